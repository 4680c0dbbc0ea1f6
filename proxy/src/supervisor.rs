//! Starts, watches, kills and restarts the replica processes of a model.
//!
//! Each replica slot has one task running the loop: spawn `replica-runtime` in its own process
//! group, accept its connection, wait for `Ready`, hand the connection to the pool, then wait for
//! the process to exit (or for shutdown). Failures back off exponentially; a slot whose module
//! fails to load, or whose processes keep dying soon after starting, is marked failed so the model
//! answers 503 instead of queueing callers for nothing. It keeps retrying at the longest backoff,
//! so a fixed model directory recovers without a restart of modelgate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use modelgate_protocol::{Kind, ModelError, Ready};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cgroup::{Enforcement, Limits, ReplicaCgroup};
use crate::pool::{Pool, SlotHealth};
use crate::replica::{KillReason, ReplicaConn, Slot};

/// First restart delay after a failure; doubles per consecutive failure.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// Longest restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Consecutive failures after which a slot counts as crash-looping (and stops taking waiters).
const CRASH_LOOP_THRESHOLD: u32 = 3;
/// A process that ran this long before dying resets the failure count.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Outside SIGKILLs in a row, each before the replica got ready, that count as a crash loop
/// (a host OOM killer ending every import looks exactly like that).
const UNREADY_KILLS_LIMIT: u32 = 10;
/// How long a stopping replica gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest log line kept from a replica; the rest of the line is dropped and counted.
const MAX_LOG_LINE: usize = 16 * 1024;

/// How replica processes are started, shared by every model.
#[derive(Debug)]
pub struct ReplicaSettings {
    pub runtime: PathBuf,
    /// Private (0700) directory for the per-process sockets.
    pub socket_dir: PathBuf,
    pub start_timeout: Duration,
    /// How memory and CPU limits are enforced.
    pub limits: Limits,
    /// Size of the in-place region each replica is asked to offer: the largest request body.
    pub in_place_bytes: u64,
    next_socket: AtomicU64,
}

impl ReplicaSettings {
    pub fn new(
        runtime: PathBuf,
        socket_dir: PathBuf,
        start_timeout: Duration,
        limits: Limits,
        in_place_bytes: u64,
    ) -> Self {
        ReplicaSettings {
            runtime,
            socket_dir,
            start_timeout,
            limits,
            in_place_bytes,
            next_socket: AtomicU64::new(0),
        }
    }
}

/// What a model's replicas run.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: Arc<str>,
    /// Directories added to `sys.path` after the model directory (installed dependencies).
    pub python_path: Vec<PathBuf>,
    pub dir: PathBuf,
    pub file: String,
    pub function: String,
    pub replicas: usize,
    pub env: BTreeMap<String, String>,
    /// Memory limit of each replica process, if any (enforced as [`ReplicaSettings::limits`] says).
    pub memory_limit_bytes: Option<u64>,
    /// CPU cores each replica process may use, if limited (where cgroups allow).
    pub cpu: Option<f64>,
}

/// A model's running replicas.
pub struct ModelReplicas {
    pub pool: Arc<Pool>,
    pub slots: Vec<Arc<Slot>>,
    tasks: Vec<JoinHandle<()>>,
}

