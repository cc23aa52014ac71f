/*
 * ngx_http_llmproxy_filter.c: the response on its way out. Owns the header filter
 * (transcoded status and content type, debug headers) and the body filter (first response
 * byte -> llmproxy_request_first_token; Triton -> OpenAI transcoding chunk by chunk; every
 * in-memory answer buffer -> llmproxy_request_observe_response, to learn the next turn).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_llmproxy_module.h"


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


/* ---------------------------------------------------------------------------------------
 * response: transcoding, first token, debug headers
 */

/* The response comes from the endpoint (not a reply nginx made up after a failure). */
static ngx_inline ngx_uint_t
ngx_http_llmproxy_upstream_answered(ngx_http_request_t *r)
{
    return r->upstream != NULL && r->upstream->headers_in.status_n != 0;
}


ngx_int_t
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

    } else if (ctx && ctx->req && ngx_http_llmproxy_upstream_answered(r)) {
        /* the library reads the answer from memory buffers (to learn the next turn's
         * prefix); a part spooled to a file stops that (ngx_http_llmproxy_observe) */
        ctx->observing = 1;
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


/* Hands every in-memory buffer of the answer to the library, which learns the next turn's
 * prefix from it at finish. A buffer in a file (proxy_temp_path) ends the reading: an answer
 * read with a gap must not be learned, and one that is never read to its end is not. */
static void
ngx_http_llmproxy_observe(ngx_http_llmproxy_ctx_t *ctx, ngx_chain_t *in)
{
    ngx_buf_t  *b;

    for ( /* void */ ; in && ctx->observing; in = in->next) {
        b = in->buf;
        if (ngx_buf_in_memory(b)) {
            llmproxy_request_observe_response(ctx->req, b->pos,
                                              (size_t) (b->last - b->pos),
                                              b->last_buf ? 1 : 0);
        } else if (ngx_buf_size(b) > 0) {
            ctx->observing = 0;
        } else if (b->last_buf) {
            llmproxy_request_observe_response(ctx->req, NULL, 0, 1);
        }
    }
}


ngx_int_t
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

    if (ctx->observing) {
        ngx_http_llmproxy_observe(ctx, in);
    }

    return ngx_http_next_body_filter(r, in);
}



void
ngx_http_llmproxy_filter_init(void)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_llmproxy_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_llmproxy_body_filter;
}
