//! The shared-state region: one routing state for every process of a host (nginx workers).
//!
//! A fixed-size anonymous `MAP_SHARED` mapping, created before fork (nginx's master, in
//! `init_by_lua`) and inherited by every worker, holds:
//! - a header: magic, layout version, sizes, the region's clock epoch, statistics;
//! - a worker table ([`MAX_WORKERS`] slots): one per attached router, with its process id and
//!   start time, so that a dead worker is recognised and its share taken back;
//! - an endpoint table ([`ENDPOINT_SLOTS`] slots) keyed by hash(cluster, address): each slot
//!   holds the endpoint's [`EndpointCounters`] and a bit per attached worker;
//! - a ledger: per (worker, endpoint), that worker's share of the endpoint's load (in flight,
//!   prefill, reported to the Metadata-Center); the endpoint's load is the sum of the shares of
//!   the workers holding it, so each share has one writer and a killed worker can never leave
//!   a half-done update behind;
//! - the prefix index's set-associative table ([`super::PrefixIndex`]), sized to the rest.
//!
//! Everything is addressed by offset from the base (position-independent) and made of atomics
//! whose all-zero state is valid; no lock lives in the region, so a worker killed at any
//! instruction cannot wedge the others. A worker that dies leaves its shares behind; the reaper
//! ([`SharedState::reap_dead_workers`], run by every attached router's upkeep thread) clears
//! them (idempotent: a reaper dying mid-way is taken over): no phantom load outlives a crash
//! by more than the reap interval.
//!
//! Regions are reused by name within a process ([`SharedState::named`]): nginx's master runs
//! `init_by_lua` again on every reload, gets the same region back when size and layout are
//! unchanged (learned prefixes and load survive), and a fresh one otherwise.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::cells::{EndpointCounters, IndexStats, Load, Way, WAYS};
use super::clock::monotonic_ms;
use super::Clock;

mod lease;
mod ledger;
mod process;

pub use lease::{Attachment, SlotLease};
pub use ledger::LedgerEntry;
use process::{process_alive, process_start_time};

/// Version of the region layout; a region with another version is never read.
pub const LAYOUT_VERSION: u32 = 3;
const MAGIC: u64 = u64::from_le_bytes(*b"LLMPXSHM");
/// Routers (worker processes) attached at once, old and new generation during a reload.
pub const MAX_WORKERS: usize = 128;
/// Distinct (cluster, address) pairs the region holds; more are routed with per-worker counters.
pub const ENDPOINT_SLOTS: usize = 2048;
/// Smallest region: the tables above plus a prefix index of useful size.
pub const MIN_SIZE: usize = 16 << 20;
/// Largest region.
pub const MAX_SIZE: usize = 64 << 30;

/// Worker slot states besides a process id.
const FREE: u32 = 0;
const REAPING: u32 = u32::MAX;
/// Endpoint slot key while a slot is being taken over for another endpoint.
const RECLAIMING: u64 = u64::MAX;
/// Endpoint ids with this bit are per-router (the region's endpoint table was full).
pub const PRIVATE_ID: u32 = 1 << 31;

#[repr(C)]
struct Header {
    magic: u64,
    version: u32,
    max_workers: u32,
    endpoint_slots: u32,
    _reserved: u32,
    size: u64,
    index_sets: u64,
    epoch_ms: u64,
    index: IndexStats,
    endpoint_overflow: AtomicU64,
    reaped_workers: AtomicU64,
    attaches: AtomicU64,
}

#[repr(C)]
struct WorkerSlot {
    /// FREE, the attached process's id, or REAPING.
    state: AtomicU32,
    /// Process id of the reaper while REAPING (a reaper that dies is taken over).
    reaper: AtomicU32,
    /// Start time of the process (`/proc/<pid>/stat` field 22): tells a reused pid apart.
    start_time: AtomicU64,
}

