//! The ledger: per (worker, endpoint), that worker's share of the endpoint's load. Each entry
//! has one writer (its worker); the endpoint's load is the sum over the workers holding it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::state::cells::Load;

/// One router's share of one endpoint's load, and how many of the router's endpoint objects
/// use the slot. Only that router writes it (its request path and its sync thread); the
/// endpoint's load is the sum over the routers holding the slot, and a dead router's share
/// disappears when its entry is cleared.
#[repr(C)]
pub struct LedgerEntry {
    pub(in crate::state) refs: AtomicU32,
    pub(in crate::state) in_flight: AtomicU32,
    pub(in crate::state) reported_in_flight: AtomicU32,
    pub(in crate::state) _reserved: AtomicU32,
    pub(in crate::state) prefill: AtomicU64,
    pub(in crate::state) uncached: AtomicU64,
    pub(in crate::state) reported_prefill: AtomicU64,
}

impl LedgerEntry {
    pub(in crate::state) fn get(&self, which: Load) -> u64 {
        match which {
            Load::InFlight => self.in_flight.load(Ordering::Relaxed) as u64,
            Load::ReportedInFlight => self.reported_in_flight.load(Ordering::Relaxed) as u64,
            Load::Prefill => self.prefill.load(Ordering::Relaxed),
            Load::Uncached => self.uncached.load(Ordering::Relaxed),
            Load::ReportedPrefill => self.reported_prefill.load(Ordering::Relaxed),
        }
    }

    pub(in crate::state) fn add(&self, which: Load, v: u64) {
        let v32 = v.min(u32::MAX as u64) as u32;
        match which {
            Load::InFlight => {
                self.in_flight.fetch_add(v32, Ordering::Relaxed);
            }
            Load::ReportedInFlight => {
                self.reported_in_flight.fetch_add(v32, Ordering::Relaxed);
            }
            Load::Prefill => {
                self.prefill.fetch_add(v, Ordering::Relaxed);
            }
            Load::Uncached => {
                self.uncached.fetch_add(v, Ordering::Relaxed);
            }
            Load::ReportedPrefill => {
                self.reported_prefill.fetch_add(v, Ordering::Relaxed);
            }
        }
    }

    pub(in crate::state) fn sub(&self, which: Load, v: u64) {
        let v32 = v.min(u32::MAX as u64) as u32;
        match which {
            Load::InFlight => sub32(&self.in_flight, v32),
            Load::ReportedInFlight => sub32(&self.reported_in_flight, v32),
            Load::Prefill => sub64(&self.prefill, v),
            Load::Uncached => sub64(&self.uncached, v),
            Load::ReportedPrefill => sub64(&self.reported_prefill, v),
        }
    }

    /// Takes the Metadata-Center part of the share out: (requests, prefill chars).
    pub(in crate::state) fn take_reported(&self) -> (u64, u64) {
        (
            self.reported_in_flight.swap(0, Ordering::AcqRel) as u64,
            self.reported_prefill.swap(0, Ordering::AcqRel),
        )
    }

    /// Drops the whole share (the router is gone or no longer holds the endpoint).
    pub(in crate::state) fn clear(&self) {
        for a in [&self.in_flight, &self.reported_in_flight] {
            a.store(0, Ordering::Release);
        }
        for a in [&self.prefill, &self.uncached, &self.reported_prefill] {
            a.store(0, Ordering::Release);
        }
    }
}

/// The ledger's saturating subtractions (its atomics are always std's: the ledger only exists
/// in a shared region, which a loom build never makes).
fn sub64(a: &AtomicU64, v: u64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
        Some(x.saturating_sub(v))
    });
}

fn sub32(a: &AtomicU32, v: u32) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
        Some(x.saturating_sub(v))
    });
}
