/*
 * ngx_http_llmproxy_metrics.c: the llmproxy_metrics location. Owns the Prometheus text: the
 * shared state's part once, every worker's router part merged family by family (one HELP/TYPE
 * per family, each sample labelled worker="<pid>": this worker's rendered now, the others'
 * from their snapshots, see _snapshot.c) and the module's counters (llmproxy_nginx_*, one set
 * for every worker, in the llmproxy_counters zone).
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


/* One metric family of the merged text: its HELP/TYPE lines (from the first worker that has
 * it) and every worker's samples, each with that worker's label. */
typedef struct {
    ngx_str_t     name;
    ngx_str_t     head;
    ngx_array_t   samples;   /* of ngx_http_llmproxy_sample_t */
    unsigned      open:1;    /* the head is still being read (TYPE follows HELP) */
} ngx_http_llmproxy_family_t;

typedef struct {
    ngx_str_t     line;      /* with its newline */
    ngx_str_t    *label;
} ngx_http_llmproxy_sample_t;


static ngx_http_llmproxy_family_t *
ngx_http_llmproxy_family(ngx_pool_t *pool, ngx_array_t *families, u_char *name, size_t len)
{
    ngx_uint_t                   i;
    ngx_http_llmproxy_family_t  *f;

    f = families->elts;
    for (i = 0; i < families->nelts; i++) {
        if (f[i].name.len == len && ngx_strncmp(f[i].name.data, name, len) == 0) {
            f[i].open = 0;
            return &f[i];
        }
    }

    f = ngx_array_push(families);
    if (f == NULL || ngx_array_init(&f->samples, pool, 16, sizeof(ngx_http_llmproxy_sample_t))
                     != NGX_OK)
    {
        return NULL;
    }
    f->name.data = name;
    f->name.len = len;
    ngx_str_null(&f->head);
    f->open = 1;

    return f;
}


/* Adds one worker's Prometheus text to `families`: its HELP/TYPE lines once per family, its
 * samples with `label`. Returns the number of sample lines, or -1 (no memory). */
static ngx_int_t
ngx_http_llmproxy_merge(ngx_pool_t *pool, ngx_array_t *families, ngx_str_t *text,
    ngx_str_t *label)
{
    u_char                      *p, *end, *eol, *name;
    ngx_int_t                    n;
    ngx_http_llmproxy_family_t  *cur;
    ngx_http_llmproxy_sample_t  *s;

    n = 0;
    cur = NULL;
    end = text->data + text->len;

    for (p = text->data; p < end; p = eol) {
        eol = ngx_strlchr(p, end, '\n');
        eol = eol ? eol + 1 : end;

        if (eol - p > 7 && ngx_strncmp(p, "# HELP ", 7) == 0) {
            for (name = p + 7; name < eol && *name != ' ' && *name != '\n'; name++) { }
            cur = ngx_http_llmproxy_family(pool, families, p + 7, name - (p + 7));
            if (cur == NULL) {
                return -1;
            }
            if (cur->open) {
                cur->head.data = p;
                cur->head.len = eol - p;
            }
            continue;
        }

        if (*p == '#' || *p == '\n') {
            /* TYPE right after its HELP: part of the head, once */
            if (cur && cur->open && cur->head.data + cur->head.len == p) {
                cur->head.len += eol - p;
            }
            continue;
        }

        if (cur == NULL) {
            cur = ngx_http_llmproxy_family(pool, families, (u_char *) "", 0);
            if (cur == NULL) {
                return -1;
            }
        }
        cur->open = 0;

        s = ngx_array_push(&cur->samples);
        if (s == NULL) {
            return -1;
        }
        s->line.data = p;
        s->line.len = eol - p;
        s->label = label;
        n++;
    }

    return n;
}


