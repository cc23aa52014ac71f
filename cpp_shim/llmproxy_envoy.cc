// llmproxy Envoy shim: an HTTP filter for Envoy's dynamic-module ABI (Envoy >= 1.40) on top of
// the llmproxy C ABI (include/llmproxy.h).
//
// Request path (inference requests only, as decided by llmproxy_router_should_intercept):
//   request_headers  strip client-supplied routing headers, raise the buffer limit, hold the stream
//   request_body     hold until end of stream; full body = Buffered + Received (see the 1.40 notes)
//   pick             llmproxy_pick_async; PENDING resumes through the Envoy scheduler, or, past the
//                    router's pick deadline, with a local decision (the shim's watchdog thread)
//   success          cluster header + clear_route_cache, set_upstream_override_host(ip:port, strict),
//                    x-llmproxy-endpoint / x-llmproxy-scene / x-llmproxy-ticket headers, dynamic
//                    metadata "llmproxy"
//   error            local reply with the library's HTTP status and JSON error body
// Retries: Envoy 1.40 drops the override host on a retry and asks the cluster's load balancer;
//          with the llmproxy LB policy (on_lb_*) that re-picks through llmproxy_request_retry.
// Response path: first response body chunk -> llmproxy_request_first_token;
//                local_reply records Envoy's (or our) reply and what it says about the endpoint;
//                stream_complete -> llmproxy_request_finish_outcome(status, outcome).
//
// No C++ exception leaves a hook: every hook body runs inside guard().

#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "envoy_dynamic_module_abi.h"
#include "llmproxy.h"
#include "llmproxy_envoy_internal.h"

// Hook symbol names: plain for the dynamic module, "<prefix>envoy_dynamic_module_on_..." for the
// static variant linked into a custom Envoy binary (compile with -DLLMPROXY_ENVOY_HOOK_PREFIX=llmproxy_).
#define LLMPROXY_CAT2(a, b) a##b
#define LLMPROXY_CAT(a, b) LLMPROXY_CAT2(a, b)
#ifdef LLMPROXY_ENVOY_HOOK_PREFIX
#define HOOK(name) LLMPROXY_CAT(LLMPROXY_ENVOY_HOOK_PREFIX, name)
#else
#define HOOK(name) name
#endif
#define LLMPROXY_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using envoy_buf = envoy_dynamic_module_type_envoy_buffer;
using module_buf = envoy_dynamic_module_type_module_buffer;
using module_header = envoy_dynamic_module_type_module_http_header;

constexpr uint64_t kResumeEvent = 1;
// Status reported when the client went away (nginx's 499 "client closed request"): before we
// forwarded the request, or before any response.
constexpr uint32_t kClientGoneStatus = 499;
// Deadline of a PENDING pick when the router reports none (0: it never pends, so this only
// bounds a library that breaks its promise).
constexpr uint64_t kFallbackPickDeadlineMs = 2000;
// Endpoints the LB re-picks before giving up when Envoy does not list the library's choice as a
// healthy host of the cluster (the llmproxy and Envoy endpoint lists disagree).
constexpr int kMaxRepicks = 8;
// Request header naming the stream for the LB policy (client copies are stripped like every
// x-llmproxy-* header).
constexpr char kTicketHeader[] = "x-llmproxy-ticket";

module_buf mb(const char *p, size_t n) { return module_buf{p, n}; }
module_buf mb(const std::string &s) { return module_buf{s.data(), s.size()}; }

void log_msg(int level, const std::string &msg) {
  if (!envoy_dynamic_module_callback_log_enabled(level)) return;
  std::string line = "llmproxy: " + msg;
  envoy_dynamic_module_callback_log(level, mb(line));
}

std::string lower(std::string s) {
  for (char &c : s)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return s;
}

bool starts_with(const std::string &s, const char *prefix) {
  size_t n = std::strlen(prefix);
  return s.size() >= n && s.compare(0, n, prefix) == 0;
}

// JSON string escaping for the few messages the shim writes itself.
std::string json_escape(const std::string &s) {
  std::string out;
  out.reserve(s.size() + 8);
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out;
}

// OpenAI-style error body, the same shape as the library's llmproxy_request_error_body.
std::string error_json(const char *type, const char *code, const std::string &message) {
  return "{\"error\":{\"message\":\"" + json_escape(message) + "\",\"type\":\"" + type +
         "\",\"param\":null,\"code\":\"" + code + "\"}}";
}

uint32_t status_to_http(llmproxy_status st) {
  switch (st) {
    case LLMPROXY_OK: return 200;
    case LLMPROXY_BAD_REQUEST:
    case LLMPROXY_INVALID_ARGUMENT: return 400;
    case LLMPROXY_MODEL_NOT_FOUND: return 404;
    case LLMPROXY_PAYLOAD_TOO_LARGE: return 413;
    case LLMPROXY_NO_ENDPOINT: return 503;
    default: return 500;
  }
}

std::string req_str(const char *(*fn)(const llmproxy_request *, size_t *), const llmproxy_request *req) {
  size_t len = 0;
  const char *p = fn(req, &len);
  return p ? std::string(p, len) : std::string();
}

struct FilterConfig {
  llmproxy_router *router = nullptr;
  uint64_t max_body = 0;
  bool strict = true;
  std::string cluster_header;  // lower case
  std::string metrics_path = LLMPROXY_ENVOY_DEFAULT_METRICS_PATH;
  uint64_t pick_deadline_ms = kFallbackPickDeadlineMs;  // longest wait for a PENDING decision

  // Shim counters, appended to the router's Prometheus text.
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

  ~FilterConfig() { llmproxy_router_free(router); }
};

// Shared between a filter (worker thread) and the library's pick callback (another thread).
struct AsyncState {
  std::mutex mu;
  void *scheduler = nullptr;          // created by the worker after PENDING; the callback commits and deletes it
  llmproxy_request *result = nullptr; // delivered decision, not yet taken
  bool delivered = false;
  bool abandoned = false;             // the stream ended before the decision was applied
  bool timed_out = false;             // the watchdog resumed the stream first: it decides locally
};

enum class Phase { Idle, Passthrough, Collecting, Pending, Routed, Replied };

struct Filter {
  FilterConfig *cfg;
  Phase phase = Phase::Idle;
  llmproxy_request *req = nullptr;
  bool forwarded = false;  // decision applied and the request continued upstream
  bool first_token = false;
  bool transcoding = false;   // the response body goes through llmproxy_request_transcode_response
  uint32_t reply_status = 0;  // status of our own local reply, if any
  std::shared_ptr<AsyncState> async;
  // Inputs of a PENDING pick, for a local decision when it is overdue.
  std::vector<std::pair<std::string, std::string>> pending_headers;
  std::string pending_body;

  // How the request ended, for llmproxy_request_finish_outcome (see finish_request).
  uint32_t upstream_status = 0;  // :status of a response the endpoint sent
  uint32_t local_status = 0;     // status of a local reply (Envoy's or ours)
  llmproxy_outcome local_outcome = LLMPROXY_OUTCOME_LOCAL;  // what that reply says of the endpoint
  bool served_elsewhere = false;  // Envoy's own LB retried on a host the library did not pick

