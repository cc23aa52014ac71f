/*
 * ngx_http_llmproxy_snapshot.c: every worker's router metrics, published for the others.
 * Owns the publish timer (each worker renders its router's part every
 * LLMPROXY_SNAPSHOT_MS into its slot of the llmproxy_counters zone), the snapshots' memory
 * (slab allocations of that zone, under its mutex, freed when a worker exits or is reaped),
 * and reading the other workers' snapshots for the metrics location (which merges them).
 *
 * No wait at scrape time: the answering worker renders its own router fresh and takes the
 * others' latest snapshots, at most one interval old (older ones are counted as stale, e.g.
 * a worker busy for seconds in one event).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_llmproxy_module.h"


static ngx_event_t       ngx_llmproxy_publish_ev;
static ngx_slab_pool_t  *ngx_llmproxy_shpool;


/* This worker's router part: the router's own series (with the shared state, whose part the
 * location renders once for all workers) or everything (without it). Free with
 * llmproxy_string_free. */
char *
ngx_http_llmproxy_router_text(size_t *len)
{
    char  *text;

    text = NULL;
    *len = 0;
    if (ngx_llmproxy_router == NULL
        || llmproxy_router_metrics_part(ngx_llmproxy_router,
                                        ngx_llmproxy_shared_router ? LLMPROXY_METRICS_ROUTER
                                                                   : LLMPROXY_METRICS_ALL,
                                        &text, len) != LLMPROXY_OK)
    {
        *len = 0;
        return NULL;
    }

    return text;
}


/* Replaces this worker's snapshot with `text`; keeps the old one when the zone is full. */
static void
ngx_http_llmproxy_publish(void)
{
    size_t   len;
    char    *text;
    u_char  *copy;

    text = ngx_http_llmproxy_router_text(&len);
    if (text == NULL) {
        return;
    }

    ngx_shmtx_lock(&ngx_llmproxy_shpool->mutex);

    copy = ngx_slab_alloc_locked(ngx_llmproxy_shpool, len);
    if (copy == NULL) {
        ngx_shmtx_unlock(&ngx_llmproxy_shpool->mutex);
        llmproxy_string_free(text);
        llmproxy_count(snapshot_failures, 1);
        return;
    }

    ngx_memcpy(copy, text, len);
    if (ngx_llmproxy_slot->snapshot) {
        ngx_slab_free_locked(ngx_llmproxy_shpool, ngx_llmproxy_slot->snapshot);
    }
    ngx_llmproxy_slot->snapshot = copy;
    ngx_llmproxy_slot->snapshot_len = len;
    ngx_llmproxy_slot->snapshot_msec = ngx_current_msec;

    ngx_shmtx_unlock(&ngx_llmproxy_shpool->mutex);

    llmproxy_string_free(text);
}


static void
ngx_http_llmproxy_publish_handler(ngx_event_t *ev)
{
    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    ngx_http_llmproxy_publish();
    ngx_add_timer(ev, LLMPROXY_SNAPSHOT_MS);
}


/* init_process, once the counters' zone is known (before any slot is reaped). */
void
ngx_http_llmproxy_snapshot_zone(ngx_slab_pool_t *shpool)
{
    ngx_llmproxy_shpool = shpool;
}


/* init_process, once the router is built: publish now and every LLMPROXY_SNAPSHOT_MS (the
 * timer never delays a graceful exit: cancelable). */
void
ngx_http_llmproxy_snapshot_start(ngx_cycle_t *cycle)
{
    if (ngx_llmproxy_shpool == NULL || ngx_llmproxy_router == NULL) {
        return;
    }

    ngx_http_llmproxy_publish();

    ngx_llmproxy_publish_ev.handler = ngx_http_llmproxy_publish_handler;
    ngx_llmproxy_publish_ev.log = cycle->log;
    ngx_llmproxy_publish_ev.data = cycle;
    ngx_llmproxy_publish_ev.cancelable = 1;
    ngx_add_timer(&ngx_llmproxy_publish_ev, LLMPROXY_SNAPSHOT_MS);
}


/* Frees a slot's snapshot (its worker exited or was reaped). */
void
ngx_http_llmproxy_snapshot_release(ngx_http_llmproxy_slot_t *slot)
{
    if (ngx_llmproxy_shpool == NULL) {
        return;
    }

    ngx_shmtx_lock(&ngx_llmproxy_shpool->mutex);
    if (slot->snapshot) {
        ngx_slab_free_locked(ngx_llmproxy_shpool, slot->snapshot);
        slot->snapshot = NULL;
        slot->snapshot_len = 0;
    }
    ngx_shmtx_unlock(&ngx_llmproxy_shpool->mutex);
}


/* The other live workers' snapshots, copied into `pool` (the lock is held only for the
 * copies). Counts those older than LLMPROXY_SNAPSHOT_STALE_MS in *stale. */
ngx_array_t *
ngx_http_llmproxy_snapshots(ngx_pool_t *pool, ngx_uint_t *stale)
{
    ngx_int_t                       i;
    ngx_array_t                    *out;
    ngx_http_llmproxy_slot_t       *slot;
    ngx_http_llmproxy_snapshot_t   *s;

    *stale = 0;
    out = ngx_array_create(pool, 8, sizeof(ngx_http_llmproxy_snapshot_t));
    if (out == NULL || ngx_llmproxy_shpool == NULL) {
        return out;
    }

    ngx_shmtx_lock(&ngx_llmproxy_shpool->mutex);

    for (i = 0; i < NGX_MAX_PROCESSES; i++) {
        slot = &ngx_llmproxy_stats->slots[i];
        if (slot == ngx_llmproxy_slot || slot->pid == 0 || slot->snapshot == NULL) {
            continue;
        }

        s = ngx_array_push(out);
        if (s == NULL) {
            break;
        }
        s->pid = (ngx_pid_t) slot->pid;
        s->text.len = slot->snapshot_len;
        s->text.data = ngx_pnalloc(pool, slot->snapshot_len);
        if (s->text.data == NULL) {
            out->nelts--;
            break;
        }
        ngx_memcpy(s->text.data, slot->snapshot, slot->snapshot_len);

        if ((ngx_msec_int_t) (ngx_current_msec - slot->snapshot_msec)
            > LLMPROXY_SNAPSHOT_STALE_MS)
        {
            (*stale)++;
        }
    }

    ngx_shmtx_unlock(&ngx_llmproxy_shpool->mutex);

    return out;
}
