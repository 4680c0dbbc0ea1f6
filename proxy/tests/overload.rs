//! Overload: ten times more concurrent callers than the replicas can serve, for a minute
//! (`OVERLOAD_SECS` to change). Every answer must be 200 or 429, admitted requests must not wait
//! past the queue timeout, and the proxy's memory must stay bounded.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use serde_json::json;

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn ten_times_overload_answers_200_or_429_within_bounds() {
    const SERVICE: f64 = 0.05; // seconds per call
    const REPLICAS: u32 = 2;
    const CALLERS: usize = 10 * REPLICAS as usize;
    const QUEUE_TIMEOUT: f64 = 0.5;
    let secs: u64 = std::env::var("OVERLOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let server = Server::start(
        &format!("queue_timeout_secs = {QUEUE_TIMEOUT}\nmax_queue = 8"),
        &[common::model("slow", "slow", REPLICAS)],
    );
    server.wait_ready().await;
    server.wait_replicas_ready(&["slow-0", "slow-1"]).await;
    let pid = server.child.id();
    let rss_before = status_kb(pid, "VmRSS:");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let (c, url, key) = (
            client.clone(),
            server.url("/model"),
            common::key_for("slow"),
        );
        callers.push(tokio::spawn(async move {
            let mut admitted = Vec::new();
            let (mut busy, mut other) = (0u64, Vec::new());
            while Instant::now() < deadline {
                let started = Instant::now();
                let r = c
                    .post(&url)
                    .json(&json!({"accessKey": key, "request": {"secs": SERVICE}}))
                    .send()
                    .await
                    .expect("answered");
                let status = r.status().as_u16();
                let _ = r.bytes().await;
                match status {
                    200 => admitted.push(started.elapsed()),
                    429 => {
                        busy += 1;
                        // A caller that honours Retry-After would back off; this one retries
                        // after a pause shorter than a call, to keep the pressure on.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    s => other.push(s),
                }
            }
            (admitted, busy, other)
        }));
    }
    let mut admitted = Vec::new();
    let (mut busy, mut other) = (0u64, Vec::new());
    for c in callers {
        let (a, b, o) = c.await.unwrap();
        admitted.extend(a);
        busy += b;
        other.extend(o);
    }
    admitted.sort();
    let p99 = admitted[admitted.len() * 99 / 100];
    let peak = status_kb(pid, "VmHWM:");
    let served_rate = admitted.len() as f64 / secs as f64;
    eprintln!(
        "{secs} s, {CALLERS} callers: {} × 200 ({served_rate:.1}/s), {busy} × 429, other {other:?}; \
         admitted p50 {:?} p99 {p99:?} max {:?}; RSS {rss_before} kB before, peak {peak} kB",
        admitted.len(),
        admitted[admitted.len() / 2],
        admitted.last().unwrap()
    );
    assert!(
        other.is_empty(),
        "answers other than 200 and 429: {other:?}"
    );
    assert!(busy > 0, "not overloaded");
    // The replicas were kept busy: close to their capacity of REPLICAS / SERVICE calls a second.
    assert!(
        served_rate > 0.7 * f64::from(REPLICAS) / SERVICE,
        "{served_rate}/s"
    );
    // Admitted requests waited at most the queue timeout, then were served.
    let bound = Duration::from_secs_f64(QUEUE_TIMEOUT + SERVICE + 0.25);
    assert!(p99 <= bound, "p99 {p99:?} over {bound:?}");
    assert!(peak < 100 * 1024, "peak RSS {peak} kB");
}
