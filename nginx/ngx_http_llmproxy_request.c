/*
 * ngx_http_llmproxy_request.c: a request on its way in. Owns the rewrite phase (strip the
 * client's routing headers, refuse inference subrequests), the precontent phase (413 by
 * Content-Length, read the body from memory or the temp file, pick, apply the library's
 * body/URI rewrites and routing headers), and every JSON answer the module makes itself
 * (library errors, llmproxy_error for error_page targets).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_llmproxy_module.h"


ngx_int_t
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
ngx_int_t
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
ngx_int_t
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
ngx_int_t
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


static ngx_str_t  endpoint_header = ngx_string(LLMPROXY_ENDPOINT_HEADER);
static ngx_str_t  scene_header = ngx_string(LLMPROXY_SCENE_HEADER);

static void ngx_http_llmproxy_resume(ngx_http_request_t *r, ngx_http_llmproxy_ctx_t *ctx);


ngx_int_t
ngx_http_llmproxy_set_header(ngx_http_request_t *r, ngx_str_t *name, ngx_uint_t hash,
    const char *value, size_t value_len)
{
    ngx_table_elt_t  *h;

    if (name->len == 0) {
        return NGX_OK;
    }

    h = ngx_list_push(&r->headers_in.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    /* the name is lower case and outlives the request (the cycle's or a constant) */
    h->key = *name;
    h->lowcase_key = name->data;
    h->hash = hash;
    h->value.len = value_len;
    h->value.data = ngx_pnalloc(r->pool, value_len);
    if (h->value.data == NULL) {
        return NGX_ERROR;
    }
    if (value_len) {
        ngx_memcpy(h->value.data, value, value_len);
    }

    return NGX_OK;
}


ngx_uint_t
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

ngx_int_t
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
ngx_int_t
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
ngx_int_t
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


ngx_int_t
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


/* The request body is read: gather the pick's inputs (request pool) and pick. */
static void
ngx_http_llmproxy_body_handler(ngx_http_request_t *r)
{
    size_t                    n, i, blen;
    u_char                   *body;
    llmproxy_header          *hdrs;
    ngx_list_part_t          *part;
    ngx_table_elt_t          *h;
    ngx_http_llmproxy_ctx_t  *ctx;

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

    ctx->hdrs = hdrs;
    ctx->nhdrs = n;
    ctx->body = body;
    ctx->blen = blen;

    /* decided now, or later from a timer (remote cache lookup): ngx_http_llmproxy_picked */
    ngx_http_llmproxy_pick_begin(r, ctx);
}


/* The pick's answer (`st`, `req`): a library error answered with its JSON, or the decision
 * applied to the request (endpoint, rewrites, routing headers) and the phases resumed. */
void
ngx_http_llmproxy_picked(ngx_http_request_t *r, ngx_http_llmproxy_ctx_t *ctx,
    llmproxy_status st, llmproxy_request *req)
{
    size_t          len;
    u_char         *body;
    const char     *s;
    const uint8_t  *ub;
    uint32_t        status;
    ngx_int_t       rc;

    if (req == NULL) {
        static const char m[] = "llmproxy_pick returned no request";
        llmproxy_count(internal_errors, 1);
        ngx_http_finalize_request(r, ngx_http_llmproxy_send_error(r, 500, m, sizeof(m) - 1));
        return;
    }

    if (st == LLMPROXY_PASSTHROUGH) {
        /* nothing to route (a stored Responses answer no one knows the endpoint of): proxied
         * untouched, to the block's round robin, like a request the library does not
         * intercept (ctx->req stays NULL) */
        llmproxy_request_finish_outcome(req, 0, LLMPROXY_OUTCOME_LOCAL);
        llmproxy_count(passthrough, 1);
        ngx_http_llmproxy_resume(r, ctx);
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
    llmproxy_count_pending(1);

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
    rc = ngx_http_llmproxy_set_header(r, &ngx_llmproxy_cluster_header,
                                      ngx_llmproxy_cluster_header_hash, s, len);
    if (rc == NGX_OK) {
        rc = ngx_http_llmproxy_set_header(r, &endpoint_header,
                                          ngx_llmproxy_endpoint_header_hash,
                                          (const char *) ctx->endpoint.data,
                                          ctx->endpoint.len);
    }
    if (rc == NGX_OK) {
        len = 0;
        s = llmproxy_request_scene(req, &len);
        rc = ngx_http_llmproxy_set_header(r, &scene_header,
                                          ngx_llmproxy_scene_header_hash, s, len);
    }
    if (rc != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    ngx_http_llmproxy_resume(r, ctx);
}


/* On to the content phase (proxy_pass) with the body read. */
static void
ngx_http_llmproxy_resume(ngx_http_request_t *r, ngx_http_llmproxy_ctx_t *ctx)
{
    ctx->phase_rc = NGX_DECLINED;
    r->preserve_body = 1;
    r->write_event_handler = ngx_http_core_run_phases;
    ngx_http_core_run_phases(r);
}


ngx_int_t
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
 * llmproxy_error: JSON answers for error_page targets
 */
/* llmproxy_error <status>: the target of error_page for errors nginx itself produces (body
 * above client_max_body_size, upstream unreachable or timed out), answered with the same
 * OpenAI JSON as the library's own errors. */
ngx_int_t
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


char *
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