impl ModelReplicas {
    /// Waits for every slot task to stop its process (after `stop` fired).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts the replica slots of one model; they run until `stop` turns true.
pub fn start_model(
    spec: Arc<ModelSpec>,
    pool: Arc<Pool>,
    settings: Arc<ReplicaSettings>,
    stop: watch::Receiver<bool>,
) -> ModelReplicas {
    let slots: Vec<Arc<Slot>> = (0..spec.replicas)
        .map(|i| Arc::new(Slot::new(spec.name.clone(), i)))
        .collect();
    let tasks = slots
        .iter()
        .enumerate()
        .map(|(index, slot)| {
            tokio::spawn(run_slot(SlotTask {
                index,
                slot: slot.clone(),
                spec: spec.clone(),
                pool: pool.clone(),
                settings: settings.clone(),
                stop: stop.clone(),
            }))
        })
        .collect();
    ModelReplicas { pool, slots, tasks }
}

struct SlotTask {
    index: usize,
    slot: Arc<Slot>,
    spec: Arc<ModelSpec>,
    pool: Arc<Pool>,
    settings: Arc<ReplicaSettings>,
    stop: watch::Receiver<bool>,
}

/// How one process of a slot ended.
enum Outcome {
    Stopped,
    LoadFailed,
    StartFailed(String),
    Exited {
        /// How long it served; `None` when it died before it was ready.
        ran_for: Option<Duration>,
        reason: &'static str,
        /// Whether it died idle, rather than while serving a request.
        idle: bool,
    },
}

async fn run_slot(mut task: SlotTask) {
    let mut generation = 0u64;
    let mut failures = 0u32;
    let mut unready_kills = 0u32;
    // The last process's death was taken for the one before it (`take_death_mid_batch_before`).
    let mut forgave_last = false;
    loop {
        if *task.stop.borrow() {
            break;
        }
        generation += 1;
        let outcome = run_process(&mut task, generation).await;
        let mut forgave = false;
        let reason = match outcome {
            Outcome::Stopped => break,
            Outcome::LoadFailed => {
                // Importing is deterministic: waiting for a retry would only delay the 503.
                failures = failures.max(CRASH_LOOP_THRESHOLD);
                "load_failed"
            }
            Outcome::StartFailed(err) => {
                tracing::error!(replica = %task.slot.id, generation, "replica failed to start: {err}");
                failures += 1;
                "start_failed"
            }
            Outcome::Exited {
                ran_for,
                reason,
                idle,
            } => {
                if reason == "killed" {
                    // SIGKILL from outside (an operator, a chaos tool): not the model's fault, so
                    // it does not count towards a crash loop, unless it keeps ending every start.
                    if ran_for.is_some_and(|t| t >= STABLE_AFTER) {
                        failures = 0;
                    }
                    if ran_for.is_none() {
                        unready_kills += 1;
                        if unready_kills >= UNREADY_KILLS_LIMIT {
                            failures = failures.max(CRASH_LOOP_THRESHOLD);
                        }
                    }
                } else if reason == "timeout" || (reason == "memory_limit" && !idle) {
                    // A request made the proxy or the kernel kill a replica that was working as
                    // designed: restart at once.
                    failures = 0;
                } else if !idle
                    && !forgave_last
                    && task.slot.take_death_mid_batch_before(generation)
                {
                    // The requests of the batch the last process died in run one at a time, and
                    // the one that ended it ends this one too: one fault, counted once. Never two
                    // processes in a row, so a model that ends every process still reaches the
                    // crash-loop count.
                    forgave = true;
                } else if ran_for.is_some_and(|t| t >= STABLE_AFTER) {
                    failures = 1;
                } else {
                    failures += 1;
                }
                if ran_for.is_some() {
                    unready_kills = 0;
                }
                reason
            }
        };
        forgave_last = forgave;
        metrics::counter!(
            crate::metrics::REPLICA_RESTARTS,
            "model" => task.slot.model.to_string(),
            "replica" => task.slot.id.to_string(),
            "reason" => reason
        )
        .increment(1);
        let health = if failures >= CRASH_LOOP_THRESHOLD {
            SlotHealth::Failed
        } else {
            SlotHealth::Starting
        };
        task.pool.set_health(task.index, health);
        let delay = if reason == "killed" {
            backoff(failures).max(INITIAL_BACKOFF)
        } else {
            backoff(failures)
        };
        tracing::warn!(
            replica = %task.slot.id, generation, reason, failures,
            "replica restarting in {delay:?}{}",
            if health == SlotHealth::Failed { " (crash loop: model marked unavailable)" } else { "" }
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = task.stop.changed() => break,
        }
    }
    task.pool.set_health(task.index, SlotHealth::Stopped);
}

fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (failures - 1).min(16);
    (INITIAL_BACKOFF * factor).min(MAX_BACKOFF)
}

