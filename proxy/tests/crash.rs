//! Crash consistency of the store: modelgate is `kill -9`ed at random moments while many
//! clients write through the API, again and again; every write that was acknowledged must be
//! there afterwards, and SQLite's own integrity check must pass.

mod common;

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use common::Server;
use serde_json::{json, Value};

/// A random number (std's hasher keys come from the operating system).
fn random(below: u64) -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() % below
}

#[tokio::test]
async fn fifty_kill_cycles_under_fifty_concurrent_writers_lose_no_acknowledged_write() {
    const CYCLES: usize = 50;
    const WRITERS: usize = 50;
    let mut server = Server::start("", &[]);
    let project = tempfile::tempdir().unwrap();
    let mut acknowledged = Vec::new();
    let mut refused_during_kill = 0usize;
    for cycle in 0..CYCLES {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let (url, tx, path) = (
                server.url("/api/v2/projects"),
                tx.clone(),
                project.path().to_owned(),
            );
            writers.push(tokio::spawn(async move {
                let c = common::admin_client(Duration::from_secs(10));
                for i in 0.. {
                    let name = format!("c{cycle}-w{w}-{i}");
                    match c
                        .post(&url)
                        .json(&json!({"name": name, "path": path}))
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 201 => {
                            let _ = tx.send(name);
                        }
                        Ok(r) => panic!("unexpected status {}", r.status()),
                        // Killed under us: this write was never acknowledged.
                        Err(_) => return,
                    }
                }
            }));
        }
        drop(tx);
        // Kill at a random moment, 20-400 ms into the writes.
        tokio::time::sleep(Duration::from_millis(20 + random(380))).await;
        server.restart(true);
        for w in writers {
            w.await.unwrap();
        }
        let before = acknowledged.len();
        while let Some(name) = rx.recv().await {
            acknowledged.push(name);
        }
        if acknowledged.len() == before {
            refused_during_kill += 1;
        }
    }
    eprintln!(
        "{CYCLES} kill cycles, {} acknowledged writes ({refused_during_kill} cycles killed before any)",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() > CYCLES,
        "too few writes to mean anything"
    );
    let c = common::admin_client(Duration::from_secs(30));
    let list: Value = c
        .get(server.url("/api/v2/projects"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stored: std::collections::HashSet<&str> = list["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|n| !stored.contains(n.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {lost:?}",
        lost.len()
    );
    let db = server.dir.path().join("data/modelgate.db");
    let store = modelgate_control::store::SqliteStore::open(&db).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

/// Sums `modelgate_requests_total` samples of `model` by code.
async fn counts_by_code(server: &Server, model: &str) -> std::collections::BTreeMap<String, u64> {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("modelgate_requests_total{") else {
            continue;
        };
        let (labels, value) = rest.split_once("} ").unwrap();
        if !labels.contains(&format!("model=\"{model}\"")) {
            continue;
        }
        let code = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("code=\""))
            .unwrap()
            .trim_end_matches('"');
        *out.entry(code.to_owned()).or_default() += value.trim().parse::<f64>().unwrap() as u64;
    }
    out
}

