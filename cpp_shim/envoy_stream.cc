// llmproxy Envoy shim: typed access to one stream through Envoy 1.40's HTTP filter callbacks (see
// envoy_stream.h and shared/spec/envoy-dynamic-modules-1.40.md for the verified semantics).

#include "envoy_stream.h"

#include <cstdlib>

#include "common.h"

namespace llmproxy_envoy {

std::optional<std::string> EnvoyStream::header(int header_type, std::string_view name) const {
  envoy_buf result{nullptr, 0};
  size_t count = 0;
  if (!envoy_dynamic_module_callback_http_get_header(f_, header_type, mb(name), &result, 0, &count) ||
      result.ptr == nullptr) {
    return std::nullopt;
  }
  return std::string(result.ptr, result.length);
}

void EnvoyStream::set_header(int header_type, std::string_view name, std::string_view value) const {
  envoy_dynamic_module_callback_http_set_header(f_, header_type, mb(name), mb(value));
}

std::optional<std::string> EnvoyStream::request_header(std::string_view name) const {
  return header(ENVOY_HEADER_REQUEST, name);
}

std::vector<EnvoyStream::Header> EnvoyStream::request_headers() const {
  std::vector<envoy_dynamic_module_type_envoy_http_header> raw(
      envoy_dynamic_module_callback_http_get_headers_size(f_, ENVOY_HEADER_REQUEST));
  if (!raw.empty() && !envoy_dynamic_module_callback_http_get_headers(f_, ENVOY_HEADER_REQUEST, raw.data())) {
    raw.clear();
  }
  std::vector<Header> headers;
  headers.reserve(raw.size());
  for (const auto &h : raw) {
    if (!h.key_ptr) continue;
    headers.emplace_back(std::string_view(h.key_ptr, h.key_length),
                         view(envoy_buf{h.value_ptr, h.value_ptr ? h.value_length : 0}));
  }
  return headers;
}

void EnvoyStream::set_request_header(std::string_view name, std::string_view value) const {
  set_header(ENVOY_HEADER_REQUEST, name, value);
}

void EnvoyStream::clear_route_cache() const { envoy_dynamic_module_callback_http_clear_route_cache(f_); }

void EnvoyStream::raise_buffer_limit(uint64_t limit) const {
  if (envoy_dynamic_module_callback_http_get_buffer_limit(f_) < limit) {
    envoy_dynamic_module_callback_http_set_buffer_limit(f_, limit);
  }
}

bool EnvoyStream::received_is_buffered() const {
  return envoy_dynamic_module_callback_http_received_buffered_request_body(f_);
}

void EnvoyStream::append_body(int body_type, std::string &out) const {
  const size_t n = envoy_dynamic_module_callback_http_get_body_chunks_size(f_, body_type);
  if (n == 0) return;
  std::vector<envoy_buf> chunks(n);
  if (!envoy_dynamic_module_callback_http_get_body_chunks(f_, body_type, chunks.data())) return;
  for (const auto &c : chunks)
    if (c.ptr && c.length) out.append(c.ptr, c.length);
}

uint64_t EnvoyStream::held_request_body_size() const {
  uint64_t total = envoy_dynamic_module_callback_http_get_body_size(f_, ENVOY_BODY_RECEIVED_REQUEST);
  if (!received_is_buffered()) {
    total += envoy_dynamic_module_callback_http_get_body_size(f_, ENVOY_BODY_BUFFERED_REQUEST);
  }
  return total;
}

std::string EnvoyStream::held_request_body() const {
  std::string body;
  body.reserve(held_request_body_size());
  if (!received_is_buffered()) append_body(ENVOY_BODY_BUFFERED_REQUEST, body);
  append_body(ENVOY_BODY_RECEIVED_REQUEST, body);
  return body;
}

std::string EnvoyStream::buffered_request_body() const {
  std::string body;
  append_body(ENVOY_BODY_BUFFERED_REQUEST, body);
  return body;
}

void EnvoyStream::replace_request_body(std::string_view body) const {
  const size_t received = envoy_dynamic_module_callback_http_get_body_size(f_, ENVOY_BODY_RECEIVED_REQUEST);
  if (received_is_buffered()) {
    // The current frame is the buffered body itself (an earlier filter buffered it).
    envoy_dynamic_module_callback_http_drain_body(f_, ENVOY_BODY_RECEIVED_REQUEST, received);
    envoy_dynamic_module_callback_http_append_body(f_, ENVOY_BODY_RECEIVED_REQUEST, mb(body));
  } else {
    const size_t buffered = envoy_dynamic_module_callback_http_get_body_size(f_, ENVOY_BODY_BUFFERED_REQUEST);
    if (received) envoy_dynamic_module_callback_http_drain_body(f_, ENVOY_BODY_RECEIVED_REQUEST, received);
    if (buffered) envoy_dynamic_module_callback_http_drain_body(f_, ENVOY_BODY_BUFFERED_REQUEST, buffered);
    const int into = buffered ? ENVOY_BODY_BUFFERED_REQUEST : ENVOY_BODY_RECEIVED_REQUEST;
    envoy_dynamic_module_callback_http_append_body(f_, into, mb(body));
  }
  if (request_header("content-length")) set_request_header("content-length", std::to_string(body.size()));
}

bool EnvoyStream::override_upstream_host(std::string_view endpoint, bool strict) const {
  return envoy_dynamic_module_callback_http_set_upstream_override_host(f_, mb(endpoint), strict);
}

void EnvoyStream::set_metadata(std::string_view key, std::string_view value) const {
  envoy_dynamic_module_callback_http_set_dynamic_metadata_string(f_, mb("llmproxy"), mb(key), mb(value));
}

void EnvoyStream::continue_decoding() const { envoy_dynamic_module_callback_http_filter_continue_decoding(f_); }

uint32_t EnvoyStream::response_status() const {
  if (std::optional<std::string> status = header(ENVOY_HEADER_RESPONSE, ":status")) {
    return static_cast<uint32_t>(std::strtoul(status->c_str(), nullptr, 10));
  }
  uint64_t code = 0;
  return envoy_dynamic_module_callback_http_filter_get_attribute_int(f_, ENVOY_ATTRIBUTE_RESPONSE_CODE, &code)
             ? static_cast<uint32_t>(code)
             : 0;
}

void EnvoyStream::set_response_header(std::string_view name, std::string_view value) const {
  set_header(ENVOY_HEADER_RESPONSE, name, value);
}

std::optional<std::string> EnvoyStream::upstream_address() const {
  envoy_buf host{nullptr, 0};
  if (!envoy_dynamic_module_callback_http_filter_get_attribute_string(f_, ENVOY_ATTRIBUTE_UPSTREAM_ADDRESS, &host) ||
      !host.ptr) {
    return std::nullopt;
  }
  return std::string(host.ptr, host.length);
}

std::string EnvoyStream::received_response_body() const {
  std::string body;
  append_body(ENVOY_BODY_RECEIVED_RESPONSE, body);
  return body;
}

std::vector<std::string_view> EnvoyStream::received_response_slices() const {
  std::vector<std::string_view> slices;
  const size_t n = envoy_dynamic_module_callback_http_get_body_chunks_size(f_, ENVOY_BODY_RECEIVED_RESPONSE);
  if (n == 0) return slices;
  std::vector<envoy_buf> chunks(n);
  if (!envoy_dynamic_module_callback_http_get_body_chunks(f_, ENVOY_BODY_RECEIVED_RESPONSE, chunks.data())) {
    return slices;
  }
  slices.reserve(n);
  for (const auto &c : chunks)
    if (c.ptr && c.length) slices.emplace_back(c.ptr, c.length);
  return slices;
}

void EnvoyStream::replace_received_response_body(size_t drained, std::string_view replacement) const {
  if (drained) envoy_dynamic_module_callback_http_drain_body(f_, ENVOY_BODY_RECEIVED_RESPONSE, drained);
  if (!replacement.empty()) {
    envoy_dynamic_module_callback_http_append_body(f_, ENVOY_BODY_RECEIVED_RESPONSE, mb(replacement));
  }
}

void EnvoyStream::send_response(uint32_t status, std::string_view body, std::string_view content_type,
                                std::string_view details) const {
  constexpr std::string_view kContentType = "content-type";
  envoy_dynamic_module_type_module_http_header hdr{kContentType.data(), kContentType.size(), content_type.data(),
                                                   content_type.size()};
  envoy_dynamic_module_callback_http_send_response(f_, status, &hdr, 1, mb(body), mb(details));
}

}  // namespace llmproxy_envoy