#[repr(C, align(64))]
struct EndpointSlot {
    /// Hash of (cluster, address); 0 = never used; RECLAIMING while taken over.
    key: AtomicU64,
    /// One bit per worker slot holding an endpoint on this slot.
    attached: [AtomicU64; MAX_WORKERS / 64],
    /// Bumped on every (re)use: part of the endpoint id, so old prefix-index entries of a
    /// reused slot never match the new endpoint.
    generation: AtomicU32,
    _reserved: AtomicU32,
    counters: EndpointCounters,
}

/// Byte offsets of the tables, from the size alone (the same size gives the same layout).
#[derive(Clone, Copy, PartialEq, Debug)]
struct Layout {
    workers: usize,
    endpoints: usize,
    ledger: usize,
    index: usize,
    index_sets: usize,
}

const PAGE: usize = 4096;

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl Layout {
    fn for_size(size: usize) -> Layout {
        let workers = PAGE;
        let endpoints = round_up(workers + MAX_WORKERS * size_of::<WorkerSlot>(), PAGE);
        let ledger = round_up(endpoints + ENDPOINT_SLOTS * size_of::<EndpointSlot>(), PAGE);
        let index = round_up(
            ledger + MAX_WORKERS * ENDPOINT_SLOTS * size_of::<LedgerEntry>(),
            PAGE,
        );
        let index_sets = size.saturating_sub(index) / (WAYS * size_of::<Way>());
        Layout {
            workers,
            endpoints,
            ledger,
            index,
            index_sets,
        }
    }
}

/// A shared-state region (see the module docs). Shared by `Arc` between the host's handle,
/// the name registry and every router attached to it; unmapped when the last one goes.
pub struct SharedState {
    base: *mut u8,
    size: usize,
    layout: Layout,
}

// SAFETY: the region is only accessed through atomics (`&Header`, `&WorkerSlot`, … are made
// of atomics and plain fields written once before the region is shared).
unsafe impl Send for SharedState {}
// SAFETY: as above.
unsafe impl Sync for SharedState {}

/// Regions by name, kept for the life of the process (nginx's master across reloads).
static NAMED: Mutex<Option<HashMap<String, Arc<SharedState>>>> = Mutex::new(None);

