// llmproxy Envoy shim: the module's entry points. Every hook Envoy 1.40 resolves in the module is
// defined here, as a one-line trampoline into the class that does the work, inside the exception
// guard: program init (with the module pin), the HTTP filter's config factory (FilterConfig) and
// stream filter (Filter), and the retry load-balancing policy (LbPolicy). The hooks 1.40 requires
// but llmproxy does not use are grouped at the bottom.
//
// Envoy's C++ SDK layout, without the SDK (spec P3: only callbacks 1.40 exports are referenced):
//   on_http_filter_config_new -> FilterConfig::create   (config factory -> filter factory)
//   on_http_filter_new        -> Filter                 (one per stream, methods in wire order)
//   on_lb_new                 -> LbPolicy               (one per cluster and worker)

#include <dlfcn.h>

#include <memory>
#include <utility>

#include "common.h"
#include "filter.h"
#include "filter_config.h"
#include "lb_policy.h"
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

using namespace llmproxy_envoy;

namespace {

FilterConfig *as_config(const void *p) { return const_cast<FilterConfig *>(static_cast<const FilterConfig *>(p)); }
Filter *as_filter(const void *p) { return const_cast<Filter *>(static_cast<const Filter *>(p)); }
LbPolicy *as_lb(const void *p) { return const_cast<LbPolicy *>(static_cast<const LbPolicy *>(p)); }

template <typename Status>
constexpr int abi(Status s) {
  return static_cast<int>(s);
}

// Runs `method` on the filter behind a hook's module pointer inside guard(), exceptions counted
// on its config: `fallback` for a NULL filter; after an exception, what `on_exception` says.
template <typename T, typename OnException, typename Method>
T with_filter(const char *hook, const void *m, T fallback, OnException &&on_exception, Method &&method) noexcept {
  Filter *flt = as_filter(m);
  if (!flt) return fallback;
  return guard_or(
      hook, &flt->config().counters.hook_exceptions, fallback, [&] { return on_exception(*flt); },
      [&] { return method(*flt); });
}

// A hook with a status: Continue for a NULL filter or after an exception.
template <typename Method>
int on_filter(const char *hook, const void *m, Method &&method) noexcept {
  using Status = decltype(method(std::declval<Filter &>()));
  return abi(with_filter(hook, m, Status::Continue, [](Filter &) { return Status::Continue; }, method));
}

// A request-path hook: after an exception the filter fails closed (500, nothing forwarded) and
// the hook returns `stop`; Continue when a reply or the request already went out.
template <typename Status, typename Method>
int on_request_path(const char *hook, const void *m, Status stop, Method &&method) noexcept {
  return abi(with_filter(
      hook, m, Status::Continue, [stop](Filter &f) { return f.fail_closed() ? stop : Status::Continue; }, method));
}

// A hook without a result.
template <typename Method>
void on_filter_event(const char *hook, const void *m, Method &&method) noexcept {
  auto nothing = [](Filter &) { return 0; };
  with_filter(hook, m, 0, nothing, [&](Filter &f) {
    method(f);
    return 0;
  });
}

// Envoy may dlclose the module when its last config goes (dynamic_module_config.do_not_close
// false), while threads that run its code still live: the library's lookup threads finish on
// their own after llmproxy_router_free, and the shim's watchdog never ends. So the module pins
// itself in memory (RTLD_NODELETE) when loaded. Nothing to pin when linked into Envoy statically.
void pin_module_in_memory() {
#ifndef LLMPROXY_ENVOY_HOOK_PREFIX
  Dl_info info{};
  if (dladdr(reinterpret_cast<void *>(&pin_module_in_memory), &info) != 0 && info.dli_fname != nullptr) {
    // The extra reference is never released: the module stays mapped until the process exits.
    (void)dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  }
#endif
}

int g_lb_config_marker;  // the LB policy has no config of its own

}  // namespace

// Internal accessor for the fake-host tests (llmproxy_envoy_internal.h; not exported).
extern "C" llmproxy_router *llmproxy_envoy_config_router(const void *filter_config_module_ptr) {
  return filter_config_module_ptr ? as_config(filter_config_module_ptr)->router : nullptr;
}

// ---- program ----

LLMPROXY_EXPORT const char *HOOK(envoy_dynamic_module_on_program_init)(void) {
  pin_module_in_memory();
  return LLMPROXY_ENVOY_ABI_VERSION;
}

// ---- HTTP filter: config factory (main thread) ----

LLMPROXY_EXPORT const void *HOOK(envoy_dynamic_module_on_http_filter_config_new)(void *, envoy_buf name,
                                                                                envoy_buf json) {
  return guard<const void *>("config_new", nullptr, nullptr,
                             [&] { return FilterConfig::create(view(name), view(json)).release(); });
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_config_destroy)(const void *config_module) {
  guard("config_destroy", nullptr, 0, [&] {
    delete as_config(config_module);
    return 0;
  });
}