async fn run_process(task: &mut SlotTask, generation: u64) -> Outcome {
    let settings = &task.settings;
    let n = settings.next_socket.fetch_add(1, Ordering::Relaxed);
    let socket = settings.socket_dir.join(format!("r{n}.sock"));
    let _ = std::fs::remove_file(&socket);
    let listener = match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(err) => return Outcome::StartFailed(format!("bind {}: {err}", socket.display())),
    };
    let _cleanup = RemoveOnDrop(socket.clone());

    let spec = &task.spec;
    let cgroup = match settings
        .limits
        .create(&format!("r{n}"), spec.memory_limit_bytes, spec.cpu)
    {
        Ok(cg) => cg.map(Arc::new),
        Err(err) => return Outcome::StartFailed(format!("creating the replica's cgroup: {err}")),
    };
    let outcome = run_in_cgroup(task, generation, socket, listener, cgroup.clone()).await;
    task.slot.set_cgroup(None);
    if let Some(cg) = cgroup.and_then(Arc::into_inner) {
        cg.release().await;
    }
    outcome
}

async fn run_in_cgroup(
    task: &mut SlotTask,
    generation: u64,
    socket: PathBuf,
    listener: UnixListener,
    cgroup: Option<Arc<ReplicaCgroup>>,
) -> Outcome {
    let settings = &task.settings;
    let spec = &task.spec;
    let rlimit = match settings.limits.enforcement() {
        Enforcement::RlimitAs => spec.memory_limit_bytes,
        Enforcement::CgroupV1 | Enforcement::CgroupV2 => None,
    };
    let mut cmd = Command::new(&settings.runtime);
    cmd.arg("serve")
        .arg("--connect")
        .arg(&socket)
        .arg("--dir")
        .arg(&spec.dir)
        .arg("--file")
        .arg(&spec.file)
        .arg("--function")
        .arg(&spec.function)
        .args(
            spec.python_path
                .iter()
                .flat_map(|p| [std::ffi::OsStr::new("--python-path"), p.as_os_str()]),
        )
        .args(
            rlimit
                .map(|b| vec!["--memory-limit-bytes".to_string(), b.to_string()])
                .unwrap_or_default(),
        )
        .args(cgroup.iter().flat_map(|cg| cg.procs_files()).flat_map(|p| {
            [
                std::ffi::OsString::from("--join-cgroup"),
                p.into_os_string(),
            ]
        }))
        .envs(&spec.env)
        // A variable, not an argument: a runtime from before in-place regions ignores it.
        .env(
            "MODELGATE_IN_PLACE_BYTES",
            settings.in_place_bytes.to_string(),
        )
        .env("PYTHONUNBUFFERED", "1")
        .env("MODELGATE_MODEL", &*spec.name)
        .env("MODELGATE_REPLICA_ID", &*task.slot.id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kill also takes whatever the model forked.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(err) => {
            return Outcome::StartFailed(format!("spawn {}: {err}", settings.runtime.display()))
        }
    };
    let pid = child.id().unwrap_or(0) as i32;
    task.slot.begin_process(pid, generation);
    task.slot
        .set_cgroup(cgroup.clone().map(|cg| (generation, cg)));
    let slot = &task.slot;
    tracing::info!(replica = %slot.id, generation, pid, "replica starting");
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump_log(out, slot.clone(), generation, "stdout"));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump_log(err, slot.clone(), generation, "stderr"));
    }

    let started = Instant::now();
    let handshake = async {
        let (stream, _) = listener.accept().await?;
        let mut conn = ReplicaConn::new(slot.clone(), generation, stream)?;
        let (kind, payload) = conn.read_frame().await.map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>((conn, kind, payload))
    };
    let handshake = tokio::select! {
        r = tokio::time::timeout(settings.start_timeout, handshake) => r,
        status = reap(slot, &mut child) => {
            if let Some(outcome) = killed_before_ready(slot, generation, &status) {
                return outcome;
            }
            return Outcome::StartFailed(format!("exited before connecting: {}", describe_exit(status)));
        }
        _ = task.stop.changed() => {
            stop_process(slot, &mut child).await;
            return Outcome::Stopped;
        }
    };
    let conn = match handshake {
        Err(_elapsed) => {
            slot.kill(KillReason::ProtocolError);
            let _ = reap(slot, &mut child).await;
            return Outcome::StartFailed(format!("not ready within {:?}", settings.start_timeout));
        }
        Ok(Err(err)) => {
            // Usually the process died: give it a moment to end, to tell how.
            let died = tokio::time::timeout(Duration::from_secs(1), ended(&mut child))
                .await
                .is_ok();
            // If it did not, it goes (and whatever it left in its group, as it is reaped).
            slot.kill(KillReason::ProtocolError);
            let status = reap(slot, &mut child).await;
            if died {
                if let Some(outcome) = killed_before_ready(slot, generation, &status) {
                    return outcome;
                }
            }
            return Outcome::StartFailed(format!("handshake: {err}"));
        }
        Ok(Ok((conn, kind, payload))) => match Kind::from_u8(kind) {
            Some(Kind::Ready) => {
                let mut conn = conn;
                match serde_json::from_slice::<Ready>(&payload) {
                    Ok(Ready {
                        in_place: Some(region),
                        ..
                    }) => {
                        conn.offer_in_place(pid, region);
                        if let Err(err) = conn.accept_lent_answers().await {
                            tracing::warn!(replica = %slot.id, generation, "telling the replica to lend answers: {err}");
                        }
                    }
                    Ok(_) => {}
                    // An unreadable Ready still means ready: it only offers no region.
                    Err(err) => {
                        tracing::warn!(replica = %slot.id, generation, "unreadable Ready frame: {err}")
                    }
                }
                conn
            }
            Some(Kind::LoadFailed) => {
                let why = serde_json::from_slice::<ModelError>(&payload)
                    .map(|e| format!("{}: {}", e.exception, e.message))
                    .unwrap_or_else(|_| "unreadable load error".into());
                tracing::error!(replica = %slot.id, generation, "model failed to load: {why}");
                let _ = tokio::time::timeout(STOP_GRACE, ended(&mut child)).await;
                slot.kill(KillReason::Shutdown);
                let _ = reap(slot, &mut child).await;
                return Outcome::LoadFailed;
            }
            _ => {
                slot.kill(KillReason::ProtocolError);
                let _ = reap(slot, &mut child).await;
                return Outcome::StartFailed("first frame was not Ready".into());
            }
        },
    };
    tracing::info!(
        replica = %slot.id, generation, pid,
        "replica ready in {:.0} ms", started.elapsed().as_secs_f64() * 1e3
    );
    task.pool.set_health(task.index, SlotHealth::Ready);
    let dispatcher = task.pool.release(conn);
    let ready_at = Instant::now();

    tokio::select! {
        status = reap(slot, &mut child) => {
            let idle = task.pool.process_ended(&dispatcher);
            let reason = match slot.take_kill_reason() {
                KillReason::Timeout => "timeout",
                KillReason::ProtocolError => "protocol_error",
                KillReason::Shutdown => "stopped",
                KillReason::MemoryLimit => "memory_limit",
                KillReason::None => sigkill_cause(slot, generation, &status).unwrap_or("exited"),
            };
            tracing::warn!(replica = %slot.id, generation, reason, "replica process ended: {}", describe_exit(status));
            Outcome::Exited { ran_for: Some(ready_at.elapsed()), reason, idle }
        }
        _ = task.stop.changed() => {
            task.pool.process_ended(&dispatcher);
            stop_process(slot, &mut child).await;
            Outcome::Stopped
        }
    }
}

