/*
 * ngx_http_llmproxy_upstream.c: llmproxy_balancer in an upstream{} block. Owns the peer
 * hooks: the decision's endpoint is the peer, a retry (proxy_next_upstream) asks
 * llmproxy_request_retry for another endpoint; requests without a decision get nginx's round
 * robin over the block's servers.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_llmproxy_module.h"


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


char *
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
