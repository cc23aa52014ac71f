/*
 * ngx_http_llmproxy_module.c: the module itself. Owns the directives table and module
 * definition, the main/location configuration (llmproxy_config read and validated in the
 * master, llmproxy_shared_state mapped before fork), the counters' shared zone, each worker's
 * router (init_process / exit_process) and postconfiguration (phase handlers and filters).
 *
 * The other files, by responsibility (ngx_http_llmproxy_module.h declares what they share):
 *   _request.c   rewrite + precontent phases: header strip, body read, pick, rewrites, error
 *                answers (llmproxy_error)
 *   _lookup.c    the pick: llmproxy_pick, or llmproxy_pick_start polled from a timer while a
 *                remote cache lookup is pending (the worker never blocks)
 *   _upstream.c  llmproxy_balancer: the peer hooks and retries
 *   _filter.c    header/body filters: first token, transcoding, debug headers
 *   _finish.c    the log phase (outcome classification, finish exactly once), pool cleanup
 *   _metrics.c   the llmproxy_metrics location
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_llmproxy_module.h"


static void *ngx_http_llmproxy_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_llmproxy_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_llmproxy_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child);
static char *ngx_http_llmproxy_config(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_llmproxy_shared_state(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_llmproxy_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_llmproxy_init_process(ngx_cycle_t *cycle);
static void ngx_http_llmproxy_exit_process(ngx_cycle_t *cycle);


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



/* Per worker process (declared in ngx_http_llmproxy_module.h). */
llmproxy_router             *ngx_llmproxy_router;
ngx_str_t                    ngx_llmproxy_cluster_header;   /* lower case */
ngx_uint_t                   ngx_llmproxy_cluster_header_hash;
ngx_uint_t                   ngx_llmproxy_endpoint_header_hash;
ngx_uint_t                   ngx_llmproxy_scene_header_hash;
uint64_t                     ngx_llmproxy_max_body;
ngx_http_llmproxy_stats_t   *ngx_llmproxy_stats;
ngx_http_llmproxy_slot_t    *ngx_llmproxy_slot;
ngx_uint_t                   ngx_llmproxy_shared_router;
static ngx_http_llmproxy_stats_t  ngx_llmproxy_stats_local;  /* before the zone exists */


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
 * worker processes: one router each, one slot of the counters each
 */

/* Frees a worker's slot once (the process holding `pid` is gone): its pending picks will
 * never be finished by it, so they count as finished and lost. */
static void
ngx_http_llmproxy_reap_slot(ngx_http_llmproxy_slot_t *slot, ngx_atomic_uint_t pid)
{
    ngx_atomic_uint_t  n;

    if (pid == 0 || !ngx_atomic_cmp_set(&slot->pid, pid, 0)) {
        return;
    }

    ngx_http_llmproxy_snapshot_release(slot);

    n = slot->pending;
    if (n) {
        (void) ngx_atomic_fetch_add(&slot->pending, -(ngx_atomic_int_t) n);
        llmproxy_count(finished, n);
        llmproxy_count(lost, n);
    }
}


/* Workers alive now, and their pending picks; reaps the slots of workers that died (kill -9:
 * no exit_process ran). */
ngx_uint_t
ngx_http_llmproxy_live_workers(ngx_atomic_uint_t *pending)
{
    ngx_int_t                  i;
    ngx_uint_t                 live;
    ngx_atomic_uint_t          pid;
    ngx_http_llmproxy_slot_t  *slot;

    live = 0;
    *pending = 0;

    for (i = 0; i < NGX_MAX_PROCESSES; i++) {
        slot = &ngx_llmproxy_stats->slots[i];
        pid = slot->pid;
        if (pid == 0) {
            continue;
        }
        if ((ngx_pid_t) pid != ngx_pid && kill((ngx_pid_t) pid, 0) == -1
            && ngx_errno == NGX_ESRCH)
        {
            ngx_http_llmproxy_reap_slot(slot, pid);
            continue;
        }
        live++;
        *pending += slot->pending;
    }

    return live;
}


static ngx_int_t
ngx_http_llmproxy_init_process(ngx_cycle_t *cycle)
{
    const char                     *ch;
    size_t                          len;
    llmproxy_status                 rc;
    ngx_http_llmproxy_main_conf_t  *lmcf;
    char                            err[LLMPROXY_ERR_CAP];

    ngx_llmproxy_stats = &ngx_llmproxy_stats_local;
    ngx_llmproxy_slot = &ngx_llmproxy_stats_local.slots[0];

    if (ngx_process != NGX_PROCESS_WORKER && ngx_process != NGX_PROCESS_SINGLE) {
        return NGX_OK;
    }

    lmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_llmproxy_module);
    if (lmcf == NULL || lmcf->config_json.data == NULL) {
        return NGX_OK;
    }

    if (lmcf->stats_zone && lmcf->stats_zone->data) {
        ngx_llmproxy_stats = lmcf->stats_zone->data;
        ngx_http_llmproxy_snapshot_zone((ngx_slab_pool_t *) lmcf->stats_zone->shm.addr);
    }

    if (ngx_process_slot >= 0 && ngx_process_slot < NGX_MAX_PROCESSES) {
        /* the slot's previous process (if any) has exited: what it left pending is lost */
        ngx_llmproxy_slot = &ngx_llmproxy_stats->slots[ngx_process_slot];
        ngx_http_llmproxy_reap_slot(ngx_llmproxy_slot, ngx_llmproxy_slot->pid);
        ngx_llmproxy_slot->pid = (ngx_atomic_uint_t) ngx_pid;
    }

    err[0] = '\0';
    rc = LLMPROXY_INTERNAL;

    if (lmcf->shared) {
        rc = llmproxy_router_new_shared((const char *) lmcf->config_json.data,
                                        lmcf->config_json.len, lmcf->shared,
                                        &ngx_llmproxy_router, err, sizeof(err));
        ngx_llmproxy_shared_router = (rc == LLMPROXY_OK);
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
    ngx_llmproxy_cluster_header_hash = ngx_hash_key(ngx_llmproxy_cluster_header.data,
                                                    ngx_llmproxy_cluster_header.len);
    ngx_llmproxy_endpoint_header_hash = ngx_hash_key((u_char *) LLMPROXY_ENDPOINT_HEADER,
                                                     sizeof(LLMPROXY_ENDPOINT_HEADER) - 1);
    ngx_llmproxy_scene_header_hash = ngx_hash_key((u_char *) LLMPROXY_SCENE_HEADER,
                                                  sizeof(LLMPROXY_SCENE_HEADER) - 1);

    ngx_llmproxy_max_body = llmproxy_router_max_body_bytes(ngx_llmproxy_router);

    ngx_log_error(NGX_LOG_INFO, cycle->log, 0,
                  "llmproxy: worker %P built its router (library %s)",
                  ngx_pid, llmproxy_version());

    ngx_http_llmproxy_snapshot_start(cycle);

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

    /* what is still pending (never expected after a graceful exit) counts as lost */
    ngx_http_llmproxy_reap_slot(ngx_llmproxy_slot, ngx_llmproxy_slot->pid);

    llmproxy_router_free(ngx_llmproxy_router);
    ngx_llmproxy_router = NULL;
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
    lmcf->stats_zone = ngx_shared_memory_add(cf, &name, LLMPROXY_COUNTERS_ZONE,
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

    ngx_http_llmproxy_filter_init();

    return NGX_OK;
}
