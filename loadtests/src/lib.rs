//! What the comparison binaries (`floor`, `replica-direct`, `hop-floor`, `blocking-floor`) share:
//! starting one real `replica-runtime` on a private Unix socket and reading its frames with
//! blocking I/O, and the `/model` format in its barest form (the fixed answer, the envelope's
//! `request`, an answer wrapped in the success envelope).

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command};

use modelgate_protocol::{self as protocol, Kind};

/// The floors' fixed answer: the add model's, in the `/model` format.
pub const FIXED_ANSWER: &[u8] = br#"{"success":true,"response":8,"replicaId":"floor-0"}"#;

/// A `/model` body as the floors read it: only `request`, unparsed.
#[derive(serde::Deserialize)]
pub struct Envelope<'a> {
    #[serde(borrow)]
    pub request: &'a serde_json::value::RawValue,
}

/// A replica's `ResultOk` payload inside the success envelope, as `replica_id` answered it.
pub fn success_body(payload: &[u8], replica_id: &str) -> Vec<u8> {
    const HEAD: &[u8] = br#"{"success":true,"response":"#;
    let mut out = Vec::with_capacity(HEAD.len() + payload.len() + replica_id.len() + 16);
    out.extend_from_slice(HEAD);
    out.extend_from_slice(payload);
    out.extend_from_slice(br#","replicaId":""#);
    out.extend_from_slice(replica_id.as_bytes());
    out.extend_from_slice(b"\"}");
    out
}

/// The replica to start: its binary and the model it serves, as `replica-runtime serve` takes
/// them. Defaults: the bundled add model and this tree's release build.
#[derive(clap::Args, Debug)]
pub struct ReplicaArgs {
    /// The replica-runtime binary.
    #[arg(long, default_value = "target/release/replica-runtime")]
    pub runtime: String,
    #[arg(long, default_value = "examples/add_numbers")]
    pub dir: String,
    #[arg(long, default_value = "add_numbers.py")]
    pub file: String,
    #[arg(long, default_value = "add")]
    pub function: String,
}

/// Runs `cmd` (`model.runtime`, or a wrapper such as `taskset` around it) as `serve` for
/// `model`, accepts its connection and waits for `Ready`. The socket's directory is
/// removed once the replica has connected. Panics when the replica does not load: these are
/// measuring tools, and a run without its replica means nothing.
pub fn start_replica(mut cmd: Command, model: &ReplicaArgs) -> (Child, UnixStream) {
    let dir = std::env::temp_dir().join(format!("modelgate-loadtests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sock = dir.join("r.sock");
    let listener = UnixListener::bind(&sock).expect("bind socket");
    let child = cmd
        .args(["serve", "--connect"])
        .arg(&sock)
        .args(["--dir", &model.dir, "--file", &model.file])
        .args(["--function", &model.function])
        .spawn()
        .expect("spawn replica-runtime");
    let (mut stream, _) = listener.accept().expect("replica connects");
    let _ = std::fs::remove_dir_all(&dir);
    let (kind, _) = read_frame(&mut stream).expect("first frame");
    assert_eq!(
        Kind::from_u8(kind),
        Some(Kind::Ready),
        "replica did not load"
    );
    (child, stream)
}

/// Reads one whole frame: `(kind byte, payload)`.
pub fn read_frame(s: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; protocol::HEADER_LEN];
    s.read_exact(&mut h)?;
    let header = protocol::decode_header(h).map_err(std::io::Error::other)?;
    let mut payload = vec![0u8; header.payload_len];
    s.read_exact(&mut payload)?;
    Ok((header.kind, payload))
}

/// Resolves at SIGINT or SIGTERM: a server stopped either way then returns from `main` and exits
/// normally, which an instrumented build (`loadtests/pgo-build.sh`) needs to write its profile.
pub async fn stopped() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Starts the running floor again, once, with modelgate's allocator settings
/// (`modelgate_protocol::glibc::PROXY`), so that a floor and modelgate are measured on the same
/// allocator, and a replica a floor starts inherits what modelgate's replicas inherit. Call it
/// first thing in `main`, before any thread starts.
pub fn allocator_like_modelgate(program: &str) {
    modelgate_protocol::glibc::restart_with(
        program,
        &modelgate_protocol::glibc::PROXY,
        "MODELGATE_FLOOR_MALLOC_SET",
    );
}

/// The runtime a server under test runs on, chosen as modelgate chooses: tokio's current-thread
/// scheduler when the process may run on one CPU, the multi-thread one with a worker per CPU
/// otherwise. So a floor pinned beside modelgate schedules its tasks the way modelgate does.
pub fn server_runtime() -> tokio::runtime::Runtime {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cpus);
        b
    }
    .enable_all()
    .build()
    .expect("tokio runtime")
}