impl SharedState {
    /// Maps a fresh region of `size` bytes, shared with processes forked after this call.
    pub fn create(size: usize) -> Result<Arc<SharedState>, String> {
        if cfg!(loom) {
            return Err("shared state is not available in a loom build".into());
        }
        if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
            return Err(format!(
                "size must be within {} MiB–{} GiB, got {size} bytes",
                MIN_SIZE >> 20,
                MAX_SIZE >> 30
            ));
        }
        let layout = Layout::for_size(size);
        let state = SharedState {
            base: map(size)?,
            size,
            layout,
        };
        // SAFETY: the header lies at offset 0 of the fresh, zeroed, private-to-us mapping.
        let h = unsafe { &mut *state.base.cast::<Header>() };
        h.magic = MAGIC;
        h.version = LAYOUT_VERSION;
        h.max_workers = MAX_WORKERS as u32;
        h.endpoint_slots = ENDPOINT_SLOTS as u32;
        h.size = size as u64;
        h.index_sets = layout.index_sets as u64;
        // Epoch a little in the past: timestamps of 0 mean "never" in the counters.
        h.epoch_ms = monotonic_ms().saturating_sub(1);
        Ok(Arc::new(state))
    }

    /// The region registered under `name` in this process when its size and layout match,
    /// else a fresh one (which replaces it in the registry). The flag says whether the region
    /// was reused.
    pub fn named(name: &str, size: usize) -> Result<(Arc<SharedState>, bool), String> {
        let mut registry = NAMED.lock().unwrap_or_else(|p| p.into_inner());
        let map = registry.get_or_insert_with(HashMap::new);
        if let Some(existing) = map.get(name) {
            if existing.size == size && existing.check().is_ok() {
                return Ok((Arc::clone(existing), true));
            }
        }
        let fresh = SharedState::create(size)?;
        map.insert(name.to_string(), Arc::clone(&fresh));
        Ok((fresh, false))
    }

    /// Checks the header against this build's layout (never read a region of another one).
    fn check(&self) -> Result<(), String> {
        let h = self.header();
        if h.magic != MAGIC
            || h.version != LAYOUT_VERSION
            || h.max_workers as usize != MAX_WORKERS
            || h.endpoint_slots as usize != ENDPOINT_SLOTS
            || h.size as usize != self.size
            || h.index_sets as usize != self.layout.index_sets
        {
            return Err(format!(
                "region layout mismatch (version {} here, {} in the region)",
                LAYOUT_VERSION, h.version
            ));
        }
        Ok(())
    }

    fn header(&self) -> &Header {
        // SAFETY: offset 0, inside the mapping, aligned to a page.
        unsafe { &*self.base.cast::<Header>() }
    }

    fn worker(&self, w: usize) -> &WorkerSlot {
        assert!(w < MAX_WORKERS);
        // SAFETY: in bounds of the worker table, which the layout places inside the mapping.
        unsafe {
            &*self
                .base
                .add(self.layout.workers)
                .cast::<WorkerSlot>()
                .add(w)
        }
    }

    fn endpoint(&self, e: usize) -> &EndpointSlot {
        assert!(e < ENDPOINT_SLOTS);
        // SAFETY: in bounds of the endpoint table.
        unsafe {
            &*self
                .base
                .add(self.layout.endpoints)
                .cast::<EndpointSlot>()
                .add(e)
        }
    }

    fn ledger(&self, w: usize, e: usize) -> &LedgerEntry {
        assert!(w < MAX_WORKERS && e < ENDPOINT_SLOTS);
        // SAFETY: in bounds of the ledger table.
        unsafe {
            &*self
                .base
                .add(self.layout.ledger)
                .cast::<LedgerEntry>()
                .add(w * ENDPOINT_SLOTS + e)
        }
    }

    /// The prefix index's table and statistics in this region.
    pub(super) fn index_table(&self) -> (&[Way], &IndexStats) {
        let ways = self.layout.index_sets * WAYS;
        // SAFETY: `index_sets * WAYS` ways fit between the index offset and the region's end.
        let table = unsafe {
            std::slice::from_raw_parts(self.base.add(self.layout.index).cast::<Way>(), ways)
        };
        (table, &self.header().index)
    }

    /// The clock every router attached to this region uses (one epoch for all processes).
    pub fn clock(&self) -> Clock {
        Clock::from_epoch(self.header().epoch_ms)
    }

    /// The region's size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Attaches a router of the calling process: claims a worker slot (taking back dead
    /// workers' shares first if none is free).
    pub fn attach(self: &Arc<Self>) -> Result<Arc<Attachment>, String> {
        self.check()?;
        let pid = std::process::id();
        for pass in 0..2 {
            for w in 0..MAX_WORKERS {
                let slot = self.worker(w);
                if slot
                    .state
                    .compare_exchange(FREE, pid, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    slot.start_time
                        .store(process_start_time(pid).unwrap_or(0), Ordering::Release);
                    self.header().attaches.fetch_add(1, Ordering::Relaxed);
                    return Ok(Arc::new(Attachment {
                        state: Arc::clone(self),
                        worker: w,
                        leases: Mutex::new(()),
                    }));
                }
            }
            if pass == 0 {
                self.reap_dead_workers();
            }
        }
        Err(format!(
            "all {MAX_WORKERS} worker slots of the shared state are taken by live processes"
        ))
    }

    /// Takes back the share of every worker whose process is gone; returns how many.
    pub fn reap_dead_workers(&self) -> usize {
        let me = std::process::id();
        let mut reaped = 0;
        for w in 0..MAX_WORKERS {
            let slot = self.worker(w);
            let state = slot.state.load(Ordering::Acquire);
            let claim = match state {
                FREE => continue,
                REAPING => {
                    // A reaper that died mid-way is taken over (taking back is idempotent).
                    let reaper = slot.reaper.load(Ordering::Acquire);
                    if reaper == me || process_alive(reaper, 0) {
                        continue;
                    }
                    slot.reaper
                        .compare_exchange(reaper, me, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                }
                pid => {
                    let start = slot.start_time.load(Ordering::Acquire);
                    if process_alive(pid, start) {
                        continue;
                    }
                    slot.reaper.store(me, Ordering::Release);
                    slot.state
                        .compare_exchange(pid, REAPING, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                }
            };
            if claim {
                self.release_worker(w);
                reaped += 1;
                self.header().reaped_workers.fetch_add(1, Ordering::Relaxed);
            }
        }
        reaped
    }

    /// Takes worker `w`'s whole ledger back and frees its slot.
    fn release_worker(&self, w: usize) {
        let now_ms = self.clock().now_ms();
        for e in 0..ENDPOINT_SLOTS {
            let entry = self.ledger(w, e);
            // What the dead worker reported stays on the Metadata-Center until it expires
            // there: keep it apart so it is not counted as other gateways' load meanwhile.
            let (requests, prefill) = entry.take_reported();
            self.endpoint(e).counters.orphan(requests, prefill, now_ms);
            entry.clear();
            entry.refs.store(0, Ordering::Release);
            self.endpoint(e).attached[w / 64].fetch_and(!(1u64 << (w % 64)), Ordering::SeqCst);
        }
        let slot = self.worker(w);
        slot.start_time.store(0, Ordering::Release);
        slot.state.store(FREE, Ordering::Release);
    }

    /// Requests in flight on every endpoint of the region (all workers).
    pub fn total_in_flight(&self) -> u64 {
        (0..ENDPOINT_SLOTS)
            .map(|e| self.load(e, Load::InFlight))
            .sum()
    }

    /// Endpoint slot `e`'s `which` load: the sum of the shares of the routers holding it.
    fn load(&self, e: usize, which: Load) -> u64 {
        let mut total = 0;
        for (word, bits) in self.endpoint(e).attached.iter().enumerate() {
            let mut b = bits.load(Ordering::Acquire);
            while b != 0 {
                let w = word * 64 + b.trailing_zeros() as usize;
                total += self.ledger(w, e).get(which);
                b &= b - 1;
            }
        }
        total
    }

    /// Statistics of the region, for metrics.
    pub fn stats(&self) -> SharedStats {
        let h = self.header();
        SharedStats {
            size: self.size as u64,
            workers: (0..MAX_WORKERS)
                .filter(|&w| self.worker(w).state.load(Ordering::Relaxed) != FREE)
                .count() as u64,
            endpoints: (0..ENDPOINT_SLOTS)
                .filter(|&e| self.endpoint(e).key.load(Ordering::Relaxed) != 0)
                .count() as u64,
            endpoint_overflow: h.endpoint_overflow.load(Ordering::Relaxed),
            reaped_workers: h.reaped_workers.load(Ordering::Relaxed),
            attaches: h.attaches.load(Ordering::Relaxed),
            index_capacity: (self.layout.index_sets * WAYS) as u64,
        }
    }
}

impl Drop for SharedState {
    fn drop(&mut self) {
        // SAFETY: the memory made by `map` in `create`, freed once (no reference outlives
        // `self`).
        unsafe { unmap(self.base, self.size) };
    }
}

/// A zeroed anonymous mapping of `size` bytes shared with the children forked afterwards.
#[cfg(not(miri))]
fn map(size: usize) -> Result<*mut u8, String> {
    // SAFETY: a fresh anonymous mapping; no address hint, no file.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!(
            "mmap of {size} bytes failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(base.cast())
}

#[cfg(not(miri))]
unsafe fn unmap(base: *mut u8, size: usize) {
    libc::munmap(base.cast(), size);
}

/// Under Miri (which has no shared mappings and no fork) the region is zeroed heap memory, so
/// that Miri checks every access the tables make.
#[cfg(miri)]
fn map(size: usize) -> Result<*mut u8, String> {
    let layout = std::alloc::Layout::from_size_align(size, PAGE).map_err(|e| e.to_string())?;
    // SAFETY: non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    (!p.is_null())
        .then_some(p)
        .ok_or_else(|| "out of memory".into())
}

#[cfg(miri)]
unsafe fn unmap(base: *mut u8, size: usize) {
    std::alloc::dealloc(
        base,
        std::alloc::Layout::from_size_align_unchecked(size, PAGE),
    );
}

/// Statistics of a shared region.
#[derive(Debug, Clone, Copy)]
pub struct SharedStats {
    /// Size of the region in bytes.
    pub size: u64,
    /// Worker slots in use (attached routers, and dead ones not reaped yet).
    pub workers: u64,
    /// Endpoint slots in use.
    pub endpoints: u64,
    /// Endpoints that found the endpoint table full (counted per worker and endpoint).
    pub endpoint_overflow: u64,
    /// Dead workers whose share was taken back.
    pub reaped_workers: u64,
    /// Routers attached since the region was made.
    pub attaches: u64,
    /// Entries the prefix index holds at most.
    pub index_capacity: u64,
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn layout_fits_and_size_is_bounded() {
        for size in [MIN_SIZE, 64 << 20, 1 << 30] {
            let l = Layout::for_size(size);
            assert!(l.index_sets > 0);
            assert!(l.index + l.index_sets * WAYS * size_of::<Way>() <= size);
        }
        assert_eq!(size_of::<EndpointSlot>() % 64, 0);
        assert!(size_of::<Header>() <= PAGE);
        let err = SharedState::create(MIN_SIZE - 1).err().unwrap();
        assert!(err.contains("size must be within 16 MiB"), "{err}");
    }

    #[test]
    fn named_regions_are_reused_only_with_the_same_size() {
        let (a, reused_a) = SharedState::named("t-reuse", MIN_SIZE).unwrap();
        let (b, reused_b) = SharedState::named("t-reuse", MIN_SIZE).unwrap();
        assert!(!reused_a && reused_b && Arc::ptr_eq(&a, &b));
        let (c, reused_c) = SharedState::named("t-reuse", MIN_SIZE + PAGE).unwrap();
        assert!(!reused_c && !Arc::ptr_eq(&a, &c));
        // The registry now holds the new one; the old one lives while used.
        let (d, _) = SharedState::named("t-reuse", MIN_SIZE + PAGE).unwrap();
        assert!(Arc::ptr_eq(&c, &d));
    }

    #[test]
    fn two_attachments_share_an_endpoint_slot_and_leases_take_their_share_back() {
        let s = SharedState::create(MIN_SIZE).unwrap();
        let (a, b) = (s.attach().unwrap(), s.attach().unwrap());
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let la = a.lease("c", addr).unwrap();
        let lb = b.lease("c", addr).unwrap();
        assert_eq!(la.endpoint_id(), lb.endpoint_id());
        let other = a.lease("d", addr).unwrap();
        assert_ne!(
            other.endpoint_id(),
            la.endpoint_id(),
            "cluster is part of the key"
        );
        la.add(Load::InFlight, 3);
        lb.add(Load::InFlight, 2);
        lb.sub(Load::InFlight, 7);
        lb.add(Load::InFlight, 2);
        assert_eq!(s.total_in_flight(), 5, "a share never goes below zero");
        assert_eq!(la.load(Load::InFlight), 5);
        drop(la);
        assert_eq!(s.total_in_flight(), 2, "a's share was taken back");
        assert_eq!(s.stats().workers, 2);
        drop((lb, other, a, b));
        assert_eq!(s.stats().workers, 0);
        assert_eq!(s.total_in_flight(), 0);
    }

    #[test]
    fn a_dead_workers_share_is_reaped() {
        let s = SharedState::create(MIN_SIZE).unwrap();
        let live = s.attach().unwrap();
        let lease = live.lease("c", "10.0.0.1:80".parse().unwrap()).unwrap();
        lease.add(Load::InFlight, 1);
        lease.add(Load::Prefill, 10);
        // A second worker on the same endpoint, as a process that died mid-request left it.
        let dead = live.worker + 1;
        s.worker(dead).state.store(0x7fff_fff0, Ordering::SeqCst);
        let entry = s.ledger(dead, lease.slot);
        entry.refs.store(1, Ordering::SeqCst);
        entry.add(Load::InFlight, 4);
        entry.add(Load::Prefill, 100);
        entry.add(Load::Uncached, 50);
        entry.add(Load::ReportedInFlight, 3);
        entry.add(Load::ReportedPrefill, 90);
        s.endpoint(lease.slot).attached[0].fetch_or(1 << dead, Ordering::SeqCst);
        assert_eq!(lease.load(Load::InFlight), 5);

        assert_eq!(s.reap_dead_workers(), 1, "the dead one, not us");
        assert_eq!(
            s.total_in_flight(),
            1,
            "only the live worker's request is left"
        );
        assert_eq!(lease.load(Load::Prefill), 10);
        assert_eq!(lease.load(Load::Uncached), 0);
        assert_eq!(
            s.endpoint(lease.slot).attached[0].load(Ordering::SeqCst),
            1 << live.worker
        );
        assert_eq!(s.stats().reaped_workers, 1);
        assert_eq!(s.stats().workers, 1);
        assert_eq!(s.reap_dead_workers(), 0, "reaped once");
        // Its reports are still on the Metadata-Center: not other gateways' load.
        let now = s.clock().now_ms();
        assert_eq!(lease.load(Load::ReportedInFlight), 0);
        assert_eq!(lease.counters().orphans(now), (3, 90));
        assert_eq!(
            lease
                .counters()
                .orphans(now + super::super::cells::ORPHAN_TTL_MS + 1),
            (0, 0),
            "expired on the server by then"
        );
        drop(lease);
        assert_eq!(s.total_in_flight(), 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "fills 2048 slots: minutes under Miri")]
    fn a_full_endpoint_table_reuses_idle_slots_with_a_new_generation() {
        let s = SharedState::create(MIN_SIZE).unwrap();
        let a = s.attach().unwrap();
        let first = a.lease("c", "10.0.0.1:1".parse().unwrap()).unwrap();
        let first_id = first.endpoint_id();
        let held: Vec<SlotLease> = (2..=ENDPOINT_SLOTS as u16)
            .map(|p| a.lease("c", SocketAddr::from(([10, 0, 0, 1], p))).unwrap())
            .collect();
        // Full, every slot held: overflow.
        assert!(a.lease("c", "10.0.0.2:1".parse().unwrap()).is_none());
        assert_eq!(s.stats().endpoint_overflow, 1);
        // The first endpoint goes away: its slot is taken over, with a new id.
        let slot = first.slot;
        drop(first);
        let new = a.lease("c", "10.0.0.2:1".parse().unwrap()).unwrap();
        assert_eq!(new.slot, slot);
        assert_ne!(new.endpoint_id(), first_id);
        drop((new, held));
    }

    #[test]
    fn own_process_is_alive_and_a_bogus_one_is_not() {
        let me = std::process::id();
        let start = process_start_time(me).unwrap();
        assert!(process_alive(me, start));
        assert!(
            !process_alive(me, start + 1),
            "another process with our pid"
        );
        assert!(!process_alive(0x7fff_fff0, 0));
    }
}
