/*
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


/* Counters of the module, in a shared zone: one set for the whole nginx (all workers). */
typedef struct {
    ngx_atomic_t  workers;
    ngx_atomic_t  intercepted;
    ngx_atomic_t  passthrough;
    ngx_atomic_t  routed;
    ngx_atomic_t  finished;
    ngx_atomic_t  leaked;
    ngx_atomic_t  pending;
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
    ngx_int_t                   phase_rc;    /* what the precontent handler answers on re-entry */
    ngx_addr_t                  peer;        /* the endpoint, for the balancer */
    ngx_str_t                   endpoint;    /* "ip:port" (pool copy) */
    unsigned                    stream:1;
    unsigned                    first_token:1;
    unsigned                    transcoding:1;
} ngx_http_llmproxy_ctx_t;


typedef struct {
    ngx_http_request_t         *request;
    ngx_http_llmproxy_ctx_t    *ctx;
    ngx_uint_t                  tries;
} ngx_http_llmproxy_peer_data_t;


static void *ngx_http_llmproxy_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_llmproxy_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_llmproxy_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child);
static char *ngx_http_llmproxy_config(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_llmproxy_shared_state(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_llmproxy_balancer(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_llmproxy_metrics(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_llmproxy_error(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_llmproxy_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_llmproxy_init_process(ngx_cycle_t *cycle);
static void ngx_http_llmproxy_exit_process(ngx_cycle_t *cycle);
static void ngx_http_llmproxy_cleanup(void *data);


static ngx_command_t  ngx_http_llmproxy_commands[] = {

    { ngx_string("llmproxy_config"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_llmproxy_config,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("llmproxy_shared_state"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE12,
      ngx_http_llmproxy_shared_state,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("llmproxy"),
      NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llmproxy_loc_conf_t, enable),
      NULL },

    { ngx_string("llmproxy_debug_headers"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llmproxy_loc_conf_t, debug_headers),
      NULL },

    { ngx_string("llmproxy_balancer"),
      NGX_HTTP_UPS_CONF|NGX_CONF_NOARGS,
      ngx_http_llmproxy_balancer,
      0,
      0,
      NULL },

    { ngx_string("llmproxy_metrics"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_llmproxy_metrics,
      0,
      0,
      NULL },

    { ngx_string("llmproxy_error"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_llmproxy_error,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_llmproxy_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_llmproxy_postconfiguration,   /* postconfiguration */

    ngx_http_llmproxy_create_main_conf,    /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_llmproxy_create_loc_conf,     /* create location configuration */
    ngx_http_llmproxy_merge_loc_conf       /* merge location configuration */
};


ngx_module_t  ngx_http_llmproxy_module = {
    NGX_MODULE_V1,
    &ngx_http_llmproxy_module_ctx,         /* module context */
    ngx_http_llmproxy_commands,            /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_llmproxy_init_process,        /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_llmproxy_exit_process,        /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/* Per worker process. */
static llmproxy_router             *ngx_llmproxy_router;
static ngx_str_t                    ngx_llmproxy_cluster_header;   /* lower case */
static uint64_t                     ngx_llmproxy_max_body;
static ngx_http_llmproxy_stats_t   *ngx_llmproxy_stats;
static ngx_http_llmproxy_stats_t    ngx_llmproxy_stats_local;      /* before the zone exists */

static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


#define llmproxy_count(field, n)                                              \
    (void) ngx_atomic_fetch_add(&ngx_llmproxy_stats->field, (ngx_atomic_int_t) (n))


/* ---------------------------------------------------------------------------------------
 * configuration (master, before fork)
 */

static void *
ngx_http_llmproxy_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_llmproxy_main_conf_t  *lmcf;

    lmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmproxy_main_conf_t));
    if (lmcf == NULL) {
        return NULL;
    }

    return lmcf;
}


static void *
ngx_http_llmproxy_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_llmproxy_loc_conf_t  *llcf;

    llcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmproxy_loc_conf_t));
    if (llcf == NULL) {
        return NULL;
    }

    llcf->enable = NGX_CONF_UNSET;
    llcf->debug_headers = NGX_CONF_UNSET;
    llcf->error_status = NGX_CONF_UNSET_UINT;

    return llcf;
}


static char *
ngx_http_llmproxy_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_llmproxy_loc_conf_t  *prev = parent;
    ngx_http_llmproxy_loc_conf_t  *conf = child;

    ngx_conf_merge_value(conf->enable, prev->enable, 0);
    ngx_conf_merge_value(conf->debug_headers, prev->debug_headers, 0);
    ngx_conf_merge_uint_value(conf->error_status, prev->error_status, 0);

    return NGX_CONF_OK;
}


static char *
ngx_http_llmproxy_config(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llmproxy_main_conf_t  *lmcf = conf;

    ssize_t          n;
    ngx_str_t       *value;
    ngx_file_t       file;
    ngx_file_info_t  fi;
    u_char           err[LLMPROXY_ERR_CAP];

    if (lmcf->config_json.data) {
        return "is duplicate";
    }

    value = cf->args->elts;
    lmcf->config_file = value[1];

    if (ngx_conf_full_name(cf->cycle, &lmcf->config_file, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&file, sizeof(ngx_file_t));
    file.name = lmcf->config_file;
    file.log = cf->log;

    file.fd = ngx_open_file(file.name.data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);
    if (file.fd == NGX_INVALID_FILE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_open_file_n " \"%V\" failed", &file.name);
        return NGX_CONF_ERROR;
    }

    if (ngx_fd_info(file.fd, &fi) == NGX_FILE_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_fd_info_n " \"%V\" failed", &file.name);
        (void) ngx_close_file(file.fd);
        return NGX_CONF_ERROR;
    }

    lmcf->config_json.len = (size_t) ngx_file_size(&fi);
    lmcf->config_json.data = ngx_pnalloc(cf->pool, lmcf->config_json.len + 1);
    if (lmcf->config_json.data == NULL) {
        (void) ngx_close_file(file.fd);
        return NGX_CONF_ERROR;
    }

    n = ngx_read_file(&file, lmcf->config_json.data, lmcf->config_json.len, 0);
    (void) ngx_close_file(file.fd);

    if (n == NGX_ERROR || (size_t) n != lmcf->config_json.len) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "cannot read \"%V\"", &file.name);
        return NGX_CONF_ERROR;
    }

    lmcf->config_json.data[lmcf->config_json.len] = '\0';

    /* builds no router and starts no thread: the master stays thread-free */
    err[0] = '\0';
    if (llmproxy_config_validate((const char *) lmcf->config_json.data,
                                 lmcf->config_json.len, (char *) err, sizeof(err))
        != LLMPROXY_OK)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "llmproxy: invalid configuration in \"%V\": %s",
                           &file.name, err);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void
