// llmproxy Envoy shim: the load-balancing policy (envoy.load_balancing_policies.dynamic_modules,
// lb_policy_name "llmproxy") that makes Envoy's retries re-pick through the library, and the
// registry through which it finds the stream it chooses for.
//
// Envoy 1.40 honours set_upstream_override_host on the first attempt only: on a retry the router
// drops it and the cluster's load balancer chooses (verified on the binary). With this policy on
// the cluster that is LbPolicy: for a stream the filter routed, any call means the picked endpoint
// could not be used (a retry after connect-failure / reset-before-request, or a non-strict
// override the cluster did not honour), so it re-picks with llmproxy_request_retry (records the
// failure, moves the accounting, never an endpoint already tried). Other requests of the cluster
// get round robin over its healthy hosts.
#ifndef LLMPROXY_ENVOY_LB_POLICY_H
#define LLMPROXY_ENVOY_LB_POLICY_H

#include <cstdint>
#include <string>

namespace llmproxy_envoy {

class Filter;

// Request header naming a routed stream for the LB policy (client copies are stripped like every
// x-llmproxy-* header).
constexpr char kTicketHeader[] = "x-llmproxy-ticket";

// Routed streams by ticket. Envoy runs a cluster's load balancer on the worker thread of the
// stream it chooses for, so each worker keeps its own registry (worker thread only).
namespace routed_streams {
uint64_t add(Filter &filter);  // a new ticket
void remove(uint64_t ticket);
}  // namespace routed_streams

// One cluster's load balancer on one worker (on_lb_new .. on_lb_destroy).
class LbPolicy {
 public:
  // Envoy's choice for one attempt: the index of a healthy host of `priority`; false = none
  // (Envoy answers 503 no_healthy_upstream).
  bool choose_host(void *lb_envoy, void *context_envoy, uint32_t *priority, uint32_t *index);

 private:
  bool repick(void *lb_envoy, Filter &filter, uint32_t *priority, uint32_t *index);
  bool round_robin(void *lb_envoy, uint32_t *priority, uint32_t *index);

  uint64_t next_ = 0;
};

}  // namespace llmproxy_envoy

#endif
