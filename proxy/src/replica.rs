//! One connection to one replica process, and the shared record of the replica slot it belongs to.

use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use metrics::Gauge;
use modelgate_protocol::{self as protocol, Kind, ModelError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::cgroup::ReplicaCgroup;

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
    kill_reason: AtomicU8,
    /// Generation of the current process (see [`ReplicaConn::generation`]).
    generation: AtomicU64,
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
            kill_reason: AtomicU8::new(0),
            generation: AtomicU64::new(0),
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

    /// Forgets the process group once its leader has been reaped.
    pub fn end_process(&self) {
        self.pgid.store(0, Ordering::SeqCst);
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
    stream: UnixStream,
    read_buf: BytesMut,
    phase: Phase,
}

/// Where a call stands, so a cancelled one can be finished or the replica written off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Writing,
    Reading,
}

/// Payloads up to this size are copied next to their header so the request costs one write.
const COALESCE_LIMIT: usize = 16 * 1024;

impl ReplicaConn {
    pub fn new(slot: Arc<Slot>, generation: u64, stream: UnixStream) -> ReplicaConn {
        ReplicaConn {
            slot,
            generation,
            stream,
            read_buf: BytesMut::with_capacity(8 * 1024),
            phase: Phase::Idle,
        }
    }

    /// Kills this connection's process (not a later one of the same slot).
    pub fn kill(&self, reason: KillReason) {
        self.slot.kill_generation(self.generation, reason);
    }

    /// Reads the next frame: `(kind byte, payload)`.
    pub async fn read_frame(&mut self) -> Result<(u8, Bytes), CallError> {
        while self.read_buf.len() < protocol::HEADER_LEN {
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(CallError::Closed);
            }
        }
        let mut h = [0u8; protocol::HEADER_LEN];
        h.copy_from_slice(&self.read_buf[..protocol::HEADER_LEN]);
        let header = protocol::decode_header(h).map_err(|e| CallError::Protocol(e.0))?;
        let need = protocol::HEADER_LEN + header.payload_len;
        if self.read_buf.capacity() < need {
            self.read_buf.reserve(need - self.read_buf.len());
        }
        while self.read_buf.len() < need {
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(CallError::Closed);
            }
        }
        let mut frame = self.read_buf.split_to(need);
        let payload = frame.split_off(protocol::HEADER_LEN).freeze();
        if self.read_buf.capacity() < 4096 {
            self.read_buf.reserve(8 * 1024);
        }
        Ok((header.kind, payload))
    }

    /// Writes one frame whose payload is `parts`, in order.
    async fn write_frame(&mut self, kind: Kind, parts: &[Bytes]) -> Result<(), CallError> {
        let len = parts.iter().map(Bytes::len).sum();
        let header = protocol::encode_header(kind, len);
        if len <= COALESCE_LIMIT {
            let mut buf = Vec::with_capacity(header.len() + len);
            buf.extend_from_slice(&header);
            for part in parts {
                buf.extend_from_slice(part);
            }
            self.stream.write_all(&buf).await?;
        } else {
            // Large payloads go out as they arrived from the client, never copied together.
            self.stream.write_all(&header).await?;
            for part in parts {
                self.stream.write_all(part).await?;
            }
        }
        Ok(())
    }

    /// Sends one request (its JSON text in `parts`) and waits for its terminal answer.
    pub async fn call(&mut self, parts: &[Bytes]) -> Result<Reply, CallError> {
        self.phase = Phase::Writing;
        self.write_frame(Kind::Predict, parts).await?;
        self.phase = Phase::Reading;
        self.finish_call().await
    }

    /// True when the request went out whole and its answer has not been read yet.
    pub fn awaiting_reply(&self) -> bool {
        self.phase == Phase::Reading
    }

    /// Reads frames until the terminal answer of the call in flight, skipping unknown kinds.
    pub async fn finish_call(&mut self) -> Result<Reply, CallError> {
        loop {
            let (kind, payload) = self.read_frame().await?;
            match Kind::from_u8(kind) {
                Some(Kind::ResultOk) => {
                    self.phase = Phase::Idle;
                    return Ok(Reply::Ok(payload));
                }
                Some(Kind::ResultErr) => {
                    let err: ModelError = serde_json::from_slice(&payload)
                        .map_err(|_| CallError::Protocol("malformed error frame"))?;
                    self.phase = Phase::Idle;
                    return Ok(Reply::Err(err));
                }
                Some(Kind::Ready | Kind::LoadFailed | Kind::Predict | Kind::Ping) => {
                    return Err(CallError::Protocol("unexpected frame during a call"));
                }
                // Pong and kinds from newer replicas carry nothing for this call.
                Some(Kind::Pong) | None => continue,
            }
        }
    }
}
