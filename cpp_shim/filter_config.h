// llmproxy Envoy shim: one filter config (Envoy's on_http_filter_config_new .. _destroy), the
// factory of the stream filters: the library's router built from the filter's JSON config, the
// knobs the shim reads from it once, and the shim's own counters, rendered after the router's
// metrics. Shared by every worker thread; created and destroyed on the main thread.
#ifndef LLMPROXY_ENVOY_FILTER_CONFIG_H
#define LLMPROXY_ENVOY_FILTER_CONFIG_H

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "llmproxy.h"

namespace llmproxy_envoy {

// Shim counters (Prometheus names in metrics_text()).
struct ShimCounters {
  std::atomic<uint64_t> intercepted{0};
  std::atomic<uint64_t> passthrough{0};
  std::atomic<uint64_t> routed{0};
  std::atomic<uint64_t> local_replies{0};
  std::atomic<uint64_t> pending{0};
  std::atomic<uint64_t> stripped_headers{0};
  std::atomic<uint64_t> hook_exceptions{0};
  std::atomic<uint64_t> pending_timeouts{0};
  std::atomic<uint64_t> lb_repicks{0};
  std::atomic<uint64_t> served_elsewhere{0};
};

struct FilterConfig {
  // The config of filter `name`; NULL (after logging the library's message) when the JSON is
  // invalid, and Envoy then rejects the configuration.
  static std::unique_ptr<FilterConfig> create(std::string_view name, std::string_view json);

  explicit FilterConfig(llmproxy_router *r) : router(r) {}
  ~FilterConfig() { llmproxy_router_free(router); }
  FilterConfig(const FilterConfig &) = delete;
  FilterConfig &operator=(const FilterConfig &) = delete;

  // The router's Prometheus text followed by the shim's counters.
  std::string metrics_text() const;

  llmproxy_router *const router;
  uint64_t max_body = 0;
  bool strict = true;          // set_upstream_override_host(..., strict)
  std::string cluster_header;  // lower case
  std::string metrics_path;
  uint64_t pick_deadline_ms = 0;  // longest wait for a PENDING decision
  ShimCounters counters;
};

}  // namespace llmproxy_envoy

#endif
