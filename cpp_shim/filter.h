// llmproxy Envoy shim: the HTTP filter, one object per stream, its hook methods in the order
// Envoy calls them. Worker thread of the stream only: the library's callback thread and the
// deadline watchdog reach a pending stream through its AsyncDecision, never through the Filter;
// the LB policy calls it between two attempts, on the same worker thread.
//
// Request path (inference requests only, as decided by llmproxy_router_should_intercept):
//   request headers  strip client-supplied routing headers, raise the buffer limit, hold the stream
//   request body     hold until end of stream; full body = Buffered + Received (see the 1.40 notes)
//   pick             llmproxy_pick_async; PENDING resumes at on_scheduled, with the library's
//                    decision or, past the router's pick deadline, a local one
//   routed           cluster header + clear_route_cache, set_upstream_override_host(ip:port, strict),
//                    x-llmproxy-endpoint / -scene / -ticket headers, dynamic metadata "llmproxy"
//   error            local reply with the library's HTTP status and JSON error body
// Response path: the first response body chunk -> llmproxy_request_first_token (or the response
// transcoder); local reply records what Envoy's (or our) reply says of the endpoint; stream
// complete -> llmproxy_request_finish_outcome(status, outcome), exactly once.
#ifndef LLMPROXY_ENVOY_FILTER_H
#define LLMPROXY_ENVOY_FILTER_H

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "envoy_dynamic_module_abi.h"
#include "envoy_stream.h"
#include "filter_config.h"
#include "llmproxy.h"

namespace llmproxy_envoy {

// Typed hook returns (the values of Envoy's enums that the filter uses).
enum class HeadersStatus : int { Continue = ENVOY_HEADERS_CONTINUE, Stop = ENVOY_HEADERS_STOP_ITERATION };
enum class BodyStatus : int {
  Continue = ENVOY_BODY_CONTINUE,
  StopAndBuffer = ENVOY_BODY_STOP_ITERATION_AND_BUFFER,
  StopNoBuffer = ENVOY_BODY_STOP_ITERATION_NO_BUFFER,
};
enum class TrailersStatus : int { Continue = ENVOY_TRAILERS_CONTINUE, Stop = ENVOY_TRAILERS_STOP_ITERATION };
enum class LocalReplyStatus : int { Continue = ENVOY_LOCAL_REPLY_CONTINUE };

class AsyncDecision;

class Filter {
 public:
  Filter(FilterConfig &config, void *envoy);
  ~Filter();
  Filter(const Filter &) = delete;
  Filter &operator=(const Filter &) = delete;

  // ---- hooks, in wire order ----
  HeadersStatus on_request_headers(bool end_of_stream);
  BodyStatus on_request_body(bool end_of_stream);
  TrailersStatus on_request_trailers();
  void on_scheduled(uint64_t event_id);
  HeadersStatus on_response_headers(bool end_of_stream);
  BodyStatus on_response_body(bool end_of_stream);
  LocalReplyStatus on_local_reply(uint32_t status, std::string_view details);
  void on_stream_complete();
  void on_destroy();  // normally finished already at stream complete

  // After an exception on the request path: answers 500 and returns true, so the hook stops the
  // stream (a request whose routing headers may not have been cleaned is never forwarded); false
  // when a reply or the request already went out.
  bool fail_closed();

  // ---- for the LB policy, between two attempts of this routed stream ----
  // Re-picks through llmproxy_request_retry: the new endpoint, or none when no untried one is left.
  std::optional<std::string> retry();
  // Tells the next attempt its endpoint: x-llmproxy-endpoint and metadata llmproxy:endpoint.
  void announce_endpoint(const std::string &endpoint);

  FilterConfig &config() { return cfg_; }

 private:
  enum class Phase { Idle, Passthrough, Collecting, Pending, Routed, Replied, Finished };
  enum class PickResult { Routed, Replied, Pending };
  struct PendingPick;

  bool routed() const { return phase_ == Phase::Routed; }

  PickResult pick(std::string body);
  PickResult decide(llmproxy_request *req, llmproxy_status st);  // st: the pick's, when req is NULL
  bool apply_decision(llmproxy_request *req);
  llmproxy_request *decide_locally(const PendingPick &pending);
  void finish();

  size_t strip_routing_headers();
  void note_upstream_response();
  void start_transcoding();
  void transcode_chunk(bool end_of_stream);
  void observe_chunk(bool end_of_stream);
  void mark_first_token();

  void send_local_reply(uint32_t status, const std::string &body, const char *content_type, const char *details);
  void send_json_error(uint32_t status, const std::string &json);
  void reply_error(uint32_t status, const std::string &message);
  void reply_too_large(uint64_t size, bool exact);

  FilterConfig &cfg_;
  EnvoyStream stream_;
  Phase phase_ = Phase::Idle;
  llmproxy_request *req_ = nullptr;        // from the decision until finish
  std::unique_ptr<PendingPick> pending_;  // from entering Pending until decided or the stream ends
  bool first_token_ = false;
  bool transcoding_ = false;  // the response body goes through llmproxy_request_transcode_response
  uint32_t reply_status_ = 0;  // status of our own local reply, if any

  // How the request ended, for llmproxy_request_finish_outcome (see finish()).
  uint32_t upstream_status_ = 0;  // :status of a response the endpoint sent
  uint32_t local_status_ = 0;     // status of a local reply (Envoy's or ours)
  llmproxy_outcome local_outcome_ = LLMPROXY_OUTCOME_LOCAL;  // what that reply says of the endpoint
  bool served_elsewhere_ = false;  // Envoy's own LB retried on a host the library did not pick

  uint64_t ticket_ = 0;  // while routed: registered for the LB policy (lb_policy.h)
};

}  // namespace llmproxy_envoy

#endif
