// llmproxy Envoy shim: building a filter config from its JSON, and its metrics (see
// filter_config.h).

#include "filter_config.h"

#include "common.h"
#include "llmproxy_envoy_internal.h"

namespace llmproxy_envoy {
namespace {

// Deadline of a PENDING pick when the router reports none (0: it never pends, so this only
// bounds a library that breaks its promise).
constexpr uint64_t kFallbackPickDeadlineMs = 2000;

}  // namespace

std::unique_ptr<FilterConfig> FilterConfig::create(std::string_view name, std::string_view json) {
  const std::string fname(name);
  char err[1024];
  err[0] = '\0';
  llmproxy_router *router = nullptr;
  const llmproxy_status st = llmproxy_router_new(json.data(), json.size(), &router, err, sizeof err);
  if (st != LLMPROXY_OK || router == nullptr) {
    err[sizeof err - 1] = '\0';
    log_always(ENVOY_LOG_ERROR,
               "filter \"" + fname + "\": invalid llmproxy config (status " + std::to_string(st) + "): " + err);
    llmproxy_router_free(router);
    return nullptr;
  }
  auto cfg = std::make_unique<FilterConfig>(router);
  cfg->max_body = llmproxy_router_max_body_bytes(router);
  cfg->strict = llmproxy_router_strict_override(router);
  size_t hlen = 0;
  const char *h = llmproxy_router_cluster_header(router, &hlen);
  cfg->cluster_header = lower(h && hlen ? std::string(h, hlen) : std::string("x-llmproxy-cluster"));
  size_t mlen = 0;
  const char *mp = llmproxy_router_metrics_path(router, &mlen);
  cfg->metrics_path = mp ? std::string(mp, mlen) : std::string(LLMPROXY_ENVOY_DEFAULT_METRICS_PATH);
  const uint64_t deadline = llmproxy_router_pick_deadline_ms(router);
  cfg->pick_deadline_ms = deadline ? deadline : kFallbackPickDeadlineMs;
  log_msg(ENVOY_LOG_INFO, "filter \"" + fname + "\" configured (library " + llmproxy_version() + ", max_body_bytes " +
                              std::to_string(cfg->max_body) + ", strict " + (cfg->strict ? "true" : "false") +
                              ", cluster header " + cfg->cluster_header + ")");
  return cfg;
}

std::string FilterConfig::metrics_text() const {
  std::string text;
  char *out = nullptr;
  size_t len = 0;
  if (llmproxy_router_metrics(router, &out, &len) == LLMPROXY_OK && out) text.assign(out, len);
  llmproxy_string_free(out);
  if (!text.empty() && text.back() != '\n') text += '\n';
  const ShimCounters &c = counters;
  const struct {
    const char *name, *type, *help;
    uint64_t value;
  } rows[] = {
      {"llmproxy_envoy_in_flight", "gauge", "Requests picked and not yet finished (llmproxy_router_in_flight).",
       llmproxy_router_in_flight(router)},
      {"llmproxy_envoy_intercepted_total", "counter", "Inference requests held for a pick.", c.intercepted.load()},
      {"llmproxy_envoy_passthrough_total", "counter", "Requests passed through untouched.", c.passthrough.load()},
      {"llmproxy_envoy_routed_total", "counter", "Requests forwarded to a picked endpoint.", c.routed.load()},
      {"llmproxy_envoy_local_replies_total", "counter", "Local replies sent by the shim.", c.local_replies.load()},
      {"llmproxy_envoy_pending_total", "counter", "Picks resumed through the Envoy scheduler.", c.pending.load()},
      {"llmproxy_envoy_stripped_headers_total", "counter", "Client-supplied routing headers removed.",
       c.stripped_headers.load()},
      {"llmproxy_envoy_hook_exceptions_total", "counter", "C++ exceptions caught at a hook.",
       c.hook_exceptions.load()},
      {"llmproxy_envoy_pending_timeouts_total", "counter",
       "Pending picks decided locally because the library's decision was overdue.", c.pending_timeouts.load()},
      {"llmproxy_envoy_lb_repicks_total", "counter",
       "Endpoints re-picked by the llmproxy LB policy for an Envoy retry (llmproxy_request_retry).",
       c.lb_repicks.load()},
      {"llmproxy_envoy_served_elsewhere_total", "counter",
       "Responses from a host the library did not pick (Envoy retried through another LB policy).",
       c.served_elsewhere.load()},
  };
  for (const auto &r : rows) {
    text += std::string("# HELP ") + r.name + " " + r.help + "\n# TYPE " + r.name + " " + r.type + "\n" + r.name + " " +
            std::to_string(r.value) + "\n";
  }
  return text;
}

}  // namespace llmproxy_envoy
