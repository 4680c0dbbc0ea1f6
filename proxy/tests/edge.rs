//! The HTTP edge against hostile framing: requests a proxy must refuse without forwarding
//! anything, and whose connection it must close (request smuggling defences), and oversized
//! heads bounded in memory. Real binary, real replica, raw TCP.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::Server;

fn counted_model(calls: &Path) -> String {
    format!(
        "[[models]]\nname = \"counted\"\npath = \"{}\"\nfile = \"funcs.py\"\nfunction = \"counted\"\naccess_key = \"{}\"\nenable_authentication = false\nenv = {{ CALLS_FILE = \"{}\" }}\n",
        common::fixtures().display(),
        common::key_for("counted"),
        calls.display()
    )
}

/// Sends `raw`, reads until the server closes (or 5 s pass); returns (answer, closed).
fn exchange(addr: &str, raw: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(raw);
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&answer).into_owned(), closed)
}

#[tokio::test]
async fn ambiguous_framing_and_oversized_heads_are_refused_and_never_forwarded() {
    let work = tempfile::tempdir().unwrap();
    let calls = work.path().join("calls");
    let server = Server::start("", &[counted_model(&calls)]);
    server.wait_ready().await;
    let addr = server.addr.clone();
    let key = common::key_for("counted");
    let body = format!(r#"{{"accessKey":"{key}","request":{{}}}}"#);
    let len = body.len();
    let chunked = format!("{len:x}\r\n{body}\r\n0\r\n\r\n");
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    // Content-Length and Transfer-Encoding together, the classic smuggling attempt: by
    // Content-Length the body holds a second request; by Transfer-Encoding (which wins, RFC 9112
    // 6.3) the body is empty and the second request would be read next on the connection.
    // hyper strips Content-Length, reads the chunked body (an empty one: 400, nothing called)
    // and closes the connection after answering, so the smuggled request is never read.
    let smuggled =
        format!("POST /model HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n{body}");
    let cl_te = format!(
        "POST /model HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
        5 + smuggled.len()
    );
    let cases: Vec<(&str, String, &[u16])> = vec![
        ("Content-Length and Transfer-Encoding", cl_te, &[400]),
        (
            "conflicting Content-Length",
            format!("POST /model HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\nContent-Length: {}\r\n\r\n{body}", len + 1),
            &[400],
        ),
        (
            "Content-Length list",
            format!("POST /model HTTP/1.1\r\nHost: x\r\nContent-Length: {len}, {}\r\n\r\n{body}", len + 1),
            &[400],
        ),
        (
            "obfuscated Transfer-Encoding",
            format!("POST /model HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n{chunked}"),
            &[400, 501],
        ),
        (
            "Transfer-Encoding not ending in chunked",
            format!("POST /model HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n{chunked}"),
            &[400, 501],
        ),
        (
            "Transfer-Encoding with a space before the colon",
            format!("POST /model HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n{chunked}"),
            &[400],
        ),
        (
            "too many headers",
            format!("POST /model HTTP/1.1\r\nHost: x\r\n{many_headers}Content-Length: {len}\r\n\r\n{body}"),
            &[431],
        ),
        (
            "one huge header",
            format!("POST /model HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nContent-Length: {len}\r\n\r\n{body}", "a".repeat(512 * 1024)),
            &[431],
        ),
        (
            "over-long request line",
            format!("POST /model?{} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n{body}", "q".repeat(512 * 1024)),
            &[414, 400, 431],
        ),
    ];
    for (name, raw, statuses) in &cases {
        let (answer, closed) = {
            let (addr, raw) = (addr.clone(), raw.clone());
            tokio::task::spawn_blocking(move || exchange(&addr, raw.as_bytes()))
                .await
                .unwrap()
        };
        let status: u16 = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!(
            statuses.contains(&status),
            "{name}: expected one of {statuses:?}, got {status}: {answer:.300}"
        );
        assert!(closed, "{name}: the connection stayed open");
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            1,
            "{name}: more than one answer: {answer:.600}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap_or_default(),
        "",
        "a refused request reached the model"
    );
    // The server is fine afterwards.
    let (status, _) = server
        .predict(&reqwest::Client::new(), &key, serde_json::json!({}))
        .await;
    assert_eq!(status, 200);
}

/// modelgate's resident memory, in kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// An HTTP/2 frame: 9-byte header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Writes `frames` (after the preface and an empty SETTINGS) until the server closes the
/// connection or `budget` bytes are sent; returns the bytes sent.
fn flood(addr: &str, opening: &[Vec<u8>], repeat: &[u8], budget: usize) -> usize {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sent = 0;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    for f in opening {
        out.extend_from_slice(f);
    }
    if s.write_all(&out).is_err() {
        return sent;
    }
    sent += out.len();
    // A reader keeps the server's frames (SETTINGS, GOAWAY) from filling the socket.
    let mut reader = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    let batch: Vec<u8> = repeat.repeat((64 * 1024 / repeat.len()).max(1));
    while sent < budget {
        if s.write_all(&batch).is_err() {
            break;
        }
        sent += batch.len();
    }
    sent
}

#[tokio::test]
async fn http2_floods_are_cut_off_with_memory_bounded_and_other_clients_served() {
    let work = tempfile::tempdir().unwrap();
    let calls = work.path().join("calls");
    let server = Server::start("body_read_timeout_secs = 2", &[counted_model(&calls)]);
    server.wait_ready().await;
    let pid = server.child.id();
    let before = rss_kb(pid);
    let addr = server.addr.clone();
    // HPACK: :method POST, :scheme http, :path /model (indexed), :authority x (literal).
    let request_head: &[u8] = &[
        0x83, 0x86, 0x44, 0x06, b'/', b'm', b'o', b'd', b'e', b'l', 0x41, 0x01, b'x',
    ];
    const BUDGET: usize = 256 * 1024 * 1024;

    // (name, frames sent once, frame repeated)
    type Flood = (&'static str, Vec<Vec<u8>>, Vec<u8>);
    let floods: Vec<Flood> = vec![
        (
            // HEADERS without END_HEADERS, then CONTINUATION frames forever.
            "CONTINUATION flood",
            vec![frame(1, 0, 1, request_head)],
            frame(9, 0, 1, &[0x40, 0x01, b'a', 0x7f, 0x7f].repeat(3000)),
        ),
        (
            // A request whose body is an endless run of empty DATA frames.
            "empty DATA flood",
            vec![frame(1, 0x4, 1, request_head)],
            frame(0, 0, 1, &[]),
        ),
        (
            // Rapid reset: open a stream and cancel it, over and over (CVE-2023-44487).
            "rapid reset",
            vec![],
            Vec::new(),
        ),
    ];
    for (name, opening, repeat) in floods {
        let addr2 = addr.clone();
        let sent = if name == "rapid reset" {
            tokio::task::spawn_blocking(move || {
                let mut s = TcpStream::connect(&addr2).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
                out.extend(frame(4, 0, 0, &[]));
                let _ = s.write_all(&out);
                let mut reader = s.try_clone().unwrap();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
                });
                let mut sent = out.len();
                for id in (1..2_000_000u32).step_by(2) {
                    let mut pair = frame(1, 0x4, id, request_head);
                    pair.extend(frame(3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
                    if s.write_all(&pair).is_err() {
                        break;
                    }
                    sent += pair.len();
                }
                sent
            })
            .await
            .unwrap()
        } else {
            tokio::task::spawn_blocking(move || flood(&addr2, &opening, &repeat, BUDGET))
                .await
                .unwrap()
        };
        let rss = rss_kb(pid);
        eprintln!("{name}: server stopped reading after {sent} bytes; RSS {before} -> {rss} kB");
        assert!(
            sent < BUDGET,
            "{name}: the server read {sent} bytes without cutting the connection"
        );
        assert!(
            rss < before + 64 * 1024,
            "{name}: RSS grew from {before} to {rss} kB"
        );
        // A well-behaved client is served meanwhile and afterwards.
        let (status, _) = server
            .predict(
                &reqwest::Client::builder()
                    .http2_prior_knowledge()
                    .build()
                    .unwrap(),
                &common::key_for("counted"),
                serde_json::json!({}),
            )
            .await;
        assert_eq!(status, 200, "{name}");
    }
}