ngx_http_llmproxy_shared_free(void *data)
{
    /* the handle only: routers attached in workers keep the region mapped, and the library
     * keeps named regions for the life of the process (a reload gets the same one back) */
    llmproxy_shared_state_free(data);
}


static char *
ngx_http_llmproxy_shared_state(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llmproxy_main_conf_t  *lmcf = conf;

    ssize_t              size;
    ngx_str_t           *value;
    ngx_pool_cleanup_t  *cln;
    u_char               err[LLMPROXY_ERR_CAP];

    if (lmcf->shared_size) {
        return "is duplicate";
    }

    value = cf->args->elts;

    size = ngx_parse_size(&value[1]);
    if (size == NGX_ERROR || size <= 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid size \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    ngx_str_set(&lmcf->shared_name, "llmproxy");

    if (cf->args->nelts == 3) {
        if (ngx_strncmp(value[2].data, "name=", 5) != 0 || value[2].len == 5) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[2]);
            return NGX_CONF_ERROR;
        }
        lmcf->shared_name.data = value[2].data + 5;
        lmcf->shared_name.len = value[2].len - 5;
    }

    lmcf->shared_size = (size_t) size;

    err[0] = '\0';
    if (llmproxy_shared_state_new((const char *) lmcf->shared_name.data,
                                  lmcf->shared_name.len, (uint64_t) size,
                                  &lmcf->shared, (char *) err, sizeof(err))
        != LLMPROXY_OK)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "llmproxy: shared state: %s", err);
        return NGX_CONF_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        llmproxy_shared_state_free(lmcf->shared);
        lmcf->shared = NULL;
        return NGX_CONF_ERROR;
    }
    cln->handler = ngx_http_llmproxy_shared_free;
    cln->data = lmcf->shared;

    ngx_conf_log_error(NGX_LOG_NOTICE, cf, 0,
                       "llmproxy: shared state \"%V\" of %uz bytes %s",
                       &lmcf->shared_name, lmcf->shared_size,
                       llmproxy_shared_state_reused(lmcf->shared)
                       ? "kept from before the reload" : "created");

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_llmproxy_init_stats_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_slab_pool_t  *shpool;

    if (data) {              /* a reload: keep the counters */
        shm_zone->data = data;
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        shm_zone->data = shpool->data;
        return NGX_OK;
    }

    shm_zone->data = ngx_slab_calloc(shpool, sizeof(ngx_http_llmproxy_stats_t));
    if (shm_zone->data == NULL) {
        return NGX_ERROR;
    }

    shpool->data = shm_zone->data;

    return NGX_OK;
}


/* ---------------------------------------------------------------------------------------
 * worker processes: one router each
 */

static ngx_int_t
ngx_http_llmproxy_init_process(ngx_cycle_t *cycle)
{
    const char                     *ch;
    size_t                          len;
    llmproxy_status                 rc;
    ngx_http_llmproxy_main_conf_t  *lmcf;
    char                            err[LLMPROXY_ERR_CAP];

    ngx_llmproxy_stats = &ngx_llmproxy_stats_local;

    if (ngx_process != NGX_PROCESS_WORKER && ngx_process != NGX_PROCESS_SINGLE) {
        return NGX_OK;
    }

    lmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_llmproxy_module);
    if (lmcf == NULL || lmcf->config_json.data == NULL) {
        return NGX_OK;
    }

    if (lmcf->stats_zone && lmcf->stats_zone->data) {
        ngx_llmproxy_stats = lmcf->stats_zone->data;
    }

    err[0] = '\0';
    rc = LLMPROXY_INTERNAL;

    if (lmcf->shared) {
        rc = llmproxy_router_new_shared((const char *) lmcf->config_json.data,
                                        lmcf->config_json.len, lmcf->shared,
                                        &ngx_llmproxy_router, err, sizeof(err));
        if (rc != LLMPROXY_OK) {
            /* all worker slots held by live processes: route on this worker's own state
             * rather than not at all */
            ngx_log_error(NGX_LOG_ERR, cycle->log, 0,
                          "llmproxy: cannot attach to the shared state (%s): "
                          "this worker routes on its own state", err);
        }
    }

    if (rc != LLMPROXY_OK) {
        err[0] = '\0';
        rc = llmproxy_router_new((const char *) lmcf->config_json.data,
                                 lmcf->config_json.len, &ngx_llmproxy_router,
                                 err, sizeof(err));
    }

    if (rc != LLMPROXY_OK) {
        ngx_llmproxy_router = NULL;
        ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                      "llmproxy: cannot build the router: %s", err);
        /* requests are answered with a JSON 500; the worker keeps serving the rest */
        return NGX_OK;
    }

    len = 0;
    ch = llmproxy_router_cluster_header(ngx_llmproxy_router, &len);
    ngx_llmproxy_cluster_header.len = 0;
    ngx_llmproxy_cluster_header.data = ngx_pnalloc(cycle->pool, len + 1);
    if (ngx_llmproxy_cluster_header.data != NULL && ch != NULL) {
        ngx_strlow(ngx_llmproxy_cluster_header.data, (u_char *) ch, len);
        ngx_llmproxy_cluster_header.len = len;
    }

    ngx_llmproxy_max_body = llmproxy_router_max_body_bytes(ngx_llmproxy_router);

    llmproxy_count(workers, 1);

    ngx_log_error(NGX_LOG_INFO, cycle->log, 0,
                  "llmproxy: worker %P built its router (library %s)",
                  ngx_pid, llmproxy_version());

    return NGX_OK;
}


static void
ngx_http_llmproxy_exit_process(ngx_cycle_t *cycle)
{
    uint64_t  in_flight;

    if (ngx_llmproxy_router == NULL) {
        return;
    }

    in_flight = llmproxy_router_in_flight(ngx_llmproxy_router);
    if (in_flight) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, 0,
                      "llmproxy: worker %P exits with %uL requests in flight",
                      ngx_pid, in_flight);
    }

    llmproxy_count(workers, -1);

    llmproxy_router_free(ngx_llmproxy_router);
    ngx_llmproxy_router = NULL;
}


/* ---------------------------------------------------------------------------------------
 * helpers
 */

/* The request's decision: the module context, or (after an internal redirect emptied the
 * contexts) the pool cleanup that holds it. */
