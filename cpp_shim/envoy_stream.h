// llmproxy Envoy shim: one HTTP stream as Envoy 1.40's filter callbacks show it (the `f` pointer
// of every filter hook), with typed access to what the filter reads and changes: headers, the
// held request body, the response body, local replies, the upstream override and metadata.
// Worker thread of the stream only. Every envoy_dynamic_module_callback_http_* call of the shim is
// here, except the scheduler's (async_decision.cc).
#ifndef LLMPROXY_ENVOY_STREAM_H
#define LLMPROXY_ENVOY_STREAM_H

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace llmproxy_envoy {

class EnvoyStream {
 public:
  using Header = std::pair<std::string_view, std::string_view>;  // name, value

  explicit EnvoyStream(void *envoy) : f_(envoy) {}
  void *envoy() const { return f_; }

  // ---- request ----
  std::optional<std::string> request_header(std::string_view name) const;
  // Every request header; the views are valid until the headers change.
  std::vector<Header> request_headers() const;
  // Replaces the header; an empty value removes it.
  void set_request_header(std::string_view name, std::string_view value) const;
  void clear_route_cache() const;
  void raise_buffer_limit(uint64_t limit) const;
  // The request body Envoy holds for us at a body hook: Buffered + Received, or Received alone
  // when that frame is the buffered body itself (an earlier filter buffered it).
  uint64_t held_request_body_size() const;
  std::string held_request_body() const;
  // The buffered request body alone (at the trailers, which end the body).
  std::string buffered_request_body() const;
  // Replaces the whole held request body, and its content-length when the request has one.
  void replace_request_body(std::string_view body) const;

  // ---- routing ----
  // False when Envoy refuses the host (not a literal ip:port).
  bool override_upstream_host(std::string_view endpoint, bool strict) const;
  // Dynamic metadata llmproxy:<key>.
  void set_metadata(std::string_view key, std::string_view value) const;
  void continue_decoding() const;

  // ---- response ----
  // The response :status, else the response.code attribute; 0 when neither is known.
  uint32_t response_status() const;
  void set_response_header(std::string_view name, std::string_view value) const;
  // "ip:port" of the host that answered.
  std::optional<std::string> upstream_address() const;
  std::string received_response_body() const;
  // The slices of the received response chunk, without a copy (valid until the body changes).
  std::vector<std::string_view> received_response_slices() const;
  // Drains `drained` bytes of the received response chunk and appends `replacement`.
  void replace_received_response_body(size_t drained, std::string_view replacement) const;

  // A local reply with one content-type header.
  void send_response(uint32_t status, std::string_view body, std::string_view content_type,
                     std::string_view details) const;

 private:
  std::optional<std::string> header(int header_type, std::string_view name) const;
  void set_header(int header_type, std::string_view name, std::string_view value) const;
  void append_body(int body_type, std::string &out) const;
  bool received_is_buffered() const;

  void *f_;
};

}  // namespace llmproxy_envoy

#endif
