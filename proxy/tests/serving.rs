//! The serving path end to end: real modelgate, real replica processes, real HTTP.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{key_for, model, Server};
use serde_json::json;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

#[tokio::test]
async fn predicts_over_http1_and_h2c() {
    let server = Server::start("", &[model("add", "add", 1)]);
    server.wait_ready().await;
    let (status, body) = server
        .predict(&client(), &key_for("add"), json!({"a": 3, "b": 5}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"success": true, "response": 8, "replicaId": "add-0"})
    );

    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2
        .post(server.url("/model"))
        .json(&json!({"accessKey": key_for("add"), "request": {"a": 40, "b": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["response"], 42);
    close_h2(h2).await;
}

/// Drops an HTTP/2 client and lets its connection close while this runtime still runs: the
/// server's drain at shutdown waits for open h2 connections, and `Server`'s drop blocks.
async fn close_h2(client: reqwest::Client) {
    drop(client);
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// `modelgate serve` starts itself again, once, in the same process, with its allocator settings
/// (a larger glibc per-thread cache; heap thresholds that keep large bodies' memory), and its
/// replicas inherit them: they want the same thresholds, so they need not start again.
#[tokio::test]
async fn serve_runs_with_its_allocator_setting() {
    let server = Server::start("", &[model("add", "add", 1)]);
    server.wait_ready().await;
    // glibc may split the variable in place once it has read it, so that each setting after the
    // first shows as an entry of its own: both forms are read.
    let environ = |pid: u32| {
        let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        raw.split(|&b| b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect::<Vec<_>>()
    };
    let settings = |env: &[String]| {
        let first = env.iter().position(|v| v.starts_with("GLIBC_TUNABLES="));
        let first = first.unwrap_or_else(|| panic!("no GLIBC_TUNABLES: {env:?}"));
        let rest = env[first + 1..]
            .iter()
            .take_while(|v| v.starts_with("glibc."));
        std::iter::once(&env[first]["GLIBC_TUNABLES=".len()..])
            .chain(rest.map(String::as_str))
            .flat_map(|v| v.split(':'))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let wanted = [
        "glibc.malloc.tcache_count=64",
        "glibc.malloc.mmap_threshold=33554432",
        "glibc.malloc.trim_threshold=33554432",
    ];
    let env = environ(server.pid());
    assert!(env.iter().any(|v| v == "MODELGATE_MALLOC_SET=1"), "{env:?}");
    assert_eq!(settings(&env), wanted, "{env:?}");
    let replica = server.children()[0];
    let env = environ(replica);
    assert!(env.iter().any(|v| v == "MODELGATE_MALLOC_SET=1"), "{env:?}");
    assert_eq!(settings(&env), wanted, "{env:?}");
    assert!(
        !env.iter().any(|v| v == "MODELGATE_REPLICA_MALLOC_SET=1"),
        "the replica started again for settings it had: {env:?}"
    );
    let (status, body) = server
        .predict(
            &client(),
            &key_for("add"),
            serde_json::json!({"a": 3, "b": 5}),
        )
        .await;
    assert_eq!(
        (status, &body["response"]),
        (200, &serde_json::json!(8)),
        "{body}"
    );
}

#[tokio::test]
async fn json_values_round_trip_through_python() {
    let server = Server::start("", &[model("echo", "echo", 1)]);
    server.wait_ready().await;
    let c = client();
    // Sent as raw text so integers beyond 64 bits are not rounded by the client.
    let request = r#"{"big": 123456789012345678901234567890, "neg": -98765432109876543210, "f": 0.1, "e": 1.5e-300, "s": "héllo ✓ \"quoted\"", "t": true, "f2": false, "n": null, "nested": {"list": [1, [2, {"x": []}], {}]}}"#;
    let resp = c
        .post(server.url("/model"))
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"accessKey": "{}", "request": {request}}}"#,
            key_for("echo")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("123456789012345678901234567890"), "{text}");
    assert!(text.contains("-98765432109876543210"), "{text}");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    let expected: serde_json::Value = serde_json::from_str(request).unwrap();
    assert_eq!(body["response"], expected);
}

#[tokio::test]
async fn non_json_return_values_are_model_errors_and_the_replica_keeps_serving() {
    let server = Server::start("", &[model("nj", "not_json", 1), model("add", "add", 1)]);
    server.wait_ready().await;
    let c = client();
    for kind in ["set", "nan", "object"] {
        let (status, body) = server
            .predict(&c, &key_for("nj"), json!({"kind": kind}))
            .await;
        assert_eq!(status, 500, "{kind}: {body}");
        assert_eq!(body["success"], false);
        assert_eq!(body["error"]["code"], "model.error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not JSON-serializable"),
            "{body}"
        );
    }
    let pids = server.children();
    let (status, _) = server
        .predict(&c, &key_for("nj"), json!({"kind": "set"}))
        .await;
    assert_eq!(status, 500);
    assert_eq!(server.children(), pids, "no replica was restarted");
}

#[tokio::test]
async fn bad_envelopes_are_400_and_unknown_keys_401_without_calling_the_replica() {
    let server = Server::start("", &[model("echo", "echo", 1)]);
    server.wait_ready().await;
    let c = client();
    let key = key_for("echo");
    let cases: Vec<(String, u16, &str)> = vec![
        ("not json".into(), 400, "request.invalid"),
        (
            r#"{"request": {"marker": "m400a"}}"#.into(),
            400,
            "request.invalid",
        ),
        (
            format!(r#"{{"accessKey": "{key}"}}"#),
            400,
            "request.invalid",
        ),
        (
            format!(r#"{{"accessKey": "{key}", "request": [1, 2]}}"#),
            400,
            "request.invalid",
        ),
        (
            r#"{"accessKey": 7, "request": {"marker": "m400b"}}"#.into(),
            400,
            "request.invalid",
        ),
        (
            r#"{"accessKey": "nope-nope-nope-nope", "request": {"marker": "m401"}}"#.into(),
            401,
            "access_key.invalid",
        ),
    ];
    for (body, status, code) in &cases {
        let resp = c
            .post(server.url("/model"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), *status, "{body}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["success"], false);
        assert_eq!(v["error"]["code"], *code, "{body}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    // A valid call is logged by the replica; the rejected ones never reached it.
    let (status, _) = server.predict(&c, &key, json!({"marker": "m200"})).await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.logs().contains("called with marker m200") {
        assert!(
            Instant::now() < deadline,
            "replica output not captured:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = server.logs();
    for m in ["m400a", "m400b", "m401"] {
        assert!(
            !logs.contains(&format!("marker {m}")),
            "replica was called for {m}"
        );
    }
    assert_eq!(
        server
            .metric(r#"modelgate_requests_total{model="",replica="",code="access_key.invalid"}"#)
            .await,
        Some(1.0)
    );
}

/// Sends raw bytes and returns the status line and body of the answer.
fn raw_exchange(addr: &str, head: &str, body_chunks: Vec<Vec<u8>>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    // The server may answer (and close) before the body is all sent: write from another thread
    // and ignore the broken pipe that follows.
    let sender = std::thread::spawn(move || {
        for chunk in body_chunks {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let answer = read_answer(stream);
    let _ = sender.join();
    answer
}

/// Reads an answer to its end (by its Content-Length) and returns its status and body.
fn read_answer(mut stream: TcpStream) -> (u16, String) {
    let mut response = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                response.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&response);
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end].lines().find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    });
                    if let Some(len) = len {
                        if response.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
            }
            Err(_) => break,
        }
    }
    drop(stream);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn oversized_bodies_are_413_by_content_length_and_while_streaming() {
    let server = Server::start("max_request_bytes = 65536", &[model("echo", "echo", 1)]);
    server.wait_ready().await;
    let addr = server.addr.clone();
    let key = key_for("echo");
    tokio::task::spawn_blocking(move || {
        // Announced too large: refused from the headers alone, no body sent at all.
        let head = "POST /model HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 65537\r\n\r\n".to_string();
        let (status, body) = raw_exchange(&addr, &head, vec![]);
        assert_eq!(status, 413, "{body}");
        assert!(body.contains("request.too_large"), "{body}");

        // Chunked, no length announced: refused once the running total passes the cap.
        let head = "POST /model HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_string();
        let mut chunks = vec![];
        let prefix = format!(r#"{{"accessKey":"{key}","request":{{"pad":""#);
        chunks.push(format!("{:x}\r\n{prefix}\r\n", prefix.len()).into_bytes());
        let pad = "x".repeat(8192);
        for _ in 0..64 {
            chunks.push(format!("{:x}\r\n{pad}\r\n", pad.len()).into_bytes());
        }
        chunks.push(b"0\r\n\r\n".to_vec());
        let (status, body) = raw_exchange(&addr, &head, chunks);
        assert_eq!(status, 413, "{body}");
        assert!(body.contains("request.too_large"), "{body}");

        // Just under the cap, chunked, is accepted.
        let head = "POST /model HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_string();
        let body = format!(r#"{{"accessKey":"{key}","request":{{"pad":"{}"}}}}"#, "y".repeat(60_000));
        let chunks = body
            .as_bytes()
            .chunks(7000)
            .map(|c| [format!("{:x}\r\n", c.len()).into_bytes(), c.to_vec(), b"\r\n".to_vec()].concat())
            .chain(std::iter::once(b"0\r\n\r\n".to_vec()))
            .collect();
        let (status, body) = raw_exchange(&addr, &head, chunks);
        assert_eq!(status, 200, "{body}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn default_cap_is_5mb() {
    let server = Server::start("", &[model("echo", "echo", 1)]);
    let addr = server.addr.clone();
    tokio::task::spawn_blocking(move || {
        let head = "POST /model HTTP/1.1\r\nHost: x\r\nContent-Length: 5242881\r\n\r\n";
        let (status, body) = raw_exchange(&addr, head, vec![]);
        assert_eq!(status, 413, "{body}");
        assert!(body.contains("5242880"), "{body}");
    })
    .await
    .unwrap();
    // Just under the cap, echoed back whole (a large answer is sent without being copied, with
    // its Content-Length), over HTTP/1.1 and h2c.
    server.wait_ready().await;
    // Every 8 characters differ, so a piece sent twice, out of order or not at all shows.
    let pad: String = (0..(5 * 1024 * 1024 - 100) / 8)
        .map(|i| format!("{i:08}"))
        .collect();
    let body = json!({"accessKey": key_for("echo"), "request": {"pad": pad}}).to_string();
    assert!(body.len() <= 5 * 1024 * 1024);
    for c in [
        client(),
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap(),
    ] {
        let r = c
            .post(server.url("/model"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let announced = r.content_length();
        let text = r.text().await.unwrap();
        assert_eq!(announced, Some(text.len() as u64));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["response"]["pad"].as_str() == Some(pad.as_str()),
            "echo differs"
        );
        assert_eq!(v["replicaId"], "echo-0");
        close_h2(c).await;
    }
    // Both went into the replica's memory, not over its socket, and both answers came out of
    // it.
    assert_eq!(in_place(&server).await, 2.0);
    assert_eq!(server.metric(ANSWERS_LENT).await, Some(2.0));
}

const ANSWERS_LENT: &str = "modelgate_answers_in_place_total";

/// Large answers are copied out of the replica's memory, one lent at a time: answers to small
/// requests written together (a batch) each reach their own caller whole, whichever of them was
/// lent and whichever came over the socket.
#[tokio::test]
async fn large_answers_come_out_of_the_replicas_memory_each_to_its_own_caller() {
    let server = Server::start("", &[model("grow", "grow", 1)]);
    server.wait_ready().await;
    let c = client();
    let ask = |seq: usize, times: usize| {
        let (server, c) = (&server, &c);
        async move {
            let chunk = format!("{seq:07}|");
            let (status, body) = server
                .predict(
                    c,
                    &key_for("grow"),
                    json!({"seq": seq, "chunk": chunk, "times": times}),
                )
                .await;
            assert_eq!(status, 200, "{seq}");
            assert_eq!(body["response"]["seq"], seq);
            assert!(
                body["response"]["pad"].as_str() == Some(chunk.repeat(times).as_str()),
                "answer {seq} differs"
            );
        }
    };
    // One by one: 800 KB, then 80 bytes (over the socket), then 2.4 MB.
    ask(0, 100_000).await;
    ask(1, 10).await;
    ask(2, 300_000).await;
    assert_eq!(server.metric(ANSWERS_LENT).await, Some(2.0));
    // Twelve at once: those that queue while one runs may be written to the replica together,
    // and then only the first of them is lent (the others come over the socket while it is);
    // how many do depends on timing (a unit test in `replica.rs` and the runtime's own tests pin
    // that order down). Each must reach its own caller whole either way.
    futures_util::future::join_all((3..15).map(|seq| ask(seq, 20_000 + seq * 1_000))).await;
    let lent = server.metric(ANSWERS_LENT).await.unwrap_or(0.0);
    assert!((3.0..=14.0).contains(&lent), "{lent} lent");
}

/// Requests written into their replica's memory, whether all at once after the body or partly
/// while it arrived (`written_ahead`).
async fn in_place(server: &Server) -> f64 {
    let mut sum = 0.0;
    for result in ["written", "written_ahead"] {
        let name = format!("modelgate_requests_in_place_total{{result=\"{result}\"}}");
        sum += server.metric(&name).await.unwrap_or(0.0);
    }
    sum
}

/// A large request whose replica is idle is written into its memory while the body arrives
/// (the dispatcher then copies only the rest); several at once to one replica each reach the
/// model whole and get their own answer, whichever of them wrote ahead.
#[tokio::test]
async fn large_requests_written_while_they_arrive_each_reach_the_model_whole() {
    let server = Server::start("", &[model("echo", "echo", 1)]);
    server.wait_ready().await;
    let c = client();
    let echo = |tag: usize| {
        let pad: String = (0..2_000_000 / 8).map(|i| format!("{tag}{i:07}")).collect();
        let (server, c) = (&server, &c);
        async move {
            let (status, body) = server
                .predict(c, &key_for("echo"), json!({"pad": pad}))
                .await;
            assert_eq!(status, 200, "{tag}");
            assert!(
                body["response"]["pad"].as_str() == Some(pad.as_str()),
                "echo {tag} differs"
            );
        }
    };
    for tag in 0..3 {
        echo(tag).await;
    }
    let ahead = "modelgate_requests_in_place_total{result=\"written_ahead\"}";
    let one_by_one = server.metric(ahead).await.unwrap_or(0.0);
    assert!(one_by_one >= 1.0, "{one_by_one} of 3 written ahead");
    futures_util::future::join_all((3..9).map(echo)).await;
    assert_eq!(in_place(&server).await, 9.0);
}

/// An upload that wrote ahead into a replica's memory, overtaken there by another request, is
/// copied whole when its turn comes (what it wrote is gone).
#[tokio::test]
async fn a_request_overtaken_while_it_wrote_ahead_reaches_the_model_whole() {
    let server = Server::start("", &[model("echo", "echo", 1)]);
    server.wait_ready().await;
    let pad: String = (0..3_000_000 / 8).map(|i| format!("s{i:07}")).collect();
    let body = json!({"accessKey": key_for("echo"), "request": {"pad": pad}}).to_string();
    let head = format!(
        "POST /model HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut slow = TcpStream::connect(&server.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    slow.write_all(head.as_bytes()).unwrap();
    // All but the last 300 KB: too little to be written ahead once the upload resumes, so the
    // request goes with what it wrote before.
    let split = body.len() - 300_000;
    slow.write_all(&body.as_bytes()[..split]).unwrap();
    // Long enough for the proxy to write what arrived into the idle replica's memory.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile another large request reaches the replica first, through its memory.
    let other: String = (0..1_200_000 / 8).map(|i| format!("o{i:07}")).collect();
    let (status, answer) = server
        .predict(&client(), &key_for("echo"), json!({"pad": other}))
        .await;
    assert_eq!(status, 200);
    assert!(answer["response"]["pad"].as_str() == Some(other.as_str()));
    slow.write_all(&body.as_bytes()[split..]).unwrap();
    let (status, answer) = tokio::task::spawn_blocking(move || read_answer(slow))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert!(
        answer["response"]["pad"].as_str() == Some(pad.as_str()),
        "the overtaken request differs"
    );
    // Neither had anything of its own left in the region when it was sent.
    let written = "modelgate_requests_in_place_total{result=\"written\"}";
    assert_eq!(server.metric(written).await, Some(2.0));
}

/// Requests over 64 KB are written into the replica's in-place region, one after another over
/// the same bytes: each must be read at its own length, whatever a longer one left behind, and
/// smaller requests still go over the socket.
#[tokio::test]
async fn large_requests_of_any_size_are_read_whole_from_the_replicas_memory() {
    let server = Server::start("", &[model("echo", "echo", 1)]);
    server.wait_ready().await;
    let c = client();
    let sizes = [3_000_000, 200_000, 70_000, 1_000, 1_500_000, 65_600];
    for (round, size) in sizes.into_iter().enumerate() {
        let pad: String = (0..size / 8).map(|i| format!("{round}{i:07}")).collect();
        let (status, body) = server
            .predict(&c, &key_for("echo"), json!({"pad": pad}))
            .await;
        assert_eq!(status, 200, "{size}");
        assert!(
            body["response"]["pad"].as_str() == Some(pad.as_str()),
            "echo of {size} bytes differs"
        );
    }
    // The 1 KB request went over the socket; the other five, even the 65,600-byte one (its JSON
    // text is just over 64 KB), into the region.
    assert_eq!(in_place(&server).await, 5.0);
    assert_eq!(
        server
            .metric("modelgate_requests_in_place_total{result=\"fell_back\"}")
            .await,
        None
    );
}

/// A replica whose memory the proxy may not write (here its region is made read-only as it
/// starts, as a hardened process's could be) still gets every large request whole: the first
/// failed write sends that request over the socket, and the replica's later ones go there too.
#[tokio::test]
async fn large_requests_reach_a_replica_whose_memory_cannot_be_written() {
    let server = Server::start(
        "",
        &[common::model_at(
            "sealed",
            &common::fixtures(),
            "sealed.py",
            "predict",
        )],
    );
    server.wait_ready().await;
    let c = client();
    let key = key_for("sealed");
    let (status, body) = server.predict(&c, &key, json!({"small": 1})).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["response"]["sealed"].is_u64(),
        "the region was not sealed, so nothing is tested: {body}"
    );
    for round in 0..3 {
        let pad: String = (0..2_000_000 / 8)
            .map(|i| format!("{round}{i:07}"))
            .collect();
        let (status, body) = server.predict(&c, &key, json!({"pad": pad})).await;
        assert_eq!(status, 200, "round {round}: {body}");
        assert!(
            body["response"]["echo"]["pad"].as_str() == Some(pad.as_str()),
            "round {round}: the echo differs"
        );
    }
    // Every large request went over the socket, none into the region.
    let fell_back = "modelgate_requests_in_place_total{result=\"fell_back\"}";
    assert_eq!(server.metric(fell_back).await, Some(3.0));
    assert_eq!(in_place(&server).await, 0.0);
    assert!(server.logs().contains("its requests go over its socket"));
}

#[tokio::test]
async fn busy_model_answers_429_with_retry_after() {
    let server = Server::start(
        "queue_timeout_secs = 0.5\nmax_queue = 2",
        &[model("slow", "slow", 1)],
    );
    server.wait_ready().await;
    let c = client();
    let url = server.url("/model");
    let key = key_for("slow");
    let first = tokio::spawn({
        let (c, url, key) = (c.clone(), url.clone(), key.clone());
        async move {
            c.post(url)
                .json(&json!({"accessKey": key, "request": {"secs": 2}}))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Queue timeout: waits 0.5 s for the only replica, which is busy for 2 s.
    let started = Instant::now();
    let resp = c
        .post(&url)
        .json(&json!({"accessKey": key, "request": {"secs": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert!(resp.headers().contains_key("retry-after"));
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model.busy");
    assert_eq!(first.await.unwrap(), 200);

    // Queue full: one running, two waiting, the fourth is refused at once.
    let mut running = Vec::new();
    for secs in [1.5, 0.0, 0.0] {
        let (c, url, key) = (c.clone(), url.clone(), key.clone());
        running.push(tokio::spawn(async move {
            c.post(url)
                .json(&json!({"accessKey": key, "request": {"secs": secs}}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let resp = c
        .post(&url)
        .json(&json!({"accessKey": key, "request": {"secs": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "queue-full refusal must not wait"
    );
    let mut statuses = Vec::new();
    for r in running {
        statuses.push(r.await.unwrap());
    }
    assert_eq!(statuses[0], 200);
}

#[tokio::test]
async fn exceptions_are_500_and_the_replica_keeps_serving() {
    let server = Server::start("", &[model("boom", "boom", 1), model("add", "add", 1)]);
    server.wait_ready().await;
    let c = client();
    let pids = server.children();
    for _ in 0..3 {
        let (status, body) = server.predict(&c, &key_for("boom"), json!({"x": 42})).await;
        assert_eq!(status, 500);
        assert_eq!(body["error"]["code"], "model.error");
        assert_eq!(body["error"]["message"], "ValueError: bad input: 42");
    }
    assert_eq!(server.children(), pids, "no replica was restarted");
    let logs = server.logs();
    assert!(logs.contains("Traceback (most recent call last)"), "{logs}");
    assert!(logs.contains("replica=\"boom-0\""), "{logs}");
}

/// A replica that dies leaves nothing it forked running: its process group goes with it, also
/// without cgroups (whose removal kills what is left in them).
#[tokio::test]
async fn what_a_dead_replica_forked_goes_with_it() {
    let server = Server::start(
        "replica_limits = \"rlimit\"",
        &[model("forky", "fork_and_die", 1)],
    );
    server.wait_ready().await;
    let pidfile = server.dir.path().join("child.pid");
    let (status, body) = server
        .predict(
            &client(),
            &key_for("forky"),
            json!({"pidfile": pidfile.to_str().unwrap()}),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    let child: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Gone, or a zombie nobody has reaped yet: not still sleeping.
    let state = || {
        std::fs::read_to_string(format!("/proc/{child}/stat"))
            .ok()
            .and_then(|s| s.rsplit(") ").next().map(|r| r[..1].to_owned()))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(state().as_deref(), Some(s) if s != "Z") {
        assert!(
            Instant::now() < deadline,
            "the forked child still runs: {:?}",
            state()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn dead_replica_gives_502_then_is_replaced() {
    let server = Server::start("", &[model("die", "die", 1)]);
    server.wait_ready().await;
    let c = client();
    let (status, body) = server.predict(&c, &key_for("die"), json!({})).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "model.shutdown");
    // The replacement comes up after a short backoff; requests meanwhile wait in the queue.
    let resp = c
        .post(server.url("/model"))
        .json(&json!({"accessKey": key_for("die"), "request": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        502,
        "the replacement serves (and dies) again"
    );
    assert_eq!(
        server
            .wait_metric(
                r#"modelgate_replica_restarts_total{model="die",replica="die-0",reason="exited"}"#,
                2.0
            )
            .await,
        Some(2.0),
        "{}",
        server.logs()
    );
}

#[tokio::test]
async fn replica_death_then_working_replica() {
    // One model whose function dies only on request; the same replica slot must serve afterwards.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.py"),
        "import os\n\ndef f(args):\n    if args.get('die'):\n        os._exit(1)\n    return {'pid': os.getpid()}\n",
    )
    .unwrap();
    let table = common::model_at("m", dir.path(), "m.py", "f");
    let server = Server::start("", &[table]);
    server.wait_ready().await;
    let c = client();
    let (_, before) = server.predict(&c, &key_for("m"), json!({})).await;
    let (status, body) = server
        .predict(&c, &key_for("m"), json!({"die": true}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("model.shutdown"))
    );
    let (status, after) = server.predict(&c, &key_for("m"), json!({})).await;
    assert_eq!(status, 200, "{after}");
    assert_ne!(
        before["response"]["pid"], after["response"]["pid"],
        "a new process serves"
    );
}

#[tokio::test]
async fn import_failure_makes_the_model_unavailable() {
    let table = common::model_at("broken", &common::fixtures(), "broken_import.py", "predict");
    let server = Server::start("", &[table, model("add", "add", 1)]);
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = server.predict(&c, &key_for("broken"), json!({})).await;
        if status == 503 {
            assert_eq!(body["error"]["code"], "model.unavailable");
            break;
        }
        assert!(Instant::now() < deadline, "still {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once the healthy model is up, readiness names only the broken one.
    loop {
        let ready = reqwest::get(server.url("/readyz")).await.unwrap();
        assert_eq!(ready.status(), 503);
        let v: serde_json::Value = ready.json().await.unwrap();
        if v["not_ready"] == json!(["broken"]) {
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = server.logs();
    assert!(
        logs.contains("ModuleNotFoundError: No module named 'module_that_does_not_exist'"),
        "{logs}"
    );
    // The healthy model is unaffected.
    let (status, _) = server
        .predict(&c, &key_for("add"), json!({"a": 1, "b": 1}))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn timeout_kills_the_replica_with_504_and_a_fresh_one_serves() {
    let server = Server::start("request_timeout_secs = 1", &[model("hang", "hang", 1)]);
    server.wait_ready().await;
    let c = client();
    let pids = server.children();
    let started = Instant::now();
    let (status, body) = server.predict(&c, &key_for("hang"), json!({})).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "model.timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The killed process is gone and a new one takes its place.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| common::alive(*p)) {
        assert!(Instant::now() < deadline, "timed-out replica still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restarts =
        r#"modelgate_replica_restarts_total{model="hang",replica="hang-0",reason="timeout"}"#;
    while server.metric(restarts).await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "restart not counted as a timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.wait_ready().await;
    let now = server.children();
    assert_eq!(now.len(), 1);
    assert_ne!(now, pids, "a new replica process serves");
}

#[tokio::test]
async fn a_function_that_ignores_sigterm_is_still_killed_at_the_timeout() {
    let server = Server::start(
        "request_timeout_secs = 1",
        &[model("stubborn", "stubborn", 1)],
    );
    server.wait_ready().await;
    let pids = server.children();
    let (status, body) = server
        .predict(&client(), &key_for("stubborn"), json!({}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("model.timeout"))
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| common::alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "the replica ignoring SIGTERM is still alive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.wait_ready().await;
}

#[tokio::test]
async fn sigkill_of_a_replica_mid_request_fails_that_request_only() {
    let server = Server::start("", &[model("slow", "slow", 1), model("add", "add", 1)]);
    server.wait_ready().await;
    server.wait_replicas_ready(&["slow-0", "add-0"]).await;
    let c = client();
    let (_, first) = server
        .predict(&c, &key_for("slow"), json!({"secs": 0}))
        .await;
    let victim = first["response"]["pid"].as_i64().unwrap() as i32;
    let in_flight = server.predict_in_background(&c, &key_for("slow"), json!({"secs": 5}));
    tokio::time::sleep(Duration::from_millis(300)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("model.shutdown")),
        "{body}"
    );
    // The other model never noticed; the killed one is back within the backoff.
    let (status, _) = server
        .predict(&c, &key_for("add"), json!({"a": 1, "b": 1}))
        .await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = server
            .predict(&c, &key_for("slow"), json!({"secs": 0}))
            .await;
        if status == 200 {
            assert_ne!(body["response"]["pid"].as_i64(), Some(victim as i64));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not come back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn timeout_from_environment_and_next_request_works() {
    // MODEL_REQUEST_TIMEOUT_SECONDS overrides the file; the replica killed for the timeout is
    // replaced and the next request succeeds.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nrequest_timeout_secs = 30\n{}",
            model("slow", "slow", 1)
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap().to_owned();
    let server = {
        let log = dir.path().join("modelgate.log");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
            .args(["serve", "--config", &cfg])
            .env("MODEL_REQUEST_TIMEOUT_SECONDS", "0.7")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let addr = loop {
            line.clear();
            assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0);
            if let Some(a) = line.trim().strip_prefix("modelgate listening on http://") {
                break a.to_owned();
            }
        };
        Server {
            child,
            args: vec![],
            addr,
            dir,
            log,
        }
    };
    server.wait_ready().await;
    let c = client();
    let (status, body) = server
        .predict(&c, &key_for("slow"), json!({"secs": 5}))
        .await;
    assert_eq!(status, 504, "{body}");
    let (status, body) = server
        .predict(&c, &key_for("slow"), json!({"secs": 0, "seq": 9}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["response"]["seq"], 9);
}

#[tokio::test]
async fn fifo_order_under_contention_and_spread_over_replicas() {
    let server = Server::start("", &[model("slow", "slow", 1), model("two", "slow", 2)]);
    server.wait_ready().await;
    server.wait_replicas_ready(&["two-0", "two-1"]).await;
    let c = client();
    // One replica, requests sent 30 ms apart while it is busy: they must finish in send order.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for seq in 0..8 {
        let (c, url, key, tx) = (c.clone(), server.url("/model"), key_for("slow"), tx.clone());
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(url)
                .json(&json!({"accessKey": key, "request": {"secs": 0.1, "seq": seq}}))
                .send()
                .await
                .unwrap();
            let v: serde_json::Value = r.json().await.unwrap();
            tx.send(v["response"]["seq"].as_i64().unwrap()).unwrap();
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    drop(tx);
    for t in tasks {
        t.await.unwrap();
    }
    let mut order = Vec::new();
    while let Some(s) = rx.recv().await {
        order.push(s);
    }
    assert_eq!(order, (0..8).collect::<Vec<_>>());

    // Two replicas, two concurrent slow requests: both replicas work at once.
    let started = Instant::now();
    let two = key_for("two");
    let a = server.predict(&c, &two, json!({"secs": 0.6}));
    let b = server.predict(&c, &two, json!({"secs": 0.6}));
    let ((sa, va), (sb, vb)) = tokio::join!(a, b);
    assert_eq!((sa, sb), (200, 200));
    assert_ne!(va["replicaId"], vb["replicaId"]);
    assert!(
        started.elapsed() < Duration::from_millis(1100),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn metrics_count_what_was_sent() {
    let server = Server::start("", &[model("add", "add", 1), model("boom", "boom", 1)]);
    server.wait_ready().await;
    let c = client();
    for i in 0..7 {
        assert_eq!(
            server
                .predict(&c, &key_for("add"), json!({"a": i, "b": 1}))
                .await
                .0,
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(server.predict(&c, &key_for("boom"), json!({})).await.0, 500);
    }
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    };
    assert_eq!(
        sample(r#"modelgate_requests_total{model="add",replica="add-0",code="ok"}"#),
        7.0
    );
    assert_eq!(
        sample(r#"modelgate_requests_total{model="boom",replica="boom-0",code="model.error"}"#),
        3.0
    );
    assert_eq!(
        sample(r#"modelgate_request_duration_seconds_count{model="add"}"#),
        7.0
    );
    assert_eq!(
        sample(r#"modelgate_queue_wait_seconds_count{model="add"}"#),
        7.0
    );
    assert_eq!(
        sample(r#"modelgate_request_size_bytes_count{model="boom"}"#),
        3.0
    );
    assert_eq!(
        sample(r#"modelgate_response_size_bytes_count{model="add"}"#),
        7.0
    );
    assert_eq!(sample(r#"modelgate_queue_depth{model="add"}"#), 0.0);
    assert_eq!(
        sample(r#"modelgate_replica_busy{model="add",replica="add-0"}"#),
        0.0
    );
    assert!(sample(r#"modelgate_replica_memory_bytes{model="add",replica="add-0"}"#) > 1e6);
    assert!(sample(r#"modelgate_replica_cpu_seconds_total{model="add",replica="add-0"}"#) > 0.0);
    assert!(
        text.contains("# TYPE modelgate_request_duration_seconds histogram"),
        "{text}"
    );
}

/// Scrapes render one at a time off the runtime's threads: several at once must each get the
/// whole exposition, and predictions go on meanwhile.
#[tokio::test]
async fn scrapes_at_once_each_get_the_whole_exposition_while_predictions_go_on() {
    let server = Server::start("", &[model("add", "add", 1)]);
    server.wait_ready().await;
    let c = client();
    assert_eq!(
        server
            .predict(&c, &key_for("add"), json!({"a": 1, "b": 1}))
            .await
            .0,
        200
    );
    let scrape = || async {
        let resp = c.get(server.url("/metrics")).send().await.unwrap();
        let status = resp.status().as_u16();
        let kind = resp.headers()[reqwest::header::CONTENT_TYPE].clone();
        (status, kind, resp.text().await.unwrap())
    };
    let predictions = async {
        let mut statuses = Vec::new();
        for i in 0..20 {
            let (status, body) = server
                .predict(&c, &key_for("add"), json!({"a": i, "b": 2}))
                .await;
            assert_eq!(body["response"], json!(i + 2), "{body}");
            statuses.push(status);
        }
        statuses
    };
    let (scrapes, statuses) = tokio::join!(
        futures_util::future::join_all((0..6).map(|_| scrape())),
        predictions
    );
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    for (status, kind, text) in scrapes {
        assert_eq!(status, 200, "{text}");
        assert_eq!(kind, "text/plain; version=0.0.4; charset=utf-8");
        let ok = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"modelgate_requests_total{model="add",replica="add-0",code="ok"}"#)
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no ok count in\n{text}"));
        assert!(ok >= 1.0, "{ok}");
        assert!(
            text.contains("# TYPE modelgate_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(r#"modelgate_replica_busy{model="add",replica="add-0"}"#),
            "{text}"
        );
    }
}

/// With nobody scraping `/metrics`, memory must not grow with traffic. The Prometheus exporter's
/// histograms keep each sample until a scrape or an upkeep drains it (about 75 bytes a request
/// before upkeep ran); modelgate's histograms now count samples into their buckets as they come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_under_traffic_that_nobody_scrapes() {
    let server = Server::start("", &[model("add", "add", 1)]);
    server.wait_ready().await;
    let c = client();
    let rss_kb = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let load = |n: usize| {
        let tasks: Vec<_> = (0..16)
            .map(|t| {
                let (c, url, key) = (c.clone(), server.url("/model"), key_for("add"));
                tokio::spawn(async move {
                    for i in 0..n / 16 {
                        let resp = c
                            .post(&url)
                            .body(format!(
                                r#"{{"accessKey":"{key}","request":{{"a":{i},"b":{t}}}}}"#
                            ))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(resp.status(), 200);
                        let body: serde_json::Value = resp.json().await.unwrap();
                        assert_eq!(body["response"], json!(i + t));
                    }
                })
            })
            .collect();
        async move {
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    // Warm up: connections, buffers and the allocator's arenas reach their working size.
    load(8_000).await;
    let before = rss_kb();
    load(40_000).await;
    let after = rss_kb();
    assert!(
        after < before + 1024,
        "RSS grew from {before} kB to {after} kB over 40,000 requests with nobody scraping"
    );
    // Every sample is counted, none lost.
    assert_eq!(
        server
            .metric(r#"modelgate_request_duration_seconds_count{model="add"}"#)
            .await,
        Some(48_000.0)
    );
}

#[tokio::test]
async fn replica_output_environment_and_working_directory() {
    let server = Server::start("", &[model("chatty", "chatty", 1), model("env", "env", 1)]);
    server.wait_ready().await;
    let c = client();
    let (status, _) = server
        .predict(&c, &key_for("chatty"), json!({"text": "xyzzy-17"}))
        .await;
    assert_eq!(status, 200);
    let (status, body) = server.predict(&c, &key_for("env"), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["response"]["greeting"], "hi");
    assert_eq!(body["response"]["data"], "hello from data.txt");
    assert_eq!(body["response"]["replica"], "env-0");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = server.logs();
        let out = logs.lines().any(|l| {
            l.contains("to stdout: xyzzy-17")
                && l.contains("replica=\"chatty-0\"")
                && l.contains("stream=\"stdout\"")
        });
        let err = logs.lines().any(|l| {
            l.contains("to stderr: xyzzy-17")
                && l.contains("replica=\"chatty-0\"")
                && l.contains("stream=\"stderr\"")
        });
        if out && err {
            break;
        }
        assert!(Instant::now() < deadline, "output not captured:\n{logs}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_leaves_no_child() {
    let mut server = Server::start("shutdown_grace_secs = 10", &[model("slow", "slow", 2)]);
    server.wait_ready().await;
    let children = server.children();
    assert_eq!(children.len(), 2, "two replica processes");
    let c = client();
    let in_flight =
        server.predict_in_background(&c, &key_for("slow"), json!({"secs": 1, "seq": 5}));
    // An idle keep-alive connection, which the drain must close rather than wait for.
    let mut idle = TcpStream::connect(&server.addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let signalled = Instant::now();
    let idle_closed = tokio::task::spawn_blocking(move || {
        idle.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = [0u8; 1024];
        let closed = matches!(idle.read(&mut buf), Ok(0) | Err(_));
        (closed, signalled.elapsed())
    });
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "in-flight request finished: {body}");
    assert_eq!(body["response"]["seq"], 5);
    let (closed, after) = idle_closed.await.unwrap();
    assert!(closed, "the idle connection was closed");
    assert!(
        after < Duration::from_secs(5),
        "closed {after:?} after SIGTERM"
    );
    let status = tokio::task::spawn_blocking(move || {
        let s = server.wait_exit(Duration::from_secs(20));
        (s, server)
    })
    .await
    .unwrap();
    // Well inside shutdown_grace_secs = 10: nothing waited for the idle connections.
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "exited {:?} after SIGTERM",
        signalled.elapsed()
    );
    assert!(status.0.success(), "{:?}", status.0);
    for pid in children {
        assert!(!common::alive(pid), "replica {pid} survived shutdown");
    }
    // New connections are refused once it is gone.
    assert!(TcpStream::connect(&status.1.addr).is_err());
}

#[tokio::test]
async fn header_read_timeout_closes_slow_clients() {
    let server = Server::start("header_read_timeout_secs = 1", &[model("add", "add", 1)]);
    let addr = server.addr.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"POST /model HTTP/1.1\r\nHost: x\r\n").unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        // The server gives up on the headers and closes (possibly after a 408).
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    })
    .await
    .unwrap();
}

/// An HTTP/1.1 prediction of the add model (1 + 1), as bytes to write on a raw connection.
fn raw_add_request() -> String {
    let body = format!(
        r#"{{"accessKey":"{}","request":{{"a":1,"b":1}}}}"#,
        key_for("add")
    );
    format!(
        "POST /model HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The header-read timeout runs from each wait for a request head, not from the connection's
/// start: a keep-alive connection whose requests keep coming within it stays open for longer
/// than it, and is closed once it stays idle, or sends half a head, for that long.
#[tokio::test]
async fn header_read_timeout_runs_from_each_wait_for_a_head() {
    let server = Server::start("header_read_timeout_secs = 1", &[model("add", "add", 1)]);
    server.wait_ready().await;
    let addr = server.addr.clone();
    tokio::task::spawn_blocking(move || {
        let req = raw_add_request();
        // One request; its answer, read whole by its Content-Length.
        let call = |s: &mut TcpStream| {
            s.write_all(req.as_bytes()).unwrap();
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).unwrap();
                assert!(
                    n > 0,
                    "closed mid-answer: {}",
                    String::from_utf8_lossy(&answer)
                );
                answer.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&answer).into_owned();
                if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap();
                    if rest.len() >= len {
                        return text;
                    }
                }
            }
        };
        // Reads until the server closes; how long that took.
        let until_closed = |s: &mut TcpStream| {
            let started = Instant::now();
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return started.elapsed(),
                    Ok(_) => continue,
                }
            }
        };
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let opened = Instant::now();
        // Five requests 0.5 s apart: 2 s on one connection, with a 1 s header timeout.
        for i in 0..5 {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(500));
            }
            let answer = call(&mut s);
            assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
        }
        assert!(opened.elapsed() >= Duration::from_secs(2));
        // Then idle: closed after the timeout.
        let idle = until_closed(&mut s);
        assert!(
            idle >= Duration::from_millis(900) && idle < Duration::from_secs(5),
            "{idle:?}"
        );
        // Half a head after an answer: closed after the timeout too.
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(call(&mut s).starts_with("HTTP/1.1 200"));
        s.write_all(b"POST /model HTTP/1.1\r\nHost: x\r\n").unwrap();
        let waited = until_closed(&mut s);
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_slow_body_gets_408_and_the_connection_closes_while_others_are_served() {
    let server = Server::start("body_read_timeout_secs = 1", &[model("add", "add", 1)]);
    server.wait_ready().await;
    let addr = server.addr.clone();
    let slow = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Headers promptly, then the body a byte at a time, far too slowly.
        s.write_all(b"POST /model HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n{")
            .unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            // Keep dribbling; the server must cut us off regardless.
            let _ = s.write_all(b" ");
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        (
            started.elapsed(),
            String::from_utf8_lossy(&answer).into_owned(),
        )
    });
    // Meanwhile another client is served normally.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = server
        .predict(&client(), &key_for("add"), json!({"a": 1, "b": 2}))
        .await;
    assert_eq!((status, body["response"].clone()), (200, json!(3)));
    let (waited, answer) = slow.await.unwrap();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request.timeout"), "{answer}");
}

#[tokio::test]
async fn connections_past_the_limit_wait_until_one_closes() {
    let server = Server::start("max_connections = 2", &[model("add", "add", 1)]);
    server.wait_ready().await;
    let addr = server.addr.clone();
    tokio::task::spawn_blocking(move || {
        let request = |s: &mut TcpStream| {
            s.write_all(raw_add_request().as_bytes()).unwrap();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        // Two keep-alive connections take both slots.
        let mut a = TcpStream::connect(&addr).unwrap();
        let mut b = TcpStream::connect(&addr).unwrap();
        for s in [&mut a, &mut b] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert!(request(s).starts_with("HTTP/1.1 200"));
        }
        // A third connects (the kernel queues it) but is not served while both are open.
        let mut c = TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let waiting = request(&mut c);
        assert_eq!(waiting, "", "served past the connection limit");
        // One closes: the third is taken and answered.
        drop(a);
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        assert!(request(&mut b).starts_with("HTTP/1.1 200"));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_panic_in_a_handler_fails_that_request_only() {
    let server = Server::start("", &[model("add", "add", 1)]);
    server.wait_ready().await;
    let c = client();
    // Several connections panic, over HTTP/1.1 and h2c; each gets a JSON 500.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for c in [&c, &h2, &c] {
        let r = c.get(server.url("/__test/panic")).send().await.unwrap();
        assert_eq!(r.status(), 500);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "internal.error");
    }
    close_h2(h2).await;
    // The process is alive and serving.
    let (status, body) = server
        .predict(&c, &key_for("add"), json!({"a": 2, "b": 2}))
        .await;
    assert_eq!((status, body["response"].clone()), (200, json!(4)));
    assert!(server.logs().contains("request handler panicked"));
}

#[tokio::test]
async fn metrics_can_move_to_their_own_listener() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Server::start(
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
        &[model("add", "add", 1)],
    );
    server.wait_ready().await;
    let c = client();
    let (status, _) = server
        .predict(&c, &key_for("add"), json!({"a": 1, "b": 1}))
        .await;
    assert_eq!(status, 200);
    // The main listener no longer shows metrics...
    let r = c.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // ...the metrics listener does, with the probes, and nothing else.
    let m = format!("http://127.0.0.1:{port}");
    let text = c
        .get(format!("{m}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("modelgate_requests_total{"), "{text:.500}");
    assert_eq!(
        c.get(format!("{m}/readyz")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.get(format!("{m}/healthz")).send().await.unwrap().status(),
        200
    );
    let r = c
        .post(format!("{m}/model"))
        .json(&json!({"accessKey": key_for("add"), "request": {"a": 1, "b": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        c.get(format!("{m}/api/v2/projects"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_errors() {
    let server = Server::start("", &[model("add", "add", 1)]);
    let c = client();
    let r = c.get(server.url("/model")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "method.not_allowed");
    let r = c.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "route.not_found");
    let r = c.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn invalid_config_exits_64_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    // The port is held by this test: a config error must be reported before any bind attempt.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{addr}\"\nqueue_timeout_secs = -1\n{}",
            model("add", "add", 42)
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("queue_timeout_secs"), "{err}");
    assert!(err.contains("replicas must be between 1 and 9"), "{err}");
    assert!(!err.contains("cannot listen"), "{err}");
}

#[tokio::test]
async fn bundled_examples_serve_add_and_iris() {
    // A copy of the examples, as a newcomer has them: no model.pkl. The iris build installs
    // scikit-learn from requirements.txt and its build.sh trains the model.
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("examples");
    for sub in ["add_numbers", "iris"] {
        let from = common::examples().join(sub);
        std::fs::create_dir_all(copy.join(sub)).unwrap();
        for entry in std::fs::read_dir(&from).unwrap().flatten() {
            if entry
                .path()
                .extension()
                .is_some_and(|e| e == "py" || e == "txt" || e == "sh")
            {
                std::fs::copy(entry.path(), copy.join(sub).join(entry.file_name())).unwrap();
            }
        }
    }
    assert!(!copy.join("iris/model.pkl").exists());
    let config = "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[[models]]\nname = \"add\"\npath = \"examples/add_numbers\"\nfile = \"add_numbers.py\"\nfunction = \"add\"\n\n[[models]]\nname = \"iris\"\npath = \"examples/iris\"\nfile = \"predict.py\"\nfunction = \"predict\"\nreplicas = 2\n";
    std::fs::write(work.path().join("modelgate.toml"), config).unwrap();
    let cfg = work.path().join("modelgate.toml");
    // Keys are generated and printed at start-up.
    let log = work.path().join("log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut keys = std::collections::HashMap::new();
    let addr = loop {
        let mut line = String::new();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
            "modelgate exited"
        );
        if let Some(a) = line.trim().strip_prefix("modelgate listening on http://") {
            break a.to_owned();
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() > 4 && words[0] == "model" && words[3] == "key" {
            keys.insert(
                words[1].trim_matches(|c| c == '"' || c == ':').to_owned(),
                words[4].to_owned(),
            );
        }
    };
    let server = Server {
        child,
        args: vec![],
        addr,
        dir: work,
        log,
    };
    server.wait_ready().await;
    assert_eq!(keys.len(), 2);
    for key in keys.values() {
        assert!(key.len() >= 32 && key.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
    assert_ne!(keys["add"], keys["iris"]);
    // The first start created an admin and handed its API key over in a private file, and
    // nowhere else: not on stdout, not in the log.
    let key_file = server.dir.path().join("data/admin-api-key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let admin = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(admin.starts_with("mgk_"), "not an API key");
    assert!(
        !server.logs().contains(&admin),
        "the admin key is in the log"
    );
    let call = |key: &str, api_key: Option<&str>, request: serde_json::Value| {
        let mut req = client()
            .post(server.url("/model"))
            .json(&json!({"accessKey": key, "request": request}));
        if let Some(k) = api_key {
            req = req.bearer_auth(k);
        }
        async move {
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    // Declared models have authentication on by default.
    let (status, body) = call(&keys["add"], None, json!({"a": 3, "b": 5})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("auth.unauthorized"))
    );
    let (status, body) = call(&keys["add"], Some(&admin), json!({"a": 3, "b": 5})).await;
    assert_eq!((status, body["response"].clone()), (200, json!(8)));
    let (status, body) = call(&keys["iris"], Some(&admin), json!({"petal_length": 4.0})).await;
    assert_eq!(status, 200, "{body}");
    let width = body["response"]["petal_width"].as_f64().unwrap();
    assert!(
        (1.0..1.6).contains(&width),
        "petal width {width} for length 4.0"
    );
    // Declared models are ordinary projects, models, builds and deployments.
    let api = |path: &str| {
        client()
            .get(server.url(&format!("/api/v2{path}")))
            .bearer_auth(&admin)
            .send()
    };
    assert_eq!(
        reqwest::get(server.url("/api/v2/projects"))
            .await
            .unwrap()
            .status(),
        401
    );
    let projects: serde_json::Value = api("/projects").await.unwrap().json().await.unwrap();
    let iris = projects["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "iris")
        .expect("iris project");
    let pid = iris["id"].as_i64().unwrap();
    let models: serde_json::Value = api(&format!("/projects/{pid}/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mid = models["models"][0]["id"].as_i64().unwrap();
    let builds: serde_json::Value = api(&format!("/projects/{pid}/models/{mid}/builds"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(builds["builds"][0]["status"], "built");
    let bid = builds["builds"][0]["id"].as_i64().unwrap();
    let log = api(&format!("/projects/{pid}/models/{mid}/builds/{bid}/log"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        log.contains("running build.sh") && log.contains("wrote model.pkl"),
        "{log}"
    );
    assert!(log.contains("dependency cache"), "{log}");
    let replicas: serde_json::Value = api(&format!("/projects/{pid}/models/{mid}/replicas"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let statuses: Vec<&str> = replicas["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["ready", "ready"], "{replicas}");
}

#[tokio::test]
async fn crash_loop_backs_off_and_marks_the_model_unavailable() {
    let table = common::model_at("loop", &common::fixtures(), "crashloop.py", "predict");
    let server = Server::start("queue_timeout_secs = 30", &[table]);
    // The replica keeps dying soon after it is ready, over and over...
    let restarts = server
        .wait_metric(
            r#"modelgate_replica_restarts_total{model="loop",replica="loop-0",reason="exited"}"#,
            3.0,
        )
        .await
        .unwrap_or_else(|| panic!("no restarts counted:\n{}", server.logs()));
    assert!(restarts >= 3.0, "{restarts}");
    // ...so the model is reported unavailable instead of queueing callers.
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = server.predict(&c, &key_for("loop"), json!({})).await;
        if status == 503 {
            assert_eq!(body["error"]["code"], "model.unavailable");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never marked unavailable: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The delays between restarts grow instead of spinning.
    let delays: Vec<f64> = server
        .logs()
        .lines()
        .filter_map(|l| l.split("replica restarting in ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|d| {
            d.strip_suffix("ms")
                .and_then(|v| v.parse::<f64>().ok())
                .or_else(|| {
                    d.strip_suffix('s')
                        .and_then(|v| v.parse::<f64>().ok().map(|s| s * 1e3))
                })
        })
        .collect();
    assert!(delays.len() >= 3, "{delays:?}");
    assert!(delays.windows(2).all(|w| w[1] > w[0]), "{delays:?}");
}

/// Voluntary context switches of a process so far (its main thread: the replica's only one).
fn voluntary_switches(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("voluntary_ctxt_switches in /proc/<pid>/status")
}

/// Only input wakes a replica waiting for its next request. Linux also wakes a Unix socket's
/// reader when the peer reads and frees buffer space, so a replica blocked in `recv` was woken
/// for nothing each time the proxy read its answer: two sleeps per request instead of one.
#[tokio::test]
async fn a_waiting_replica_sleeps_once_per_request() {
    let server = Server::start("", &[model("add", "add", 1)]);
    server.wait_ready().await;
    let c = client();
    let replica = server.children();
    assert_eq!(replica.len(), 1, "one replica process");
    for _ in 0..20 {
        let (status, body) = server
            .predict(&c, &key_for("add"), json!({"a": 1, "b": 2}))
            .await;
        assert_eq!(status, 200, "{body}\n{}", server.logs());
    }
    let before = voluntary_switches(replica[0]);
    const N: u64 = 300;
    for i in 0..N {
        let (status, body) = server
            .predict(&c, &key_for("add"), json!({"a": i, "b": 1}))
            .await;
        assert_eq!(
            (status, body["response"].as_u64()),
            (200, Some(i + 1)),
            "{body}"
        );
    }
    let per_request = (voluntary_switches(replica[0]) - before) as f64 / N as f64;
    // About 1: the replica sleeps once, waiting for the next request (a little less when the
    // next one is already there). Two would mean it is woken by the proxy's reads.
    assert!(
        (0.2..1.5).contains(&per_request),
        "the replica slept {per_request:.2} times per request"
    );
}

/// A model for the batching tests: `hold` (a path) first writes `<hold>.started` and waits until
/// the file `hold` exists; `wait` sleeps; `die` ends the process, `oom` raises `MemoryError`,
/// `hang` never returns. Every call that returns appends `<seq> <pid>` to `calls` (path baked
/// in).
fn batching_model(dir: &std::path::Path, calls: &std::path::Path) -> String {
    std::fs::write(
        dir.join("m.py"),
        format!(
            "import os, time\n\n\
             def f(args):\n    \
                 hold = args.get('hold')\n    \
                 if hold:\n        open(hold + '.started', 'w').close()\n        \
                     while not os.path.exists(hold):\n            time.sleep(0.005)\n    \
                 time.sleep(args.get('wait', 0))\n    \
                 if args.get('die'):\n        os._exit(1)\n    \
                 if args.get('oom'):\n        raise MemoryError('pretend')\n    \
                 while args.get('hang'):\n        time.sleep(1)\n    \
                 with open({calls:?}, 'a') as out:\n        out.write(f\"{{args.get('seq')}} {{os.getpid()}}\\n\")\n    \
                 return {{'seq': args.get('seq'), 'sum': args.get('a', 0) + args.get('b', 0), 'pid': os.getpid()}}\n"
        ),
    )
    .unwrap();
    common::model_at("m", dir, "m.py", "f")
}

/// The `seq` of every call model `m` ran, in the order it ran them.
fn calls_run(calls: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(calls)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

/// Queues requests behind one that holds model `m`'s only replica, in a known order: the first
/// request of `requests` gets `"hold"`, and once it runs each of the rest is sent only after
/// the queue has taken the one before. Then the hold is released and the answers are returned,
/// in the order sent.
async fn behind_a_held_call(
    server: &Server,
    mut requests: Vec<serde_json::Value>,
) -> Vec<(u16, serde_json::Value)> {
    let hold = server.dir.path().join("release");
    requests[0]["hold"] = json!(hold.to_str().unwrap());
    let send = |request: serde_json::Value| {
        let (c, url, key) = (client(), server.url("/model"), key_for("m"));
        tokio::spawn(async move {
            let r = c
                .post(url)
                .bearer_auth(common::admin_key())
                .json(&json!({"accessKey": key, "request": request}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json().await.unwrap())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tasks = Vec::new();
    for (i, request) in requests.into_iter().enumerate() {
        tasks.push(send(request));
        loop {
            let there = if i == 0 {
                hold.with_extension("started").exists()
            } else {
                server.metric(r#"modelgate_queue_depth{model="m"}"#).await == Some(i as f64)
            };
            if there {
                break;
            }
            assert!(Instant::now() < deadline, "request {i} never queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    std::fs::write(&hold, "").unwrap();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// `modelgate_dispatch_batch_size` of model `m`: (batches of more than 8, batches in all).
async fn large_batches(server: &Server) -> (f64, f64) {
    let bucket =
        |le: &str| format!(r#"modelgate_dispatch_batch_size_bucket{{model="m",le="{le}"}}"#);
    let all = server.metric(&bucket("+Inf")).await.unwrap();
    (all - server.metric(&bucket("8")).await.unwrap(), all)
}

/// Checks a batch whose second request ended its replica (after the held first one): the first
/// answered, the second alone failed with `status` and `code`, every later one was put back and
/// answered by the replacement, and the model ran `ran`, in that order.
async fn only_the_fatal_one_failed(
    server: &Server,
    calls: &std::path::Path,
    answers: &[(u16, serde_json::Value)],
    (status, code): (u16, &str),
    ran: &[&str],
) {
    assert_eq!(answers[0].0, 200, "{}", answers[0].1);
    assert_eq!(
        (answers[1].0, answers[1].1["error"]["code"].as_str()),
        (status, Some(code))
    );
    for (status, body) in &answers[2..] {
        assert_eq!(*status, 200, "{body}");
        assert_ne!(
            body["response"]["pid"], answers[0].1["response"]["pid"],
            "ran on the replacement"
        );
    }
    assert_eq!(calls_run(calls), ran, "each ran once, in order");
    assert_eq!(
        server
            .metric(r#"modelgate_requests_requeued_total{model="m"}"#)
            .await,
        Some((answers.len() - 2) as f64),
        "{}",
        server.logs()
    );
}

/// Server settings under which the requests queued behind a held call go out as one batch (up
/// to 16): the held call is slow, and the default budget would send them one at a time.
const BATCH_ALL: &str = "batch_budget_us = 1000000000";

/// One worker thread runs tokio's current-thread scheduler (the multi-thread one otherwise):
/// concurrent predictions all get their own answers, and waiting ones go to the replica together.
/// The budget is lifted: on a busy CI machine a debug replica's recent time per request can pass
/// the default 250 µs, which sends every request alone by design.
#[tokio::test]
async fn one_worker_thread_runs_the_current_thread_runtime_and_batches() {
    let server = Server::start(
        &format!("worker_threads = 1\n{BATCH_ALL}"),
        &[model("add", "add", 1)],
    );
    server.wait_ready().await;
    assert!(
        server.logs().contains("runtime: current-thread"),
        "{}",
        server.logs()
    );
    let c = client();
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let (c, url, key) = (c.clone(), server.url("/model"), key_for("add"));
            tokio::spawn(async move {
                for i in 0..50 {
                    let body = c
                        .post(&url)
                        .json(&json!({"accessKey": key, "request": {"a": t, "b": i}}))
                        .send()
                        .await
                        .unwrap()
                        .json::<serde_json::Value>()
                        .await
                        .unwrap();
                    assert_eq!(body["response"], t + i, "{body}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let label = r#"{model="add"}"#;
    let count = server
        .metric(&format!("modelgate_dispatch_batch_size_count{label}"))
        .await
        .unwrap();
    let sum = server
        .metric(&format!("modelgate_dispatch_batch_size_sum{label}"))
        .await
        .unwrap();
    assert_eq!(sum, 800.0);
    assert!(count < sum, "{count} batches for {sum} requests");
}

#[tokio::test]
async fn waiting_requests_are_written_together_and_run_in_arrival_order_each_answer_to_its_caller()
{
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let server = Server::start(BATCH_ALL, &[batching_model(dir.path(), &calls)]);
    server.wait_ready().await;
    let mut requests = vec![json!({"seq": 0})];
    requests.extend((1..=32).map(|i| json!({"seq": i, "a": i, "b": 1000})));
    let answers = behind_a_held_call(&server, requests).await;
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(
            body["response"]["seq"], i,
            "each answer reaches its own caller"
        );
        if i > 0 {
            assert_eq!(body["response"]["sum"], i + 1000);
        }
    }
    let expected: Vec<String> = (0..=32).map(|i| i.to_string()).collect();
    assert_eq!(
        calls_run(&calls),
        expected,
        "run once each, in arrival order"
    );
    // The 32 waiting requests went out as two batches of 16 (the held call alone).
    assert_eq!(
        large_batches(&server).await,
        (2.0, 3.0),
        "{}",
        server.logs()
    );
}

#[tokio::test]
async fn a_request_that_kills_its_replica_in_a_batch_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let server = Server::start(BATCH_ALL, &[batching_model(dir.path(), &calls)]);
    server.wait_ready().await;
    // [1, 2, 3, 4] go out together and 2 ends the process. The replica held 1's answer (3 was
    // already there to start), so the proxy cannot tell 1 from 2: all four go back, each to run
    // alone on the replacement, where 2 ends a process again and is the only one to fail.
    let mut requests = vec![json!({"seq": 0}), json!({"seq": 1})];
    requests.push(json!({"seq": 2, "die": true}));
    requests.extend((3..=4).map(|i| json!({ "seq": i })));
    let answers = behind_a_held_call(&server, requests).await;
    for (i, (status, body)) in answers.iter().enumerate() {
        if i == 2 {
            assert_eq!(
                (*status, body["error"]["code"].as_str()),
                (502, Some("model.shutdown")),
                "{body}"
            );
        } else {
            assert_eq!(*status, 200, "{body}");
            assert_eq!(body["response"]["seq"], i, "its own answer");
        }
    }
    // 1 ran again unless the replica's flusher sent its answer (held over 2 ms) before 2 ended
    // the process; then only the three after it went back.
    let ran = calls_run(&calls);
    let held = ran == ["0", "1", "1", "3", "4"];
    assert!(held || ran == ["0", "1", "3", "4"], "{ran:?}");
    let back = if held { 4.0 } else { 3.0 };
    assert_eq!(
        server
            .metric(r#"modelgate_requests_requeued_total{model="m"}"#)
            .await,
        Some(back),
        "those of the batch, once: alone, 2 failed instead"
    );
    let bucket =
        |le: &str| format!(r#"modelgate_dispatch_batch_size_bucket{{model="m",le="{le}"}}"#);
    let all = server.metric(&bucket("+Inf")).await.unwrap();
    let single = server.metric(&bucket("1")).await.unwrap();
    assert_eq!(
        (all, single),
        (2.0 + back, 1.0 + back),
        "the held call, the four together, then each put back alone: {}",
        server.logs()
    );
    // Two processes ended for one request: the crash-loop count (3) takes it for one fault.
    let logs = server.logs();
    assert!(logs.contains("failures=1"), "{logs}");
    assert!(!logs.contains("failures=2"), "{logs}");
}

#[tokio::test]
async fn a_request_that_times_out_in_a_batch_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let server = Server::start(
        &format!("{BATCH_ALL}\nrequest_timeout_secs = 5"),
        &[batching_model(dir.path(), &calls)],
    );
    server.wait_ready().await;
    // The second call hangs: it alone gets 504, after its own 5 s. The two written behind it
    // run on the replacement, together, taking 5.2 s in all: each request's timeout counts from
    // the answer before it, not from the batch's write.
    let requests = vec![
        json!({"seq": 0}),
        json!({"seq": 1, "hang": true}),
        json!({"seq": 2, "wait": 2.6}),
        json!({"seq": 3, "wait": 2.6}),
    ];
    let answers = behind_a_held_call(&server, requests).await;
    only_the_fatal_one_failed(
        &server,
        &calls,
        &answers,
        (504, "model.timeout"),
        &["0", "2", "3"],
    )
    .await;
    let bucket =
        |le: &str| format!(r#"modelgate_dispatch_batch_size_bucket{{model="m",le="{le}"}}"#);
    let pairs =
        server.metric(&bucket("2")).await.unwrap() - server.metric(&bucket("1")).await.unwrap();
    assert_eq!(pairs, 1.0, "the two put back went out together");
}

#[tokio::test]
async fn requests_written_behind_an_out_of_memory_answer_run_on_the_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let server = Server::start(BATCH_ALL, &[batching_model(dir.path(), &calls)]);
    server.wait_ready().await;
    // A replica that answered out of memory is replaced, and it must not run what was written
    // behind that request: the replacement does, once each.
    let requests = vec![
        json!({"seq": 0}),
        json!({"seq": 1, "oom": true}),
        json!({"seq": 2}),
        json!({"seq": 3}),
    ];
    let answers = behind_a_held_call(&server, requests).await;
    only_the_fatal_one_failed(
        &server,
        &calls,
        &answers,
        (500, "model.out_of_memory"),
        &["0", "2", "3"],
    )
    .await;
}
