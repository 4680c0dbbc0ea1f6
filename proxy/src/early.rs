//! Large requests written into a replica's in-place region while their body is still arriving.
//!
//! A large request is copied into its replica's region ([`crate::replica`]) by the dispatcher,
//! after the last byte of the body: about 0.5 ms for 5 MB, all of it after the upload. When the
//! body names its model before the request (`accessKey` first, as clients write it), the model's
//! queue is empty and one of its replicas is idle, the upload copies the request's finished
//! pieces into that replica's region as they arrive, in the time the proxy would otherwise wait
//! for the network. The request then goes through the queue as every request does; the
//! dispatcher that takes it copies only what was not written ahead, if the region still holds
//! that prefix, and all of it otherwise. Writing ahead never changes which replica serves a
//! request: it saves the copy when the guess was right, and costs a dispatcher at most the wait
//! for one upload copy in progress when it was wrong.
//!
//! Who writes a region is decided under its [`RegionLease`]:
//! - the dispatcher marks the region *serving* under the lease before it writes a request there,
//!   and clears the mark when the replica has answered that request; nothing else writes a
//!   serving region, so a region never changes under a request being read;
//! - an upload copies while it holds the lease, and only into a region that is not serving and
//!   holds no prefix of another upload still under way, and only after the bytes before;
//! - the dispatcher always wins: writing a request, it takes the region from whatever upload
//!   held it, so a slow client never holds a replica or its region.
//!
//! An upload writes ahead only for a model it has passed routing and authentication for
//! (checked again, as for every request, once the body has ended), and only into a process of
//! that model's own replicas: the slot's current process, checked under the lease just before
//! each copy and kept so until it ends ([`Slot::while_current`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use std::future::Future;

use bytes::Bytes;

use crate::replica::{copy_into, InPlaceTarget, Slot};

/// Bodies from this size on may be written ahead: below it the copy after the body is short,
/// and writing ahead would only add copies.
pub const EARLY_MIN_BODY: u64 = 1 << 20;

/// An upload writes ahead once this much of its request is waiting: few enough copies (each is
/// a hand-over to a blocking thread), and what is left for the dispatcher is small.
const EARLY_CHUNK: usize = 512 * 1024;

/// Who may write one replica process's in-place region; see the module documentation.
#[derive(Debug, Default)]
pub struct RegionLease(Mutex<Lease>);

#[derive(Debug, Default)]
struct Lease {
    /// The dispatcher wrote a request into the region and the replica has not answered it.
    serving: bool,
    /// Writing into the region failed: its process's requests go over the socket, and nothing
    /// is written ahead there any more.
    disabled: bool,
    /// The upload whose request's first bytes the region holds.
    early: Option<Claim>,
}

/// An upload's prefix in a region: its id, how many bytes, and whether the upload still wants
/// them (an upload that went away gives the region up without taking the lease).
#[derive(Debug)]
struct Claim {
    id: u64,
    bytes: usize,
    live: Weak<()>,
}

impl RegionLease {
    fn lock(&self) -> MutexGuard<'_, Lease> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For the dispatcher, about to write a request into the region: marks it serving (from
    /// then on no upload writes there), and returns how many of the request's pieces and bytes
    /// are already there: both 0 unless `ahead` ([`Ahead::key`]) is what this region's current
    /// upload wrote. Waits for an upload's copy in progress, so it is called on a blocking
    /// thread.
    pub(crate) fn serve(&self, ahead: Option<AheadKey>) -> (usize, usize) {
        let mut lease = self.lock();
        let written = match (ahead, &lease.early) {
            (Some(a), Some(claim))
                if a.id == claim.id && a.bytes == claim.bytes && !lease.serving =>
            {
                (a.pieces, a.bytes)
            }
            _ => (0, 0),
        };
        lease.early = None;
        lease.serving = true;
        written
    }

    /// The replica answered the request in the region (or it was never sent there).
    pub(crate) fn served(&self) {
        self.lock().serving = false;
    }

    /// Writing into the region failed: no upload writes there any more.
    pub(crate) fn disable(&self) {
        let mut lease = self.lock();
        lease.disabled = true;
        lease.serving = false;
    }
}

/// Where an upload may write ahead: one replica process's region.
#[derive(Debug, Clone)]
pub struct EarlyRegion {
    pub(crate) lease: Arc<RegionLease>,
    pub(crate) target: InPlaceTarget,
    pub(crate) slot: Arc<Slot>,
    pub(crate) generation: u64,
}

/// What an upload wrote ahead, handed to the dispatcher with its request. Dropped unused, it
/// gives the region up for the next upload (its claim's `live` goes with it).
#[derive(Debug)]
pub struct Ahead {
    lease: Arc<RegionLease>,
    live: Arc<()>,
    id: u64,
    /// The request's first `pieces` pieces, `bytes` long, are in the region.
    pieces: usize,
    bytes: usize,
}

