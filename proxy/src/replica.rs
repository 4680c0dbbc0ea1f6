//! One connection to one replica process, and the shared record of the replica slot it belongs to.

use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use std::io::{IoSlice, Read, Write};

use bytes::Bytes;
use metrics::Gauge;
use modelgate_protocol::{self as protocol, Kind, ModelError};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::cgroup::ReplicaCgroup;
use crate::early::{Ahead, EarlyRegion, RegionLease};

/// Why a replica process was killed by the proxy (label `reason` of the restart counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KillReason {
    None = 0,
    Timeout = 1,
    ProtocolError = 2,
    Shutdown = 3,
    MemoryLimit = 4,
}

impl KillReason {
    fn from_u8(v: u8) -> KillReason {
        match v {
            1 => KillReason::Timeout,
            2 => KillReason::ProtocolError,
            3 => KillReason::Shutdown,
            4 => KillReason::MemoryLimit,
            _ => KillReason::None,
        }
    }
}

/// A replica slot: the stable identity (`<model>-<index>`) that successive processes fill.
#[derive(Debug)]
pub struct Slot {
    pub id: Arc<str>,
    pub model: Arc<str>,
    /// Process group of the running process, 0 when none.
    pgid: AtomicI32,
    /// Held shared by every write into the running process's memory, from the check that the
    /// process is still the slot's to the end of the write, and taken exclusively to forget the
    /// process, which the supervisor does before it reaps it: no write starts or is still under
    /// way once the pid may be another process's ([`Slot::while_current`]).
    writes: RwLock<()>,
    kill_reason: AtomicU8,
    /// Generation of the current process (see [`ReplicaConn::generation`]).
    generation: AtomicU64,
    /// The last process generation that died with several requests of a batch unanswered.
    died_mid_batch: AtomicU64,
    /// The cgroup of the running process and its generation, when limits use cgroups.
    cgroup: Mutex<Option<(u64, Arc<ReplicaCgroup>)>>,
    /// The last process generation the kernel killed for its memory limit, and how it is told.
    memory_killed: Mutex<Option<(u64, String)>>,
    pub busy: Gauge,
    /// CPU seconds of the slot's processes, for `modelgate_replica_cpu_seconds_total`.
    pub cpu: Mutex<CpuTotals>,
    /// The last [`LOG_LINES`] lines the slot's processes printed, for the replica log API.
    log: Mutex<std::collections::VecDeque<String>>,
}

/// Lines of output kept per replica slot.
pub const LOG_LINES: usize = 2000;

#[derive(Debug, Default)]
pub struct CpuTotals {
    /// Summed over processes that have ended.
    pub retired: f64,
    /// Last reading of the running process.
    pub current: f64,
}

impl Slot {
    /// A slot with id `<model>-<index>`: it names the slot, not the process, so it is the same
    /// across restarts and deployments and metric labels stay bounded.
    pub fn new(model: Arc<str>, index: usize) -> Slot {
        let id: Arc<str> = format!("{model}-{index}").into();
        let busy = metrics::gauge!(
            crate::metrics::REPLICA_BUSY,
            "model" => model.to_string(),
            "replica" => id.to_string()
        );
        busy.set(0.0);
        Slot {
            id,
            model,
            pgid: AtomicI32::new(0),
            writes: RwLock::new(()),
            kill_reason: AtomicU8::new(0),
            generation: AtomicU64::new(0),
            died_mid_batch: AtomicU64::new(0),
            cgroup: Mutex::new(None),
            memory_killed: Mutex::new(None),
            busy,
            cpu: Mutex::new(CpuTotals::default()),
            log: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// Records the process group of a newly spawned process and forgets any old kill reason.
    pub fn begin_process(&self, pgid: i32, generation: u64) {
        self.kill_reason.store(0, Ordering::SeqCst);
        self.generation.store(generation, Ordering::SeqCst);
        self.pgid.store(pgid, Ordering::SeqCst);
    }

    pub fn set_cgroup(&self, cgroup: Option<(u64, Arc<ReplicaCgroup>)>) {
        *self.cgroup.lock().unwrap_or_else(|p| p.into_inner()) = cgroup;
    }

    /// The cgroup of the running process, if it has one.
    pub fn cgroup(&self) -> Option<Arc<ReplicaCgroup>> {
        let cgroup = self.cgroup.lock().unwrap_or_else(|p| p.into_inner());
        cgroup.as_ref().map(|(_, cg)| cg.clone())
    }

    /// Whether the kernel killed process `generation` for going over its memory limit, and if so
    /// how to say it. Decided once per process and remembered, since its cgroup is removed as
    /// soon as it is reaped.
    pub fn memory_killed(&self, generation: u64) -> Option<String> {
        let mut killed = self.memory_killed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, why)) = killed.as_ref() {
            if *g == generation {
                return Some(why.clone());
            }
        }
        let cg = match &*self.cgroup.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((g, cg)) if *g == generation => cg.clone(),
            _ => return None,
        };
        if !cg.killed_at_limit() {
            return None;
        }
        let why = match cg.memory_limit() {
            Some(b) => format!(
                "killed by the kernel: over its memory limit of {} MB",
                b / (1024 * 1024)
            ),
            None => "killed by the kernel: out of memory".to_string(),
        };
        tracing::warn!(replica = %self.id, generation, "replica {why}");
        self.push_log(format!("{} modelgate replica {why}", crate::now_rfc3339()));
        *killed = Some((generation, why.clone()));
        Some(why)
    }

    /// Forgets the process group: once its leader has ended and before it is reaped, so its
    /// pid is still its own. Waits for a write into its memory still under way, which ends soon
    /// after the process has (its pages go with it).
    pub fn end_process(&self) {
        let _no_writes = self.writes.write().unwrap_or_else(|p| p.into_inner());
        self.pgid.store(0, Ordering::SeqCst);
    }

    /// Runs `write`, a write into process `pid`'s memory, if that process is the slot's current
    /// one (of generation `generation`), and keeps it so until `write` returns: the supervisor
    /// forgets a process before reaping it and waits for this, so the pid cannot have been
    /// reused by another process meanwhile. `None` when the process is not the slot's.
    pub(crate) fn while_current<T>(
        &self,
        generation: u64,
        pid: i32,
        write: impl FnOnce() -> T,
    ) -> Option<T> {
        let _held = self.writes.read().unwrap_or_else(|p| p.into_inner());
        (self.is_current(generation) && self.pgid() == pid).then(write)
    }

    pub fn pgid(&self) -> i32 {
        self.pgid.load(Ordering::SeqCst)
    }

    /// Kills the whole process group of the current process (the model may have forked).
    pub fn kill(&self, reason: KillReason) {
        // Keep the first reason: a timeout kill stays a timeout even if shutdown follows.
        let _ =
            self.kill_reason
                .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        self.kill_group();
    }

    /// SIGKILLs the current process group, if any, recording no reason.
    pub fn kill_group(&self) {
        let pgid = self.pgid();
        if pgid > 0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Kills process `generation` of the slot, if it is still the current one: a request that
    /// learns late that its replica died must not kill the replacement.
    pub fn kill_generation(&self, generation: u64, reason: KillReason) {
        if self.generation.load(Ordering::SeqCst) == generation {
            self.kill(reason);
        }
    }

    /// Process `generation` died with several requests of its batch unanswered: they go to the
    /// next process one at a time, and the one that ended it will end that process too.
    pub fn died_mid_batch(&self, generation: u64) {
        self.died_mid_batch.store(generation, Ordering::SeqCst);
    }

    /// Whether the process before `generation` died mid-batch ([`Slot::died_mid_batch`]), using
    /// the mark up: then a death of `generation` while serving is most likely the same request's
    /// second, which a crash-loop count must not take for another fault.
    pub fn take_death_mid_batch_before(&self, generation: u64) -> bool {
        generation > 1
            && self
                .died_mid_batch
                .compare_exchange(generation - 1, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }

    /// Whether `generation` is the slot's current process.
    pub fn is_current(&self, generation: u64) -> bool {
        self.generation.load(Ordering::SeqCst) == generation
    }

    /// Keeps a line of the replica's output, dropping the oldest beyond [`LOG_LINES`].
    pub fn push_log(&self, line: String) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() == LOG_LINES {
            log.pop_front();
        }
        log.push_back(line);
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn take_kill_reason(&self) -> KillReason {
        KillReason::from_u8(self.kill_reason.swap(0, Ordering::SeqCst))
    }
}

/// What the function answered.
#[derive(Debug)]
pub enum Reply {
    /// The JSON-encoded return value, ready to splice into the HTTP body.
    Ok(Bytes),
    Err(ModelError),
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("replica connection closed")]
    Closed,
    #[error("replica i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("replica protocol: {0}")]
    Protocol(&'static str),
}

/// The proxy's end of a ready replica's socket. Whoever holds it has the replica to themselves.
#[derive(Debug)]
pub struct ReplicaConn {
    pub slot: Arc<Slot>,
    /// Process generation within the slot, for logs.
    pub generation: u64,
    socket: ReplicaSocket,
    /// Bytes read and not yet handed out as frames.
    read_buf: Vec<u8>,
    /// Where small reads land before they are appended to `read_buf`.
    scratch: Box<[u8]>,
    /// Where small requests are copied together with their headers, to go out in one write;
    /// kept between writes (it holds at most a batch, `pool::BATCH_BYTES` and headers).
    out: Vec<u8>,
    speculation: Speculation,
    /// The replica's in-place region, while writing there works.
    in_place: Option<InPlaceTarget>,
    /// Writing into the region failed: large requests go over the socket, counted as such.
    in_place_failed: bool,
    /// Who writes the region: this connection's dispatcher, or an upload ahead of it
    /// ([`crate::early`]).
    lease: Arc<RegionLease>,
    /// A request sent into the region is not answered yet (its lease is marked serving).
    region_serving: bool,
    /// The process whose large answers are copied out of its memory ([`Kind::Lend`]), when
    /// this proxy can read it.
    lending: Option<i32>,
    /// The answer to the oldest request, lent and not yet handed on: a call dropped while
    /// taking it (at its deadline) leaves it here, and the next call resumes it rather than
    /// read the next request's answer.
    lent: Option<LentAnswer>,
}

/// A lent answer, taken in two steps ([`ReplicaConn::take_lent`]).
#[derive(Debug)]
enum LentAnswer {
    /// `len` bytes at `addr` of the replica's memory, not copied yet.
    At { addr: u64, len: usize },
    /// Copied out; the replica has not been told yet.
    Copied(Bytes),
}

/// Where [`ReplicaConn::send`] writes large requests: the region a replica announced, in the
/// process the supervisor started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InPlaceTarget {
    pub(crate) pid: i32,
    addr: u64,
    pub(crate) len: usize,
}