static ngx_http_llmproxy_ctx_t *
ngx_http_llmproxy_find_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t       *cln;
    ngx_http_llmproxy_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_llmproxy_module);
    if (ctx) {
        return ctx;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_llmproxy_cleanup) {
            return cln->data;
        }
    }

    return NULL;
}


static void
ngx_http_llmproxy_finish(ngx_http_llmproxy_ctx_t *ctx, ngx_uint_t status,
    llmproxy_outcome outcome)
{
    llmproxy_request  *req;

    req = ctx->req;
    if (req == NULL) {
        return;
    }

    ctx->req = NULL;

    if (ngx_llmproxy_router == NULL) {
        /* the router is gone (worker exit): a handle must not outlive it */
        return;
    }

    llmproxy_request_finish_outcome(req, (uint32_t) status, (uint32_t) outcome);
    llmproxy_count(pending, -1);
}


/* Request pool cleanup: finishes a decision the log phase did not (never expected). */
static void
ngx_http_llmproxy_cleanup(void *data)
{
    ngx_http_llmproxy_ctx_t  *ctx = data;

    if (ctx->req) {
        llmproxy_count(leaked, 1);
        ngx_http_llmproxy_finish(ctx, 0, LLMPROXY_OUTCOME_LOCAL);
    }
}


static ngx_int_t
ngx_http_llmproxy_send(ngx_http_request_t *r, ngx_uint_t status, const u_char *body,
    size_t len)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }

    r->headers_out.status = status;
    r->headers_out.content_length_n = len + 1;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;
    ngx_http_clear_accept_ranges(r);
    ngx_http_clear_last_modified(r);
    ngx_http_clear_etag(r);

    b = ngx_create_temp_buf(r->pool, len + 1);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->last = ngx_cpymem(b->last, body, len);
    *b->last++ = '\n';
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


/* An OpenAI error body rendered by the library (the same JSON as its own errors). */
static ngx_int_t
ngx_http_llmproxy_send_error(ngx_http_request_t *r, ngx_uint_t status, const char *msg,
    size_t msg_len)
{
    size_t   n;
    u_char  *p;

    n = llmproxy_error_body((uint32_t) status, msg, msg_len, NULL, 0);

    p = ngx_pnalloc(r->pool, n + 1);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    (void) llmproxy_error_body((uint32_t) status, msg, msg_len, (char *) p, n + 1);

    return ngx_http_llmproxy_send(r, status, p, n);
}


/* Ends a phase handler with a response of our own. */
static ngx_int_t
ngx_http_llmproxy_reply(ngx_http_request_t *r, ngx_int_t rc)
{
    ngx_http_finalize_request(r, rc);
    return NGX_DONE;
}


static ngx_inline ngx_uint_t
ngx_http_llmproxy_routing_header(ngx_table_elt_t *h)
{
    u_char  *name = h->lowcase_key;
    size_t   len = h->key.len;

    if (len >= sizeof(LLMPROXY_STRIP_PREFIX) - 1
        && ngx_strncmp(name, LLMPROXY_STRIP_PREFIX, sizeof(LLMPROXY_STRIP_PREFIX) - 1) == 0)
    {
        return 1;
    }

    if (len == sizeof(LLMPROXY_GATEWAY_HEADER) - 1
        && ngx_strncmp(name, LLMPROXY_GATEWAY_HEADER, len) == 0)
    {
        return 1;
    }

    if (ngx_llmproxy_cluster_header.len == len
        && ngx_strncmp(name, ngx_llmproxy_cluster_header.data, len) == 0)
    {
        return 1;
    }

    return 0;
}


/*
 * Removes every client routing header from r->headers_in.headers (all values, any case).
 * nginx 1.22's proxy module sends every element of the list, so they must leave it. The
 * list is rebuilt only when there is something to remove: the kept elements are copied into
 * a new list; the old elements stay valid in the pool with the same contents, so the
 * known-header pointers of headers_in (host, content_length, ...) still read the same values.
 */
