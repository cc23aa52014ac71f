//! Attachments and leases: a router's worker slot in a region, and its hold on the endpoint
//! slots of its endpoints (claimed, joined, taken over when idle, left).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::ledger::LedgerEntry;
use super::{EndpointSlot, SharedState, ENDPOINT_SLOTS, FREE, RECLAIMING};
use crate::state::cells::{EndpointCounters, Load};

/// One router's attachment to a region: its worker slot. Dropped (with the router and its
/// last endpoint) it frees the slot.
pub struct Attachment {
    pub(in crate::state) state: Arc<SharedState>,
    pub(in crate::state) worker: usize,
    /// Serialises this router's joins and leaves of endpoint slots.
    pub(in crate::state) leases: Mutex<()>,
}

impl Attachment {
    /// The region.
    pub fn state(&self) -> &Arc<SharedState> {
        &self.state
    }

    /// A lease on the slot of (cluster, address), claimed or joined; None when the endpoint
    /// table is full of endpoints other workers hold.
    pub fn lease(self: &Arc<Self>, cluster: &str, addr: SocketAddr) -> Option<SlotLease> {
        let key = slot_key(cluster, addr);
        let _guard = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        for _attempt in 0..64 {
            match self.find_or_claim(key) {
                Some(e) if self.join(e, key) => {
                    let generation = self.state.endpoint(e).generation.load(Ordering::Acquire);
                    return Some(SlotLease {
                        attachment: Arc::clone(self),
                        slot: e,
                        generation,
                    });
                }
                Some(_) => std::thread::yield_now(),
                None => {
                    self.state
                        .header()
                        .endpoint_overflow
                        .fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        None
    }

    /// The slot holding `key`, an empty one claimed for it, or one no worker holds taken over.
    pub(in crate::state) fn find_or_claim(&self, key: u64) -> Option<usize> {
        let s = &self.state;
        let start = (key % ENDPOINT_SLOTS as u64) as usize;
        for i in 0..ENDPOINT_SLOTS {
            let e = (start + i) % ENDPOINT_SLOTS;
            let slot = s.endpoint(e);
            match slot.key.load(Ordering::SeqCst) {
                k if k == key => return Some(e),
                0 => match slot
                    .key
                    .compare_exchange(0, key, Ordering::SeqCst, Ordering::SeqCst)
                {
                    Ok(_) => {
                        slot.generation.fetch_add(1, Ordering::AcqRel);
                        return Some(e);
                    }
                    Err(k) if k == key => return Some(e),
                    Err(_) => continue,
                },
                _ => continue,
            }
        }
        // Full: take over a slot no worker holds and nothing is in flight on.
        for i in 0..ENDPOINT_SLOTS {
            let e = (start + i) % ENDPOINT_SLOTS;
            let slot = s.endpoint(e);
            let old = slot.key.load(Ordering::SeqCst);
            if old == RECLAIMING || !slot.is_idle() {
                continue;
            }
            if slot
                .key
                .compare_exchange(old, RECLAIMING, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue;
            }
            // A worker that joined between the check and the marker keeps the slot.
            if !slot.is_idle() {
                slot.key.store(old, Ordering::SeqCst);
                continue;
            }
            slot.counters.reset();
            slot.generation.fetch_add(1, Ordering::AcqRel);
            slot.key.store(key, Ordering::SeqCst);
            return Some(e);
        }
        None
    }

    /// Marks this worker as holding slot `e`; false when the slot changed hands meanwhile.
    pub(in crate::state) fn join(&self, e: usize, key: u64) -> bool {
        let slot = self.state.endpoint(e);
        let entry = self.state.ledger(self.worker, e);
        if entry.refs.fetch_add(1, Ordering::AcqRel) == 0 {
            slot.attached[self.worker / 64].fetch_or(1u64 << (self.worker % 64), Ordering::SeqCst);
        }
        if slot.key.load(Ordering::SeqCst) == key {
            return true;
        }
        self.leave(e);
        false
    }

    /// Drops one of this worker's holds on slot `e`; the last one takes its share back.
    pub(in crate::state) fn leave(&self, e: usize) {
        let slot = self.state.endpoint(e);
        let entry = self.state.ledger(self.worker, e);
        // Checked: a slot reaped as dead (its refs zeroed) is never driven below zero.
        let prev = entry
            .refs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1));
        if prev == Ok(1) {
            entry.clear();
            slot.attached[self.worker / 64]
                .fetch_and(!(1u64 << (self.worker % 64)), Ordering::SeqCst);
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // Every lease is gone (each holds the attachment): the ledger is empty. The slot is
        // freed only if it is still ours (never one a reaper freed and another worker took).
        let slot = self.state.worker(self.worker);
        if slot.state.load(Ordering::Acquire) == std::process::id() {
            slot.start_time.store(0, Ordering::Release);
            let _ = slot.state.compare_exchange(
                std::process::id(),
                FREE,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }
}

impl EndpointSlot {
    /// No worker holds the slot and nothing is in flight on it.
    pub(in crate::state) fn is_idle(&self) -> bool {
        self.attached.iter().all(|a| a.load(Ordering::SeqCst) == 0)
    }
}

/// A router's hold on one endpoint slot: the endpoint's counters and the router's ledger entry.
pub struct SlotLease {
    pub(in crate::state) attachment: Arc<Attachment>,
    pub(in crate::state) slot: usize,
    pub(in crate::state) generation: u32,
}

impl SlotLease {
    /// The shared counters.
    pub(in crate::state) fn counters(&self) -> &EndpointCounters {
        &self.attachment.state.endpoint(self.slot).counters
    }

    /// This router's ledger entry for the slot.
    pub(in crate::state) fn ledger(&self) -> &LedgerEntry {
        self.attachment
            .state
            .ledger(self.attachment.worker, self.slot)
    }

    /// The endpoint's `which` load, all routers together.
    pub(in crate::state) fn load(&self, which: Load) -> u64 {
        self.attachment.state.load(self.slot, which)
    }

    /// Adds `v` to this router's share of the `which` load.
    pub(in crate::state) fn add(&self, which: Load, v: u64) {
        self.ledger().add(which, v);
    }

    /// Takes `v` back from this router's share of the `which` load.
    pub(in crate::state) fn sub(&self, which: Load, v: u64) {
        self.ledger().sub(which, v);
    }

    /// The endpoint id: the same in every worker, new when the slot is reused.
    pub(in crate::state) fn endpoint_id(&self) -> u32 {
        ((self.generation & 0x7fff) << 16) | (self.slot as u32 + 1)
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let _guard = self
            .attachment
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.attachment.leave(self.slot);
    }
}

/// The endpoint table key of (cluster, address): never 0 or RECLAIMING.
pub(in crate::state) fn slot_key(cluster: &str, addr: SocketAddr) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(cluster.as_bytes());
    h.update(&[0]);
    h.update(addr.to_string().as_bytes());
    match h.digest() {
        0 => 1,
        RECLAIMING => RECLAIMING - 1,
        k => k,
    }
}