/// Requests from this size on go into the replica's in-place region, when it has one. They are
/// also the ones written alone (`pool::BATCH_BYTES`), so a region never holds two requests.
pub const IN_PLACE_MIN: usize = crate::pool::BATCH_BYTES + 1;

/// Whether a speculative step has been paying: one that saves much when it hits and costs
/// little when it misses. Used for reading an answer right after writing its request (before
/// any readiness wait: a hit saves a yield and an `epoll_wait`, several µs here, a miss costs one
/// `recv`, about 1 µs), and for a dispatcher's yield before its first batch (`Pool`: a hit lets
/// other requests join the batch, a miss costs an `epoll_wait`). It keeps trying while more than
/// about one in five hit: +4 per hit, -1 per miss, within `0..=32`. At 0 it tries once every 16
/// calls, to notice when hits start again (a replica moved onto this process's CPU; load).
#[derive(Debug, Default)]
pub(crate) struct Speculation {
    score: u8,
    calls: u8,
}

impl Speculation {
    pub(crate) fn should_try(&mut self) -> bool {
        self.calls = self.calls.wrapping_add(1);
        self.score > 0 || self.calls.is_multiple_of(16)
    }

    pub(crate) fn record(&mut self, hit: bool) {
        self.score = if hit {
            (self.score + 4).min(32)
        } else {
            self.score.saturating_sub(1)
        };
    }
}

/// Most buffers one `process_vm_writev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Writes the `len` bytes of `parts` at `offset` in `target`'s region, in as many calls as it
/// takes (each takes at most [`IOV_MAX`] slices, and may write less than it was given). The
/// caller has checked that they fit.
pub(crate) fn copy_into(
    target: InPlaceTarget,
    offset: usize,
    parts: &[Bytes],
    len: usize,
) -> Result<(), String> {
    let pid = nix::unistd::Pid::from_raw(target.pid);
    let mut done = 0;
    while done < len {
        // The parts not yet written, from where the last call stopped.
        let mut skip = done;
        let local: Vec<IoSlice<'_>> = parts
            .iter()
            .filter_map(|p| {
                if skip >= p.len() {
                    skip -= p.len();
                    return None;
                }
                let slice = IoSlice::new(&p[skip..]);
                skip = 0;
                Some(slice)
            })
            .take(IOV_MAX)
            .collect();
        let remote = nix::sys::uio::RemoteIoVec {
            base: (target.addr as usize) + offset + done,
            len: len - done,
        };
        match nix::sys::uio::process_vm_writev(pid, &local, &[remote]) {
            Ok(n) if n > 0 => done += n,
            Ok(_) => return Err(format!("nothing written at byte {done} of {len}")),
            Err(errno) => return Err(format!("{errno} at byte {done} of {len}")),
        }
    }
    Ok(())
}

/// Buffers that large answers were read into, kept for the next ones once sent: reading into
/// memory that already holds bytes needs no zeroing first (safe code cannot read into memory
/// that holds none), and its pages are already there. At most [`SPARE_ANSWERS_KEPT`] of them,
/// none larger than [`SPARE_ANSWER_BYTES`].
static SPARE_ANSWERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
const SPARE_ANSWERS_KEPT: usize = 2;
const SPARE_ANSWER_BYTES: usize = 8 << 20;

/// An answer's bytes, given back to [`SPARE_ANSWERS`] once the response has been sent.
struct Spare(Vec<u8>);

impl AsRef<[u8]> for Spare {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        if self.0.capacity() <= SPARE_ANSWER_BYTES {
            let mut spare = SPARE_ANSWERS.lock().unwrap_or_else(|p| p.into_inner());
            if spare.len() < SPARE_ANSWERS_KEPT {
                spare.push(std::mem::take(&mut self.0));
            }
        }
    }
}

/// Fills `into` from `addr` of process `pid`'s memory, in as many calls as it takes (each may
/// read less than it was asked). A read of nothing counts as `EFAULT`.
pub(crate) fn copy_from(pid: i32, addr: u64, into: &mut [u8]) -> Result<(), nix::errno::Errno> {
    let pid = nix::unistd::Pid::from_raw(pid);
    let len = into.len();
    let mut done = 0;
    while done < len {
        let remote = nix::sys::uio::RemoteIoVec {
            base: (addr as usize) + done,
            len: len - done,
        };
        let mut local = [std::io::IoSliceMut::new(&mut into[done..])];
        match nix::sys::uio::process_vm_readv(pid, &mut local, &[remote])? {
            0 => return Err(nix::errno::Errno::EFAULT),
            n => done += n,
        }
    }
    Ok(())
}