  // Forwarded streams are registered for the LB policy under `ticket` (worker thread only).
  void *envoy = nullptr;  // this stream's Envoy filter pointer, kept while registered
  uint64_t ticket = 0;

  explicit Filter(FilterConfig *c) : cfg(c) {}
};

FilterConfig *as_config(const void *p) { return const_cast<FilterConfig *>(static_cast<const FilterConfig *>(p)); }
Filter *as_filter(const void *p) { return const_cast<Filter *>(static_cast<const Filter *>(p)); }

// Runs a hook body; no exception gets out. On an exception: count it, log it, then return
// on_exception() (itself guarded), or `fallback` if that throws too.
template <typename T, typename F, typename E>
T guard_or(const char *hook, FilterConfig *cfg, T fallback, E &&on_exception, F &&body) noexcept {
  try {
    return body();
  } catch (const std::exception &e) {
    if (cfg) cfg->hook_exceptions.fetch_add(1, std::memory_order_relaxed);
    try {
      log_msg(ENVOY_LOG_ERROR, std::string(hook) + ": exception: " + e.what());
    } catch (...) {
    }
  } catch (...) {
    if (cfg) cfg->hook_exceptions.fetch_add(1, std::memory_order_relaxed);
    try {
      log_msg(ENVOY_LOG_ERROR, std::string(hook) + ": unknown exception");
    } catch (...) {
    }
  }
  try {
    return on_exception();
  } catch (...) {
    return fallback;
  }
}

template <typename T, typename F>
T guard(const char *hook, FilterConfig *cfg, T fallback, F &&body) noexcept {
  return guard_or(hook, cfg, fallback, [fallback] { return fallback; }, std::forward<F>(body));
}

bool get_request_header(void *f, const char *name, std::string &out) {
  envoy_buf result{nullptr, 0};
  size_t count = 0;
  if (!envoy_dynamic_module_callback_http_get_header(f, ENVOY_HEADER_REQUEST, mb(name, std::strlen(name)), &result, 0,
                                                     &count) ||
      result.ptr == nullptr) {
    return false;
  }
  out.assign(result.ptr, result.length);
  return true;
}

std::vector<envoy_dynamic_module_type_envoy_http_header> request_headers(void *f) {
  std::vector<envoy_dynamic_module_type_envoy_http_header> headers(
      envoy_dynamic_module_callback_http_get_headers_size(f, ENVOY_HEADER_REQUEST));
  if (!headers.empty() && !envoy_dynamic_module_callback_http_get_headers(f, ENVOY_HEADER_REQUEST, headers.data())) {
    headers.clear();
  }
  return headers;
}

bool is_routing_header(const FilterConfig &cfg, const std::string &lname) {
  return starts_with(lname, "x-llmproxy-") || lname == "x-gateway-destination-endpoint" || lname == cfg.cluster_header;
}

// Removes every client-supplied routing header. Returns the number removed.
size_t strip_routing_headers(void *f, FilterConfig &cfg) {
  std::vector<std::string> doomed;
  for (const auto &h : request_headers(f)) {
    std::string lname = lower(std::string(h.key_ptr ? h.key_ptr : "", h.key_ptr ? h.key_length : 0));
    if (is_routing_header(cfg, lname)) doomed.push_back(std::move(lname));
  }
  for (const auto &name : doomed) {
    envoy_dynamic_module_callback_http_set_header(f, ENVOY_HEADER_REQUEST, mb(name), mb("", 0));
  }
  if (!doomed.empty()) cfg.stripped_headers.fetch_add(doomed.size(), std::memory_order_relaxed);
  return doomed.size();
}

void append_chunks(void *f, int body_type, std::string &out) {
  size_t n = envoy_dynamic_module_callback_http_get_body_chunks_size(f, body_type);
  if (n == 0) return;
  std::vector<envoy_buf> chunks(n);
  if (!envoy_dynamic_module_callback_http_get_body_chunks(f, body_type, chunks.data())) return;
  for (const auto &c : chunks)
    if (c.ptr && c.length) out.append(c.ptr, c.length);
}

void send_local_reply(void *f, Filter &flt, uint32_t status, const std::string &body, const char *content_type,
                      const char *details) {
  module_header hdr{"content-type", std::strlen("content-type"), content_type, std::strlen(content_type)};
  flt.phase = Phase::Replied;
  flt.reply_status = status;
  flt.cfg->local_replies.fetch_add(1, std::memory_order_relaxed);
  envoy_dynamic_module_callback_http_send_response(f, status, &hdr, 1, mb(body), mb(details, std::strlen(details)));
}

void send_error(void *f, Filter &flt, uint32_t status, const std::string &body) {
  send_local_reply(f, flt, status, body, "application/json", "llmproxy_error");
}

// Request path after an exception: fail closed with a 500 (never forward a request whose
// routing headers may not have been cleaned), unless a reply was already sent.
bool fail_closed(void *f, Filter &flt) {
  if (flt.phase == Phase::Replied || flt.forwarded) return false;
  flt.phase = Phase::Replied;
  send_error(f, flt, 500, error_json("server_error", "internal_error", "llmproxy filter error"));
  return true;
}

std::string metrics_text(FilterConfig &cfg) {
  std::string text;
  char *out = nullptr;
  size_t len = 0;
  if (llmproxy_router_metrics(cfg.router, &out, &len) == LLMPROXY_OK && out) {
    text.assign(out, len);
  }
  llmproxy_string_free(out);
  if (!text.empty() && text.back() != '\n') text += '\n';
  auto line = [&text](const char *name, const char *type, const char *help, uint64_t v) {
    text += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + " " +
            std::to_string(v) + "\n";
  };
  line("llmproxy_envoy_in_flight", "gauge", "Requests picked and not yet finished (llmproxy_router_in_flight).",
       llmproxy_router_in_flight(cfg.router));
  line("llmproxy_envoy_intercepted_total", "counter", "Inference requests held for a pick.", cfg.intercepted.load());
  line("llmproxy_envoy_passthrough_total", "counter", "Requests passed through untouched.", cfg.passthrough.load());
  line("llmproxy_envoy_routed_total", "counter", "Requests forwarded to a picked endpoint.", cfg.routed.load());
  line("llmproxy_envoy_local_replies_total", "counter", "Local replies sent by the shim.", cfg.local_replies.load());
  line("llmproxy_envoy_pending_total", "counter", "Picks resumed through the Envoy scheduler.", cfg.pending.load());
  line("llmproxy_envoy_stripped_headers_total", "counter", "Client-supplied routing headers removed.",
       cfg.stripped_headers.load());
  line("llmproxy_envoy_hook_exceptions_total", "counter", "C++ exceptions caught at a hook.",
       cfg.hook_exceptions.load());
  line("llmproxy_envoy_pending_timeouts_total", "counter",
       "Pending picks decided locally because the library's decision was overdue.", cfg.pending_timeouts.load());
  line("llmproxy_envoy_lb_repicks_total", "counter",
       "Endpoints re-picked by the llmproxy LB policy for an Envoy retry (llmproxy_request_retry).",
       cfg.lb_repicks.load());
  line("llmproxy_envoy_served_elsewhere_total", "counter",
       "Responses from a host the library did not pick (Envoy retried through another LB policy).",
       cfg.served_elsewhere.load());
  return text;
}

