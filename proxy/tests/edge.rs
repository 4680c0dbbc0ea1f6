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
