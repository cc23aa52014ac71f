/*
 * ngx_http_llmproxy_module.h: what the module's files share (types, per-worker globals,
 * cross-file functions).
 *
 * ngx_http_llmproxy_module: llmproxy (include/llmproxy.h, linked from build/libllmproxy.a)
 * as a native nginx module, without Lua. See docs/nginx.md, "Native module (no Lua)".
 *
 *   llmproxy_config <file>;                  main: the library's JSON config, read and
 *                                            validated in the master (no thread there)
 *   llmproxy_shared_state <size> [name=<n>]; main: one routing state for every worker, a
 *                                            region made by the master before fork (kept
 *                                            across reloads when name and size stay)
 *   llmproxy on|off;                         location: strip client routing headers, pick for
 *                                            inference requests (POST to intercept_paths)
 *   llmproxy_debug_headers on|off;           location: x-llmproxy-worker/-endpoint response
 *                                            headers (tests, debugging)
 *   llmproxy_balancer;                       upstream{}: the picked ip:port is the peer, a
 *                                            retry asks llmproxy_request_retry; requests
 *                                            without a decision get round robin over the
 *                                            block's servers
 *   llmproxy_metrics;                        location: Prometheus text
 *
 * Request lifecycle (main requests):
 *   rewrite phase     strip every x-llmproxy-*, x-gateway-destination-endpoint and the
 *                     router's cluster header; a subrequest that would be intercepted gets a
 *                     JSON 501 (nginx never runs a subrequest's log phase: its pick could not
 *                     be finished)
 *   precontent phase  (after every access check) 413 early by Content-Length, read the body
 *                     (memory or temp file), pick, answer library errors with their JSON,
 *                     apply body/URI rewrites, set the cluster/endpoint/scene headers
 *   balancer          the decision's endpoint; on a retry llmproxy_request_retry
 *   header/body filter  transcoded status and content type; first response byte -> first
 *                     token; transcoding chunk by chunk
 *   log phase         finish exactly once, with the outcome classified from the last
 *                     upstream try (as the Lua host's log())
 *   pool cleanup      finishes what the log phase did not (never expected: counted as leaked)
 *
 * The decision is kept in a request pool cleanup, found again after an internal redirect
 * (error_page empties the module contexts) by walking the pool's cleanup list.
 */

#ifndef NGX_HTTP_LLMPROXY_MODULE_H_INCLUDED_
#define NGX_HTTP_LLMPROXY_MODULE_H_INCLUDED_

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "llmproxy.h"


#define LLMPROXY_STRIP_PREFIX    "x-llmproxy-"
#define LLMPROXY_ENDPOINT_HEADER "x-llmproxy-endpoint"
#define LLMPROXY_SCENE_HEADER    "x-llmproxy-scene"
#define LLMPROXY_GATEWAY_HEADER  "x-gateway-destination-endpoint"
#define LLMPROXY_ERR_CAP         2048
#define LLMPROXY_TRIES           2   /* the first try and one retry on another endpoint */


/* One worker's part of the counters, at its nginx process slot (ngx_process_slot): what must
 * go away with the worker when it is killed (SIGKILL runs no exit_process). A slot whose pid is
 * gone is reaped (ngx_http_llmproxy_live_workers): its pending picks count as finished and
 * lost. The master gives a slot to a new process only after the old one exited. */
typedef struct {
    ngx_atomic_t  pid;        /* 0: free */
    ngx_atomic_t  pending;    /* this worker's decisions not finished yet */
    /* the worker's router metrics, published for the other workers' metrics location
     * (_snapshot.c; a slab allocation of the zone, read and written under its mutex) */
    u_char       *snapshot;
    size_t        snapshot_len;
    ngx_msec_t    snapshot_msec;   /* ngx_current_msec when published */
} ngx_http_llmproxy_slot_t;

#define LLMPROXY_SNAPSHOT_MS        1000   /* each worker publishes its router metrics */
#define LLMPROXY_SNAPSHOT_STALE_MS  3000   /* older: counted in llmproxy_nginx_stale_snapshots */
#define LLMPROXY_COUNTERS_ZONE      (4 * 1024 * 1024)   /* counters + snapshots */

