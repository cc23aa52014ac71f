/*
 * ngx_http_llmproxy_lookup.c: the pick itself, and waiting for a remote cache lookup
 * without blocking the worker. Owns the choice between llmproxy_pick (no remote lookups:
 * decided at once, locally) and llmproxy_pick_start (metadata_center.cache_enabled: the
 * library may ask the Metadata-Center where the prompt's prefix is cached and answer
 * LLMPROXY_PENDING with a ticket), the 1 ms timer that polls the ticket and resumes the
 * request once decided, giving up at the router's pick deadline (the ticket is freed, the
 * library finishes the late decision nobody took, and the request is picked again from local
 * data, as the Lua host does), and freeing the ticket of a request that ends while pending
 * (client abort: request pool cleanup).
 *
 * While pending, the request sits in the precontent phase: its write event is the timer
 * (the limit_req delay pattern: wev->delayed + ngx_add_timer), its read event watches the
 * client (ngx_http_test_reading: a client that leaves terminates the request, and the pool
 * cleanup frees the ticket).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_llmproxy_module.h"


#define LLMPROXY_POLL_MS  1   /* between polls of a pending pick (nginx's timer resolution) */


static void ngx_http_llmproxy_lookup_poll(ngx_http_request_t *r);


/* Picks for the request: ctx->hdrs / ctx->body are its inputs (request pool). Either decides
 * at once (ngx_http_llmproxy_picked) or leaves the request waiting for the lookup. */
void
ngx_http_llmproxy_pick_begin(ngx_http_request_t *r, ngx_http_llmproxy_ctx_t *ctx)
{
    uint64_t               deadline_ms;
    llmproxy_status        st;
    llmproxy_request      *req;
    llmproxy_pick_ticket  *ticket;
    ngx_event_t           *wev;

    req = NULL;
    deadline_ms = llmproxy_router_pick_deadline_ms(ngx_llmproxy_router);

    if (deadline_ms == 0) {
        /* no remote lookups: every pick is local, decided now */
        st = llmproxy_pick(ngx_llmproxy_router, ctx->hdrs, ctx->nhdrs, ctx->body, ctx->blen,
                           &req);
        ngx_http_llmproxy_picked(r, ctx, st, req);
        return;
    }

    ticket = NULL;
    st = llmproxy_pick_start(ngx_llmproxy_router, ctx->hdrs, ctx->nhdrs, ctx->body,
                             ctx->blen, &ticket, &req);

    if (st != LLMPROXY_PENDING || ticket == NULL) {
        ngx_http_llmproxy_picked(r, ctx, st, req);
        return;
    }

    /* the Metadata-Center is asked: poll the ticket from a timer, keep serving the rest */
    llmproxy_count(lookup_waited, 1);
    ctx->ticket = ticket;
    ctx->lookup_deadline = ngx_current_msec + (ngx_msec_t) deadline_ms;

    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_llmproxy_lookup_poll;

    wev = r->connection->write;
    wev->delayed = 1;
    ngx_add_timer(wev, LLMPROXY_POLL_MS);
}


/* The write event handler while a pick is pending: on each timer tick, poll the ticket. */
static void
ngx_http_llmproxy_lookup_poll(ngx_http_request_t *r)
{
    llmproxy_status           st;
    llmproxy_request         *req;
    ngx_event_t              *wev;
    ngx_http_llmproxy_ctx_t  *ctx;

    wev = r->connection->write;

    if (wev->delayed) {
        /* the connection became writable, not the timer: keep waiting */
        if (ngx_handle_write_event(wev, 0) != NGX_OK) {
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        }
        return;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_llmproxy_module);
    if (ctx == NULL || ctx->ticket == NULL || ngx_llmproxy_router == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    req = NULL;
    st = llmproxy_pick_poll(ctx->ticket, &req);

    if (st == LLMPROXY_PENDING) {
        if ((ngx_msec_int_t) (ctx->lookup_deadline - ngx_current_msec) > 0) {
            wev->delayed = 1;
            ngx_add_timer(wev, LLMPROXY_POLL_MS);
            return;
        }

        /* past the router's own deadline: give up on the lookup (the library finishes the
         * late decision when it comes) and decide from local data */
        llmproxy_count(lookup_abandoned, 1);
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "llmproxy: remote cache lookup not decided within its deadline: "
                      "picking from local data");
        llmproxy_pick_ticket_free(ctx->ticket);
        ctx->ticket = NULL;

        req = NULL;
        st = llmproxy_pick(ngx_llmproxy_router, ctx->hdrs, ctx->nhdrs, ctx->body, ctx->blen,
                           &req);

    } else {
        llmproxy_pick_ticket_free(ctx->ticket);
        ctx->ticket = NULL;
    }

    /* back to the phases: stop watching the client here (the proxy does from now on) */
    if (ngx_handle_read_event(r->connection->read, 0) != NGX_OK) {
        if (req) {
            llmproxy_request_finish_outcome(req, 0, LLMPROXY_OUTCOME_LOCAL);
        }
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }
    r->read_event_handler = ngx_http_block_reading;

    ngx_http_llmproxy_picked(r, ctx, st, req);
}


/* The request ends while its pick is pending (client abort, worker shutdown): free the
 * ticket; the library finishes the decision nobody took when it arrives. */
void
ngx_http_llmproxy_lookup_cancel(ngx_http_llmproxy_ctx_t *ctx)
{
    if (ctx->ticket == NULL) {
        return;
    }

    if (ngx_llmproxy_router != NULL) {
        /* after exit_process the library is being torn down: let the process exit take it */
        llmproxy_pick_ticket_free(ctx->ticket);
    }

    ctx->ticket = NULL;
    llmproxy_count(lookup_cancelled, 1);
}