static ngx_int_t
ngx_http_llmproxy_strip(ngx_http_request_t *r)
{
    ngx_uint_t        i, n, strip;
    ngx_list_t        old;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h, *nh;

    n = 0;
    strip = 0;
    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {
        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }
            part = part->next;
            h = part->elts;
            i = 0;
        }
        n++;
        if (ngx_http_llmproxy_routing_header(&h[i])) {
            strip++;
        }
    }

    if (strip == 0) {
        return NGX_OK;
    }

    old = r->headers_in.headers;   /* `part` is copied: old.part.next etc. stay valid */

    if (ngx_list_init(&r->headers_in.headers, r->pool, n - strip + 4,
                      sizeof(ngx_table_elt_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    part = &old.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {
        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }
            part = part->next;
            h = part->elts;
            i = 0;
        }
        if (ngx_http_llmproxy_routing_header(&h[i])) {
            continue;
        }
        nh = ngx_list_push(&r->headers_in.headers);
        if (nh == NULL) {
            return NGX_ERROR;
        }
        *nh = h[i];
    }

    llmproxy_count(stripped, strip);

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmproxy_set_header(ngx_http_request_t *r, const char *name, size_t name_len,
    const char *value, size_t value_len)
{
    ngx_table_elt_t  *h;

    if (name_len == 0) {
        return NGX_OK;
    }

    h = ngx_list_push(&r->headers_in.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->key.data = ngx_pnalloc(r->pool, name_len + name_len + value_len);
    if (h->key.data == NULL) {
        return NGX_ERROR;
    }

    h->key.len = name_len;
    ngx_memcpy(h->key.data, name, name_len);
    h->lowcase_key = h->key.data + name_len;
    ngx_strlow(h->lowcase_key, h->key.data, name_len);
    h->value.data = h->lowcase_key + name_len;
    h->value.len = value_len;
    if (value_len) {
        ngx_memcpy(h->value.data, value, value_len);
    }
    h->hash = ngx_hash_key(h->lowcase_key, name_len);

    return NGX_OK;
}


static ngx_uint_t
ngx_http_llmproxy_should_intercept(ngx_http_request_t *r)
{
    return llmproxy_router_should_intercept(ngx_llmproxy_router,
                                            (const char *) r->method_name.data,
                                            r->method_name.len,
                                            (const char *) r->uri.data, r->uri.len);
}


/* ---------------------------------------------------------------------------------------
 * rewrite phase: strip routing headers; refuse inference subrequests
 */

static ngx_int_t
ngx_http_llmproxy_rewrite_handler(ngx_http_request_t *r)
{
    static const char msg[] =
        "llmproxy does not route subrequests (mirror, auth_request, SSI, ...): a "
        "subrequest's log phase never runs, so its pick could not be finished; send the "
        "request to the gateway's own listener instead";

    ngx_http_llmproxy_loc_conf_t  *llcf;

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llmproxy_module);
    if (!llcf->enable) {
        return NGX_DECLINED;
    }

    if (ngx_http_llmproxy_strip(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (r == r->main || ngx_llmproxy_router == NULL
        || !ngx_http_llmproxy_should_intercept(r))
    {
        return NGX_DECLINED;
    }

    llmproxy_count(subrequests, 1);

    return ngx_http_llmproxy_reply(r, ngx_http_llmproxy_send_error(r, NGX_HTTP_NOT_IMPLEMENTED,
                                                                  msg, sizeof(msg) - 1));
}


/* ---------------------------------------------------------------------------------------
 * precontent phase: read the body, pick
 */

/* The whole request body in one buffer (the chain's memory buffers and the temp file). */
static ngx_int_t
ngx_http_llmproxy_body(ngx_http_request_t *r, u_char **data, size_t *len)
{
    size_t        size;
    ssize_t       n;
    u_char       *p;
    ngx_buf_t    *b;
    ngx_uint_t    in_file;
    ngx_chain_t  *cl;

    *data = (u_char *) "";
    *len = 0;

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        llmproxy_count(body_memory, 1);
        return NGX_OK;
    }

    cl = r->request_body->bufs;

    if (cl->next == NULL && !cl->buf->in_file) {
        *data = cl->buf->pos;
        *len = cl->buf->last - cl->buf->pos;
        llmproxy_count(body_memory, 1);
        return NGX_OK;
    }

    size = 0;
    in_file = 0;
    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;
        if (b->in_file) {
            size += (size_t) (b->file_last - b->file_pos);
            in_file = 1;
        } else {
            size += b->last - b->pos;
        }
    }

    p = ngx_pnalloc(r->pool, size + 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    *data = p;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;
        if (b->in_file) {
            /* the spooled body (larger than client_body_buffer_size): a read from the page
             * cache, bounded by client_max_body_size, as the Lua host does */
            n = ngx_read_file(b->file, p, (size_t) (b->file_last - b->file_pos),
                              b->file_pos);
            if (n != b->file_last - b->file_pos) {
                return NGX_ERROR;
            }
            p += n;
        } else {
            p = ngx_cpymem(p, b->pos, b->last - b->pos);
        }
    }

    *len = p - *data;

    if (in_file) {
        llmproxy_count(body_file, 1);
    } else {
        llmproxy_count(body_memory, 1);
    }

    return NGX_OK;
}


/* Replaces the request body (and its length) with what the library rewrote. */
static ngx_int_t
ngx_http_llmproxy_set_body(ngx_http_request_t *r, const uint8_t *body, size_t len)
{
    ngx_buf_t    *b;
    ngx_chain_t  *cl;
    u_char       *p;

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    p = ngx_pnalloc(r->pool, len ? len : 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(p, body, len);
    b->start = b->pos = p;
    b->end = b->last = p + len;
    b->memory = 1;
    b->last_buf = 1;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    r->request_body->bufs = cl;
    r->request_body->buf = b;
    r->request_body->temp_file = NULL;
    r->request_body_in_file_only = 0;

    r->headers_in.content_length_n = (off_t) len;

    if (r->headers_in.content_length) {
        p = ngx_pnalloc(r->pool, NGX_OFF_T_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }
        r->headers_in.content_length->value.data = p;
        r->headers_in.content_length->value.len = ngx_sprintf(p, "%O", (off_t) len) - p;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmproxy_set_endpoint(ngx_http_request_t *r, ngx_http_llmproxy_ctx_t *ctx)
{
    size_t       len;
    const char  *ep;
    u_char      *p;

    len = 0;
    ep = llmproxy_request_endpoint(ctx->req, &len);
    if (ep == NULL || len == 0) {
        return NGX_ERROR;
    }

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(p, ep, len);
    ctx->endpoint.data = p;
    ctx->endpoint.len = len;

    ngx_memzero(&ctx->peer, sizeof(ngx_addr_t));

    /* an IP literal with a port ("10.0.0.1:8000", "[::1]:8000"): no resolver involved */
    if (ngx_parse_addr_port(r->pool, &ctx->peer, p, len) != NGX_OK) {
        return NGX_ERROR;
    }

    ctx->peer.name = ctx->endpoint;

    return NGX_OK;
}


static void
ngx_http_llmproxy_body_handler(ngx_http_request_t *r)
{
    size_t                    n, i, len, blen;
    u_char                   *body;
    const char               *s;
    const uint8_t            *ub;
    llmproxy_header          *hdrs;
    llmproxy_status           st;
    llmproxy_request         *req;
    ngx_list_part_t          *part;
    ngx_table_elt_t          *h;
    ngx_http_llmproxy_ctx_t  *ctx;
    uint32_t                  status;
    ngx_int_t                 rc;

    ctx = ngx_http_get_module_ctx(r, ngx_http_llmproxy_module);
    if (ctx == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    if (ngx_http_llmproxy_body(r, &body, &blen) != NGX_OK) {
        static const char m[] = "cannot read the request body";
        llmproxy_count(internal_errors, 1);
        ngx_http_finalize_request(r, ngx_http_llmproxy_send_error(r, 500, m, sizeof(m) - 1));
        return;
    }

    /* the headers the library sees: the client's (routing headers already stripped),
     * :path (chat vs completions) and :method */
    n = 2;
    part = &r->headers_in.headers.part;
    for ( /* void */ ; part; part = part->next) {
        n += part->nelts;
    }

    hdrs = ngx_palloc(r->pool, n * sizeof(llmproxy_header));
    if (hdrs == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    n = 0;
    part = &r->headers_in.headers.part;
    h = part->elts;
    for (i = 0; /* void */; i++) {
        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }
            part = part->next;
            h = part->elts;
            i = 0;
        }
        hdrs[n].name = (const char *) h[i].key.data;
        hdrs[n].name_len = h[i].key.len;
        hdrs[n].value = (const char *) h[i].value.data;
        hdrs[n].value_len = h[i].value.len;
        n++;
    }

    hdrs[n].name = ":path";
    hdrs[n].name_len = sizeof(":path") - 1;
    hdrs[n].value = (const char *) r->uri.data;
    hdrs[n].value_len = r->uri.len;
    n++;
    hdrs[n].name = ":method";
    hdrs[n].name_len = sizeof(":method") - 1;
    hdrs[n].value = (const char *) r->method_name.data;
    hdrs[n].value_len = r->method_name.len;
    n++;

    req = NULL;
    st = llmproxy_pick(ngx_llmproxy_router, hdrs, n, body, blen, &req);

    if (req == NULL) {
        static const char m[] = "llmproxy_pick returned no request";
        llmproxy_count(internal_errors, 1);
        ngx_http_finalize_request(r, ngx_http_llmproxy_send_error(r, 500, m, sizeof(m) - 1));
        return;
    }

    if (st != LLMPROXY_OK) {
        /* the library's own status and OpenAI JSON; the handle is finished at once */
        status = llmproxy_request_http_status(req);
        len = 0;
        s = llmproxy_request_error_body(req, &len);
        llmproxy_count(pick_errors, 1);

        body = ngx_pnalloc(r->pool, len + 1);
        if (body && len) {
            ngx_memcpy(body, s, len);
        }
        llmproxy_request_finish_outcome(req, 0, LLMPROXY_OUTCOME_LOCAL);

        if (body == NULL) {
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
            return;
        }
        if (status < 400 || status > 599) {
            status = 500;
        }
        ngx_http_finalize_request(r, ngx_http_llmproxy_send(r, status, body, len));
        return;
    }

    ctx->req = req;
    ctx->stream = llmproxy_request_is_stream(req) ? 1 : 0;
    llmproxy_count(routed, 1);
    llmproxy_count(pending, 1);

    if (ngx_http_llmproxy_set_endpoint(r, ctx) != NGX_OK) {
        static const char m[] = "llmproxy: the endpoint is not an IP literal with a port";
        llmproxy_count(internal_errors, 1);
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "llmproxy: cannot use endpoint \"%V\"", &ctx->endpoint);
        ngx_http_llmproxy_finish(ctx, 500, LLMPROXY_OUTCOME_LOCAL);
        ngx_http_finalize_request(r, ngx_http_llmproxy_send_error(r, 500, m, sizeof(m) - 1));
        return;
    }

    /* what the backend receives when it differs from what the client sent */
    len = 0;
    ub = llmproxy_request_upstream_body(req, &len);
    if (ub != NULL && ngx_http_llmproxy_set_body(r, ub, len) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    len = 0;
    s = llmproxy_request_upstream_path(req, &len);
    if (s != NULL && len > 0) {
        r->uri.data = ngx_pnalloc(r->pool, len);
        if (r->uri.data == NULL) {
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
            return;
        }
        ngx_memcpy(r->uri.data, s, len);
        r->uri.len = len;
        ngx_str_null(&r->args);
        r->valid_unparsed_uri = 0;
    }

    /* the decision, on the proxied request (client copies were stripped) */
    len = 0;
    s = llmproxy_request_cluster(req, &len);
    rc = ngx_http_llmproxy_set_header(r, (const char *) ngx_llmproxy_cluster_header.data,
                                      ngx_llmproxy_cluster_header.len, s, len);
    if (rc == NGX_OK) {
        rc = ngx_http_llmproxy_set_header(r, LLMPROXY_ENDPOINT_HEADER,
                                          sizeof(LLMPROXY_ENDPOINT_HEADER) - 1,
                                          (const char *) ctx->endpoint.data,
                                          ctx->endpoint.len);
    }
    if (rc == NGX_OK) {
        len = 0;
        s = llmproxy_request_scene(req, &len);
        rc = ngx_http_llmproxy_set_header(r, LLMPROXY_SCENE_HEADER,
                                          sizeof(LLMPROXY_SCENE_HEADER) - 1, s, len);
    }
    if (rc != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    /* on to the content phase (proxy_pass) */
    ctx->phase_rc = NGX_DECLINED;
    r->preserve_body = 1;
    r->write_event_handler = ngx_http_core_run_phases;
    ngx_http_core_run_phases(r);
}


static ngx_int_t
ngx_http_llmproxy_precontent_handler(ngx_http_request_t *r)
{
    off_t                          cl;
    ngx_int_t                      rc;
    ngx_pool_cleanup_t            *cln;
    ngx_http_llmproxy_ctx_t       *ctx;
    ngx_http_llmproxy_loc_conf_t  *llcf;
    u_char                         msg[128];

    if (r != r->main) {
        return NGX_DECLINED;
    }

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llmproxy_module);
    if (!llcf->enable) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_llmproxy_module);
    if (ctx) {
        /* back after the body was read */
        return ctx->phase_rc;
    }

    if (ngx_llmproxy_router == NULL) {
        static const char m[] = "llmproxy: no router in this worker (see the error log)";
        return ngx_http_llmproxy_reply(r, ngx_http_llmproxy_send_error(r, 500, m,
                                                                      sizeof(m) - 1));
    }

    if (!ngx_http_llmproxy_should_intercept(r)) {
        llmproxy_count(passthrough, 1);
        return NGX_DECLINED;
    }

    llmproxy_count(intercepted, 1);

    ctx = ngx_http_llmproxy_find_ctx(r);
    if (ctx) {
        /* the same request again after an internal redirect into another llmproxy
         * location: the earlier decision never reached an upstream */
        ngx_http_llmproxy_finish(ctx, 0, LLMPROXY_OUTCOME_LOCAL);
        llmproxy_count(finished, 1);
        llmproxy_count(outcome_local, 1);
        ngx_memzero(ctx, sizeof(ngx_http_llmproxy_ctx_t));

    } else {
        cln = ngx_pool_cleanup_add(r->pool, sizeof(ngx_http_llmproxy_ctx_t));
        if (cln == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        ctx = cln->data;
        ngx_memzero(ctx, sizeof(ngx_http_llmproxy_ctx_t));
        cln->handler = ngx_http_llmproxy_cleanup;
    }

    cl = r->headers_in.content_length_n;
    if (cl > 0 && ngx_llmproxy_max_body && (uint64_t) cl > ngx_llmproxy_max_body) {
        /* refuse before reading it: the same answer the library gives for a read body */
        llmproxy_count(early_413, 1);
        return ngx_http_llmproxy_reply(r, ngx_http_llmproxy_send_error(r,
                   NGX_HTTP_REQUEST_ENTITY_TOO_LARGE, (const char *) msg,
                   ngx_snprintf(msg, sizeof(msg),
                                "request body of %O bytes is larger than the limit of "
                                "%uL bytes", cl, ngx_llmproxy_max_body) - msg));
    }

    ctx->phase_rc = NGX_DONE;
    ngx_http_set_ctx(r, ctx, ngx_http_llmproxy_module);

    rc = ngx_http_read_client_request_body(r, ngx_http_llmproxy_body_handler);
    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    ngx_http_finalize_request(r, NGX_DONE);
    return NGX_DONE;
}


/* ---------------------------------------------------------------------------------------
 * balancer: llmproxy_balancer in an upstream{} block
 */

static ngx_int_t
ngx_http_llmproxy_get_peer(ngx_peer_connection_t *pc, void *data)
{
    ngx_http_llmproxy_peer_data_t  *pd = data;
    ngx_http_llmproxy_ctx_t        *ctx = pd->ctx;
    ngx_addr_t                      prev;
    ngx_str_t                       prev_ep;

    if (ctx->req == NULL) {
        return NGX_BUSY;
    }

    if (pd->tries++ > 0) {
        /* a retry (proxy_next_upstream): another untried endpoint of the cluster; the
         * library records the failure of the previous one */
        llmproxy_count(retries, 1);
        prev = ctx->peer;
        prev_ep = ctx->endpoint;

        if (llmproxy_request_retry(ctx->req) != LLMPROXY_OK) {
            /* no endpoint left: the failed one again, so nginx ends with its own error */
            llmproxy_count(retry_exhausted, 1);
            ngx_log_error(NGX_LOG_WARN, pc->log, 0,
                          "llmproxy: no endpoint left to retry after \"%V\"", &prev_ep);

        } else if (ngx_http_llmproxy_set_endpoint(pd->request, ctx) != NGX_OK) {
            ctx->peer = prev;
            ctx->endpoint = prev_ep;
        }
    }

    /* a name per try: $upstream_addr keeps each try's endpoint */
    pc->name = ngx_palloc(pd->request->pool, sizeof(ngx_str_t));
    if (pc->name == NULL) {
        return NGX_ERROR;
    }
    *pc->name = ctx->endpoint;
    pc->sockaddr = ctx->peer.sockaddr;
    pc->socklen = ctx->peer.socklen;
    pc->cached = 0;
    pc->connection = NULL;

    return NGX_OK;
}


static void
ngx_http_llmproxy_free_peer(ngx_peer_connection_t *pc, void *data, ngx_uint_t state)
{
    if (pc->tries) {
        pc->tries--;
    }
}


static ngx_int_t
ngx_http_llmproxy_init_peer(ngx_http_request_t *r, ngx_http_upstream_srv_conf_t *us)
{
    ngx_http_llmproxy_ctx_t        *ctx;
    ngx_http_llmproxy_peer_data_t  *pd;

    ctx = (r == r->main) ? ngx_http_llmproxy_find_ctx(r) : NULL;

    if (ctx == NULL || ctx->req == NULL) {
        /* not an intercepted request (GET /v1/models, ...): round robin over the block's
         * servers */
        return ngx_http_upstream_init_round_robin_peer(r, us);
    }

    pd = ngx_palloc(r->pool, sizeof(ngx_http_llmproxy_peer_data_t));
    if (pd == NULL) {
        return NGX_ERROR;
    }

    pd->request = r;
    pd->ctx = ctx;
    pd->tries = 0;

    r->upstream->peer.data = pd;
    r->upstream->peer.get = ngx_http_llmproxy_get_peer;
    r->upstream->peer.free = ngx_http_llmproxy_free_peer;
    r->upstream->peer.tries = LLMPROXY_TRIES;   /* capped by proxy_next_upstream_tries */

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmproxy_init_upstream(ngx_conf_t *cf, ngx_http_upstream_srv_conf_t *us)
{
    if (ngx_http_upstream_init_round_robin(cf, us) != NGX_OK) {
        return NGX_ERROR;
    }

    us->peer.init = ngx_http_llmproxy_init_peer;

    return NGX_OK;
}


static char *
ngx_http_llmproxy_balancer(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_upstream_srv_conf_t  *uscf;

    uscf = ngx_http_conf_get_module_srv_conf(cf, ngx_http_upstream_module);

    if (uscf->peer.init_upstream) {
        ngx_conf_log_error(NGX_LOG_WARN, cf, 0, "load balancing method redefined");
    }

    uscf->peer.init_upstream = ngx_http_llmproxy_init_upstream;

    uscf->flags = NGX_HTTP_UPSTREAM_CREATE
                  |NGX_HTTP_UPSTREAM_WEIGHT
                  |NGX_HTTP_UPSTREAM_MAX_CONNS
                  |NGX_HTTP_UPSTREAM_MAX_FAILS
                  |NGX_HTTP_UPSTREAM_FAIL_TIMEOUT
                  |NGX_HTTP_UPSTREAM_DOWN
                  |NGX_HTTP_UPSTREAM_BACKUP;

    return NGX_CONF_OK;
}


/* ---------------------------------------------------------------------------------------
 * response: transcoding, first token, debug headers
 */

/* The response comes from the endpoint (not a reply nginx made up after a failure). */
static ngx_inline ngx_uint_t
ngx_http_llmproxy_upstream_answered(ngx_http_request_t *r)
{
    return r->upstream != NULL && r->upstream->headers_in.status_n != 0;
}


static ngx_int_t
ngx_http_llmproxy_header_filter(ngx_http_request_t *r)
{
    size_t                          len;
    u_char                         *p;
    const char                     *ct;
    ngx_table_elt_t                *h;
    ngx_http_llmproxy_ctx_t        *ctx;
    ngx_http_llmproxy_loc_conf_t   *llcf;

    if (r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_llmproxy_module);

    if (ctx && ctx->req && llmproxy_request_needs_transcoding(ctx->req)
        && ngx_http_llmproxy_upstream_answered(r))
    {
        /* the response is rewritten (Triton -> OpenAI): status, content type, no length */
        r->headers_out.status = llmproxy_request_response_status(ctx->req,
                                    (uint32_t) r->headers_out.status);
        r->headers_out.status_line.len = 0;
        len = 0;
        ct = llmproxy_request_response_content_type(ctx->req, &len);
        if (ct && len) {
            r->headers_out.content_type.data = (u_char *) ct;   /* static in the library */
            r->headers_out.content_type.len = len;
            r->headers_out.content_type_len = len;
            r->headers_out.content_type_lowcase = NULL;
            r->headers_out.charset.len = 0;
        }
        ngx_http_clear_content_length(r);
        ngx_http_clear_accept_ranges(r);
        ngx_http_clear_etag(r);
        /* the transcoder reads memory buffers: never let the response be spooled to
         * proxy_temp_path (nginx decides on buffering after sending the header) */
        r->upstream->buffering = 0;
        ctx->transcoding = 1;
    }

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llmproxy_module);

    if (llcf->debug_headers) {
        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_ERROR;
        }
        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }
        h->hash = 1;
        ngx_str_set(&h->key, "x-llmproxy-worker");
        h->value.data = p;
        h->value.len = ngx_sprintf(p, "%P", ngx_pid) - p;

        if (ctx && ctx->endpoint.len) {
            h = ngx_list_push(&r->headers_out.headers);
            if (h == NULL) {
                return NGX_ERROR;
            }
            h->hash = 1;
            ngx_str_set(&h->key, "x-llmproxy-endpoint");
            h->value = ctx->endpoint;
        }
    }

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_llmproxy_transcode(ngx_http_request_t *r, ngx_http_llmproxy_ctx_t *ctx,
    ngx_chain_t *in)
{
    size_t          olen;
    ngx_buf_t      *b, *nb;
    ngx_uint_t      eos;
    ngx_chain_t    *out, **ll, *cl;
    const uint8_t  *o;

    out = NULL;
    ll = &out;

    for ( /* void */ ; in; in = in->next) {
        b = in->buf;
        eos = b->last_buf ? 1 : 0;
        o = NULL;
        olen = 0;

        if (ngx_buf_in_memory(b) || eos) {
            if (llmproxy_request_transcode_response(ctx->req,
                    ngx_buf_in_memory(b) ? b->pos : (u_char *) "",
                    ngx_buf_in_memory(b) ? (size_t) (b->last - b->pos) : 0,
                    eos, &o, &olen)
                != LLMPROXY_OK)
            {
                ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                              "llmproxy: cannot transcode the response");
                olen = 0;
            }
        }

        ctx->first_token = 1;   /* the transcoder marks it itself */

        /* the upstream buffer is consumed: its bytes were replaced */
        if (ngx_buf_in_memory(b)) {
            b->pos = b->last;
        }
        if (b->in_file) {
            b->file_pos = b->file_last;
        }

        if (olen == 0 && !b->last_buf && !b->flush && !b->last_in_chain) {
            continue;
        }

        if (olen) {
            nb = ngx_create_temp_buf(r->pool, olen);
            if (nb == NULL) {
                return NGX_ERROR;
            }
            nb->last = ngx_cpymem(nb->last, o, olen);
        } else {
            nb = ngx_calloc_buf(r->pool);
            if (nb == NULL) {
                return NGX_ERROR;
            }
            nb->sync = 1;
        }

        nb->last_buf = b->last_buf;
        nb->last_in_chain = b->last_in_chain;
        nb->flush = b->flush || olen > 0;
        nb->tag = (ngx_buf_tag_t) &ngx_http_llmproxy_module;

        cl = ngx_alloc_chain_link(r->pool);
        if (cl == NULL) {
            return NGX_ERROR;
        }
        cl->buf = nb;
        *ll = cl;
        ll = &cl->next;
    }

    *ll = NULL;

    if (out == NULL) {
        return NGX_OK;
    }

    return ngx_http_next_body_filter(r, out);
}


static ngx_int_t
ngx_http_llmproxy_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_chain_t              *cl;
    ngx_http_llmproxy_ctx_t  *ctx;

    if (r != r->main || in == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_llmproxy_module);
    if (ctx == NULL || ctx->req == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    if (ctx->transcoding) {
        return ngx_http_llmproxy_transcode(r, ctx, in);
    }

    if (!ctx->first_token && ngx_http_llmproxy_upstream_answered(r)) {
        for (cl = in; cl; cl = cl->next) {
            if (ngx_buf_size(cl->buf) > 0 || cl->buf->last_buf) {
                /* the first response byte: prefill done */
                llmproxy_request_first_token(ctx->req);
                ctx->first_token = 1;
                break;
            }
        }
    }

    return ngx_http_next_body_filter(r, in);
}


/* ---------------------------------------------------------------------------------------
 * log phase: finish exactly once
 */

/*
 * How a routed request ended, from its last upstream try (earlier tries failed to connect
 * and were counted by llmproxy_request_retry in the balancer); the Lua host's classify():
 *   a response header from the endpoint            -> its status, UPSTREAM
 *   no try at all / the client left before an answer -> what the client got (499), LOCAL
 *   nginx's 502 without a response (refused, reset, closed, invalid header) -> ENDPOINT_FAILED
 *   nginx's 504: connect timeout, or a stream's read timeout -> ENDPOINT_FAILED;
 *                read/send timeout of a non-streaming request -> LOCAL (a long generation)
 *   anything else nginx made up                    -> LOCAL
 */
static ngx_int_t
ngx_http_llmproxy_log_handler(ngx_http_request_t *r)
{
    ngx_uint_t                    got, status, client_gone;
    llmproxy_outcome              outcome;
    ngx_http_llmproxy_ctx_t      *ctx;
    ngx_http_upstream_state_t    *state, *last;

    if (r != r->main) {
        return NGX_OK;
    }

    ctx = ngx_http_llmproxy_find_ctx(r);
    if (ctx == NULL || ctx->req == NULL) {
        return NGX_OK;
    }

    client_gone = !r->request_complete || r->connection->error;
    if (client_gone) {
        llmproxy_count(client_aborts, 1);
    }

    got = r->headers_out.status;
    if (client_gone && got == 0) {
        got = 499;
    }

    last = NULL;
    if (r->upstream_states && r->upstream_states->nelts) {
        state = r->upstream_states->elts;
        last = &state[r->upstream_states->nelts - 1];
    }

    if (last && last->status && last->header_time != (ngx_msec_t) -1) {
        status = last->status;
        outcome = LLMPROXY_OUTCOME_UPSTREAM;

    } else if (last == NULL || last->status == 0) {
        status = got;
        outcome = LLMPROXY_OUTCOME_LOCAL;

    } else if (last->status == NGX_HTTP_BAD_GATEWAY) {
        status = got;
        outcome = LLMPROXY_OUTCOME_ENDPOINT_FAILED;

    } else if (last->status == NGX_HTTP_GATEWAY_TIME_OUT) {
        status = got;
        outcome = (last->connect_time != (ngx_msec_t) -1 && !ctx->stream)
                  ? LLMPROXY_OUTCOME_LOCAL : LLMPROXY_OUTCOME_ENDPOINT_FAILED;

    } else {
        status = got;
        outcome = LLMPROXY_OUTCOME_LOCAL;
    }

    switch (outcome) {
    case LLMPROXY_OUTCOME_UPSTREAM:
        llmproxy_count(outcome_upstream, 1);
        break;
    case LLMPROXY_OUTCOME_ENDPOINT_FAILED:
        llmproxy_count(outcome_endpoint_failed, 1);
        break;
    default:
        llmproxy_count(outcome_local, 1);
    }

    llmproxy_count(finished, 1);
    ngx_http_llmproxy_finish(ctx, status, outcome);

    return NGX_OK;
}


/* ---------------------------------------------------------------------------------------
 * metrics location
 */

static u_char *
ngx_http_llmproxy_counter(u_char *p, const char *name, const char *label, ngx_atomic_t *v)
{
    return ngx_sprintf(p, "%s%s %uA\n", name, label, (ngx_atomic_uint_t) *v);
}


static ngx_int_t
ngx_http_llmproxy_metrics_handler(ngx_http_request_t *r)
{
    char                       *text;
    size_t                      text_len, size;
    u_char                     *p;
    ngx_int_t                   rc;
    ngx_buf_t                  *b;
    ngx_chain_t                 out;
    ngx_http_llmproxy_stats_t  *s = ngx_llmproxy_stats;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    text = NULL;
    text_len = 0;
    if (ngx_llmproxy_router
        && llmproxy_router_metrics(ngx_llmproxy_router, &text, &text_len) != LLMPROXY_OK)
    {
        text = NULL;
        text_len = 0;
    }

    size = text_len + 4096;
    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        llmproxy_string_free(text);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (text) {
        b->last = ngx_cpymem(b->last, text, text_len);
        llmproxy_string_free(text);
    }

    /* the module's counters, for the whole nginx (every worker) */
    p = b->last;
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_workers gauge\n");
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_workers", "", &s->workers);
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_pending_requests gauge\n");
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_pending_requests", "", &s->pending);
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_requests_total counter\n");
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_requests_total", "{kind=\"intercepted\"}",
                                  &s->intercepted);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_requests_total", "{kind=\"passthrough\"}",
                                  &s->passthrough);
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_picks_total counter\n");
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_picks_total", "{event=\"routed\"}",
                                  &s->routed);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_picks_total", "{event=\"finished\"}",
                                  &s->finished);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_picks_total", "{event=\"leaked\"}",
                                  &s->leaked);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_picks_total", "{event=\"error\"}",
                                  &s->pick_errors);
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_finished_total counter\n");
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_finished_total", "{outcome=\"upstream\"}",
                                  &s->outcome_upstream);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_finished_total",
                                  "{outcome=\"endpoint_failed\"}", &s->outcome_endpoint_failed);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_finished_total", "{outcome=\"local\"}",
                                  &s->outcome_local);
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_request_bodies_total counter\n");
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_request_bodies_total",
                                  "{source=\"memory\"}", &s->body_memory);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_request_bodies_total",
                                  "{source=\"file\"}", &s->body_file);
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_retries_total counter\n");
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_retries_total", "", &s->retries);
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_errors_total counter\n");
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_errors_total",
                                  "{reason=\"retry_exhausted\"}", &s->retry_exhausted);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_errors_total", "{reason=\"early_413\"}",
                                  &s->early_413);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_errors_total", "{reason=\"subrequest\"}",
                                  &s->subrequests);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_errors_total", "{reason=\"internal\"}",
                                  &s->internal_errors);
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_stripped_headers_total counter\n");
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_stripped_headers_total", "", &s->stripped);
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_client_aborts_total counter\n");
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_client_aborts_total", "",
                                  &s->client_aborts);
    b->last = p;

    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = b->last - b->pos;
    ngx_str_set(&r->headers_out.content_type, "text/plain; version=0.0.4");
    r->headers_out.content_type_len = r->headers_out.content_type.len;

    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


