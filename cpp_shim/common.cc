// llmproxy Envoy shim, shared helpers (see common.h): logging, strings, exception reporting.

#include "common.h"

namespace llmproxy_envoy {

void log_always(int level, std::string_view msg) {
  std::string line = "llmproxy: ";
  line += msg;
  envoy_dynamic_module_callback_log(level, mb(line));
}

void log_msg(int level, std::string_view msg) {
  if (envoy_dynamic_module_callback_log_enabled(level)) log_always(level, msg);
}

std::string lower(std::string s) {
  for (char &c : s)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return s;
}

bool starts_with(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }

std::string request_string(const char *(*accessor)(const llmproxy_request *, size_t *), const llmproxy_request *req) {
  size_t len = 0;
  const char *p = accessor(req, &len);
  return p ? std::string(p, len) : std::string();
}

void note_exception(const char *hook, std::atomic<uint64_t> *exceptions, const char *what) noexcept {
  if (exceptions) exceptions->fetch_add(1, std::memory_order_relaxed);
  try {
    log_msg(ENVOY_LOG_ERROR, std::string(hook) + (what ? std::string(": exception: ") + what : ": unknown exception"));
  } catch (...) {
  }
}

}  // namespace llmproxy_envoy
