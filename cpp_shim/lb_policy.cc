// llmproxy Envoy shim: the retry load-balancing policy and the routed-stream registry (see
// lb_policy.h).

#include "lb_policy.h"

#include <atomic>
#include <cstdlib>
#include <optional>
#include <unordered_map>

#include "common.h"
#include "filter.h"

namespace llmproxy_envoy {
namespace {

// Endpoints the LB re-picks before giving up when Envoy does not list the library's choice as a
// healthy host of the cluster (the llmproxy and Envoy endpoint lists disagree).
constexpr int kMaxRepicks = 8;

thread_local std::unordered_map<uint64_t, Filter *> t_routed;
std::atomic<uint64_t> g_next_ticket{1};

// The routed stream an attempt is for, by its ticket header; NULL for any other request.
Filter *routed_stream(void *context) {
  envoy_buf v{nullptr, 0};
  size_t count = 0;
  if (!envoy_dynamic_module_callback_lb_context_get_downstream_header(context, mb(kTicketHeader), &v, 0, &count) ||
      !v.ptr) {
    return nullptr;
  }
  const uint64_t ticket = std::strtoull(std::string(v.ptr, v.length).c_str(), nullptr, 10);
  auto it = t_routed.find(ticket);
  return it == t_routed.end() ? nullptr : it->second;
}

bool find_healthy_host(void *lb, const std::string &address, uint32_t *priority, uint32_t *index) {
  const size_t priorities = envoy_dynamic_module_callback_lb_get_priority_set_size(lb);
  for (uint32_t p = 0; p < priorities; ++p) {
    const size_t n = envoy_dynamic_module_callback_lb_get_healthy_hosts_count(lb, p);
    for (size_t i = 0; i < n; ++i) {
      envoy_buf a{nullptr, 0};
      if (envoy_dynamic_module_callback_lb_get_healthy_host_address(lb, p, i, &a) && a.ptr && view(a) == address) {
        *priority = p;
        *index = static_cast<uint32_t>(i);
        return true;
      }
    }
  }
  return false;
}

}  // namespace

namespace routed_streams {

uint64_t add(Filter &filter) {
  const uint64_t ticket = g_next_ticket.fetch_add(1, std::memory_order_relaxed);
  t_routed[ticket] = &filter;
  return ticket;
}

void remove(uint64_t ticket) { t_routed.erase(ticket); }

}  // namespace routed_streams

bool LbPolicy::choose_host(void *lb_envoy, void *context_envoy, uint32_t *priority, uint32_t *index) {
  if (!priority || !index) return false;
  Filter *filter = context_envoy ? routed_stream(context_envoy) : nullptr;
  return filter ? repick(lb_envoy, *filter, priority, index) : round_robin(lb_envoy, priority, index);
}

// Re-picks for a routed stream whose endpoint failed; false when the cluster has no untried
// endpoint left.
bool LbPolicy::repick(void *lb_envoy, Filter &filter, uint32_t *priority, uint32_t *index) {
  for (int i = 0; i < kMaxRepicks; ++i) {
    const std::optional<std::string> endpoint = filter.retry();
    if (!endpoint) return false;
    if (find_healthy_host(lb_envoy, *endpoint, priority, index)) {
      filter.announce_endpoint(*endpoint);  // same worker thread, between two attempts: the retry sends it
      return true;
    }
  }
  return false;
}

bool LbPolicy::round_robin(void *lb_envoy, uint32_t *priority, uint32_t *index) {
  const size_t priorities = envoy_dynamic_module_callback_lb_get_priority_set_size(lb_envoy);
  for (uint32_t p = 0; p < priorities; ++p) {
    const size_t n = envoy_dynamic_module_callback_lb_get_healthy_hosts_count(lb_envoy, p);
    if (n == 0) continue;
    *priority = p;
    *index = static_cast<uint32_t>(next_++ % n);
    return true;
  }
  return false;
}

}  // namespace llmproxy_envoy
