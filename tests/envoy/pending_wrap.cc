// Test-only: makes every llmproxy_pick_async of the Envoy module PENDING, with the decision made
// by the real llmproxy_pick on a helper thread after LLMPROXY_TEST_PENDING_DELAY_MS (default 20)
// milliseconds; a negative delay means the decision never comes. Linked into
// build/test-pending/libllmproxy_envoy.so with -Wl,--wrap=llmproxy_pick_async, so the real Envoy
// scheduler path (scheduler_new, commit from a foreign thread, on_scheduled, continue_decoding) is
// exercised end to end although the library itself only returns PENDING for remote cache lookups.
// LLMPROXY_TEST_PICK_DEADLINE_MS (-Wl,--wrap=llmproxy_router_pick_deadline_ms) sets the shim's
// deadline for those decisions.

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "llmproxy.h"

namespace {
int env_ms(const char *name, int fallback) {
  const char *v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}
int delay_ms() {
  static const int ms = env_ms("LLMPROXY_TEST_PENDING_DELAY_MS", 20);
  return ms;
}
}  // namespace

extern "C" uint64_t __real_llmproxy_router_pick_deadline_ms(const llmproxy_router *router);
extern "C" __attribute__((visibility("hidden"))) uint64_t __wrap_llmproxy_router_pick_deadline_ms(
    const llmproxy_router *router) {
  int ms = env_ms("LLMPROXY_TEST_PICK_DEADLINE_MS", 0);
  return ms > 0 ? static_cast<uint64_t>(ms) : __real_llmproxy_router_pick_deadline_ms(router);
}

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
  if (delay < 0) return LLMPROXY_PENDING;  // never decided (user_data is never released: test only)
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
