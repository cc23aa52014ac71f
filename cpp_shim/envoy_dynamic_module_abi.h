/*
 * Minimal declarations of the Envoy dynamic-module ABI subset used by llmproxy's shim.
 *
 * Written by the llmproxy project from its verified notes on the Envoy 1.40.0 release
 * binary (shared/spec/envoy-dynamic-modules-1.40.md); it is not Envoy's abi.h. Only the
 * callbacks the shim actually references are declared: the 1.40 release loads modules
 * with RTLD_NOW, so every referenced callback must exist in the running Envoy.
 *
 * Hook symbol names can carry a prefix (LLMPROXY_ENVOY_HOOK_PREFIX) for the static-module
 * build, where Envoy looks up "<name>_envoy_dynamic_module_on_..." in its own binary.
 */
#ifndef LLMPROXY_ENVOY_DYNAMIC_MODULE_ABI_H
#define LLMPROXY_ENVOY_DYNAMIC_MODULE_ABI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ABI version string the 1.40 binary expects from on_program_init. */
#define LLMPROXY_ENVOY_ABI_VERSION "v0.2.0"

/* ---- types (layout-compatible with Envoy's; passed by value) ---- */
typedef struct {
  const char *ptr;
  size_t length;
} envoy_dynamic_module_type_envoy_buffer; /* owned by Envoy */

typedef struct {
  const char *ptr;
  size_t length;
} envoy_dynamic_module_type_module_buffer; /* owned by the module */

typedef struct {
  const char *key_ptr;
  size_t key_length;
  const char *value_ptr;
  size_t value_length;
} envoy_dynamic_module_type_module_http_header;

typedef envoy_dynamic_module_type_module_http_header envoy_dynamic_module_type_envoy_http_header;

typedef void *envoy_dynamic_module_type_http_filter_config_envoy_ptr;
typedef const void *envoy_dynamic_module_type_http_filter_config_module_ptr;
typedef void *envoy_dynamic_module_type_http_filter_envoy_ptr;
typedef const void *envoy_dynamic_module_type_http_filter_module_ptr;
typedef void *envoy_dynamic_module_type_http_filter_scheduler_module_ptr;

/* enums, passed as C int */
enum {
  ENVOY_HEADER_REQUEST = 0,
  ENVOY_HEADER_REQUEST_TRAILER = 1,
  ENVOY_HEADER_RESPONSE = 2,
  ENVOY_HEADER_RESPONSE_TRAILER = 3,
};
enum {
  ENVOY_BODY_RECEIVED_REQUEST = 0,
  ENVOY_BODY_BUFFERED_REQUEST = 1,
  ENVOY_BODY_RECEIVED_RESPONSE = 2,
  ENVOY_BODY_BUFFERED_RESPONSE = 3,
};
enum {
  ENVOY_HEADERS_CONTINUE = 0,
  ENVOY_HEADERS_STOP_ITERATION = 1,
  ENVOY_HEADERS_CONTINUE_AND_DONT_END_STREAM = 2,
  ENVOY_HEADERS_STOP_ALL_ITERATION_AND_BUFFER = 3,
  ENVOY_HEADERS_STOP_ALL_ITERATION_AND_WATERMARK = 4,
};
enum {
  ENVOY_BODY_CONTINUE = 0,
  ENVOY_BODY_STOP_ITERATION_AND_BUFFER = 1,
  ENVOY_BODY_STOP_ITERATION_AND_WATERMARK = 2,
  ENVOY_BODY_STOP_ITERATION_NO_BUFFER = 3,
};
enum {
  ENVOY_TRAILERS_CONTINUE = 0,
  ENVOY_TRAILERS_STOP_ITERATION = 1,
};
enum {
  ENVOY_LOCAL_REPLY_CONTINUE = 0,
  ENVOY_LOCAL_REPLY_CONTINUE_AND_RESET = 1,
};
enum {
  ENVOY_LOG_TRACE = 0,
  ENVOY_LOG_DEBUG = 1,
  ENVOY_LOG_INFO = 2,
  ENVOY_LOG_WARN = 3,
  ENVOY_LOG_ERROR = 4,
  ENVOY_LOG_CRITICAL = 5,
  ENVOY_LOG_OFF = 6,
};
enum {
  ENVOY_ATTRIBUTE_RESPONSE_CODE = 15,
  ENVOY_ATTRIBUTE_UPSTREAM_ADDRESS = 41,
};

