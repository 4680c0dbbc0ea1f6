//! `replica-direct`: calls a replica over its Unix socket with no proxy in between, one request
//! at a time (as the proxy does), to isolate what the proxy adds to a prediction.
//!
//! It spawns `replica-runtime serve` itself, waits for `Ready`, then sends the same request back
//! to back for the warm-up and the measured duration, checking every answer.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use modelgate_loadtests::{read_frame, start_replica, ReplicaArgs};
use modelgate_protocol::{self as protocol, Kind};

/// Calls one replica over its Unix socket with no proxy in between, and reports latency.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    replica: ReplicaArgs,
    /// The request object (JSON).
    #[arg(long, default_value = r#"{"a":3,"b":5}"#)]
    body: String,
    /// Expected JSON answer, compared byte for byte.
    #[arg(long, default_value = "8")]
    expect: String,
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// Send `{"pad":"<N chars>"}` instead of --body.
    #[arg(long, value_name = "N")]
    payload_bytes: Option<usize>,
    /// Expect the request back (an echo function) instead of --expect.
    #[arg(long)]
    expect_echo: bool,
    /// Pin the replica process to this CPU (with `taskset`), as the runner pins servers.
    #[arg(long)]
    runtime_cpu: Option<u32>,
    /// Requests kept written ahead of the answers (1: one at a time, as the proxy sends). Above 1
    /// the replica finds the next request already waiting when it finishes one; latency is then
    /// from a request's write to its answer. For small bodies only: all N are written before an
    /// answer is read, so N bodies that overflow both socket buffers would deadlock.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Never sleep waiting for an answer: poll the socket in a loop (as `loadgen --spin`).
    #[arg(long)]
    spin: bool,
}

/// Retries reads and writes that would block, so a nonblocking socket is polled in a loop.
struct Spin<T>(T);

impl<T: Read> Read for Spin<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                r => return r,
            }
        }
    }
}

impl<T: Write> Write for Spin<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn main() -> std::process::ExitCode {
    // Its replica then runs with what modelgate's replicas inherit.
    modelgate_loadtests::allocator_like_modelgate("replica-direct");
    let args = Args::parse();
    let cmd = match args.runtime_cpu {
        Some(cpu) => {
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", &cpu.to_string(), &args.replica.runtime]);
            c
        }
        None => std::process::Command::new(&args.replica.runtime),
    };
    let (mut child, stream) = start_replica(cmd, &args.replica);

    let body = match args.payload_bytes {
        Some(n) => format!(r#"{{"pad":"{}"}}"#, "x".repeat(n)),
        None => args.body.clone(),
    };
    let expect = if args.expect_echo {
        body.clone()
    } else {
        args.expect.clone()
    };
    let mut frame = protocol::encode_header(Kind::Predict, body.len()).to_vec();
    frame.extend_from_slice(body.as_bytes());
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let (mut sent, mut errors) = (0u64, 0u64);
    let warm_end = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = warm_end + Duration::from_secs_f64(args.duration);
    let mut measured_start = None;
    let depth = args.pipeline.max(1);
    let mut written = std::collections::VecDeque::with_capacity(depth);
    // Nonblocking is a property of the socket, so it holds for the clone too.
    stream.set_nonblocking(args.spin).expect("socket mode");
    let mut reader =
        std::io::BufReader::with_capacity(64 * 1024, Spin(stream.try_clone().expect("clone")));
    let mut stream = Spin(stream);
    while sent < args.max_requests {
        let now = Instant::now();
        if now >= end {
            break;
        }
        while written.len() < depth {
            stream.write_all(&frame).expect("write");
            written.push_back(Instant::now());
        }
        let (kind, payload) = read_frame(&mut reader).expect("read");
        let t0 = written.pop_front().expect("a request in flight");
        let us = t0.elapsed().as_micros() as u64;
        if now >= warm_end {
            measured_start.get_or_insert(now);
            sent += 1;
            if Kind::from_u8(kind) != Some(Kind::ResultOk) || payload != expect.as_bytes() {
                errors += 1;
            } else {
                let _ = hist.record(us.max(1));
            }
        }
    }
    let elapsed = measured_start
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or(1.0);
    for _ in 0..written.len() {
        let _ = read_frame(&mut reader);
    }
    drop(reader);
    drop(stream);
    let _ = child.wait();
    let report = serde_json::json!({
        "mode": "replica-direct",
        "spin": args.spin,
        "pipeline": depth,
        "sent": sent,
        "error_total": errors,
        "achieved_rps": (sent as f64 / elapsed * 10.0).round() / 10.0,
        "latency_us": {
            "p50": hist.value_at_quantile(0.5), "p90": hist.value_at_quantile(0.9),
            "p99": hist.value_at_quantile(0.99), "p99_9": hist.value_at_quantile(0.999),
            "max": hist.max(),
        },
    });
    println!("{report}");
    if errors > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