/* Another worker's router metrics, copied out of the zone for one scrape. */
typedef struct {
    ngx_pid_t     pid;
    ngx_str_t     text;
} ngx_http_llmproxy_snapshot_t;


/* Counters of the module, in a shared zone: one set for the whole nginx (all workers). */
typedef struct {
    ngx_atomic_t  intercepted;
    ngx_atomic_t  passthrough;
    ngx_atomic_t  routed;
    ngx_atomic_t  finished;
    ngx_atomic_t  leaked;
    ngx_atomic_t  pick_errors;
    ngx_atomic_t  early_413;
    ngx_atomic_t  body_memory;
    ngx_atomic_t  body_file;
    ngx_atomic_t  retries;
    ngx_atomic_t  retry_exhausted;
    ngx_atomic_t  subrequests;
    ngx_atomic_t  stripped;
    ngx_atomic_t  client_aborts;
    ngx_atomic_t  outcome_upstream;
    ngx_atomic_t  outcome_endpoint_failed;
    ngx_atomic_t  outcome_local;
    ngx_atomic_t  internal_errors;
    ngx_atomic_t  lookup_waited;       /* picks that waited for a remote cache lookup */
    ngx_atomic_t  lookup_abandoned;    /* of those: not decided by the deadline, picked locally */
    ngx_atomic_t  lookup_cancelled;    /* of those: the request ended while pending */
    ngx_atomic_t  lost;                /* pending picks of workers that died (reaped) */
    ngx_atomic_t  snapshot_failures;   /* publishes that found the zone full */
    ngx_http_llmproxy_slot_t  slots[NGX_MAX_PROCESSES];
} ngx_http_llmproxy_stats_t;


typedef struct {
    ngx_str_t                   config_json;
    ngx_str_t                   config_file;
    ngx_str_t                   shared_name;
    size_t                      shared_size;
    llmproxy_shared_state      *shared;
    ngx_shm_zone_t             *stats_zone;
} ngx_http_llmproxy_main_conf_t;


typedef struct {
    ngx_flag_t                  enable;
    ngx_flag_t                  debug_headers;
    ngx_uint_t                  error_status;   /* llmproxy_error <status> */
} ngx_http_llmproxy_loc_conf_t;


/* One intercepted request, from pick to finish. Lives in the request pool. */
typedef struct {
    llmproxy_request           *req;         /* NULL once finished */
    llmproxy_pick_ticket       *ticket;      /* a pick waiting for a remote lookup */
    ngx_msec_t                  lookup_deadline;
    llmproxy_header            *hdrs;        /* the pick's inputs (request pool) */
    size_t                      nhdrs;
    u_char                     *body;
    size_t                      blen;
    ngx_int_t                   phase_rc;    /* what the precontent handler answers on re-entry */
    ngx_addr_t                  peer;        /* the endpoint, for the balancer */
    ngx_str_t                   endpoint;    /* "ip:port" (pool copy) */
    unsigned                    stream:1;
    unsigned                    first_token:1;
    unsigned                    transcoding:1;
    unsigned                    observing:1;   /* answer read by the library (learning) */
} ngx_http_llmproxy_ctx_t;


typedef struct {
    ngx_http_request_t         *request;
    ngx_http_llmproxy_ctx_t    *ctx;
    ngx_uint_t                  tries;
} ngx_http_llmproxy_peer_data_t;


extern ngx_module_t                 ngx_http_llmproxy_module;

/* Per worker process (ngx_http_llmproxy_module.c). */
extern llmproxy_router             *ngx_llmproxy_router;
extern ngx_str_t                    ngx_llmproxy_cluster_header;   /* lower case */
/* ngx_hash_key of the routing headers' lower-case names, computed once per worker */
extern ngx_uint_t                   ngx_llmproxy_cluster_header_hash;
extern ngx_uint_t                   ngx_llmproxy_endpoint_header_hash;
extern ngx_uint_t                   ngx_llmproxy_scene_header_hash;
extern uint64_t                     ngx_llmproxy_max_body;
extern ngx_http_llmproxy_stats_t   *ngx_llmproxy_stats;
extern ngx_http_llmproxy_slot_t    *ngx_llmproxy_slot;             /* this worker's */
extern ngx_uint_t                   ngx_llmproxy_shared_router;     /* attached to the state */