// ---- HTTP filter: one per stream, hooks in wire order (worker thread) ----

LLMPROXY_EXPORT const void *HOOK(envoy_dynamic_module_on_http_filter_new)(const void *config_module, void *envoy) {
  FilterConfig *cfg = as_config(config_module);
  return cfg ? guard<const void *>("filter_new", &cfg->counters.hook_exceptions, nullptr,
                                   [&] { return new Filter(*cfg, envoy); })
             : nullptr;
}

LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_request_headers)(void *, const void *m, bool eos) {
  return on_request_path("request_headers", m, HeadersStatus::Stop,
                         [=](Filter &f) { return f.on_request_headers(eos); });
}

LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_request_body)(void *, const void *m, bool eos) {
  return on_request_path("request_body", m, BodyStatus::StopNoBuffer,
                         [=](Filter &f) { return f.on_request_body(eos); });
}

LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_request_trailers)(void *, const void *m) {
  return on_request_path("request_trailers", m, TrailersStatus::Stop,
                         [](Filter &f) { return f.on_request_trailers(); });
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_scheduled)(void *, const void *m, uint64_t event_id) {
  on_filter_event("scheduled", m, [=](Filter &f) { f.on_scheduled(event_id); });
}

LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_response_headers)(void *, const void *m, bool eos) {
  return on_filter("response_headers", m, [=](Filter &f) { return f.on_response_headers(eos); });
}

LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_response_body)(void *, const void *m, bool eos) {
  return on_filter("response_body", m, [=](Filter &f) { return f.on_response_body(eos); });
}

// Optional in 1.40: every local reply, Envoy's and ours, before it is encoded.
LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_local_reply)(void *, const void *m, uint32_t status,
                                                                         envoy_buf details, bool) {
  return on_filter("local_reply", m, [=](Filter &f) { return f.on_local_reply(status, view(details)); });
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_stream_complete)(void *, const void *m) {
  on_filter_event("stream_complete", m, [](Filter &f) { f.on_stream_complete(); });
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_destroy)(const void *m) {
  on_filter_event("filter_destroy", m, [](Filter &f) {
    f.on_destroy();
    delete &f;
  });
}

// ---- load-balancing policy (envoy.load_balancing_policies.dynamic_modules; all six hooks are
// resolved when a cluster uses it; signatures verified on the 1.40 binary, see
// envoy_dynamic_module_abi.h) ----

LLMPROXY_EXPORT const void *HOOK(envoy_dynamic_module_on_lb_config_new)(void *, envoy_buf, envoy_buf) {
  return &g_lb_config_marker;
}

LLMPROXY_EXPORT const void *HOOK(envoy_dynamic_module_on_lb_new)(const void *, void *) {
  return guard<const void *>("lb_new", nullptr, nullptr, [] { return new LbPolicy(); });
}

LLMPROXY_EXPORT bool HOOK(envoy_dynamic_module_on_lb_choose_host)(void *lb_envoy, const void *lb_module, void *context,
                                                                 uint32_t *priority, uint32_t *index) {
  LbPolicy *lb = as_lb(lb_module);
  return lb &&
         guard("lb_choose_host", nullptr, false, [&] { return lb->choose_host(lb_envoy, context, priority, index); });
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_lb_destroy)(const void *lb_module) { delete as_lb(lb_module); }

// ---------------------------------------------------------------------------------------------
// Required by Envoy 1.40 (resolved at config creation: a missing one rejects the config, spec P2),
// unused by llmproxy.

LLMPROXY_EXPORT int HOOK(envoy_dynamic_module_on_http_filter_response_trailers)(void *, const void *) {
  return ENVOY_TRAILERS_CONTINUE;
}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_http_callout_done)(
    void *, const void *, uint64_t, int, envoy_dynamic_module_type_envoy_http_header *, size_t, envoy_buf *, size_t) {}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_http_stream_headers)(
    void *, const void *, uint64_t, envoy_dynamic_module_type_envoy_http_header *, size_t, bool) {}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_http_stream_data)(void *, const void *, uint64_t,
                                                                               const envoy_buf *, size_t, bool) {}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_http_stream_trailers)(
    void *, const void *, uint64_t, envoy_dynamic_module_type_envoy_http_header *, size_t) {}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_http_stream_complete)(void *, const void *, uint64_t) {}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_http_stream_reset)(void *, const void *, uint64_t, int) {}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark)(
    void *, const void *) {}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark)(
    void *, const void *) {}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_lb_config_destroy)(const void *) {}

LLMPROXY_EXPORT void HOOK(envoy_dynamic_module_on_lb_on_host_membership_update)(void *, const void *, size_t, size_t) {}