// Replaces the whole request body (held in Envoy's buffers at decision time) with `body`.
void replace_request_body(void *f, const uint8_t *body, size_t len) {
  const module_buf data = mb(reinterpret_cast<const char *>(body), len);
  const size_t received = envoy_dynamic_module_callback_http_get_body_size(f, ENVOY_BODY_RECEIVED_REQUEST);
  if (envoy_dynamic_module_callback_http_received_buffered_request_body(f)) {
    // The current frame is the buffered body itself (an earlier filter buffered it).
    envoy_dynamic_module_callback_http_drain_body(f, ENVOY_BODY_RECEIVED_REQUEST, received);
    envoy_dynamic_module_callback_http_append_body(f, ENVOY_BODY_RECEIVED_REQUEST, data);
  } else {
    const size_t buffered = envoy_dynamic_module_callback_http_get_body_size(f, ENVOY_BODY_BUFFERED_REQUEST);
    if (received) envoy_dynamic_module_callback_http_drain_body(f, ENVOY_BODY_RECEIVED_REQUEST, received);
    if (buffered) envoy_dynamic_module_callback_http_drain_body(f, ENVOY_BODY_BUFFERED_REQUEST, buffered);
    envoy_dynamic_module_callback_http_append_body(
        f, buffered ? ENVOY_BODY_BUFFERED_REQUEST : ENVOY_BODY_RECEIVED_REQUEST, data);
  }
  std::string cl;
  if (get_request_header(f, "content-length", cl)) {
    envoy_dynamic_module_callback_http_set_header(f, ENVOY_HEADER_REQUEST, mb("content-length", 14),
                                                  mb(std::to_string(len)));
  }
}

// ---- Forwarded streams, for the LB policy (worker thread only) ----
// Envoy runs a cluster's load balancer on the worker thread of the stream it chooses for, so
// each worker keeps its own map; the LB finds the stream by the x-llmproxy-ticket header.
thread_local std::unordered_map<uint64_t, Filter *> t_streams;
std::atomic<uint64_t> g_next_ticket{1};

void register_stream(void *f, Filter &flt) {
  flt.envoy = f;
  flt.ticket = g_next_ticket.fetch_add(1, std::memory_order_relaxed);
  t_streams[flt.ticket] = &flt;
  envoy_dynamic_module_callback_http_set_header(f, ENVOY_HEADER_REQUEST, mb(kTicketHeader, sizeof kTicketHeader - 1),
                                                mb(std::to_string(flt.ticket)));
}

void unregister_stream(Filter &flt) {
  if (flt.ticket) t_streams.erase(flt.ticket);
  flt.ticket = 0;
  flt.envoy = nullptr;
}