/// A lent answer: `len` bytes at `addr` of process `pid`'s memory, read into a spare buffer when
/// there is one (which goes back to the spares if the read fails).
fn read_answer(pid: i32, addr: u64, len: usize) -> Result<Bytes, nix::errno::Errno> {
    let spare = SPARE_ANSWERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop();
    let mut out = Spare(spare.unwrap_or_default());
    // Only what the buffer did not hold yet is zeroed.
    out.0.resize(len.max(out.0.len()), 0);
    out.0.truncate(len);
    copy_from(pid, addr, &mut out.0)?;
    Ok(Bytes::from_owner(out))
}

/// Payloads up to this size are copied next to their header so the request costs one write.
const COALESCE_LIMIT: usize = 16 * 1024;

/// Most bytes one small read takes: a small answer arrives with its header in one read.
const READ_CHUNK: usize = 8 * 1024;

/// Payloads up to this size are copied out of the read buffer, which is then reused; larger ones
/// take the buffer over, uncopied.
const SMALL_PAYLOAD: usize = 4 * 1024;

/// A replica's socket, registered with the runtime for input only.
///
/// A `tokio::net::UnixStream` also asks epoll for output readiness, and Linux reports output
/// space on a Unix socket every time the peer reads: the replica reading each request would
/// wake the proxy's worker for nothing. On a core shared with the replica that is two context
/// switches and an `epoll_wait` per request. Writes are almost always small enough to go out at
/// once; one that fills the socket waits for space through `spare`, a duplicate descriptor made
/// when the connection is, registered for output only while that write lasts (so a large
/// request never needs a new descriptor, which could fail at the limit, half-way through).
#[derive(Debug)]
struct ReplicaSocket {
    fd: AsyncFd<std::os::unix::net::UnixStream>,
    /// Taken while a write waits for space; `None` after such a write was cancelled, which
    /// ends the connection anyway.
    spare: Option<std::os::unix::net::UnixStream>,
}

impl ReplicaSocket {
    fn new(stream: UnixStream) -> std::io::Result<ReplicaSocket> {
        let stream = stream.into_std()?;
        stream.set_nonblocking(true)?;
        let spare = stream.try_clone()?;
        Ok(ReplicaSocket {
            fd: register(stream, Interest::READABLE)?,
            spare: Some(spare),
        })
    }