/// What the dispatcher needs of an [`Ahead`] on its blocking thread.
#[derive(Debug, Clone, Copy)]
pub struct AheadKey {
    id: u64,
    pieces: usize,
    bytes: usize,
}

impl Ahead {
    /// For [`RegionLease::serve`] of `lease`; `None` when it was written into another region.
    pub(crate) fn key(&self, lease: &Arc<RegionLease>) -> Option<AheadKey> {
        Arc::ptr_eq(&self.lease, lease).then_some(AheadKey {
            id: self.id,
            pieces: self.pieces,
            bytes: self.bytes,
        })
    }
}

/// Writes one upload's request into a region as its pieces arrive. Each copy runs on a blocking
/// thread while the upload goes on reading; the next waits for it.
pub struct EarlyWriter {
    region: EarlyRegion,
    ahead: Ahead,
    /// The copy in progress, and the pieces and bytes written once it has succeeded.
    copying: Option<(tokio::task::JoinHandle<bool>, usize, usize)>,
}

impl EarlyWriter {
    pub fn new(region: EarlyRegion) -> EarlyWriter {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let ahead = Ahead {
            lease: region.lease.clone(),
            live: Arc::new(()),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            pieces: 0,
            bytes: 0,
        };
        EarlyWriter {
            region,
            ahead,
            copying: None,
        }
    }

    /// Offers the request's pieces kept so far (`request` only ever grows): once enough of them
    /// are not written yet, and no copy is in progress, starts copying them. False when the
    /// upload cannot write ahead any more (the region is serving or another upload's, the
    /// request outgrew it, its process is no longer the slot's, or a copy failed); dropping
    /// the writer then gives up what it wrote.
    pub fn offer(&mut self, request: &[Bytes]) -> bool {
        if let Some((copy, ..)) = &mut self.copying {
            if !copy.is_finished() {
                return true;
            }
            // Finished: its result is ready, so one poll takes it.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let copied = match std::pin::Pin::new(copy).poll(&mut cx) {
                std::task::Poll::Ready(result) => result.unwrap_or(false),
                std::task::Poll::Pending => false,
            };
            if !self.copied(copied) {
                return false;
            }
        }
        let new = &request[self.ahead.pieces..];
        let len: usize = new.iter().map(Bytes::len).sum();
        if len < EARLY_CHUNK {
            return true;
        }
        let region = &self.region;
        let offset = self.ahead.bytes;
        if offset + len > region.target.len {
            return false;
        }
        let (lease, slot, generation, target) = (
            region.lease.clone(),
            region.slot.clone(),
            region.generation,
            region.target,
        );
        let (id, live, parts) = (
            self.ahead.id,
            Arc::downgrade(&self.ahead.live),
            new.to_vec(),
        );
        let copy = tokio::task::spawn_blocking(move || {
            let mut held = lease.lock();
            // Whose prefix the region holds; one of an upload that went away counts as none.
            let ours = match &held.early {
                Some(claim) if claim.live.strong_count() > 0 => {
                    claim.id == id && claim.bytes == offset
                }
                _ => offset == 0,
            };
            let wanted = live.strong_count() > 0;
            if held.serving || held.disabled || !ours || !wanted {
                return false;
            }
            // Only into the slot's current process, kept so for the write (the supervisor
            // forgets a process before reaping it, so its pid is not another's meanwhile). A
            // failed copy may have written part of its bytes: the prefix before them is intact.
            let ok = slot
                .while_current(generation, target.pid, || {
                    copy_into(target, offset, &parts, len).is_ok()
                })
                .unwrap_or(false);
            if ok {
                held.early = Some(Claim {
                    id,
                    bytes: offset + len,
                    live,
                });
            }
            ok
        });
        self.copying = Some((copy, request.len(), offset + len));
        true
    }

    /// Takes a finished copy's outcome into account; false when it failed.
    fn copied(&mut self, ok: bool) -> bool {
        if let Some((_, pieces, bytes)) = self.copying.take() {
            if ok {
                self.ahead.pieces = pieces;
                self.ahead.bytes = bytes;
            }
        }
        ok
    }

    /// What was written ahead, for the dispatcher, once the copy in progress has ended; `None`
    /// when nothing was, or when that copy has not ended by `deadline` (the body's).
    pub async fn finish(mut self, deadline: tokio::time::Instant) -> Option<Ahead> {
        if let Some((copy, ..)) = &mut self.copying {
            let ok = tokio::time::timeout_at(deadline, copy).await.ok()?;
            self.copied(ok.unwrap_or(false));
        }
        (self.ahead.bytes > 0).then_some(self.ahead)
    }
}