// Applies a pick result on the worker thread. Returns true when the request may continue upstream.
bool apply_decision(void *f, Filter &flt, llmproxy_request *req) {
  flt.req = req;
  llmproxy_status st = llmproxy_request_status(req);
  uint32_t http = llmproxy_request_http_status(req);
  if (st != LLMPROXY_OK || http != 200) {
    if (http < 400 || http > 599) http = status_to_http(st == LLMPROXY_OK ? LLMPROXY_INTERNAL : st);
    std::string body = req_str(llmproxy_request_error_body, req);
    if (body.empty()) body = error_json("server_error", "internal_error", "request could not be routed");
    send_error(f, flt, http, body);
    return false;
  }
  std::string endpoint = req_str(llmproxy_request_endpoint, req);
  std::string cluster = req_str(llmproxy_request_cluster, req);
  if (!cluster.empty()) {
    envoy_dynamic_module_callback_http_set_header(f, ENVOY_HEADER_REQUEST, mb(flt.cfg->cluster_header), mb(cluster));
    envoy_dynamic_module_callback_http_clear_route_cache(f);
  }
  if (endpoint.empty() ||
      !envoy_dynamic_module_callback_http_set_upstream_override_host(f, mb(endpoint), flt.cfg->strict)) {
    log_msg(ENVOY_LOG_ERROR, "endpoint \"" + endpoint + "\" is not a literal ip:port; refusing the request");
    send_error(f, flt, 503, error_json("service_unavailable_error", "no_endpoint", "picked endpoint is not usable by Envoy: " + endpoint));
    return false;
  }
  std::string scene = req_str(llmproxy_request_scene, req);
  std::string model = req_str(llmproxy_request_model, req);
  std::string backend = req_str(llmproxy_request_backend, req);
  std::string upstream_model = req_str(llmproxy_request_upstream_model, req);
  if (upstream_model == model) upstream_model.clear();
  // Upstream rewrites decided by the library (target_model / LoRA model, Triton generate).
  std::string upstream_path = req_str(llmproxy_request_upstream_path, req);
  if (!upstream_path.empty()) {
    envoy_dynamic_module_callback_http_set_header(f, ENVOY_HEADER_REQUEST, mb(":path", 5), mb(upstream_path));
    envoy_dynamic_module_callback_http_clear_route_cache(f);
  }
  size_t upstream_body_len = 0;
  const uint8_t *upstream_body = llmproxy_request_upstream_body(req, &upstream_body_len);
  if (upstream_body) replace_request_body(f, upstream_body, upstream_body_len);
  envoy_dynamic_module_callback_http_set_header(f, ENVOY_HEADER_REQUEST, mb("x-llmproxy-endpoint", 19), mb(endpoint));
  if (!scene.empty()) {
    envoy_dynamic_module_callback_http_set_header(f, ENVOY_HEADER_REQUEST, mb("x-llmproxy-scene", 16), mb(scene));
  }
  const module_buf ns = mb("llmproxy", 8);
  const std::pair<const char *, const std::string *> meta[] = {
      {"endpoint", &endpoint}, {"cluster", &cluster}, {"model", &model},
      {"scene", &scene},       {"backend", &backend}, {"upstream_model", &upstream_model}};
  for (const auto &kv : meta) {
    if (kv.second->empty()) continue;
    envoy_dynamic_module_callback_http_set_dynamic_metadata_string(f, ns, mb(kv.first, std::strlen(kv.first)),
                                                                   mb(*kv.second));
  }
  register_stream(f, flt);
  flt.phase = Phase::Routed;
  flt.forwarded = true;
  flt.cfg->routed.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// ---- Deadline for PENDING picks ----
// Envoy 1.40's HTTP filter ABI has no timer, so one shim-wide thread (started at the first
// PENDING pick) watches the deadlines. It never touches a filter or a stream: when a decision is
// overdue it marks the shared state timed out and commits the stream's scheduler event (allowed
// from any thread; a no-op once the stream is gone); the worker then decides locally in
// on_scheduled. A decision that arrives later is finished by the library's callback.
class PickWatchdog {
 public:
  using Clock = std::chrono::steady_clock;

  static PickWatchdog &instance() {
    static PickWatchdog *w = new PickWatchdog();  // never destroyed: its thread may outlive main()
    return *w;
  }

  // Returns false when the watchdog thread cannot run (the stream then waits for the callback).
  bool watch(const std::shared_ptr<AsyncState> &st, uint64_t deadline_ms) noexcept {
    try {
      std::lock_guard<std::mutex> lock(mu_);
      if (!started_) {
        std::thread([this] { run(); }).detach();
        started_ = true;
      }
      due_.emplace(Clock::now() + std::chrono::milliseconds(deadline_ms), st);
      cv_.notify_one();
      return true;
    } catch (...) {
      return false;
    }
  }

 private:
  void run() noexcept {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (due_.empty()) {
        cv_.wait(lock);
      } else if (Clock::now() < due_.begin()->first) {
        cv_.wait_until(lock, due_.begin()->first);
      } else {
        std::shared_ptr<AsyncState> st = due_.begin()->second.lock();
        due_.erase(due_.begin());
        lock.unlock();
        if (st) expire(*st);
        lock.lock();
      }
    }
  }

  static void expire(AsyncState &st) noexcept {
    void *sched = nullptr;
    bool resume = false;
    {
      std::lock_guard<std::mutex> lock(st.mu);
      if (st.delivered || st.scheduler == nullptr) return;  // decided in time (or already expired)
      sched = st.scheduler;  // whoever takes the scheduler out deletes it
      st.scheduler = nullptr;
      st.timed_out = true;
      resume = !st.abandoned;
    }
    if (resume) envoy_dynamic_module_callback_http_filter_scheduler_commit(sched, kResumeEvent);
    envoy_dynamic_module_callback_http_filter_scheduler_delete(sched);
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::multimap<Clock::time_point, std::weak_ptr<AsyncState>> due_;
  bool started_ = false;
};

// Called by the library on another thread when a PENDING pick is decided. Touches no filter or
// Envoy stream object: it only hands the decision over and wakes the worker through the scheduler.
// A decision for a stream that is gone, or that the watchdog already resumed, is finished here.
void on_pick_done(void *user_data, llmproxy_request *req) noexcept {
  try {
    auto *holder = static_cast<std::shared_ptr<AsyncState> *>(user_data);
    std::shared_ptr<AsyncState> st = std::move(*holder);
    delete holder;
    void *sched = nullptr;
    bool orphan = false;
    {
      std::lock_guard<std::mutex> lock(st->mu);
      sched = st->scheduler;
      st->scheduler = nullptr;
      if (st->abandoned || st->timed_out) {
        orphan = true;
      } else {
        st->result = req;
        st->delivered = true;
      }
    }
    if (orphan) llmproxy_request_finish_outcome(req, kClientGoneStatus, LLMPROXY_OUTCOME_LOCAL);
    if (sched) {
      if (!orphan) envoy_dynamic_module_callback_http_filter_scheduler_commit(sched, kResumeEvent);
      envoy_dynamic_module_callback_http_filter_scheduler_delete(sched);
    }
  } catch (...) {
    // Nothing sensible to do on a foreign thread; never let it unwind into the library.
  }
}

// The library's decision is overdue: decide now from local data (llmproxy_pick never waits).
llmproxy_request *decide_locally(Filter &flt) {
  flt.cfg->pending_timeouts.fetch_add(1, std::memory_order_relaxed);
  log_msg(ENVOY_LOG_WARN, "pick decision overdue after " + std::to_string(flt.cfg->pick_deadline_ms) +
                              " ms; deciding from local data");
  std::vector<llmproxy_header> lh;
  lh.reserve(flt.pending_headers.size());
  for (const auto &h : flt.pending_headers)
    lh.push_back(llmproxy_header{h.first.data(), h.first.size(), h.second.data(), h.second.size()});
  llmproxy_request *req = nullptr;
  llmproxy_pick(flt.cfg->router, lh.data(), lh.size(), reinterpret_cast<const uint8_t *>(flt.pending_body.data()),
                flt.pending_body.size(), &req);
  return req;
}

enum class PickOutcome { Routed, Replied, Pending };

PickOutcome do_pick(void *f, Filter &flt, std::string body) {
  std::vector<envoy_dynamic_module_type_envoy_http_header> hdrs = request_headers(f);
  std::vector<llmproxy_header> lh;
  lh.reserve(hdrs.size());
  for (const auto &h : hdrs) {
    if (!h.key_ptr) continue;
    lh.push_back(llmproxy_header{h.key_ptr, h.key_length, h.value_ptr ? h.value_ptr : "", h.value_ptr ? h.value_length : 0});
  }
  auto state = std::make_shared<AsyncState>();
  auto *holder = new std::shared_ptr<AsyncState>(state);
  llmproxy_request *req = nullptr;
  llmproxy_status st =
      llmproxy_pick_async(flt.cfg->router, lh.data(), lh.size(), reinterpret_cast<const uint8_t *>(body.data()),
                          body.size(), on_pick_done, holder, &req);
  if (st == LLMPROXY_PENDING) {
    // The callback now owns `holder`. The scheduler is only created for a real PENDING (none on
    // the synchronous hot path); if the decision already arrived meanwhile, apply it right here.
    {
      std::lock_guard<std::mutex> lock(state->mu);
      if (state->delivered) {
        req = state->result;
        state->result = nullptr;
      } else {
        state->scheduler = envoy_dynamic_module_callback_http_filter_scheduler_new(f);
      }
    }
    if (req == nullptr) {
      // Keep what a local decision needs if the library's is overdue.
      flt.pending_headers.reserve(lh.size());
      for (const auto &h : lh) flt.pending_headers.emplace_back(std::string(h.name, h.name_len), std::string(h.value, h.value_len));
      flt.pending_body = std::move(body);
      flt.async = std::move(state);
      flt.phase = Phase::Pending;
      flt.cfg->pending.fetch_add(1, std::memory_order_relaxed);
      PickWatchdog::instance().watch(flt.async, flt.cfg->pick_deadline_ms);
      return PickOutcome::Pending;
    }
    return apply_decision(f, flt, req) ? PickOutcome::Routed : PickOutcome::Replied;
  }
  delete holder;
  if (req == nullptr) {
    // Contract says *out is always set; be defensive anyway.
    uint32_t http = status_to_http(st == LLMPROXY_OK ? LLMPROXY_INTERNAL : st);
    send_error(f, flt, http, error_json("server_error", "internal_error", "pick failed without a decision"));
    return PickOutcome::Replied;
  }
  return apply_decision(f, flt, req) ? PickOutcome::Routed : PickOutcome::Replied;
}

void reply_too_large(void *f, Filter &flt, uint64_t size, bool exact) {
  send_error(f, flt, 413,
             error_json("invalid_request_error", "request_too_large",
                        "request body of " + std::string(exact ? "" : "more than ") +
                            std::to_string(exact ? size : flt.cfg->max_body) + " bytes is larger than the limit of " +
                            std::to_string(flt.cfg->max_body) + " bytes"));
}

uint32_t response_status(void *f) {
  envoy_buf st{nullptr, 0};
  size_t count = 0;
  if (envoy_dynamic_module_callback_http_get_header(f, ENVOY_HEADER_RESPONSE, mb(":status", 7), &st, 0, &count) &&
      st.ptr) {
    return static_cast<uint32_t>(std::strtoul(std::string(st.ptr, st.length).c_str(), nullptr, 10));
  }
  uint64_t code = 0;
  return envoy_dynamic_module_callback_http_filter_get_attribute_int(f, ENVOY_ATTRIBUTE_RESPONSE_CODE, &code)
             ? static_cast<uint32_t>(code)
             : 0;
}

// A response from an endpoint: its status, and whether it came from the endpoint the library
// picked. It does not when Envoy retried through a cluster LB other than llmproxy's (the override
// host only holds for the first attempt): then the picked endpoint failed, and the library never
// heard of the host that answered.
void note_upstream_response(void *f, Filter &flt) {
  flt.upstream_status = response_status(f);
  envoy_buf host{nullptr, 0};
  if (flt.served_elsewhere ||
      !envoy_dynamic_module_callback_http_filter_get_attribute_string(f, ENVOY_ATTRIBUTE_UPSTREAM_ADDRESS, &host) ||
      !host.ptr) {
    return;
  }
  const std::string picked = req_str(llmproxy_request_endpoint, flt.req);
  if (picked.empty() || picked.compare(0, std::string::npos, host.ptr, host.length) == 0) return;
  flt.served_elsewhere = true;
  if (flt.cfg->served_elsewhere.fetch_add(1, std::memory_order_relaxed) == 0) {
    log_msg(ENVOY_LOG_WARN, "a retry was served by " + std::string(host.ptr, host.length) + ", not by the picked " +
                                picked + ": give the cluster the llmproxy load-balancing policy (docs/envoy.md)");
  }
}

// What a local reply (Envoy's or ours) says about the endpoint, from its details string
// (Envoy 1.40, checked end to end): only a connection that failed, or was closed or reset before
// any response byte ("upstream_reset_before_response_started{connection_failure...}",
// "{connection_termination}", "{remote_reset}", ...), is the endpoint's failure. Route and
// per-try timeouts ("response_timeout", "upstream_per_try_timeout"), "no_healthy_upstream",
// Envoy's own resets ("{overflow}" of a circuit breaker, "{local_reset}") and our own replies
// say nothing about it: a client can cause all of those.
llmproxy_outcome local_reply_outcome(const std::string &details) {
  if (!starts_with(details, "upstream_reset_before_response_started")) return LLMPROXY_OUTCOME_LOCAL;
  if (details.find("overflow") != std::string::npos || details.find("local_reset") != std::string::npos) {
    return LLMPROXY_OUTCOME_LOCAL;
  }
  return LLMPROXY_OUTCOME_ENDPOINT_FAILED;
}

// Finishes the request exactly once: the status the client got and what it says of the endpoint.
//
//   never forwarded (our reply, client gone while deciding)  our status or 499   LOCAL
//   forwarded, then a local reply (Envoy's router)           its status          local_reply_outcome
//   forwarded, a response from the endpoint                  its status          UPSTREAM (502-504 fail)
//     ... but from a host the library did not pick           its status          ENDPOINT_FAILED (the pick)
//   forwarded, no response at all (client went away)        499                 LOCAL
void finish_request(Filter &flt) {
  if (flt.async) {
    llmproxy_request *orphan = nullptr;
    {
      std::lock_guard<std::mutex> lock(flt.async->mu);
      flt.async->abandoned = true;
      if (flt.async->delivered && flt.async->result) {
        orphan = flt.async->result;
        flt.async->result = nullptr;
      }
    }
    if (orphan) llmproxy_request_finish_outcome(orphan, kClientGoneStatus, LLMPROXY_OUTCOME_LOCAL);
    flt.async.reset();
  }
  unregister_stream(flt);
  if (!flt.req) return;
  uint32_t status = kClientGoneStatus;
  llmproxy_outcome outcome = LLMPROXY_OUTCOME_LOCAL;
  if (!flt.forwarded) {
    if (flt.reply_status) status = flt.reply_status;
  } else if (flt.local_status) {
    status = flt.local_status;
    outcome = flt.local_outcome;
  } else if (flt.upstream_status) {
    status = flt.upstream_status;
    outcome = flt.served_elsewhere ? LLMPROXY_OUTCOME_ENDPOINT_FAILED : LLMPROXY_OUTCOME_UPSTREAM;
  }
  llmproxy_request *req = flt.req;
  flt.req = nullptr;
  llmproxy_request_finish_outcome(req, status, outcome);
}

// ---- Load-balancing policy: Envoy retries re-pick through the library ----
// Envoy 1.40 honours set_upstream_override_host on the first attempt only: on a retry the
// router drops it and the cluster's load balancer chooses (verified on the binary). With the
// llmproxy policy on the cluster that is this LB: for a stream the filter routed, any call means
// the picked endpoint could not be used (a retry after connect-failure / reset-before-request,
// or a non-strict override the cluster did not honour), so it re-picks with
// llmproxy_request_retry (records the failure, moves the accounting, never an endpoint already
// tried). Other requests of the cluster get round robin over its healthy hosts.
struct Lb {
  uint64_t next = 0;
};

Filter *routed_stream(void *ctx) {
  envoy_buf v{nullptr, 0};
  size_t count = 0;
  if (!envoy_dynamic_module_callback_lb_context_get_downstream_header(
          ctx, mb(kTicketHeader, sizeof kTicketHeader - 1), &v, 0, &count) ||
      !v.ptr) {
    return nullptr;
  }
  uint64_t ticket = std::strtoull(std::string(v.ptr, v.length).c_str(), nullptr, 10);
  auto it = t_streams.find(ticket);
  return it == t_streams.end() ? nullptr : it->second;
}

bool find_healthy_host(void *lb, const std::string &address, uint32_t *priority, uint32_t *index) {
  const size_t priorities = envoy_dynamic_module_callback_lb_get_priority_set_size(lb);
  for (uint32_t p = 0; p < priorities; ++p) {
    const size_t n = envoy_dynamic_module_callback_lb_get_healthy_hosts_count(lb, p);
    for (size_t i = 0; i < n; ++i) {
      envoy_buf a{nullptr, 0};
      if (envoy_dynamic_module_callback_lb_get_healthy_host_address(lb, p, i, &a) && a.ptr &&
          address.compare(0, std::string::npos, a.ptr, a.length) == 0) {
        *priority = p;
        *index = static_cast<uint32_t>(i);
        return true;
      }
    }
  }
  return false;
}

bool round_robin(void *lb, Lb &state, uint32_t *priority, uint32_t *index) {
  const size_t priorities = envoy_dynamic_module_callback_lb_get_priority_set_size(lb);
  for (uint32_t p = 0; p < priorities; ++p) {
    const size_t n = envoy_dynamic_module_callback_lb_get_healthy_hosts_count(lb, p);
    if (n == 0) continue;
    *priority = p;
    *index = static_cast<uint32_t>(state.next++ % n);
    return true;
  }
  return false;
}

// Re-picks for a routed stream whose endpoint failed; false (Envoy answers 503
// no_healthy_upstream) when the cluster has no untried endpoint left.
bool repick(void *lb, Filter &flt, uint32_t *priority, uint32_t *index) {
  for (int i = 0; i < kMaxRepicks; ++i) {
    const std::string failed = req_str(llmproxy_request_endpoint, flt.req);
    if (llmproxy_request_retry(flt.req) != LLMPROXY_OK) {
      log_msg(ENVOY_LOG_WARN, "endpoint " + failed + " failed and no untried endpoint is left");
      return false;
    }
    flt.cfg->lb_repicks.fetch_add(1, std::memory_order_relaxed);
    const std::string endpoint = req_str(llmproxy_request_endpoint, flt.req);
    log_msg(ENVOY_LOG_INFO, "endpoint " + failed + " failed; retrying on " + endpoint);
    if (find_healthy_host(lb, endpoint, priority, index)) {
      // Same worker thread, between two attempts: the retry sends these.
      envoy_dynamic_module_callback_http_set_header(flt.envoy, ENVOY_HEADER_REQUEST, mb("x-llmproxy-endpoint", 19),
                                                    mb(endpoint));
      envoy_dynamic_module_callback_http_set_dynamic_metadata_string(flt.envoy, mb("llmproxy", 8), mb("endpoint", 8),
                                                                     mb(endpoint));
      return true;
    }
  }
  return false;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Internal accessor for the fake-host tests.
extern "C" llmproxy_router *llmproxy_envoy_config_router(const void *filter_config_module_ptr) {
  return filter_config_module_ptr ? as_config(filter_config_module_ptr)->router : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Hooks.

// Envoy may dlclose the module when its last config goes (dynamic_module_config.do_not_close
// false), while threads that run its code still live: the library's lookup threads finish on
// their own after llmproxy_router_free, and the shim's watchdog never ends. So the module pins
// itself in memory (RTLD_NODELETE) when loaded. Nothing to pin when linked into Envoy statically.
static void pin_module_in_memory() {
#ifndef LLMPROXY_ENVOY_HOOK_PREFIX
  Dl_info info{};
  if (dladdr(reinterpret_cast<void *>(&pin_module_in_memory), &info) != 0 && info.dli_fname != nullptr) {
    // The extra reference is never released: the module stays mapped until the process exits.
    (void)dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  }
#endif
}

LLMPROXY_EXPORT const char *HOOK(envoy_dynamic_module_on_program_init)(void) {
  pin_module_in_memory();
  return LLMPROXY_ENVOY_ABI_VERSION;
}

LLMPROXY_EXPORT const void *HOOK(envoy_dynamic_module_on_http_filter_config_new)(void *filter_config_envoy_ptr,
                                                                                envoy_buf name, envoy_buf config) {
  (void)filter_config_envoy_ptr;
  return guard<const void *>("config_new", nullptr, nullptr, [&]() -> const void * {
    std::string fname(name.ptr ? name.ptr : "", name.ptr ? name.length : 0);
    char err[1024];
    err[0] = '\0';
    llmproxy_router *router = nullptr;
    const char *cfg_ptr = config.ptr ? config.ptr : "";
    size_t cfg_len = config.ptr ? config.length : 0;
    llmproxy_status st = llmproxy_router_new(cfg_ptr, cfg_len, &router, err, sizeof err);
    if (st != LLMPROXY_OK || router == nullptr) {
      err[sizeof err - 1] = '\0';
      std::string msg = "filter \"" + fname + "\": invalid llmproxy config (status " + std::to_string(st) + "): " + err;
      // Always visible: the config is about to be rejected.
      envoy_dynamic_module_callback_log(ENVOY_LOG_ERROR, mb("llmproxy: " + msg));
      llmproxy_router_free(router);
      return nullptr;
    }
    auto cfg = std::make_unique<FilterConfig>();
    cfg->router = router;
    cfg->max_body = llmproxy_router_max_body_bytes(router);
    cfg->strict = llmproxy_router_strict_override(router);
    size_t hlen = 0;
    const char *h = llmproxy_router_cluster_header(router, &hlen);
    cfg->cluster_header = lower(h && hlen ? std::string(h, hlen) : std::string("x-llmproxy-cluster"));
    size_t mlen = 0;
    const char *mp = llmproxy_router_metrics_path(router, &mlen);
    cfg->metrics_path = mp ? std::string(mp, mlen) : std::string(LLMPROXY_ENVOY_DEFAULT_METRICS_PATH);
    if (uint64_t ms = llmproxy_router_pick_deadline_ms(router)) cfg->pick_deadline_ms = ms;
    log_msg(ENVOY_LOG_INFO, "filter \"" + fname + "\" configured (library " + llmproxy_version() +
                                ", max_body_bytes " + std::to_string(cfg->max_body) + ", strict " +
                                (cfg->strict ? "true" : "false") + ", cluster header " + cfg->cluster_header + ")");
    return cfg.release();
  });
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_config_destroy)(const void *filter_config_module_ptr) {
  guard<int>("config_destroy", nullptr, 0, [&] {
    delete as_config(filter_config_module_ptr);
    return 0;
  });
}

LLMPROXY_EXPORT const void *HOOK(envoy_dynamic_module_on_http_filter_new)(const void *filter_config_module_ptr,
                                                                         void *filter_envoy_ptr) {
  (void)filter_envoy_ptr;
  FilterConfig *cfg = as_config(filter_config_module_ptr);
  return guard<const void *>("filter_new", cfg, nullptr, [&]() -> const void * {
    if (!cfg) return nullptr;
    return new Filter(cfg);
  });
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_destroy)(const void *filter_module_ptr) {
  Filter *flt = as_filter(filter_module_ptr);
  guard<int>("filter_destroy", flt ? flt->cfg : nullptr, 0, [&] {
    if (!flt) return 0;
    finish_request(*flt);  // normally already done in stream_complete
    delete flt;
    return 0;
  });
}

LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_request_headers)(void *f, const void *m,
                                                                             bool end_of_stream) {
  Filter *flt = as_filter(m);
  if (!flt) return ENVOY_HEADERS_CONTINUE;
  FilterConfig &cfg = *flt->cfg;
  auto on_exception = [&]() -> int {
    return fail_closed(f, *flt) ? ENVOY_HEADERS_STOP_ITERATION : ENVOY_HEADERS_CONTINUE;
  };
  return guard_or<int>("request_headers", &cfg, ENVOY_HEADERS_CONTINUE, on_exception, [&]() -> int {
    std::string method, path;
    get_request_header(f, ":method", method);
    get_request_header(f, ":path", path);
    std::string bare_path = path.substr(0, path.find('?'));

    if (!cfg.metrics_path.empty() && method == "GET" && bare_path == cfg.metrics_path) {
      send_local_reply(f, *flt, 200, metrics_text(cfg), "text/plain; version=0.0.4; charset=utf-8",
                       "llmproxy_metrics");
      return ENVOY_HEADERS_STOP_ITERATION;
    }

    // A client never chooses the endpoint or the cluster, on any request.
    if (strip_routing_headers(f, cfg) > 0) envoy_dynamic_module_callback_http_clear_route_cache(f);

    if (!llmproxy_router_should_intercept(cfg.router, method.data(), method.size(), path.data(), path.size())) {
      flt->phase = Phase::Passthrough;
      cfg.passthrough.fetch_add(1, std::memory_order_relaxed);
      return ENVOY_HEADERS_CONTINUE;
    }
    cfg.intercepted.fetch_add(1, std::memory_order_relaxed);
    flt->phase = Phase::Collecting;

    std::string content_length;
    if (get_request_header(f, "content-length", content_length)) {
      char *end = nullptr;
      unsigned long long n = std::strtoull(content_length.c_str(), &end, 10);
      if (end && *end == '\0' && !content_length.empty() && n > cfg.max_body) {
        reply_too_large(f, *flt, n, true);
        return ENVOY_HEADERS_STOP_ITERATION;
      }
    }
    if (end_of_stream) {
      // No body at all: the library answers 400 for an empty body.
      PickOutcome o = do_pick(f, *flt, std::string());
      return o == PickOutcome::Routed ? ENVOY_HEADERS_CONTINUE : ENVOY_HEADERS_STOP_ITERATION;
    }
    if (envoy_dynamic_module_callback_http_get_buffer_limit(f) < cfg.max_body) {
      envoy_dynamic_module_callback_http_set_buffer_limit(f, cfg.max_body);
    }
    return ENVOY_HEADERS_STOP_ITERATION;
  });
}

LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_request_body)(void *f, const void *m,
                                                                          bool end_of_stream) {
  Filter *flt = as_filter(m);
  if (!flt) return ENVOY_BODY_CONTINUE;
  auto on_exception = [&]() -> int {
    return fail_closed(f, *flt) ? ENVOY_BODY_STOP_ITERATION_NO_BUFFER : ENVOY_BODY_CONTINUE;
  };
  return guard_or<int>("request_body", flt->cfg, ENVOY_BODY_CONTINUE, on_exception, [&]() -> int {
    switch (flt->phase) {
      case Phase::Collecting: break;
      case Phase::Pending: return ENVOY_BODY_STOP_ITERATION_AND_BUFFER;
      case Phase::Replied: return ENVOY_BODY_STOP_ITERATION_NO_BUFFER;
      default: return ENVOY_BODY_CONTINUE;
    }
    const bool already_buffered = envoy_dynamic_module_callback_http_received_buffered_request_body(f);
    uint64_t total = envoy_dynamic_module_callback_http_get_body_size(f, ENVOY_BODY_RECEIVED_REQUEST);
    if (!already_buffered) total += envoy_dynamic_module_callback_http_get_body_size(f, ENVOY_BODY_BUFFERED_REQUEST);
    if (total > flt->cfg->max_body) {
      reply_too_large(f, *flt, total, false);
      return ENVOY_BODY_STOP_ITERATION_NO_BUFFER;
    }
    if (!end_of_stream) return ENVOY_BODY_STOP_ITERATION_AND_BUFFER;
    std::string body;
    body.reserve(total);
    if (!already_buffered) append_chunks(f, ENVOY_BODY_BUFFERED_REQUEST, body);
    append_chunks(f, ENVOY_BODY_RECEIVED_REQUEST, body);
    switch (do_pick(f, *flt, std::move(body))) {
      case PickOutcome::Routed: return ENVOY_BODY_CONTINUE;
      case PickOutcome::Pending: return ENVOY_BODY_STOP_ITERATION_AND_BUFFER;
      case PickOutcome::Replied: break;
    }
    return ENVOY_BODY_STOP_ITERATION_NO_BUFFER;
  });
}

LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_request_trailers)(void *f, const void *m) {
  Filter *flt = as_filter(m);
  if (!flt) return ENVOY_TRAILERS_CONTINUE;
  auto on_exception = [&]() -> int {
    return fail_closed(f, *flt) ? ENVOY_TRAILERS_STOP_ITERATION : ENVOY_TRAILERS_CONTINUE;
  };
  return guard_or<int>("request_trailers", flt->cfg, ENVOY_TRAILERS_CONTINUE, on_exception, [&]() -> int {
    if (flt->phase == Phase::Pending || flt->phase == Phase::Replied) return ENVOY_TRAILERS_STOP_ITERATION;
    if (flt->phase != Phase::Collecting) return ENVOY_TRAILERS_CONTINUE;
    // Trailers end the stream: the whole body is in the buffer now.
    std::string body;
    append_chunks(f, ENVOY_BODY_BUFFERED_REQUEST, body);
    if (body.size() > flt->cfg->max_body) {
      reply_too_large(f, *flt, body.size(), true);
      return ENVOY_TRAILERS_STOP_ITERATION;
    }
    return do_pick(f, *flt, std::move(body)) == PickOutcome::Routed ? ENVOY_TRAILERS_CONTINUE : ENVOY_TRAILERS_STOP_ITERATION;
  });
}

LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_response_headers)(void *f, const void *m,
                                                                              bool end_of_stream) {
  (void)f;
  Filter *flt = as_filter(m);
  if (!flt) return ENVOY_HEADERS_CONTINUE;
  return guard<int>("response_headers", flt->cfg, ENVOY_HEADERS_CONTINUE, [&]() -> int {
    // Local replies (ours, the router's) were announced to on_http_filter_local_reply first.
    if (flt->req && flt->forwarded && flt->local_status == 0) note_upstream_response(f, *flt);
    if (flt->req && flt->forwarded && llmproxy_request_needs_transcoding(flt->req)) {
      // The library rewrites the response (e.g. Triton generate -> OpenAI): status, type, length.
      flt->transcoding = true;
      const uint32_t upstream_status = response_status(f);
      uint32_t status = llmproxy_request_response_status(flt->req, upstream_status);
      if (status != upstream_status && status >= 100 && status <= 599) {
        envoy_dynamic_module_callback_http_set_header(f, ENVOY_HEADER_RESPONSE, mb(":status", 7),
                                                      mb(std::to_string(status)));
      }
      envoy_dynamic_module_callback_http_set_header(f, ENVOY_HEADER_RESPONSE, mb("content-length", 14), mb("", 0));
      std::string ct = req_str(llmproxy_request_response_content_type, flt->req);
      if (!ct.empty()) {
        envoy_dynamic_module_callback_http_set_header(f, ENVOY_HEADER_RESPONSE, mb("content-type", 12), mb(ct));
      }
    }
    if (end_of_stream && flt->req && flt->forwarded && !flt->first_token) {
      // A response without a body is complete as far as prefill is concerned.
      flt->first_token = true;
      llmproxy_request_first_token(flt->req);
    }
    return ENVOY_HEADERS_CONTINUE;
  });
}

LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_response_body)(void *f, const void *m,
                                                                           bool end_of_stream) {
  (void)f;
  (void)end_of_stream;
  Filter *flt = as_filter(m);
  if (!flt) return ENVOY_BODY_CONTINUE;
  return guard<int>("response_body", flt->cfg, ENVOY_BODY_CONTINUE, [&]() -> int {
    if (flt->transcoding && flt->req) {
      // Replace this chunk with what the transcoder makes of it (it also marks the first token).
      std::string in;
      append_chunks(f, ENVOY_BODY_RECEIVED_RESPONSE, in);
      const uint8_t *out = nullptr;
      size_t out_len = 0;
      llmproxy_status st = llmproxy_request_transcode_response(
          flt->req, reinterpret_cast<const uint8_t *>(in.data()), in.size(), end_of_stream, &out, &out_len);
      if (st != LLMPROXY_OK) {
        log_msg(ENVOY_LOG_WARN, "response transcoding failed (status " + std::to_string(st) + ")");
        out = nullptr;
        out_len = 0;
      }
      std::string replacement(out ? reinterpret_cast<const char *>(out) : "", out ? out_len : 0);
      if (!in.empty()) envoy_dynamic_module_callback_http_drain_body(f, ENVOY_BODY_RECEIVED_RESPONSE, in.size());
      if (!replacement.empty()) {
        envoy_dynamic_module_callback_http_append_body(f, ENVOY_BODY_RECEIVED_RESPONSE, mb(replacement));
      }
      flt->first_token = true;
      return ENVOY_BODY_CONTINUE;
    }
    if (flt->req && flt->forwarded && !flt->first_token) {
      flt->first_token = true;
      llmproxy_request_first_token(flt->req);
    }
    return ENVOY_BODY_CONTINUE;  // never buffer: SSE streams straight through
  });
}

LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_response_trailers)(void *f, const void *m) {
  (void)f;
  (void)m;
  return ENVOY_TRAILERS_CONTINUE;
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_stream_complete)(void *f, const void *m) {
  Filter *flt = as_filter(m);
  if (!flt) return;
  guard<int>("stream_complete", flt->cfg, 0, [&] {
    (void)f;
    finish_request(*flt);
    return 0;
  });
}

// Optional hook: every local reply, Envoy's (router: connect failure, reset, timeout, no healthy
// upstream) and ours, before it is encoded.
LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_local_reply)(void *f, const void *m,
                                                                         uint32_t response_code, envoy_buf details,
                                                                         bool reset_imminent) {
  (void)f;
  (void)reset_imminent;
  Filter *flt = as_filter(m);
  if (!flt) return ENVOY_LOCAL_REPLY_CONTINUE;
  return guard<int>("local_reply", flt->cfg, ENVOY_LOCAL_REPLY_CONTINUE, [&]() -> int {
    flt->local_status = response_code;
    flt->local_outcome = local_reply_outcome(std::string(details.ptr ? details.ptr : "", details.ptr ? details.length : 0));
    return ENVOY_LOCAL_REPLY_CONTINUE;
  });
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_scheduled)(void *f, const void *m, uint64_t event_id) {
  Filter *flt = as_filter(m);
  if (!flt) return;
  guard<int>("scheduled", flt->cfg, 0, [&] {
    if (event_id != kResumeEvent || flt->phase != Phase::Pending || !flt->async) return 0;
    llmproxy_request *req = nullptr;
    bool overdue = false;
    {
      std::lock_guard<std::mutex> lock(flt->async->mu);
      if (flt->async->abandoned) return 0;
      if (flt->async->delivered) {
        req = flt->async->result;
        flt->async->result = nullptr;
      } else if (flt->async->timed_out) {
        overdue = true;  // the watchdog resumed us; the library's callback finishes its own decision
      } else {
        return 0;
      }
    }
    flt->async.reset();
    if (overdue) req = decide_locally(*flt);
    flt->pending_headers.clear();
    std::string().swap(flt->pending_body);
    if (!req) {
      send_error(f, *flt, 500, error_json("server_error", "internal_error", "pick failed without a decision"));
      return 0;
    }
    if (apply_decision(f, *flt, req)) envoy_dynamic_module_callback_http_filter_continue_decoding(f);
    return 0;
  });
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_http_callout_done)(
    void *f, const void *m, uint64_t callout_id, int result, envoy_dynamic_module_type_envoy_http_header *headers,
    size_t headers_size, envoy_buf *body_chunks, size_t body_chunks_size) {
  (void)f, (void)m, (void)callout_id, (void)result, (void)headers, (void)headers_size, (void)body_chunks,
      (void)body_chunks_size;
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_http_stream_headers)(
    void *f, const void *m, uint64_t stream_id, envoy_dynamic_module_type_envoy_http_header *headers,
    size_t headers_size, bool end_stream) {
  (void)f, (void)m, (void)stream_id, (void)headers, (void)headers_size, (void)end_stream;
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_http_stream_data)(void *f, const void *m,
                                                                               uint64_t stream_id,
                                                                               const envoy_buf *data,
                                                                               size_t data_count, bool end_stream) {
  (void)f, (void)m, (void)stream_id, (void)data, (void)data_count, (void)end_stream;
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_http_stream_trailers)(
    void *f, const void *m, uint64_t stream_id, envoy_dynamic_module_type_envoy_http_header *trailers,
    size_t trailers_size) {
  (void)f, (void)m, (void)stream_id, (void)trailers, (void)trailers_size;
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_http_stream_complete)(void *f, const void *m,
                                                                                   uint64_t stream_id) {
  (void)f, (void)m, (void)stream_id;
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_http_stream_reset)(void *f, const void *m,
                                                                                uint64_t stream_id, int reason) {
  (void)f, (void)m, (void)stream_id, (void)reason;
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark)(
    void *f, const void *m) {
  (void)f, (void)m;
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark)(
    void *f, const void *m) {
  (void)f, (void)m;
}