    /// One read of what has arrived, waiting for some to arrive; 0 means end of stream.
    async fn read_some(&self, into: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|s| s.get_ref().read(into)) {
                Ok(Ok(n)) => {
                    if n < into.len() {
                        // The socket is drained: wait for the next edge rather than spend a read
                        // on learning that (what tokio's own streams do).
                        ready.clear_ready();
                    }
                    return Ok(n);
                }
                Ok(Err(err)) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => {}
            }
        }
    }

    /// One read of what has already arrived, without waiting: `None` when nothing has.
    fn read_now(&self, into: &mut [u8]) -> std::io::Result<Option<usize>> {
        loop {
            match self.fd.get_ref().read(into) {
                Ok(n) => return Ok(Some(n)),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// Appends exactly `len` bytes to `buf`, read straight into place (large frames are then
    /// handed on without a copy), one read per wake-up; fewer at end of stream. Cancel-safe:
    /// `buf` only ever keeps bytes that were read.
    async fn read_exact_into(&self, buf: &mut Vec<u8>, len: usize) -> std::io::Result<usize> {
        /// Cuts the buffer back to what was read, however the read ends.
        struct Filling<'a> {
            buf: &'a mut Vec<u8>,
            filled: usize,
        }
        impl Drop for Filling<'_> {
            fn drop(&mut self) {
                self.buf.truncate(self.filled);
            }
        }
        let start = buf.len();
        // Zeroed first: safe code cannot read into uninitialised memory, and a memset of the
        // frame costs less here than the growing reads `read_to_end` would make instead.
        buf.resize(start + len, 0);
        let mut f = Filling { buf, filled: start };
        while f.filled < f.buf.len() {
            let n = self.read_some(&mut f.buf[f.filled..]).await?;
            if n == 0 {
                break;
            }
            f.filled += n;
        }
        Ok(f.filled - start)
    }

    /// Writes `parts` in order, in as few `writev` calls as the socket's buffer allows, waiting
    /// for space if it fills up. `parts` is consumed as it is written. Unlike std's `write` on a
    /// socket, `writev` cannot pass `MSG_NOSIGNAL`: a replica that has gone away gives `EPIPE`
    /// because Rust programs ignore SIGPIPE (std sets that before `main`; nothing here resets it).
    async fn write_all(&mut self, parts: &mut [IoSlice<'_>]) -> std::io::Result<()> {
        let mut rest = parts;
        while !rest.is_empty() {
            match (&mut self.fd.get_ref()).write_vectored(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    return self.write_waiting(rest).await;
                }
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// The rest of a write that filled the socket, through the spare descriptor registered for
    /// output.
    async fn write_waiting(&mut self, mut rest: &mut [IoSlice<'_>]) -> std::io::Result<()> {
        let spare = match self.spare.take() {
            Some(spare) => spare,
            None => self.fd.get_ref().try_clone()?,
        };
        let out = register(spare, Interest::WRITABLE)?;
        while !rest.is_empty() {
            let mut ready = out.writable().await?;
            match ready.try_io(|s| (&mut s.get_ref()).write_vectored(rest)) {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => IoSlice::advance_slices(&mut rest, n),
                Ok(Err(err)) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => {}
            }
        }
        self.spare = Some(out.into_inner());
        Ok(())
    }
}

/// Registers `stream` with the runtime for `interest` only.
fn register(
    stream: std::os::unix::net::UnixStream,
    interest: Interest,
) -> std::io::Result<AsyncFd<std::os::unix::net::UnixStream>> {
    // Deprecated because a type could hand out a different descriptor over time; a `UnixStream`
    // owns its one descriptor for its whole life, which is the sound case (the replacement is an
    // `unsafe fn`, and this crate forbids `unsafe`).
    #[allow(deprecated)]
    AsyncFd::with_interest(stream, interest)
}

impl ReplicaConn {
    pub fn new(
        slot: Arc<Slot>,
        generation: u64,
        stream: UnixStream,
    ) -> std::io::Result<ReplicaConn> {
        Ok(ReplicaConn {
            slot,
            generation,
            socket: ReplicaSocket::new(stream)?,
            read_buf: Vec::with_capacity(READ_CHUNK),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            out: Vec::new(),
            speculation: Speculation::default(),
            in_place: None,
            in_place_failed: false,
            lease: Arc::default(),
            region_serving: false,
            lending: None,
            lent: None,
        })
    }

    /// Lets large requests go into the region the replica announced in its `Ready` frame. `pid`
    /// is the process the supervisor started, not the one the frame names.
    pub fn offer_in_place(&mut self, pid: i32, region: protocol::InPlace) {
        self.in_place = usize::try_from(region.len)
            .ok()
            .filter(|_| pid > 0 && region.addr != 0)
            .map(|len| InPlaceTarget {
                pid,
                addr: region.addr,
                len,
            });
    }

    /// Lets the replica lend its large answers ([`Kind::Lend`]) when this process can read its
    /// memory, tried on the first byte of the region it announced (in-place requests and lent
    /// answers both need the proxy to reach the replica's memory; a replica without a region
    /// sends every answer over the socket).
    pub async fn accept_lent_answers(&mut self) -> Result<(), CallError> {
        let Some(target) = self.in_place else {
            return Ok(());
        };
        let probe =
            tokio::task::spawn_blocking(move || copy_from(target.pid, target.addr, &mut [0u8]));
        match tokio::time::timeout(std::time::Duration::from_secs(1), probe).await {
            Ok(Ok(Ok(_))) => {
                self.write_frame(Kind::Lend, &[]).await?;
                self.lending = Some(target.pid);
            }
            outcome => tracing::warn!(
                replica = %self.slot.id,
                "the replica's memory cannot be read ({outcome:?}); its answers come over its socket"
            ),
        }
        Ok(())
    }

    /// Copies the answer the replica lent ([`Self::lent`]) out of its memory, then gives it
    /// back ([`Kind::Taken`]). One copy, where the socket made two on the core the two processes
    /// share. Cancel-safe: a call dropped at an await resumes where it stopped. The process gone
    /// (killed at a timeout, say) counts as a closed socket; a replica that lent what cannot be
    /// read (it unmapped or protected the bytes) has broken the protocol: the call fails and it
    /// is replaced.
    async fn take_lent(&mut self) -> Result<Bytes, CallError> {
        if let Some(LentAnswer::At { addr, len }) = self.lent {
            let Some(pid) = self.lending else {
                self.lent = None;
                return Err(CallError::Protocol("answer lent without leave"));
            };
            let (slot, generation) = (self.slot.clone(), self.generation);
            // On a blocking thread, as writes into the replica's memory are: it faults pages in.
            let copied = tokio::task::spawn_blocking(move || {
                slot.while_current(generation, pid, || read_answer(pid, addr, len))
            })
            .await;
            match copied {
                Ok(Some(Ok(answer))) => self.lent = Some(LentAnswer::Copied(answer)),
                Ok(None | Some(Err(nix::errno::Errno::ESRCH))) => {
                    self.lent = None;
                    return Err(CallError::Closed);
                }
                Ok(Some(Err(errno))) => {
                    self.lent = None;
                    tracing::warn!(
                        replica = %self.slot.id,
                        "reading an answer from the replica's memory failed: {errno}"
                    );
                    return Err(CallError::Protocol(
                        "its answer could not be read from its memory",
                    ));
                }
                Err(err) => {
                    self.lent = None;
                    tracing::warn!(replica = %self.slot.id, "copying an answer failed: {err}");
                    return Err(CallError::Protocol(
                        "its answer could not be read from its memory",
                    ));
                }
            }
        }
        // Given back before it is handed on. A write that fails leaves the answer good: the
        // broken socket shows at the next call.
        if let Err(err) = self.write_frame(Kind::Taken, &[]).await {
            tracing::debug!(replica = %self.slot.id, "giving a lent answer back: {err}");
        }
        match self.lent.take() {
            Some(LentAnswer::Copied(answer)) => {
                metrics::counter!(crate::metrics::ANSWERS_IN_PLACE).increment(1);
                Ok(answer)
            }
            _ => Err(CallError::Protocol("no lent answer to take")),
        }
    }

    /// Where an upload may write ahead into this replica's region ([`crate::early`]); `None`
    /// when large requests do not go into its memory.
    pub fn early_region(&self) -> Option<EarlyRegion> {
        self.in_place.map(|target| EarlyRegion {
            lease: self.lease.clone(),
            target,
            slot: self.slot.clone(),
            generation: self.generation,
        })
    }

    /// Copies a request into the replica's in-place region (one copy, from this process's
    /// memory into the replica's, with no socket buffer between); false when it has none, the
    /// request does not fit, or the write failed, which also ends in-place writes to this
    /// process. The caller only writes while the replica has no request left to answer, so the
    /// region is not being read.
    ///
    /// The copy runs on a blocking thread, not the runtime's: it faults in the replica's pages,
    /// which takes as long as the replica's memory makes it (a first touch, reclaim at its
    /// memory limit, or a mapping the model put there that never answers). Whoever awaits this
    /// bounds it (the dispatcher, by the request's timeout, after which it kills the replica;
    /// the copy then fails as the process goes).
    ///
    /// The pid is the supervisor's child, which cannot be reused before the supervisor reaps it,
    /// and the supervisor forgets it in the slot first: the write runs only while the slot still
    /// holds this process ([`Slot::while_current`]), checked on the blocking thread.
    ///
    /// The region is marked serving (under its lease) until the replica answers, so no upload
    /// writes ahead into it meanwhile; when `ahead` is what the region's upload wrote, only the
    /// rest is copied.
    async fn write_in_place(&mut self, parts: &[Bytes], len: usize, ahead: Option<&Ahead>) -> bool {
        let Some(target) = self.in_place else {
            if self.in_place_failed {
                metrics::counter!(crate::metrics::IN_PLACE, "result" => "fell_back").increment(1);
            }
            return false;
        };
        if len > target.len
            || !self.slot.is_current(self.generation)
            || self.slot.pgid() != target.pid
        {
            return false;
        }
        let parts = parts.to_vec();
        let ahead = ahead.and_then(|a| a.key(&self.lease));
        let (lease, slot, generation) = (self.lease.clone(), self.slot.clone(), self.generation);
        self.region_serving = true;
        let copied = tokio::task::spawn_blocking(move || {
            let (pieces, bytes) = lease.serve(ahead);
            slot.while_current(generation, target.pid, || {
                copy_into(target, bytes, &parts[pieces..], len - bytes)
            })
            .unwrap_or_else(|| Err("its process is no longer the slot's".into()))
            .map(|()| bytes > 0)
        })
        .await
        .unwrap_or_else(|err| Err(format!("the copy did not finish: {err}")));
        match copied {
            Ok(reused) => {
                let result = if reused { "written_ahead" } else { "written" };
                metrics::counter!(crate::metrics::IN_PLACE, "result" => result).increment(1);
                true
            }
            Err(why) => {
                // Not permitted (the replica made itself undumpable, a seccomp policy), or the
                // region or the process is gone: the socket carries its requests from now on.
                tracing::warn!(
                    replica = %self.slot.id,
                    "writing a request into the replica's memory failed ({why}); \
                     its requests go over its socket"
                );
                self.in_place = None;
                self.in_place_failed = true;
                self.region_serving = false;
                self.lease.disable();
                metrics::counter!(crate::metrics::IN_PLACE, "result" => "fell_back").increment(1);
                false
            }
        }
    }

    /// The replica answered its oldest request: if that one was in the region, the region is
    /// free again for uploads to write ahead (requests in the region are sent alone).
    fn answered(&mut self) {
        if std::mem::take(&mut self.region_serving) {
            self.lease.served();
        }
    }

    /// Kills this connection's process (not a later one of the same slot).
    pub fn kill(&self, reason: KillReason) {
        self.slot.kill_generation(self.generation, reason);
    }

    /// Reads until the buffer holds `want` bytes: small amounts through the scratch buffer (one
    /// read, which may also take what follows), large ones straight into the buffer.
    async fn fill(&mut self, want: usize) -> Result<(), CallError> {
        while self.read_buf.len() < want {
            let missing = want - self.read_buf.len();
            let n = if missing <= READ_CHUNK {
                let n = self.socket.read_some(&mut self.scratch).await?;
                self.read_buf.extend_from_slice(&self.scratch[..n]);
                n
            } else {
                self.socket
                    .read_exact_into(&mut self.read_buf, missing)
                    .await?
            };
            if n == 0 {
                return Err(CallError::Closed);
            }
        }
        Ok(())
    }

    /// Reads the next frame: `(kind byte, payload)`.
    pub async fn read_frame(&mut self) -> Result<(u8, Bytes), CallError> {
        self.fill(protocol::HEADER_LEN).await?;
        let mut h = [0u8; protocol::HEADER_LEN];
        h.copy_from_slice(&self.read_buf[..protocol::HEADER_LEN]);
        let header = protocol::decode_header(h).map_err(|e| CallError::Protocol(e.0))?;
        let need = protocol::HEADER_LEN + header.payload_len;
        self.fill(need).await?;
        let payload = if header.payload_len <= SMALL_PAYLOAD {
            let payload = Bytes::copy_from_slice(&self.read_buf[protocol::HEADER_LEN..need]);
            self.read_buf.drain(..need);
            payload
        } else {
            // Anything after the frame (rare: frames sent back to back) moves to a new buffer;
            // the frame's own bytes are handed over as they are.
            let mut rest = self.read_buf.split_off(need);
            rest.reserve(READ_CHUNK);
            let frame = std::mem::replace(&mut self.read_buf, rest);
            Bytes::from(frame).slice(protocol::HEADER_LEN..)
        };
        Ok((header.kind, payload))
    }

    /// Writes one frame whose payload is `parts`, in order.
    async fn write_frame(&mut self, kind: Kind, parts: &[Bytes]) -> Result<(), CallError> {
        let len = parts.iter().map(Bytes::len).sum();
        let header = protocol::encode_header(kind, len);
        if len <= COALESCE_LIMIT {
            let mut buf = std::mem::take(&mut self.out);
            buf.clear();
            buf.extend_from_slice(&header);
            for part in parts {
                buf.extend_from_slice(part);
            }
            self.socket.write_all(&mut [IoSlice::new(&buf)]).await?;
            self.out = buf;
        } else {
            // Large payloads go out as they arrived from the client, never copied together.
            let mut all = Vec::with_capacity(parts.len() + 1);
            all.push(IoSlice::new(&header));
            all.extend(parts.iter().map(|p| IoSlice::new(p)));
            self.socket.write_all(&mut all).await?;
        }
        Ok(())
    }

    /// Writes requests (each one's JSON text as slices) as `Predict` frames, in order: one alone
    /// as [`Self::write_frame`] does, several copied together into one write. Their answers are
    /// then read, in the same order, with [`Self::finish_call`]. Not cancel-safe: a write cut
    /// short leaves the stream out of step. `ahead` is what an upload wrote into the replica's
    /// region ahead of a request sent alone ([`crate::early`]).
    pub async fn send<'a, I>(&mut self, requests: I, ahead: Option<&Ahead>) -> Result<(), CallError>
    where
        I: Iterator<Item = &'a [Bytes]> + Clone,
    {
        let mut count = requests.clone();
        match (count.next(), count.next()) {
            (None, _) => return Ok(()),
            (Some(one), None) => {
                let len = one.iter().map(Bytes::len).sum();
                if len >= IN_PLACE_MIN && self.write_in_place(one, len, ahead).await {
                    let payload = Bytes::copy_from_slice(&protocol::encode_in_place(len));
                    self.write_frame(Kind::PredictInPlace, &[payload]).await?
                } else {
                    self.write_frame(Kind::Predict, one).await?
                }
            }
            (Some(_), Some(_)) => {
                let mut buf = std::mem::take(&mut self.out);
                buf.clear();
                for parts in requests {
                    let len = parts.iter().map(Bytes::len).sum();
                    buf.extend_from_slice(&protocol::encode_header(Kind::Predict, len));
                    for part in parts {
                        buf.extend_from_slice(part);
                    }
                }
                self.socket.write_all(&mut [IoSlice::new(&buf)]).await?;
                self.out = buf;
            }
        }
        // A replica sharing this CPU often runs as soon as the write wakes it, and has answered
        // by the time the write returns: read that answer now rather than through the
        // runtime's readiness wait (a yield and an `epoll_wait`, since the answer arrived
        // while the socket's readiness was cleared). Nothing there costs one `recv`, so this
        // is done only while it pays (`Speculation`).
        if self.read_buf.is_empty() && self.speculation.should_try() {
            let got = self.socket.read_now(&mut self.scratch)?;
            self.speculation.record(got.is_some());
            match got {
                Some(0) => return Err(CallError::Closed),
                Some(n) => self.read_buf.extend_from_slice(&self.scratch[..n]),
                None => {}
            }
        }
        Ok(())
    }

    /// Sends one request (its JSON text in `parts`) and waits for its terminal answer. The
    /// dispatcher uses [`Self::send`] and [`Self::finish_call`]; this is their pairing for tests.
    #[cfg(test)]
    pub async fn call(&mut self, parts: &[Bytes]) -> Result<Reply, CallError> {
        self.call_ahead(parts, None).await
    }

    /// [`Self::call`] for a request an upload wrote `ahead` of.
    #[cfg(test)]
    pub async fn call_ahead(
        &mut self,
        parts: &[Bytes],
        ahead: Option<&Ahead>,
    ) -> Result<Reply, CallError> {
        self.send(std::iter::once(parts), ahead).await?;
        self.finish_call().await
    }

    /// Reads frames until the terminal answer of the oldest request sent and not yet answered,
    /// skipping unknown kinds.
    pub async fn finish_call(&mut self) -> Result<Reply, CallError> {
        loop {
            if self.lent.is_some() {
                return self.take_lent().await.map(Reply::Ok);
            }
            // Readiness waits on an `AsyncFd` do not spend tokio's cooperative budget: a replica
            // streaming frames must still let the worker's other tasks run.
            tokio::task::consume_budget().await;
            let (kind, payload) = self.read_frame().await?;
            match Kind::from_u8(kind) {
                Some(Kind::ResultOk) => {
                    self.answered();
                    return Ok(Reply::Ok(payload));
                }
                Some(Kind::ResultLent) => {
                    self.answered();
                    let (addr, len) =
                        protocol::decode_lent(&payload).map_err(|e| CallError::Protocol(e.0))?;
                    // Taken at the top of the loop, where a dropped call also resumes it.
                    self.lent = Some(LentAnswer::At { addr, len });
                }
                Some(Kind::ResultErr) => {
                    self.answered();
                    let err: ModelError = serde_json::from_slice(&payload)
                        .map_err(|_| CallError::Protocol("malformed error frame"))?;
                    return Ok(Reply::Err(err));
                }
                Some(
                    Kind::Ready
                    | Kind::LoadFailed
                    | Kind::Predict
                    | Kind::Ping
                    | Kind::PredictInPlace
                    | Kind::Lend
                    | Kind::Taken,
                ) => {
                    return Err(CallError::Protocol("unexpected frame during a call"));
                }
                // Pong and kinds from newer replicas carry nothing for this call.
                Some(Kind::Pong) | None => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn conn(stream: UnixStream) -> ReplicaConn {
        ReplicaConn::new(Arc::new(Slot::new("m".into(), 0)), 1, stream).expect("register")
    }

    #[test]
    fn a_death_mid_batch_excuses_the_next_process_once() {
        let slot = Slot::new("m".into(), 0);
        assert!(!slot.take_death_mid_batch_before(1));
        slot.died_mid_batch(3);
        assert!(
            !slot.take_death_mid_batch_before(5),
            "only the next process"
        );
        assert!(slot.take_death_mid_batch_before(4));
        assert!(!slot.take_death_mid_batch_before(4), "used up");
    }

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut f = protocol::encode_header(kind, payload.len()).to_vec();
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn frames_sent_back_to_back_are_split_exactly() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut conn = conn(ours);
        let big: Vec<u8> = (0..3_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut bytes = frame(Kind::Pong, b"");
        bytes.extend(frame(Kind::ResultOk, &big));
        bytes.extend(frame(Kind::ResultOk, b"8"));
        bytes.extend(frame(Kind::ResultOk, &big[..5000]));
        let theirs = theirs.into_std().unwrap();
        theirs.set_nonblocking(false).unwrap();
        let writer = std::thread::spawn(move || {
            // In uneven pieces, so frames straddle reads.
            for piece in bytes.chunks(70_001) {
                (&theirs).write_all(piece).unwrap();
            }
            theirs
        });
        assert_eq!(
            conn.read_frame().await.unwrap(),
            (Kind::Pong as u8, Bytes::new())
        );
        let (kind, payload) = conn.read_frame().await.unwrap();
        assert_eq!((kind, payload.len()), (Kind::ResultOk as u8, big.len()));
        assert!(payload == big[..], "large payload intact");
        assert_eq!(&conn.read_frame().await.unwrap().1[..], b"8");
        assert_eq!(&conn.read_frame().await.unwrap().1[..], &big[..5000]);
        drop(writer.join().unwrap());
        assert!(matches!(conn.read_frame().await, Err(CallError::Closed)));
    }

    #[test]
    fn speculation_keeps_trying_while_more_than_one_in_five_hit() {
        // Over 1,600 calls, how many try; one try in `hit_every` finds the answer.
        let run = |hit_every: Option<u32>| {
            let mut s = Speculation::default();
            let mut tries = 0;
            for _ in 0..1600 {
                if s.should_try() {
                    tries += 1;
                    s.record(hit_every.is_some_and(|n| tries % n == 0));
                }
            }
            tries
        };
        assert_eq!(
            run(Some(1)),
            1600 - 15,
            "always hitting: every call once one hit"
        );
        assert!(run(Some(4)) > 1500, "one in four hit: keeps trying");
        assert!(run(Some(10)) < 250, "one in ten hit: mostly skips");
        assert_eq!(run(None), 100, "never hitting: one call in 16");
    }

    #[tokio::test]
    async fn an_answer_already_there_when_the_write_returns_is_read_at_once_and_whole() {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut conn = conn(ours);
        conn.speculation.score = 32;
        let theirs = theirs.into_std().unwrap();
        theirs.set_nonblocking(false).unwrap();
        // The answer is there before the call, as a replica on this CPU writes it before the
        // call's write returns: the call ends on its first poll, with no readiness wait (the
        // runtime has not yet seen the socket readable, so waiting would return Pending).
        (&theirs).write_all(&frame(Kind::ResultOk, b"8")).unwrap();
        {
            let request = [Bytes::from_static(b"{}")];
            let mut call = std::pin::pin!(conn.call(&request));
            let polled = call.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            assert!(
                matches!(polled, Poll::Ready(Ok(Reply::Ok(ref p))) if &p[..] == b"8"),
                "answered on the first poll"
            );
        }
        assert_eq!(conn.speculation.score, 32, "a hit keeps the score");
        // Part of the next answer is there at once, the rest comes later: read whole.
        let answer = frame(Kind::ResultOk, b"\"eleven\"");
        (&theirs).write_all(&answer[..3]).unwrap();
        let rest = answer[3..].to_vec();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            (&theirs).write_all(&rest).unwrap();
            theirs
        });
        let reply = conn.call(&[Bytes::from_static(b"{}")]).await.unwrap();
        assert!(matches!(reply, Reply::Ok(ref p) if &p[..] == b"\"eleven\""));
        let mut theirs = writer.join().unwrap();
        // Both requests reached the replica whole.
        let mut got = vec![0u8; 2 * (protocol::HEADER_LEN + 2)];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(
            got,
            [frame(Kind::Predict, b"{}"), frame(Kind::Predict, b"{}")].concat()
        );
    }

    #[tokio::test]
    async fn a_request_larger_than_the_socket_buffer_goes_out_whole_and_in_order() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut conn = conn(ours);
        let parts: Vec<Bytes> = (0..40u8)
            .map(|i| Bytes::from(vec![b'0' + i % 10; 131_072 + i as usize]))
            .collect();
        let expected: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let theirs = theirs.into_std().unwrap();
        theirs.set_nonblocking(false).unwrap();
        let reader = std::thread::spawn(move || {
            let mut h = [0u8; protocol::HEADER_LEN];
            (&theirs).read_exact(&mut h).unwrap();
            let header = protocol::decode_header(h).unwrap();
            let mut got = vec![0u8; header.payload_len];
            // Slowly at first, so the proxy's side fills the socket and has to wait for room.
            std::thread::sleep(std::time::Duration::from_millis(50));
            (&theirs).read_exact(&mut got).unwrap();
            (&theirs).write_all(&frame(Kind::ResultOk, b"1")).unwrap();
            (header.kind, got)
        });
        let reply = conn.call(&parts).await.unwrap();
        assert!(matches!(reply, Reply::Ok(b) if &b[..] == b"1"));
        let (kind, got) = reader.join().unwrap();
        assert_eq!(kind, Kind::Predict as u8);
        assert!(got == expected, "request bytes intact and in order");
    }

    /// Reads one frame as a replica does: its kind byte and payload.
    fn read_one(theirs: &std::os::unix::net::UnixStream) -> (u8, Vec<u8>) {
        let mut h = [0u8; protocol::HEADER_LEN];
        (&*theirs).read_exact(&mut h).unwrap();
        let header = protocol::decode_header(h).unwrap();
        let mut got = vec![0u8; header.payload_len];
        (&*theirs).read_exact(&mut got).unwrap();
        (header.kind, got)
    }

    /// A peer that answers each request with "1" and hands back (kind, payload) of each.
    fn answering_peer(
        theirs: UnixStream,
        requests: usize,
    ) -> std::thread::JoinHandle<Vec<(u8, Vec<u8>)>> {
        let theirs = theirs.into_std().unwrap();
        theirs.set_nonblocking(false).unwrap();
        std::thread::spawn(move || {
            (0..requests)
                .map(|_| {
                    let got = read_one(&theirs);
                    (&theirs).write_all(&frame(Kind::ResultOk, b"1")).unwrap();
                    got
                })
                .collect()
        })
    }

    fn pieces(count: u8, size: usize) -> (Vec<Bytes>, Vec<u8>) {
        let parts: Vec<Bytes> = (0..count)
            .map(|i| Bytes::from(vec![b'a' + i % 26; size + i as usize]))
            .collect();
        let whole = parts.iter().flat_map(|p| p.iter().copied()).collect();
        (parts, whole)
    }

    /// A connection whose replica is this test process, with `region` as its in-place region:
    /// the write is the same system call into the same kind of memory.
    fn conn_into(stream: UnixStream, region: &[u8]) -> ReplicaConn {
        conn_offering(stream, region.as_ptr() as u64, region.len() as u64)
    }

    /// Same, with the region this test process announces at `addr`.
    fn conn_offering(stream: UnixStream, addr: u64, len: u64) -> ReplicaConn {
        let mut conn = conn(stream);
        let pid = std::process::id() as i32;
        conn.slot.begin_process(pid, conn.generation);
        conn.offer_in_place(pid, protocol::InPlace { addr, len });
        conn
    }

    #[tokio::test]
    async fn a_large_request_goes_into_the_region_and_only_its_length_over_the_socket() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut region = vec![0u8; 6 << 20];
        let mut conn = conn_into(ours, &region);
        let peer = answering_peer(theirs, 3);
        // Many slices of the body, then a shorter request over the longer one's bytes, then one
        // the region cannot hold.
        let (parts, whole) = pieces(40, 131_072);
        let reply = conn.call(&parts).await.unwrap();
        assert!(matches!(reply, Reply::Ok(b) if &b[..] == b"1"));
        std::hint::black_box(&mut region);
        assert!(region[..whole.len()] == whole[..], "request bytes intact");
        let (short, short_whole) = pieces(1, 70_000);
        conn.call(&short).await.unwrap();
        std::hint::black_box(&mut region);
        assert!(region[..short_whole.len()] == short_whole[..]);
        let (huge, huge_whole) = pieces(7, 1 << 20);
        conn.call(&huge).await.unwrap();
        let seen = peer.join().unwrap();
        let in_place = |len: usize| {
            (
                Kind::PredictInPlace as u8,
                protocol::encode_in_place(len).to_vec(),
            )
        };
        assert_eq!(seen[0], in_place(whole.len()));
        assert_eq!(seen[1], in_place(short_whole.len()));
        assert_eq!(seen[2].0, Kind::Predict as u8, "too large for the region");
        assert!(seen[2].1 == huge_whole);
    }

    /// Writes `parts` but the last ahead, as an upload would while they arrive, one copy at a
    /// time; returns what it wrote.
    async fn write_ahead(conn: &ReplicaConn, parts: &[Bytes]) -> Option<Ahead> {
        let mut writer = crate::early::EarlyWriter::new(conn.early_region().expect("a region"));
        for n in 1..parts.len() {
            if !writer.offer(&parts[..n]) {
                return None;
            }
            // Offered while a copy runs, the pieces wait for the next offer.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        writer
            .finish(tokio::time::Instant::now() + Duration::from_secs(5))
            .await
    }

    #[tokio::test]
    async fn a_request_written_ahead_is_completed_and_not_copied_again() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut region = vec![0u8; 6 << 20];
        let mut conn = conn_into(ours, &region);
        let peer = answering_peer(theirs, 1);
        let (parts, whole) = pieces(6, 600_000);
        let ahead = write_ahead(&conn, &parts).await.expect("written ahead");
        std::hint::black_box(&mut region);
        assert!(
            region[..600_000] == whole[..600_000],
            "the first piece, ahead"
        );
        assert!(region[whole.len() - 1000..whole.len()]
            .iter()
            .all(|&b| b == 0));
        // Copied again, this byte would be the request's.
        region[0] = b'#';
        conn.call_ahead(&parts, Some(&ahead)).await.unwrap();
        std::hint::black_box(&mut region);
        assert_eq!(
            region[0], b'#',
            "what was written ahead is not copied again"
        );
        assert!(region[1..whole.len()] == whole[1..], "the rest was copied");
        let seen = peer.join().unwrap();
        let frame = (
            Kind::PredictInPlace as u8,
            protocol::encode_in_place(whole.len()).to_vec(),
        );
        assert_eq!(seen, [frame]);
    }

    #[tokio::test]
    async fn a_request_whose_region_was_taken_meanwhile_is_copied_whole() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut region = vec![0u8; 6 << 20];
        let mut conn = conn_into(ours, &region);
        let peer = answering_peer(theirs, 2);
        let (parts, whole) = pieces(4, 600_000);
        let ahead = write_ahead(&conn, &parts).await.expect("written ahead");
        // Another request goes into the region before this one.
        let other = [Bytes::from(vec![b'z'; 2_500_000])];
        conn.call(&other).await.unwrap();
        std::hint::black_box(&mut region);
        assert!(region[..2_500_000].iter().all(|&b| b == b'z'));
        conn.call_ahead(&parts, Some(&ahead)).await.unwrap();
        std::hint::black_box(&mut region);
        assert!(region[..whole.len()] == whole[..], "copied whole");
        assert_eq!(peer.join().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn no_upload_writes_into_a_region_the_replica_is_reading() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut region = vec![0u8; 6 << 20];
        let mut conn = conn_into(ours, &region);
        let peer = answering_peer(theirs, 1);
        let other = [Bytes::from(vec![b'z'; 3_000_000])];
        conn.send(std::iter::once(&other[..]), None).await.unwrap();
        // Sent and not answered: the replica may be reading it.
        let (parts, whole) = pieces(4, 600_000);
        assert!(write_ahead(&conn, &parts).await.is_none());
        std::hint::black_box(&mut region);
        assert!(region[..3_000_000].iter().all(|&b| b == b'z'), "left alone");
        conn.finish_call().await.unwrap();
        // Answered: the region is free again, and given up by an upload that went away.
        drop(write_ahead(&conn, &parts).await.expect("written ahead"));
        let ahead = write_ahead(&conn, &parts)
            .await
            .expect("written ahead again");
        std::hint::black_box(&mut region);
        assert!(region[..600_000] == whole[..600_000]);
        drop(ahead);
        peer.join().unwrap();
    }

    #[tokio::test]
    async fn a_region_that_cannot_be_written_is_given_up_for_the_socket() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        // The first page is never mapped: the write fails without touching anything.
        let mut conn = conn_offering(ours, 4096, 1 << 20);
        let peer = answering_peer(theirs, 2);
        let (parts, whole) = pieces(3, 100_000);
        conn.call(&parts).await.unwrap();
        conn.call(&parts).await.unwrap();
        for (kind, payload) in peer.join().unwrap() {
            assert_eq!(kind, Kind::Predict as u8);
            assert!(payload == whole);
        }
        assert!(conn.in_place.is_none());
    }

    #[tokio::test]
    async fn no_region_is_written_once_its_process_is_not_the_slots() {
        let pid = std::process::id() as i32;
        // The slot moved on to another generation, or to another process.
        for (slot_pid, generation) in [(pid, 2), (pid + 1, 1)] {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let mut region = vec![0u8; 1 << 20];
            let mut conn = conn_into(ours, &region);
            conn.slot.begin_process(slot_pid, generation);
            let peer = answering_peer(theirs, 1);
            let (parts, whole) = pieces(1, 100_000);
            conn.call(&parts).await.unwrap();
            let seen = peer.join().unwrap();
            assert_eq!(seen[0].0, Kind::Predict as u8);
            assert!(seen[0].1 == whole);
            std::hint::black_box(&mut region);
            assert!(region.iter().all(|&b| b == 0), "the region was left alone");
        }
    }

    /// A peer that reads one frame at a time and answers each request with `answers`' next
    /// frame; returns the kinds of the frames it read.
    fn scripted_peer(
        theirs: UnixStream,
        reads: usize,
        mut answers: Vec<Vec<u8>>,
    ) -> std::thread::JoinHandle<Vec<u8>> {
        let theirs = theirs.into_std().unwrap();
        theirs.set_nonblocking(false).unwrap();
        answers.reverse();
        std::thread::spawn(move || {
            (0..reads)
                .map(|_| {
                    let (kind, _) = read_one(&theirs);
                    if kind == Kind::Predict as u8 {
                        (&theirs).write_all(&answers.pop().unwrap()).unwrap();
                    }
                    kind
                })
                .collect()
        })
    }

    #[tokio::test]
    async fn a_lent_answer_is_copied_out_of_the_replicas_memory_and_given_back() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let region = vec![0u8; 1 << 20];
        let mut conn = conn_into(ours, &region);
        let answer: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let lent = frame(
            Kind::ResultLent,
            &protocol::encode_lent(answer.as_ptr() as u64, answer.len()),
        );
        let small = frame(Kind::ResultOk, b"7");
        // A shorter one after, read into the first one's buffer once that is given back.
        let shorter = vec![b'#'; 100_000];
        let lent_shorter = frame(
            Kind::ResultLent,
            &protocol::encode_lent(shorter.as_ptr() as u64, shorter.len()),
        );
        // Lend, a request answered by lending, Taken, a request answered over the socket, one
        // answered by lending, Taken.
        let peer = scripted_peer(theirs, 6, vec![lent, small, lent_shorter]);
        conn.accept_lent_answers().await.unwrap();
        let request = [Bytes::from_static(b"{}")];
        let reply = conn.call(&request).await.unwrap();
        assert!(
            matches!(reply, Reply::Ok(ref b) if b[..] == answer[..]),
            "copied whole"
        );
        drop(reply);
        let reply = conn.call(&request).await.unwrap();
        assert!(matches!(reply, Reply::Ok(ref b) if &b[..] == b"7"));
        let reply = conn.call(&request).await.unwrap();
        assert!(
            matches!(reply, Reply::Ok(ref b) if b[..] == shorter[..]),
            "only its own bytes"
        );
        let kinds = peer.join().unwrap();
        let want = [
            Kind::Lend,
            Kind::Predict,
            Kind::Taken,
            Kind::Predict,
            Kind::Predict,
            Kind::Taken,
        ];
        assert_eq!(kinds, want.map(|k| k as u8));
    }

    /// A call dropped while it copies a lent answer (at its deadline) leaves that answer for the
    /// next call, which must not take the next request's answer instead.
    #[tokio::test]
    async fn a_call_dropped_while_taking_a_lent_answer_leaves_it_to_the_next() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let region = vec![0u8; 1 << 20];
        let mut conn = conn_into(ours, &region);
        // Large enough that its copy is still under way when the call is dropped.
        let answer = vec![b'a'; 16 << 20];
        let lent = frame(
            Kind::ResultLent,
            &protocol::encode_lent(answer.as_ptr() as u64, answer.len()),
        );
        let peer = scripted_peer(theirs, 4, vec![lent, frame(Kind::ResultOk, b"2")]);
        conn.accept_lent_answers().await.unwrap();
        let request = [Bytes::from_static(b"{}")];
        conn.send([&request[..], &request[..]].into_iter(), None)
            .await
            .unwrap();
        // Both answers are in the socket before the first call starts.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let first = match tokio::time::timeout(Duration::ZERO, conn.finish_call()).await {
            Ok(done) => done.unwrap(),
            // Dropped part-way, as the dispatcher drops a call at its deadline.
            Err(_) => conn.finish_call().await.unwrap(),
        };
        assert!(
            matches!(first, Reply::Ok(ref b) if b[..] == answer[..]),
            "the first request got another answer"
        );
        let second = conn.finish_call().await.unwrap();
        assert!(matches!(second, Reply::Ok(ref b) if &b[..] == b"2"));
        let kinds = peer.join().unwrap();
        let want = [Kind::Lend, Kind::Predict, Kind::Predict, Kind::Taken];
        assert_eq!(kinds, want.map(|k| k as u8));
    }

    #[tokio::test]
    async fn an_answer_lent_without_leave_or_unreadable_fails_the_call() {
        for leave in [false, true] {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let region = vec![0u8; 1 << 20];
            let mut conn = conn_into(ours, &region);
            // The first page is never mapped.
            let lent = frame(Kind::ResultLent, &protocol::encode_lent(4096, 100_000));
            let peer = scripted_peer(theirs, 1 + leave as usize, vec![lent]);
            if leave {
                conn.accept_lent_answers().await.unwrap();
                assert!(
                    conn.lending.is_some(),
                    "this process can read its own memory"
                );
            }
            let request = [Bytes::from_static(b"{}")];
            let err = conn.call(&request).await.unwrap_err();
            assert!(matches!(err, CallError::Protocol(_)), "{err}");
            peer.join().unwrap();
        }
    }

    /// The supervisor forgets a process before it reaps it: a write into its memory that found
    /// it current finishes first, and none starts after.
    #[test]
    fn a_process_is_not_forgotten_while_its_memory_is_written() {
        let slot = Arc::new(Slot::new("m".into(), 0));
        let pid = std::process::id() as i32;
        slot.begin_process(pid, 1);
        let written = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (started, start) = std::sync::mpsc::channel();
        let writer = {
            let (slot, written) = (slot.clone(), written.clone());
            std::thread::spawn(move || {
                slot.while_current(1, pid, || {
                    started.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                    written.store(true, Ordering::SeqCst);
                })
            })
        };
        start.recv().unwrap();
        slot.end_process();
        assert!(
            written.load(Ordering::SeqCst),
            "forgotten while the write was under way"
        );
        assert!(writer.join().unwrap().is_some());
        assert!(slot.while_current(1, pid, || ()).is_none(), "written after");
        // Another generation, or another process, is not written either.
        slot.begin_process(pid, 2);
        assert!(slot.while_current(1, pid, || ()).is_none());
        assert!(slot.while_current(2, pid + 1, || ()).is_none());
        assert!(slot.while_current(2, pid, || ()).is_some());
    }

    /// More slices than one `process_vm_writev` takes: the rest go in further calls, each
    /// resuming where the last stopped.
    #[tokio::test]
    async fn a_request_in_more_slices_than_one_write_takes_arrives_whole() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut region = vec![0u8; 1 << 20];
        let mut conn = conn_into(ours, &region);
        let peer = answering_peer(theirs, 1);
        let parts: Vec<Bytes> = (0..2_500u32)
            .map(|i| Bytes::from(format!("{i:05}").repeat(7 + (i % 5) as usize)))
            .collect();
        let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert!(parts.len() > 2 * IOV_MAX && whole.len() >= IN_PLACE_MIN);
        conn.call(&parts).await.unwrap();
        let seen = peer.join().unwrap();
        assert_eq!(seen[0].0, Kind::PredictInPlace as u8);
        std::hint::black_box(&mut region);
        assert!(region[..whole.len()] == whole[..], "every slice, in order");
    }

    #[tokio::test]
    async fn a_read_cancelled_half_way_through_a_large_answer_resumes_intact() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut conn = conn(ours);
        let big: Vec<u8> = (0..1_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let bytes = frame(Kind::ResultOk, &big);
        let theirs = theirs.into_std().unwrap();
        theirs.set_nonblocking(false).unwrap();
        (&theirs).write_all(&bytes[..100_000]).unwrap();
        // The caller gives up while the answer is half there (a client that went away).
        let early = tokio::time::timeout(Duration::from_millis(50), conn.read_frame()).await;
        assert!(early.is_err(), "the answer is not complete yet");
        let writer = std::thread::spawn(move || (&theirs).write_all(&bytes[100_000..]).unwrap());
        let (kind, payload) = tokio::time::timeout(Duration::from_secs(10), conn.read_frame())
            .await
            .expect("the rest of the answer is read")
            .unwrap();
        writer.join().unwrap();
        assert_eq!((kind, payload.len()), (Kind::ResultOk as u8, big.len()));
        assert!(
            payload == big[..],
            "no bytes lost or invented by the cancelled read"
        );
    }
}
