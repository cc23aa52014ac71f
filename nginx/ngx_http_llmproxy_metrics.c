/*
 * ngx_http_llmproxy_metrics.c: the llmproxy_metrics location. Owns the Prometheus text: the
 * answering worker's router (llmproxy_router_metrics) and the module's counters
 * (llmproxy_nginx_*, one set for every worker, in the llmproxy_counters zone).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_llmproxy_module.h"


/* ---------------------------------------------------------------------------------------
 * metrics location
 */

static u_char *
ngx_http_llmproxy_counter(u_char *p, const char *name, const char *label, ngx_atomic_t *v)
{
    return ngx_sprintf(p, "%s%s %uA\n", name, label, (ngx_atomic_uint_t) *v);
}


/* Copies Prometheus text to `p`, adding `label` (worker="<pid>") to every sample. */
static u_char *
ngx_http_llmproxy_label(u_char *p, u_char *text, size_t len, ngx_str_t *label)
{
    u_char  *end, *eol, *q;

    end = text + len;

    while (text < end) {
        eol = ngx_strlchr(text, end, '\n');
        eol = eol ? eol + 1 : end;

        if (*text == '#' || *text == '\n') {
            p = ngx_cpymem(p, text, eol - text);
            text = eol;
            continue;
        }

        for (q = text; q < eol && *q != '{' && *q != ' '; q++) { /* the metric's name */ }

        p = ngx_cpymem(p, text, q - text);

        if (q < eol && *q == '{') {
            *p++ = '{';
            p = ngx_cpymem(p, label->data, label->len);
            q++;
            if (q < eol && *q != '}') {
                *p++ = ',';
            }

        } else {
            *p++ = '{';
            p = ngx_cpymem(p, label->data, label->len);
            *p++ = '}';
        }

        p = ngx_cpymem(p, q, eol - q);
        text = eol;
    }

    return p;
}


static ngx_int_t
ngx_http_llmproxy_metrics_handler(ngx_http_request_t *r)
{
    char                       *text, *state;
    size_t                      text_len, state_len, size, lines;
    u_char                     *q, label_buf[sizeof("worker=\"\"") + NGX_INT64_LEN];
    ngx_str_t                   label;
    u_char                     *p;
    ngx_int_t                   rc;
    ngx_buf_t                  *b;
    ngx_chain_t                 out;
    ngx_uint_t                  workers;
    ngx_atomic_uint_t           pending;
    ngx_http_llmproxy_stats_t  *s = ngx_llmproxy_stats;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    /* with the shared state: its part (endpoints, prefix index) once, as it is the same in
     * every worker; this worker's own part (picks, finishes, latencies) labelled with its pid.
     * Without it, everything is this worker's. */
    state = NULL;
    state_len = 0;
    if (ngx_llmproxy_router && ngx_llmproxy_shared_router
        && llmproxy_router_metrics_part(ngx_llmproxy_router, LLMPROXY_METRICS_STATE,
                                        &state, &state_len) != LLMPROXY_OK)
    {
        state = NULL;
        state_len = 0;
    }

    text = NULL;
    text_len = 0;
    if (ngx_llmproxy_router
        && llmproxy_router_metrics_part(ngx_llmproxy_router,
                                        ngx_llmproxy_shared_router ? LLMPROXY_METRICS_ROUTER
                                                                   : LLMPROXY_METRICS_ALL,
                                        &text, &text_len) != LLMPROXY_OK)
    {
        text = NULL;
        text_len = 0;
    }

    label.data = label_buf;
    label.len = ngx_sprintf(label_buf, "worker=\"%P\"", ngx_pid) - label_buf;

    /* each sample line may get the label and a comma or braces */
    lines = 0;
    for (q = (u_char *) text; q && q < (u_char *) text + text_len; q++) {
        lines += (*q == '\n');
    }

    size = state_len + text_len + (lines + 1) * (label.len + 3) + 4096;
    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        llmproxy_string_free(state);
        llmproxy_string_free(text);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (state) {
        b->last = ngx_cpymem(b->last, state, state_len);
        llmproxy_string_free(state);
    }

    if (text) {
        b->last = ngx_http_llmproxy_label(b->last, (u_char *) text, text_len, &label);
        llmproxy_string_free(text);
    }

    /* the module's counters, for the whole nginx (every worker) */
    p = b->last;
    workers = ngx_http_llmproxy_live_workers(&pending);
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_workers gauge\n");
    p = ngx_sprintf(p, "llmproxy_nginx_workers %ui\n", workers);
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_pending_requests gauge\n");
    p = ngx_sprintf(p, "llmproxy_nginx_pending_requests %uA\n", pending);
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
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_picks_total",
                                  "{event=\"waited_for_lookup\"}", &s->lookup_waited);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_picks_total",
                                  "{event=\"lookup_abandoned\"}", &s->lookup_abandoned);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_picks_total",
                                  "{event=\"lookup_cancelled\"}", &s->lookup_cancelled);
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_picks_total", "{event=\"lost\"}",
                                  &s->lost);
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


char *
ngx_http_llmproxy_metrics(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_llmproxy_metrics_handler;

    return NGX_CONF_OK;
}