static char *
ngx_http_llmproxy_metrics(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_llmproxy_metrics_handler;

    return NGX_CONF_OK;
}


/* llmproxy_error <status>: the target of error_page for errors nginx itself produces (body
 * above client_max_body_size, upstream unreachable or timed out), answered with the same
 * OpenAI JSON as the library's own errors. */
static ngx_int_t
ngx_http_llmproxy_error_handler(ngx_http_request_t *r)
{
    const char                    *msg;
    ngx_uint_t                     status;
    ngx_http_llmproxy_loc_conf_t  *llcf;

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llmproxy_module);
    status = llcf->error_status;

    switch (status) {
    case 413: msg = "request body is larger than client_max_body_size"; break;
    case 500: msg = "internal gateway error"; break;
    case 502: msg = "the upstream endpoint could not be reached"; break;
    case 503: msg = "no upstream available"; break;
    case 504: msg = "the upstream endpoint timed out"; break;
    default:  msg = "gateway error";
    }

    return ngx_http_llmproxy_send_error(r, status, msg, ngx_strlen(msg));
}


static char *
ngx_http_llmproxy_error(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llmproxy_loc_conf_t  *llcf = conf;

    ngx_int_t                  n;
    ngx_str_t                 *value;
    ngx_http_core_loc_conf_t  *clcf;

    value = cf->args->elts;
    n = ngx_atoi(value[1].data, value[1].len);
    if (n < 400 || n > 599) {
        return "needs an error status (400-599)";
    }

    llcf->error_status = (ngx_uint_t) n;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_llmproxy_error_handler;

    return NGX_CONF_OK;
}


/* ---------------------------------------------------------------------------------------
 * postconfiguration: phase handlers, filters, the counters' zone
 */

static ngx_int_t
ngx_http_llmproxy_postconfiguration(ngx_conf_t *cf)
{
    ngx_str_t                       name;
    ngx_http_handler_pt            *h;
    ngx_http_core_main_conf_t      *cmcf;
    ngx_http_llmproxy_main_conf_t  *lmcf;

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_llmproxy_module);

    if (lmcf->config_json.data == NULL) {
        return NGX_OK;   /* module loaded, not configured */
    }

    ngx_str_set(&name, "llmproxy_counters");
    lmcf->stats_zone = ngx_shared_memory_add(cf, &name, 8 * ngx_pagesize,
                                             &ngx_http_llmproxy_module);
    if (lmcf->stats_zone == NULL) {
        return NGX_ERROR;
    }
    lmcf->stats_zone->init = ngx_http_llmproxy_init_stats_zone;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_REWRITE_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }
    *h = ngx_http_llmproxy_rewrite_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }
    *h = ngx_http_llmproxy_precontent_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }
    *h = ngx_http_llmproxy_log_handler;

    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_llmproxy_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_llmproxy_body_filter;

    return NGX_OK;
}