/* Load-balancing policy (envoy.load_balancing_policies.dynamic_modules). Hooks, verified by
 * disassembly of the 1.40 binary (its builtin hickory_dns_static_envoy_dynamic_module_on_lb_* and
 * the callbacks below):
 *   const void *on_lb_config_new(void *lb_config_envoy, envoy_buffer name, envoy_buffer config);
 *   void        on_lb_config_destroy(const void *lb_config_module);
 *   const void *on_lb_new(const void *lb_config_module, void *lb_envoy);
 *   bool        on_lb_choose_host(void *lb_envoy, const void *lb_module, void *context_envoy,
 *                                 uint32_t *priority, uint32_t *index);   -- index into the
 *                                 priority's *healthy* hosts; false = no host
 *   void        on_lb_on_host_membership_update(void *lb_envoy, const void *lb_module,
 *                                               size_t hosts_added, size_t hosts_removed);
 *   void        on_lb_destroy(const void *lb_module);
 * All six are resolved when a cluster uses the policy. */
typedef void *envoy_dynamic_module_type_lb_envoy_ptr;
typedef void *envoy_dynamic_module_type_lb_context_envoy_ptr;

/* ---- callbacks exported by Envoy 1.40 that the shim uses ---- */
void envoy_dynamic_module_callback_log(int level, envoy_dynamic_module_type_module_buffer message);
bool envoy_dynamic_module_callback_log_enabled(int level);

bool envoy_dynamic_module_callback_http_get_header(envoy_dynamic_module_type_http_filter_envoy_ptr f, int header_type,
                                                   envoy_dynamic_module_type_module_buffer key,
                                                   envoy_dynamic_module_type_envoy_buffer *result, size_t index,
                                                   size_t *optional_size);
size_t envoy_dynamic_module_callback_http_get_headers_size(envoy_dynamic_module_type_http_filter_envoy_ptr f,
                                                           int header_type);
bool envoy_dynamic_module_callback_http_get_headers(envoy_dynamic_module_type_http_filter_envoy_ptr f, int header_type,
                                                    envoy_dynamic_module_type_envoy_http_header *result_headers);
/* Replaces the header; an empty value removes it. */
bool envoy_dynamic_module_callback_http_set_header(envoy_dynamic_module_type_http_filter_envoy_ptr f, int header_type,
                                                   envoy_dynamic_module_type_module_buffer key,
                                                   envoy_dynamic_module_type_module_buffer value);

size_t envoy_dynamic_module_callback_http_get_body_size(envoy_dynamic_module_type_http_filter_envoy_ptr f,
                                                        int body_type);
size_t envoy_dynamic_module_callback_http_get_body_chunks_size(envoy_dynamic_module_type_http_filter_envoy_ptr f,
                                                               int body_type);
bool envoy_dynamic_module_callback_http_get_body_chunks(envoy_dynamic_module_type_http_filter_envoy_ptr f,
                                                        int body_type,
                                                        envoy_dynamic_module_type_envoy_buffer *result_buffer_vector);
bool envoy_dynamic_module_callback_http_received_buffered_request_body(
    envoy_dynamic_module_type_http_filter_envoy_ptr f);
/* Body modification (request or response, by body_type). */
bool envoy_dynamic_module_callback_http_append_body(envoy_dynamic_module_type_http_filter_envoy_ptr f, int body_type,
                                                    envoy_dynamic_module_type_module_buffer data);