/// SIGTERM to the replica, SIGKILL to its process group after a grace period, then reap.
async fn stop_process(slot: &Arc<Slot>, child: &mut Child) {
    // The replica alone (it leads its group, so the group id is its pid, still its own until it
    // is reaped): it answers the request under way and exits, and the processes the model
    // started keep working for that request meanwhile. What is left of them goes as it is reaped.
    let pid = slot.pgid();
    if pid > 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(STOP_GRACE, ended(child))
        .await
        .is_err()
    {
        slot.kill(KillReason::Shutdown);
    }
    // Whatever else the model left in its group goes as it is reaped.
    let _ = reap(slot, child).await;
}

/// Resolves once the child has ended: without reaping it where the kernel gives a pidfd (Linux
/// 5.3 on), so its pid stays its own until [`reap`] (true); by reaping it otherwise (false).
async fn ended(child: &mut Child) -> bool {
    let pidfd = child.id().map(|pid| {
        let pid = rustix::process::Pid::from_raw(pid as i32)
            .ok_or_else(|| std::io::Error::other("pid 0"))?;
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
        // Deprecated because a type could hand out a different descriptor over time; an
        // `OwnedFd` owns its one descriptor for its whole life, which is the sound case (the
        // replacement is an `unsafe fn`, and this crate forbids `unsafe`).
        #[allow(deprecated)]
        tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)
    });
    if let Some(Ok(fd)) = pidfd {
        // Readable once the process has ended.
        if fd.readable().await.is_ok() {
            return true;
        }
    }
    let _ = child.wait().await;
    false
}