static ngx_int_t
ngx_http_llmproxy_metrics_handler(ngx_http_request_t *r)
{
    char                          *own, *state;
    size_t                         own_len, state_len, size;
    ngx_str_t                      own_text, *label;
    u_char                        *p;
    ngx_int_t                      rc, n;
    ngx_buf_t                     *b;
    ngx_uint_t                     i, j, stale, texts;
    ngx_chain_t                    out;
    ngx_array_t                   *snapshots, families;
    ngx_uint_t                     workers;
    ngx_atomic_uint_t              pending;
    ngx_http_llmproxy_stats_t     *s = ngx_llmproxy_stats;
    ngx_http_llmproxy_family_t    *f;
    ngx_http_llmproxy_sample_t    *smp;
    ngx_http_llmproxy_snapshot_t  *snap;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    /* reaps dead workers' slots (and their snapshots) before the snapshots are read */
    workers = ngx_http_llmproxy_live_workers(&pending);

    /* with the shared state: its part (endpoints, prefix index) once, as it is the same in
     * every worker; the routers' own parts (picks, finishes, latencies) of every worker, each
     * sample labelled worker="<pid>": this worker's rendered now, the others' from their
     * latest snapshots. Without it, each router's whole text. */
    state = NULL;
    state_len = 0;
    if (ngx_llmproxy_router && ngx_llmproxy_shared_router
        && llmproxy_router_metrics_part(ngx_llmproxy_router, LLMPROXY_METRICS_STATE,
                                        &state, &state_len) != LLMPROXY_OK)
    {
        state = NULL;
        state_len = 0;
    }

    own = ngx_http_llmproxy_router_text(&own_len);
    snapshots = ngx_http_llmproxy_snapshots(r->pool, &stale);
    if (snapshots == NULL
        || ngx_array_init(&families, r->pool, 64, sizeof(ngx_http_llmproxy_family_t)) != NGX_OK)
    {
        llmproxy_string_free(state);
        llmproxy_string_free(own);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* every text with its label: this worker first, then the others */
    texts = 0;
    size = state_len + 8192;   /* + the module's counters below */
    own_text.data = (u_char *) own;
    own_text.len = own_len;
    snap = snapshots->elts;

    for (i = 0; i <= snapshots->nelts; i++) {
        ngx_pid_t   pid = (i == 0) ? ngx_pid : snap[i - 1].pid;
        ngx_str_t  *text = (i == 0) ? &own_text : &snap[i - 1].text;

        if (text->data == NULL) {
            continue;
        }
        label = ngx_palloc(r->pool, sizeof(ngx_str_t));
        p = ngx_pnalloc(r->pool, sizeof("worker=\"\"") + NGX_INT64_LEN);
        if (label == NULL || p == NULL) {
            n = -1;
        } else {
            label->data = p;
            label->len = ngx_sprintf(p, "worker=\"%P\"", pid) - p;
            n = ngx_http_llmproxy_merge(r->pool, &families, text, label);
        }
        if (n < 0) {
            llmproxy_string_free(state);
            llmproxy_string_free(own);
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        texts++;
        size += text->len + n * (label->len + 3);
    }

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        llmproxy_string_free(state);
        llmproxy_string_free(own);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (state) {
        b->last = ngx_cpymem(b->last, state, state_len);
        llmproxy_string_free(state);
    }

    f = families.elts;
    for (i = 0; i < families.nelts; i++) {
        b->last = ngx_cpymem(b->last, f[i].head.data, f[i].head.len);
        smp = f[i].samples.elts;
        for (j = 0; j < f[i].samples.nelts; j++) {
            b->last = ngx_http_llmproxy_label(b->last, smp[j].line.data, smp[j].line.len,
                                              smp[j].label);
        }
    }

    /* the routers' texts are copied: the library's string can go */
    llmproxy_string_free(own);

    /* the module's counters, for the whole nginx (every worker) */
    p = b->last;
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_workers gauge\n");
    p = ngx_sprintf(p, "llmproxy_nginx_workers %ui\n", workers);
    p = ngx_sprintf(p, "# HELP llmproxy_nginx_merged_routers Workers whose router series are "
                       "in this answer (its own, rendered now, and the others' snapshots).\n");
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_merged_routers gauge\n");
    p = ngx_sprintf(p, "llmproxy_nginx_merged_routers %ui\n", texts);
    p = ngx_sprintf(p, "# HELP llmproxy_nginx_stale_snapshots Other workers' router snapshots "
                       "older than 3 s (a worker busy in one event).\n");
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_stale_snapshots gauge\n");
    p = ngx_sprintf(p, "llmproxy_nginx_stale_snapshots %ui\n", stale);
    p = ngx_sprintf(p, "# TYPE llmproxy_nginx_snapshot_failures_total counter\n");
    p = ngx_http_llmproxy_counter(p, "llmproxy_nginx_snapshot_failures_total", "",
                                  &s->snapshot_failures);
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