/// GETs `path` under `/api/v2` as the admin.
async fn api_get(server: &Server, c: &reqwest::Client, path: &str) -> Value {
    c.get(server.url(&format!("/api/v2{path}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `/projects/{p}/models/{m}` of the (only) model declared in the configuration.
async fn declared_model(server: &Server, c: &reqwest::Client) -> String {
    let projects = api_get(server, c, "/projects").await;
    let pid = projects["projects"][0]["id"].as_i64().unwrap();
    let models = api_get(server, c, &format!("/projects/{pid}/models")).await;
    let mid = models["models"][0]["id"].as_i64().unwrap();
    format!("/projects/{pid}/models/{mid}")
}

/// (slot id, pid) of each ready replica of the declared model, through the API.
async fn replica_pids(server: &Server, c: &reqwest::Client) -> Vec<(String, i32)> {
    let model = declared_model(server, c).await;
    let replicas = api_get(server, c, &format!("{model}/replicas")).await;
    replicas["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "ready")
        .filter_map(|r| Some((r["id"].as_str()?.to_owned(), r["pid"].as_i64()? as i32)))
        .collect()
}

#[tokio::test]
async fn chaos_random_replica_kills_under_load_every_request_ends_and_metrics_agree() {
    // Three replicas, killed at random moments several times each: kills from outside are not
    // crashes, so however often they come the model never turns 503 `model.unavailable`.
    const REPLICAS: usize = 3;
    let server = Server::start(
        "request_timeout_secs = 3\nqueue_timeout_secs = 1",
        &[common::model("chaos", "slow", REPLICAS as u32)],
    );
    server.wait_ready().await;
    server
        .wait_replicas_ready(&["chaos-0", "chaos-1", "chaos-2"])
        .await;
    let admin = common::admin_client(Duration::from_secs(10));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut callers = Vec::new();
    for _ in 0..8 {
        let (c, url, key) = (
            client.clone(),
            server.url("/model"),
            common::key_for("chaos"),
        );
        callers.push(tokio::spawn(async move {
            let mut seen = std::collections::BTreeMap::<u16, u64>::new();
            let mut slowest = Duration::ZERO;
            while std::time::Instant::now() < deadline {
                let started = std::time::Instant::now();
                let r = c
                    .post(&url)
                    .json(&json!({"accessKey": key, "request": {"secs": 0.01}}))
                    .send()
                    .await
                    .expect("every request gets an answer, none hangs");
                slowest = slowest.max(started.elapsed());
                *seen.entry(r.status().as_u16()).or_default() += 1;
            }
            (seen, slowest)
        }));
    }
    // Meanwhile, SIGKILL a random replica process every 0.2-0.6 s, starting or serving.
    let mut kills = std::collections::BTreeMap::<String, usize>::new();
    while std::time::Instant::now() + Duration::from_millis(1500) < deadline {
        tokio::time::sleep(Duration::from_millis(200 + random(400))).await;
        let candidates: Vec<(String, i32)> = replica_pids(&server, &admin).await;
        if candidates.is_empty() {
            continue;
        }
        let (id, pid) = &candidates[random(candidates.len() as u64) as usize];
        if nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
        {
            *kills.entry(id.clone()).or_default() += 1;
        }
    }
    let mut client_counts = std::collections::BTreeMap::<u16, u64>::new();
    let mut slowest = Duration::ZERO;
    for c in callers {
        let (seen, slow) = c.await.unwrap();
        slowest = slowest.max(slow);
        for (status, n) in seen {
            *client_counts.entry(status).or_default() += n;
        }
    }
    eprintln!("kills {kills:?}; client saw {client_counts:?}; slowest answer {slowest:?}");
    assert!(kills.values().sum::<usize>() >= 10, "{kills:?}");
    assert!(
        kills.values().any(|&n| n >= 3),
        "a replica died more often than the crash-loop threshold: {kills:?}"
    );
    for status in client_counts.keys() {
        assert!(
            [200, 429, 502, 504].contains(status),
            "unexpected status {status}: {client_counts:?}"
        );
    }
    assert!(client_counts.get(&200).copied().unwrap_or(0) > 100);
    // Request timeout + queue timeout bound every answer (plus scheduling slack).
    assert!(slowest < Duration::from_secs(5), "{slowest:?}");
    // The server counted exactly what the clients saw.
    let code_of = |status: u16| match status {
        200 => "ok",
        429 => "model.busy",
        502 => "model.shutdown",
        504 => "model.timeout",
        _ => unreachable!(),
    };
    let mut expected = std::collections::BTreeMap::<String, u64>::new();
    for (status, n) in &client_counts {
        *expected.entry(code_of(*status).to_owned()).or_default() += n;
    }
    assert_eq!(counts_by_code(&server, "chaos").await, expected);
}

#[tokio::test]
async fn outside_kills_that_end_every_start_still_make_a_crash_loop() {
    // Kills from outside do not count towards a crash loop, except when they end every start:
    // a host OOM killer ending each import looks just like this, and callers deserve a 503
    // rather than a queue for a replica that never comes.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("slow_import.py"),
        "import time\ntime.sleep(0.4)\n\ndef f(args):\n    return 1\n",
    )
    .unwrap();
    let server = Server::start(
        "",
        &[common::model_at(
            "doomed",
            dir.path(),
            "slow_import.py",
            "f",
        )],
    );
    let mut killed = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !server
        .logs()
        .contains("crash loop: model marked unavailable")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no crash loop after {} kills:\n{}",
            killed.len(),
            server.logs()
        );
        for pid in server.children() {
            // Only serving replicas: the build (and its import check) runs first.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let serving = String::from_utf8_lossy(&cmdline).contains("serve\0--connect");
            if serving && killed.insert(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = server.logs();
    assert!(killed.len() >= 10, "{} kills:\n{logs}", killed.len());
    let restarts = logs.matches("reason=\"killed\"").count();
    assert!(restarts >= 10, "{logs}");
    assert!(!logs.contains("replica ready"), "{logs}");
}

#[tokio::test]
async fn a_replica_writing_megabytes_to_stdout_neither_blocks_nor_grows_memory() {
    let server = Server::start("", &[common::model("flood", "flood_output", 1)]);
    server.wait_ready().await;
    let pid = server.child.id();
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    for _ in 0..5 {
        let (status, body) = server
            .predict(&c, &common::key_for("flood"), json!({}))
            .await;
        assert_eq!(
            (status, body["response"].as_str()),
            (200, Some("done")),
            "{body}"
        );
    }
    let took = started.elapsed();
    // 5 calls wrote about 20 MB of output and 100,000 lines.
    let hwm: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    eprintln!("5 calls in {took:?}; modelgate peak RSS {hwm} kB");
    assert!(hwm < 100 * 1024, "peak RSS {hwm} kB");
    // The kept log is bounded and ends with the newest lines.
    let admin = common::admin_client(Duration::from_secs(10));
    let model = declared_model(&server, &admin).await;
    // The log is read as the replica writes it, not before the answer: wait for its end.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let logs = api_get(&server, &admin, &format!("{model}/replicas/flood-0/logs")).await;
        let lines = logs["lines"].as_array().unwrap();
        assert!(lines.len() <= 2000, "{} lines kept", lines.len());
        if lines
            .last()
            .is_some_and(|l| l.to_string().contains("line 19999"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the last line never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