bool envoy_dynamic_module_callback_http_drain_body(envoy_dynamic_module_type_http_filter_envoy_ptr f, int body_type,
                                                   size_t number_of_bytes);

void envoy_dynamic_module_callback_http_send_response(envoy_dynamic_module_type_http_filter_envoy_ptr f,
                                                      uint32_t status_code,
                                                      envoy_dynamic_module_type_module_http_header *headers_vector,
                                                      size_t headers_vector_size,
                                                      envoy_dynamic_module_type_module_buffer body,
                                                      envoy_dynamic_module_type_module_buffer details);

bool envoy_dynamic_module_callback_http_set_upstream_override_host(envoy_dynamic_module_type_http_filter_envoy_ptr f,
                                                                   envoy_dynamic_module_type_module_buffer host,
                                                                   bool strict);
void envoy_dynamic_module_callback_http_set_dynamic_metadata_string(envoy_dynamic_module_type_http_filter_envoy_ptr f,
                                                                    envoy_dynamic_module_type_module_buffer ns,
                                                                    envoy_dynamic_module_type_module_buffer key,
                                                                    envoy_dynamic_module_type_module_buffer value);
bool envoy_dynamic_module_callback_http_filter_get_attribute_int(envoy_dynamic_module_type_http_filter_envoy_ptr f,
                                                                 int attribute_id, uint64_t *result);
void envoy_dynamic_module_callback_http_set_buffer_limit(envoy_dynamic_module_type_http_filter_envoy_ptr f,
                                                         uint64_t limit);
uint64_t envoy_dynamic_module_callback_http_get_buffer_limit(envoy_dynamic_module_type_http_filter_envoy_ptr f);
void envoy_dynamic_module_callback_http_clear_route_cache(envoy_dynamic_module_type_http_filter_envoy_ptr f);

envoy_dynamic_module_type_http_filter_scheduler_module_ptr envoy_dynamic_module_callback_http_filter_scheduler_new(
    envoy_dynamic_module_type_http_filter_envoy_ptr f);
void envoy_dynamic_module_callback_http_filter_scheduler_commit(
    envoy_dynamic_module_type_http_filter_scheduler_module_ptr scheduler, uint64_t event_id);
void envoy_dynamic_module_callback_http_filter_scheduler_delete(
    envoy_dynamic_module_type_http_filter_scheduler_module_ptr scheduler);
void envoy_dynamic_module_callback_http_filter_continue_decoding(envoy_dynamic_module_type_http_filter_envoy_ptr f);
/* String attributes, e.g. ENVOY_ATTRIBUTE_UPSTREAM_ADDRESS ("ip:port" of the host that answered). */
bool envoy_dynamic_module_callback_http_filter_get_attribute_string(envoy_dynamic_module_type_http_filter_envoy_ptr f,
                                                                    int attribute_id,
                                                                    envoy_dynamic_module_type_envoy_buffer *result);

/* Load-balancer callbacks (1.40, verified by disassembly). */
size_t envoy_dynamic_module_callback_lb_get_priority_set_size(envoy_dynamic_module_type_lb_envoy_ptr lb);
size_t envoy_dynamic_module_callback_lb_get_healthy_hosts_count(envoy_dynamic_module_type_lb_envoy_ptr lb,
                                                                uint32_t priority);
bool envoy_dynamic_module_callback_lb_get_healthy_host_address(envoy_dynamic_module_type_lb_envoy_ptr lb,
                                                               uint32_t priority, size_t index,
                                                               envoy_dynamic_module_type_envoy_buffer *result);
bool envoy_dynamic_module_callback_lb_context_get_downstream_header(
    envoy_dynamic_module_type_lb_context_envoy_ptr context, envoy_dynamic_module_type_module_buffer key,
    envoy_dynamic_module_type_envoy_buffer *result, size_t index, size_t *optional_size);

#ifdef __cplusplus
}
#endif

#endif /* LLMPROXY_ENVOY_DYNAMIC_MODULE_ABI_H */
