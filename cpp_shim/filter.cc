// llmproxy Envoy shim: the HTTP filter (see filter.h): the stream's hook methods in wire order,
// the pick and how its decision is applied, how the request ends, and the one place the shim
// renders an OpenAI error body of its own.

#include "filter.h"

#include <algorithm>
#include <cstdlib>
#include <utility>
#include <vector>

#include "async_decision.h"
#include "common.h"
#include "lb_policy.h"

namespace llmproxy_envoy {
namespace {

// The OpenAI error body of a reply the shim makes itself, for `status`: rendered by the library
// (llmproxy_error_body, from src/error.rs) in the shape, type and code of its own errors. The
// only place the shim builds one.
std::string error_body(uint32_t status, std::string_view message) {
  // Its length first, then the body (error replies are rare: one code path over a fixed buffer).
  std::string body(llmproxy_error_body(status, message.data(), message.size(), nullptr, 0) + 1, '\0');
  const size_t n = llmproxy_error_body(status, message.data(), message.size(), &body[0], body.size());
  body.resize(std::min(n, body.size() - 1));  // without the NUL
  return body;
}

// The HTTP status of a pick that failed with `st` (500 for a failure without a reason).
uint32_t error_status(llmproxy_status st) {
  return llmproxy_status_http(st == LLMPROXY_OK ? LLMPROXY_INTERNAL : st);
}

// What a local reply (Envoy's or ours) says about the endpoint, from its details string
// (Envoy 1.40, checked end to end): only a connection that failed, or was closed or reset before
// any response byte ("upstream_reset_before_response_started{connection_failure...}",
// "{connection_termination}", "{remote_reset}", ...), is the endpoint's failure. Route and
// per-try timeouts ("response_timeout", "upstream_per_try_timeout"), "no_healthy_upstream",
// Envoy's own resets ("{overflow}" of a circuit breaker, "{local_reset}") and our own replies
// say nothing about it: a client can cause all of those.
llmproxy_outcome local_reply_outcome(std::string_view details) {
  if (!starts_with(details, "upstream_reset_before_response_started")) return LLMPROXY_OUTCOME_LOCAL;
  if (details.find("overflow") != std::string_view::npos || details.find("local_reset") != std::string_view::npos) {
    return LLMPROXY_OUTCOME_LOCAL;
  }
  return LLMPROXY_OUTCOME_ENDPOINT_FAILED;
}

// Borrowed llmproxy_header views of (name, value) pairs, which must outlive them.
template <typename Headers>
std::vector<llmproxy_header> llmproxy_headers(const Headers &headers) {
  std::vector<llmproxy_header> out;
  out.reserve(headers.size());
  for (const auto &h : headers)
    out.push_back(llmproxy_header{h.first.data(), h.first.size(), h.second.data(), h.second.size()});
  return out;
}

}  // namespace

// A pick waiting for the library: the hand-off, and the inputs of a local decision should the
// library's be overdue.
struct Filter::PendingPick {
  std::shared_ptr<AsyncDecision> decision;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
};

Filter::Filter(FilterConfig &config, void *envoy) : cfg_(config), stream_(envoy) {}
Filter::~Filter() = default;

// ---------------------------------------------------------------------------------------------
// Hooks, in wire order.

HeadersStatus Filter::on_request_headers(bool end_of_stream) {
  const std::string method = stream_.request_header(":method").value_or("");
  const std::string path = stream_.request_header(":path").value_or("");
  const std::string bare_path = path.substr(0, path.find('?'));

  if (!cfg_.metrics_path.empty() && method == "GET" && bare_path == cfg_.metrics_path) {
    send_local_reply(200, cfg_.metrics_text(), "text/plain; version=0.0.4; charset=utf-8", "llmproxy_metrics");
    return HeadersStatus::Stop;
  }

  // A client never chooses the endpoint or the cluster, on any request.
  if (strip_routing_headers() > 0) stream_.clear_route_cache();

  if (!llmproxy_router_should_intercept(cfg_.router, method.data(), method.size(), path.data(), path.size())) {
    phase_ = Phase::Passthrough;
    cfg_.counters.passthrough.fetch_add(1, std::memory_order_relaxed);
    return HeadersStatus::Continue;
  }
  cfg_.counters.intercepted.fetch_add(1, std::memory_order_relaxed);
  phase_ = Phase::Collecting;

  if (const std::optional<std::string> content_length = stream_.request_header("content-length")) {
    char *end = nullptr;
    const unsigned long long n = std::strtoull(content_length->c_str(), &end, 10);
    if (end && *end == '\0' && !content_length->empty() && n > cfg_.max_body) {
      reply_too_large(n, true);
      return HeadersStatus::Stop;
    }
  }
  if (end_of_stream) {
    // No body at all: the library answers 400 for an empty body.
    return pick(std::string()) == PickResult::Routed ? HeadersStatus::Continue : HeadersStatus::Stop;
  }
  stream_.raise_buffer_limit(cfg_.max_body);
  return HeadersStatus::Stop;
}

BodyStatus Filter::on_request_body(bool end_of_stream) {
  switch (phase_) {
    case Phase::Collecting: break;
    case Phase::Pending: return BodyStatus::StopAndBuffer;
    case Phase::Replied: return BodyStatus::StopNoBuffer;
    default: return BodyStatus::Continue;
  }
  const uint64_t total = stream_.held_request_body_size();
  if (total > cfg_.max_body) {
    reply_too_large(total, false);
    return BodyStatus::StopNoBuffer;
  }
  if (!end_of_stream) return BodyStatus::StopAndBuffer;
  switch (pick(stream_.held_request_body())) {
    case PickResult::Routed: return BodyStatus::Continue;
    case PickResult::Pending: return BodyStatus::StopAndBuffer;
    case PickResult::Replied: break;
  }
  return BodyStatus::StopNoBuffer;
}

TrailersStatus Filter::on_request_trailers() {
  if (phase_ == Phase::Pending || phase_ == Phase::Replied) return TrailersStatus::Stop;
  if (phase_ != Phase::Collecting) return TrailersStatus::Continue;
  // Trailers end the stream: the whole body is in the buffer now.
  std::string body = stream_.buffered_request_body();
  if (body.size() > cfg_.max_body) {
    reply_too_large(body.size(), true);
    return TrailersStatus::Stop;
  }
  return pick(std::move(body)) == PickResult::Routed ? TrailersStatus::Continue : TrailersStatus::Stop;
}

// The library's callback or the watchdog resumed a pending pick (worker thread).
void Filter::on_scheduled(uint64_t event_id) {
  if (event_id != kResumeEvent || phase_ != Phase::Pending) return;
  const AsyncDecision::Result r = pending_->decision->take();
  if (r.kind == AsyncDecision::Result::NotYet) return;
  // Overdue: the watchdog resumed us first; the library's callback finishes its own decision.
  llmproxy_request *req = r.kind == AsyncDecision::Result::Overdue ? decide_locally(*pending_) : r.req;
  pending_.reset();  // one resume event per pick: nothing comes back here
  if (decide(req, LLMPROXY_INTERNAL) == PickResult::Routed) stream_.continue_decoding();
}

HeadersStatus Filter::on_response_headers(bool end_of_stream) {
  if (!routed()) return HeadersStatus::Continue;
  // Local replies (ours, the router's) were announced to on_local_reply first.
  if (local_status_ == 0) note_upstream_response();
  if (llmproxy_request_needs_transcoding(req_)) start_transcoding();
  // A response without a body is complete as far as prefill is concerned. A local reply
  // (connect failure, timeout, ours) is no token and no answer: finish releases the prefill,
  // and the endpoint's TTFT histogram only sees its own answers.
  if (end_of_stream && local_status_ == 0) {
    mark_first_token();
    if (!transcoding_) llmproxy_request_observe_response(req_, nullptr, 0, true);
  }
  return HeadersStatus::Continue;
}

BodyStatus Filter::on_response_body(bool end_of_stream) {
  if (!routed()) return BodyStatus::Continue;
  if (transcoding_) {
    transcode_chunk(end_of_stream);  // the transcoder marks the first token and reads its output
    first_token_ = true;
  } else if (local_status_ == 0) {
    mark_first_token();  // the endpoint's first byte (a local reply's body is none)
    observe_chunk(end_of_stream);
  }
  return BodyStatus::Continue;  // never buffer: SSE streams straight through
}

// Every local reply, Envoy's (router: connect failure, reset, timeout, no healthy upstream) and
// ours, before it is encoded.
LocalReplyStatus Filter::on_local_reply(uint32_t status, std::string_view details) {
  local_status_ = status;
  local_outcome_ = local_reply_outcome(details);
  return LocalReplyStatus::Continue;
}

void Filter::on_stream_complete() { finish(); }

void Filter::on_destroy() { finish(); }

bool Filter::fail_closed() {
  if (phase_ == Phase::Replied || phase_ == Phase::Routed) return false;
  phase_ = Phase::Replied;
  reply_error(500, "llmproxy filter error");
  return true;
}

// ---------------------------------------------------------------------------------------------
// The pick and its decision.

Filter::PickResult Filter::pick(std::string body) {
  const std::vector<EnvoyStream::Header> headers = stream_.request_headers();
  const std::vector<llmproxy_header> lh = llmproxy_headers(headers);
  auto decision = std::make_shared<AsyncDecision>();
  llmproxy_request *req = nullptr;
  const llmproxy_status st = decision->pick_async(cfg_.router, lh, body, &req);
  if (st == LLMPROXY_PENDING) {
    // The scheduler is only created for a real PENDING (none on the synchronous hot path); a
    // decision that already arrived meanwhile is applied right here.
    const AsyncDecision::Result early = decision->arm(stream_.envoy(), cfg_.pick_deadline_ms);
    if (early.kind == AsyncDecision::Result::NotYet) {
      pending_.reset(new PendingPick{std::move(decision),
                                     std::vector<std::pair<std::string, std::string>>(headers.begin(), headers.end()),
                                     std::move(body)});
      phase_ = Phase::Pending;
      cfg_.counters.pending.fetch_add(1, std::memory_order_relaxed);
      return PickResult::Pending;
    }
    req = early.req;
  }
  return decide(req, st);
}

Filter::PickResult Filter::decide(llmproxy_request *req, llmproxy_status st) {
  if (req == nullptr) {
    // The library's contract says a decision always comes; be defensive anyway.
    send_json_error(error_status(st), error_body(500, "pick failed without a decision"));
    return PickResult::Replied;
  }
  return apply_decision(req) ? PickResult::Routed : PickResult::Replied;
}

// Applies a pick result. Returns true when the request may continue upstream.
bool Filter::apply_decision(llmproxy_request *req) {
  req_ = req;
  const llmproxy_status st = llmproxy_request_status(req);
  if (st == LLMPROXY_PASSTHROUGH) {
    // Nothing to route (a stored Responses answer no one knows the endpoint of): proxied
    // untouched, like a request the library does not intercept.
    llmproxy_request_finish_outcome(std::exchange(req_, nullptr), 0, LLMPROXY_OUTCOME_LOCAL);
    phase_ = Phase::Passthrough;
    cfg_.counters.passthrough.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  uint32_t http = llmproxy_request_http_status(req);
  if (st != LLMPROXY_OK || http != 200) {
    if (http < 400 || http > 599) http = error_status(st);
    const std::string body = request_string(llmproxy_request_error_body, req);
    // No body from the library is its internal failure, whatever the status.
    send_json_error(http, body.empty() ? error_body(500, "request could not be routed") : body);
    return false;
  }
  const std::string endpoint = request_string(llmproxy_request_endpoint, req);
  const std::string cluster = request_string(llmproxy_request_cluster, req);
  if (!cluster.empty()) {
    stream_.set_request_header(cfg_.cluster_header, cluster);
    stream_.clear_route_cache();
  }
  if (endpoint.empty() || !stream_.override_upstream_host(endpoint, cfg_.strict)) {
    log_msg(ENVOY_LOG_ERROR, "endpoint \"" + endpoint + "\" is not a literal ip:port; refusing the request");
    reply_error(503, "picked endpoint is not usable by Envoy: " + endpoint);
    return false;
  }
  // Upstream rewrites decided by the library (target_model / LoRA model, Triton generate).
  const std::string upstream_path = request_string(llmproxy_request_upstream_path, req);
  if (!upstream_path.empty()) {
    stream_.set_request_header(":path", upstream_path);
    stream_.clear_route_cache();
  }
  size_t upstream_body_len = 0;
  if (const uint8_t *upstream_body = llmproxy_request_upstream_body(req, &upstream_body_len)) {
    stream_.replace_request_body(std::string_view(reinterpret_cast<const char *>(upstream_body), upstream_body_len));
  }
  announce_endpoint(endpoint);
  const std::string scene = request_string(llmproxy_request_scene, req);
  if (!scene.empty()) stream_.set_request_header("x-llmproxy-scene", scene);
  const std::string model = request_string(llmproxy_request_model, req);
  const std::string backend = request_string(llmproxy_request_backend, req);
  std::string upstream_model = request_string(llmproxy_request_upstream_model, req);
  if (upstream_model == model) upstream_model.clear();
  const std::pair<const char *, const std::string *> metadata[] = {{"cluster", &cluster},
                                                                   {"model", &model},
                                                                   {"scene", &scene},
                                                                   {"backend", &backend},
                                                                   {"upstream_model", &upstream_model}};
  for (const auto &kv : metadata) {
    if (!kv.second->empty()) stream_.set_metadata(kv.first, *kv.second);
  }
  ticket_ = routed_streams::add(*this);
  stream_.set_request_header(kTicketHeader, std::to_string(ticket_));
  phase_ = Phase::Routed;
  cfg_.counters.routed.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// The library's decision is overdue: decide now from local data (llmproxy_pick never waits).
llmproxy_request *Filter::decide_locally(const PendingPick &pending) {
  cfg_.counters.pending_timeouts.fetch_add(1, std::memory_order_relaxed);
  log_msg(ENVOY_LOG_WARN,
          "pick decision overdue after " + std::to_string(cfg_.pick_deadline_ms) + " ms; deciding from local data");
  const std::vector<llmproxy_header> lh = llmproxy_headers(pending.headers);
  llmproxy_request *req = nullptr;
  llmproxy_pick(cfg_.router, lh.data(), lh.size(), reinterpret_cast<const uint8_t *>(pending.body.data()),
                pending.body.size(), &req);
  return req;
}

std::optional<std::string> Filter::retry() {
  const std::string failed = request_string(llmproxy_request_endpoint, req_);
  if (llmproxy_request_retry(req_) != LLMPROXY_OK) {
    log_msg(ENVOY_LOG_WARN, "endpoint " + failed + " failed and no untried endpoint is left");
    return std::nullopt;
  }
  cfg_.counters.lb_repicks.fetch_add(1, std::memory_order_relaxed);
  std::string endpoint = request_string(llmproxy_request_endpoint, req_);
  log_msg(ENVOY_LOG_INFO, "endpoint " + failed + " failed; retrying on " + endpoint);
  return endpoint;
}

void Filter::announce_endpoint(const std::string &endpoint) {
  stream_.set_request_header("x-llmproxy-endpoint", endpoint);
  stream_.set_metadata("endpoint", endpoint);
}

// Finishes the request exactly once: the status the client got and what it says of the endpoint.
//
//   never routed (our reply, client gone while deciding)  our status or 499   LOCAL
//   routed, then a local reply (Envoy's router)           its status          local_reply_outcome
//   routed, a response from the endpoint                  its status          UPSTREAM (502-504 fail)
//     ... but from a host the library did not pick        its status          ENDPOINT_FAILED (the pick)
//   routed, no response at all (client went away)        499                 LOCAL
void Filter::finish() {
  if (pending_) {
    pending_->decision->abandon();
    pending_.reset();
  }
  if (ticket_) routed_streams::remove(std::exchange(ticket_, 0));
  const Phase phase = std::exchange(phase_, Phase::Finished);
  llmproxy_request *req = std::exchange(req_, nullptr);
  if (!req) return;
  uint32_t status = kClientGoneStatus;
  llmproxy_outcome outcome = LLMPROXY_OUTCOME_LOCAL;
  if (phase != Phase::Routed) {
    if (reply_status_) status = reply_status_;
  } else if (local_status_) {
    status = local_status_;
    outcome = local_outcome_;
  } else if (upstream_status_) {
    status = upstream_status_;
    outcome = served_elsewhere_ ? LLMPROXY_OUTCOME_ENDPOINT_FAILED : LLMPROXY_OUTCOME_UPSTREAM;
  }
  llmproxy_request_finish_outcome(req, status, outcome);
}

// ---------------------------------------------------------------------------------------------
// Request and response details.

// Removes every client-supplied routing header. Returns the number removed.
size_t Filter::strip_routing_headers() {
  std::vector<std::string> doomed;
  for (const auto &h : stream_.request_headers()) {
    std::string name = lower(std::string(h.first));
    if (starts_with(name, "x-llmproxy-") || name == "x-gateway-destination-endpoint" || name == cfg_.cluster_header) {
      doomed.push_back(std::move(name));
    }
  }
  for (const auto &name : doomed) stream_.set_request_header(name, "");
  if (!doomed.empty()) cfg_.counters.stripped_headers.fetch_add(doomed.size(), std::memory_order_relaxed);
  return doomed.size();
}

// A response from an endpoint: its status, and whether it came from the endpoint the library
// picked. It does not when Envoy retried through a cluster LB other than llmproxy's (the override
// host only holds for the first attempt): then the picked endpoint failed, and the library never
// heard of the host that answered.
void Filter::note_upstream_response() {
  upstream_status_ = stream_.response_status();
  if (served_elsewhere_) return;
  const std::optional<std::string> host = stream_.upstream_address();
  if (!host) return;
  const std::string picked = request_string(llmproxy_request_endpoint, req_);
  if (picked.empty() || picked == *host) return;
  served_elsewhere_ = true;
  if (cfg_.counters.served_elsewhere.fetch_add(1, std::memory_order_relaxed) == 0) {
    log_msg(ENVOY_LOG_WARN, "a retry was served by " + *host + ", not by the picked " + picked +
                                ": give the cluster the llmproxy load-balancing policy (docs/envoy.md)");
  }
}

// The library rewrites the response (e.g. Triton generate -> OpenAI): status, type, length.
void Filter::start_transcoding() {
  transcoding_ = true;
  const uint32_t upstream_status = stream_.response_status();
  const uint32_t status = llmproxy_request_response_status(req_, upstream_status);
  if (status != upstream_status && status >= 100 && status <= 599) {
    stream_.set_response_header(":status", std::to_string(status));
  }
  stream_.set_response_header("content-length", "");
  const std::string content_type = request_string(llmproxy_request_response_content_type, req_);
  if (!content_type.empty()) stream_.set_response_header("content-type", content_type);
}

// Replaces this response chunk with what the transcoder makes of it.
void Filter::transcode_chunk(bool end_of_stream) {
  const std::string in = stream_.received_response_body();
  const uint8_t *out = nullptr;
  size_t out_len = 0;
  const llmproxy_status st = llmproxy_request_transcode_response(
      req_, reinterpret_cast<const uint8_t *>(in.data()), in.size(), end_of_stream, &out, &out_len);
  if (st != LLMPROXY_OK) {
    log_msg(ENVOY_LOG_WARN, "response transcoding failed (status " + std::to_string(st) + ")");
    out = nullptr;
  }
  // `out` stays valid until the next call on the request.
  stream_.replace_received_response_body(
      in.size(), out ? std::string_view(reinterpret_cast<const char *>(out), out_len) : std::string_view());
}

// Lets the library read the answer (to learn the next turn's prefix): every slice, no copy.
void Filter::observe_chunk(bool end_of_stream) {
  for (std::string_view slice : stream_.received_response_slices()) {
    llmproxy_request_observe_response(req_, reinterpret_cast<const uint8_t *>(slice.data()), slice.size(), false);
  }
  if (end_of_stream) llmproxy_request_observe_response(req_, nullptr, 0, true);
}

void Filter::mark_first_token() {
  if (first_token_) return;
  first_token_ = true;
  llmproxy_request_first_token(req_);
}

// ---------------------------------------------------------------------------------------------
// Local replies.

void Filter::send_local_reply(uint32_t status, const std::string &body, const char *content_type,
                              const char *details) {
  phase_ = Phase::Replied;
  reply_status_ = status;
  cfg_.counters.local_replies.fetch_add(1, std::memory_order_relaxed);
  stream_.send_response(status, body, content_type, details);
}

void Filter::send_json_error(uint32_t status, const std::string &json) {
  send_local_reply(status, json, "application/json", "llmproxy_error");
}

void Filter::reply_error(uint32_t status, const std::string &message) {
  send_json_error(status, error_body(status, message));
}

void Filter::reply_too_large(uint64_t size, bool exact) {
  reply_error(413, "request body of " + std::string(exact ? "" : "more than ") +
                       std::to_string(exact ? size : cfg_.max_body) + " bytes is larger than the limit of " +
                       std::to_string(cfg_.max_body) + " bytes");
}

}  // namespace llmproxy_envoy
