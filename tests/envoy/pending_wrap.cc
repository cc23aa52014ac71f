// Test-only: makes every llmproxy_pick_async of the Envoy module PENDING, with the decision made
// by the real llmproxy_pick on a helper thread after LLMPROXY_TEST_PENDING_DELAY_MS (default 20)
// milliseconds. Linked into build/test-pending/libllmproxy_envoy.so with
// -Wl,--wrap=llmproxy_pick_async, so the real Envoy scheduler path (scheduler_new, commit from a
// foreign thread, on_scheduled, continue_decoding) is exercised end to end although the library
// itself only returns PENDING for remote cache lookups.

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "llmproxy.h"

namespace {
int delay_ms() {
  static const int ms = [] {
    const char *v = std::getenv("LLMPROXY_TEST_PENDING_DELAY_MS");
    return v ? std::atoi(v) : 20;
  }();
  return ms;
}
}  // namespace

extern "C" __attribute__((visibility("hidden"))) llmproxy_status __wrap_llmproxy_pick_async(
    llmproxy_router *router, const llmproxy_header *headers, size_t n, const uint8_t *body, size_t body_len,
    llmproxy_pick_callback cb, void *user_data, llmproxy_request **out) {
  // The inputs are only lent for the call: copy them.
  std::vector<std::pair<std::string, std::string>> hs;
  hs.reserve(n);
  for (size_t i = 0; i < n; ++i)
    hs.emplace_back(std::string(headers[i].name, headers[i].name_len), std::string(headers[i].value, headers[i].value_len));
  std::string b(reinterpret_cast<const char *>(body), body_len);
  *out = nullptr;
  int delay = delay_ms();
  try {
    std::thread([router, hs = std::move(hs), b = std::move(b), cb, user_data, delay] {
      std::this_thread::sleep_for(std::chrono::milliseconds(delay));
      std::vector<llmproxy_header> lh;
      lh.reserve(hs.size());
      for (const auto &h : hs)
        lh.push_back(llmproxy_header{h.first.data(), h.first.size(), h.second.data(), h.second.size()});
      llmproxy_request *req = nullptr;
      llmproxy_pick(router, lh.data(), lh.size(), reinterpret_cast<const uint8_t *>(b.data()), b.size(), &req);
      cb(user_data, req);
    }).detach();
  } catch (...) {
    return LLMPROXY_INTERNAL;  // *out stays NULL: the shim answers 500
  }
  return LLMPROXY_PENDING;
}
