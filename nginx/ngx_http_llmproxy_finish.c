/*
 * ngx_http_llmproxy_finish.c: the end of a routed request. Owns finding the decision again
 * (module context, or the request pool cleanup after an internal redirect emptied the
 * contexts), finishing it exactly once, the log phase that classifies the outcome from the
 * last upstream try, and the pool cleanup that finishes what the log phase did not (counted
 * as leaked, never expected).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_llmproxy_module.h"


/* The request's decision: the module context, or (after an internal redirect emptied the
 * contexts) the pool cleanup that holds it. */
ngx_http_llmproxy_ctx_t *
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


void
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
    llmproxy_count_pending(-1);
}


/* Request pool cleanup: finishes a decision the log phase did not (never expected). */
void
ngx_http_llmproxy_cleanup(void *data)
{
    ngx_http_llmproxy_ctx_t  *ctx = data;

    /* the request ended while its pick waited for a remote lookup (client abort) */
    ngx_http_llmproxy_lookup_cancel(ctx);

    if (ctx->req) {
        llmproxy_count(leaked, 1);
        ngx_http_llmproxy_finish(ctx, 0, LLMPROXY_OUTCOME_LOCAL);
    }
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
ngx_int_t
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