#define llmproxy_count(field, n)                                              \
    (void) ngx_atomic_fetch_add(&ngx_llmproxy_stats->field, (ngx_atomic_int_t) (n))

#define llmproxy_count_pending(n)                                             \
    (void) ngx_atomic_fetch_add(&ngx_llmproxy_slot->pending, (ngx_atomic_int_t) (n))

/* _module.c */
ngx_uint_t ngx_http_llmproxy_live_workers(ngx_atomic_uint_t *pending);


/* _request.c */
ngx_int_t ngx_http_llmproxy_rewrite_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_llmproxy_precontent_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_llmproxy_send(ngx_http_request_t *r, ngx_uint_t status,
    const u_char *body, size_t len);
ngx_int_t ngx_http_llmproxy_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *msg, size_t msg_len);
ngx_int_t ngx_http_llmproxy_reply(ngx_http_request_t *r, ngx_int_t rc);
ngx_int_t ngx_http_llmproxy_strip(ngx_http_request_t *r);
ngx_int_t ngx_http_llmproxy_set_header(ngx_http_request_t *r, ngx_str_t *name,
    ngx_uint_t hash, const char *value, size_t value_len);
ngx_uint_t ngx_http_llmproxy_should_intercept(ngx_http_request_t *r);
ngx_int_t ngx_http_llmproxy_body(ngx_http_request_t *r, u_char **data, size_t *len);
ngx_int_t ngx_http_llmproxy_set_body(ngx_http_request_t *r, const uint8_t *body,
    size_t len);
ngx_int_t ngx_http_llmproxy_set_endpoint(ngx_http_request_t *r,
    ngx_http_llmproxy_ctx_t *ctx);
ngx_int_t ngx_http_llmproxy_error_handler(ngx_http_request_t *r);
char *ngx_http_llmproxy_error(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);

void ngx_http_llmproxy_picked(ngx_http_request_t *r, ngx_http_llmproxy_ctx_t *ctx,
    llmproxy_status st, llmproxy_request *req);

/* _lookup.c */
void ngx_http_llmproxy_pick_begin(ngx_http_request_t *r, ngx_http_llmproxy_ctx_t *ctx);
void ngx_http_llmproxy_lookup_cancel(ngx_http_llmproxy_ctx_t *ctx);

/* _upstream.c */
char *ngx_http_llmproxy_balancer(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);

/* _filter.c */
void ngx_http_llmproxy_filter_init(void);
ngx_int_t ngx_http_llmproxy_header_filter(ngx_http_request_t *r);
ngx_int_t ngx_http_llmproxy_body_filter(ngx_http_request_t *r, ngx_chain_t *in);

/* _snapshot.c */
void ngx_http_llmproxy_snapshot_zone(ngx_slab_pool_t *shpool);
void ngx_http_llmproxy_snapshot_start(ngx_cycle_t *cycle);
void ngx_http_llmproxy_snapshot_release(ngx_http_llmproxy_slot_t *slot);
char *ngx_http_llmproxy_router_text(size_t *len);
ngx_array_t *ngx_http_llmproxy_snapshots(ngx_pool_t *pool, ngx_uint_t *stale);

/* _finish.c */
ngx_http_llmproxy_ctx_t *ngx_http_llmproxy_find_ctx(ngx_http_request_t *r);
void ngx_http_llmproxy_finish(ngx_http_llmproxy_ctx_t *ctx, ngx_uint_t status,
    llmproxy_outcome outcome);
void ngx_http_llmproxy_cleanup(void *data);
ngx_int_t ngx_http_llmproxy_log_handler(ngx_http_request_t *r);

/* _metrics.c */
char *ngx_http_llmproxy_metrics(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);


#endif /* NGX_HTTP_LLMPROXY_MODULE_H_INCLUDED_ */
