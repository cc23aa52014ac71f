// llmproxy Envoy shim, shared helpers: the exception guard every hook body runs in, logging
// through Envoy, ABI buffer conversions and a few string helpers. Nothing here knows about
// filters, load balancers or the library's decisions.
#ifndef LLMPROXY_ENVOY_COMMON_H
#define LLMPROXY_ENVOY_COMMON_H

#include <atomic>
#include <cstdint>
#include <exception>
#include <string>
#include <string_view>

#include "envoy_dynamic_module_abi.h"
#include "llmproxy.h"

namespace llmproxy_envoy {

using envoy_buf = envoy_dynamic_module_type_envoy_buffer;
using module_buf = envoy_dynamic_module_type_module_buffer;

// Status reported when the client went away (nginx's 499 "client closed request"): before the
// request was forwarded, or before any response.
constexpr uint32_t kClientGoneStatus = 499;

inline module_buf mb(std::string_view s) { return module_buf{s.data(), s.size()}; }
// An Envoy buffer as a view; a NULL buffer is the empty string (never a NULL pointer).
inline std::string_view view(envoy_buf b) {
  return b.ptr ? std::string_view(b.ptr, b.length) : std::string_view("", 0);
}

// "llmproxy: <msg>" in Envoy's log (component dynamic_modules), when that level is enabled.
void log_msg(int level, std::string_view msg);
// The same, whatever the log level (a config about to be rejected).
void log_always(int level, std::string_view msg);

std::string lower(std::string s);
bool starts_with(std::string_view s, std::string_view prefix);
// A string accessor of a library request handle, copied ("" when it has none).
std::string request_string(const char *(*accessor)(const llmproxy_request *, size_t *), const llmproxy_request *req);

// Counts (when `exceptions` is set) and logs an exception caught at `hook`; never throws.
void note_exception(const char *hook, std::atomic<uint64_t> *exceptions, const char *what) noexcept;

// Runs a hook body; no exception gets out. On an exception: count it, log it, then return
// on_exception() (itself guarded), or `fallback` if that throws too.
template <typename T, typename Body, typename OnException>
T guard_or(const char *hook, std::atomic<uint64_t> *exceptions, T fallback, OnException &&on_exception,
           Body &&body) noexcept {
  try {
    return body();
  } catch (const std::exception &e) {
    note_exception(hook, exceptions, e.what());
  } catch (...) {
    note_exception(hook, exceptions, nullptr);
  }
  try {
    return on_exception();
  } catch (...) {
    return fallback;
  }
}

template <typename T, typename Body>
T guard(const char *hook, std::atomic<uint64_t> *exceptions, T fallback, Body &&body) noexcept {
  return guard_or(hook, exceptions, fallback, [fallback] { return fallback; }, body);
}

}  // namespace llmproxy_envoy

#endif