// ---------------------------------------------------------------------------------------------
// Load-balancing policy hooks (envoy.load_balancing_policies.dynamic_modules, lb_policy_name
// "llmproxy"; signatures verified on the 1.40 binary, see envoy_dynamic_module_abi.h).

namespace {
int g_lb_config_marker;  // the policy has no config of its own
}

LLMPROXY_EXPORT const void *HOOK(envoy_dynamic_module_on_lb_config_new)(void *lb_config_envoy_ptr, envoy_buf name,
                                                                       envoy_buf config) {
  (void)lb_config_envoy_ptr, (void)name, (void)config;
  return &g_lb_config_marker;
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_lb_config_destroy)(const void *lb_config_module_ptr) {
  (void)lb_config_module_ptr;
}

LLMPROXY_EXPORT const void *HOOK(envoy_dynamic_module_on_lb_new)(const void *lb_config_module_ptr, void *lb_envoy_ptr) {
  (void)lb_config_module_ptr, (void)lb_envoy_ptr;
  return guard<const void *>("lb_new", nullptr, nullptr, [] { return new Lb(); });
}

LLMPROXY_EXPORT bool HOOK(envoy_dynamic_module_on_lb_choose_host)(void *lb_envoy_ptr, const void *lb_module_ptr,
                                                                 void *context_envoy_ptr, uint32_t *priority,
                                                                 uint32_t *index) {
  Lb *state = const_cast<Lb *>(static_cast<const Lb *>(lb_module_ptr));
  if (!state || !priority || !index) return false;
  return guard<bool>("lb_choose_host", nullptr, false, [&] {
    Filter *flt = context_envoy_ptr ? routed_stream(context_envoy_ptr) : nullptr;
    if (flt && flt->req && flt->forwarded && flt->envoy) return repick(lb_envoy_ptr, *flt, priority, index);
    return round_robin(lb_envoy_ptr, *state, priority, index);
  });
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_lb_on_host_membership_update)(void *lb_envoy_ptr,
                                                                               const void *lb_module_ptr,
                                                                               size_t hosts_added,
                                                                               size_t hosts_removed) {
  (void)lb_envoy_ptr, (void)lb_module_ptr, (void)hosts_added, (void)hosts_removed;
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_lb_destroy)(const void *lb_module_ptr) {
  delete static_cast<const Lb *>(lb_module_ptr);
}