/// Waits for the child to end and reaps it. In between, while its pid cannot yet be another
/// process's: whatever the model forked is killed (the group's id is still its own, so nothing
/// else can be in it; a replica that crashed would otherwise leave its children running); the
/// slot forgets it, which waits for any copy into or out of its memory still
/// under way ([`Slot::end_process`], on a blocking thread, as a large copy can take a while), so
/// none can reach a process that reuses the pid; then its last CPU reading is taken (a scrape
/// meanwhile no longer reads it, so it is counted once).
async fn reap(slot: &Arc<Slot>, child: &mut Child) -> std::io::Result<std::process::ExitStatus> {
    if ended(child).await {
        slot.kill_group();
    }
    let pid = slot.pgid();
    let forget = slot.clone();
    let _ = tokio::task::spawn_blocking(move || forget.end_process()).await;
    crate::metrics::retire_replica_cpu(slot, pid);
    child.wait().await
}

/// Why process `generation` died of a SIGKILL the proxy did not send (its own kills carry a
/// [`KillReason`]): `memory_limit` when the kernel killed it at its cgroup's limit, else `killed`
/// from outside. `None` when it did not die of a SIGKILL.
fn sigkill_cause(
    slot: &Slot,
    generation: u64,
    status: &std::io::Result<std::process::ExitStatus>,
) -> Option<&'static str> {
    use std::os::unix::process::ExitStatusExt;
    if !matches!(status, Ok(s) if s.signal() == Some(nix::libc::SIGKILL)) {
        return None;
    }
    Some(match slot.memory_killed(generation) {
        Some(_) => "memory_limit",
        None => "killed",
    })
}

/// The outcome of a process SIGKILLed before it got ready: an import over the memory limit is a
/// load failure (it will fail again); a kill from outside is not the model's.
fn killed_before_ready(
    slot: &Slot,
    generation: u64,
    status: &std::io::Result<std::process::ExitStatus>,
) -> Option<Outcome> {
    sigkill_cause(slot, generation, status).map(|cause| match cause {
        "memory_limit" => Outcome::LoadFailed,
        reason => Outcome::Exited {
            ran_for: None,
            reason,
            idle: true,
        },
    })
}

fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "ended".into(),
        },
        Err(err) => format!("wait failed: {err}"),
    }
}

/// Copies a replica's output into the log, one event per line, bounding line length.
async fn pump_log(
    reader: impl AsyncRead + Unpin,
    replica: Arc<Slot>,
    generation: u64,
    stream: &'static str,
) {
    let mut reader = BufReader::with_capacity(16 * 1024, reader);
    let mut line: Vec<u8> = Vec::new();
    let mut dropped = 0usize;
    loop {
        let buf = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(buf) => buf,
        };
        let (chunk, consumed, complete) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        let room = MAX_LOG_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        dropped += chunk.len().saturating_sub(room);
        reader.consume(consumed);
        if complete {
            emit(&replica, generation, stream, &line, dropped);
            line.clear();
            dropped = 0;
        }
    }
    if !line.is_empty() {
        emit(&replica, generation, stream, &line, dropped);
    }
}

fn emit(slot: &Slot, generation: u64, stream: &'static str, line: &[u8], dropped: usize) {
    let text = String::from_utf8_lossy(line);
    let mut text = text.trim_end_matches('\r').to_owned();
    if dropped > 0 {
        text.push_str(&format!(" [line truncated, {dropped} bytes dropped]"));
    }
    let replica = &*slot.id;
    tracing::info!(target: "replica", replica, generation, stream, "{text}");
    slot.push_log(format!("{} {stream} {text}", crate::now_rfc3339()));
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
