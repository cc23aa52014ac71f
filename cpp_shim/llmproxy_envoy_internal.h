// Internal entry points of the llmproxy Envoy shim, for the fake-host unit tests only.
// They are not exported from libllmproxy_envoy.so (the version script keeps only the hooks).
#ifndef LLMPROXY_ENVOY_INTERNAL_H
#define LLMPROXY_ENVOY_INTERNAL_H

#include "llmproxy.h"

#ifdef __cplusplus
extern "C" {
#endif

// The router owned by a filter config (the pointer config_new returned).
llmproxy_router *llmproxy_envoy_config_router(const void *filter_config_module_ptr);

// Default path for the Prometheus text of the router (GET only).
#define LLMPROXY_ENVOY_DEFAULT_METRICS_PATH "/llmproxy/metrics"

#ifdef __cplusplus
}
#endif

#endif
