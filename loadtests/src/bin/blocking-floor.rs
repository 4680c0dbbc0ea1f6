//! `blocking-floor`: the fewest system calls an HTTP server (and a proxy in front of a replica)
//! can make per request with blocking sockets. A thread per connection, blocking reads and writes on
//! std sockets, no event loop: a request costs two system calls, the `read` that waits for it
//! and the `write` of the answer. With `--hop`, each request's `request` also goes to one real
//! `replica-runtime` over the replica protocol with one `write` and comes back with the blocking
//! `read` that waits for the answer (4 calls in all), as `hop-floor` does with tokio.
//!
//! It is a measuring tool for one question: how small can "modelgate minus the direct replica"
//! be at concurrency 1, where a server spends its time in system calls and wake-ups rather than
//! in its own code. A thread per connection is not a design for a proxy meant to hold thousands
//! of connections; at c=1 it makes the fewest calls that blocking sockets allow.
//!
//! HTTP/1.1 with `Content-Length` bodies only, as `loadgen` sends; a `Transfer-Encoding`, a
//! length that is not a number, or a body over 1 MB closes the connection. Any failure talking
//! to the replica ends the process rather than risk pairing answers with the wrong requests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use clap::Parser;
use modelgate_loadtests::{start_replica, success_body, Envelope, ReplicaArgs, FIXED_ANSWER};
use modelgate_protocol::{self as protocol, Kind};

#[derive(Parser)]
struct Args {
    /// Address to listen on (use 127.0.0.1).
    #[arg(long, default_value = "127.0.0.1:18902")]
    listen: String,
    /// Send each request's `request` to a replica (otherwise answer a fixed body, as `floor`).
    #[arg(long)]
    hop: bool,
    #[command(flatten)]
    replica: ReplicaArgs,
}

const MAX_BODY: usize = 1 << 20;

/// One replica connection and the buffer its answers are read into, one request at a time: the
/// lock is held from the write to the answer.
type Replica = Arc<Mutex<(UnixStream, Vec<u8>)>>;

fn main() {
    modelgate_loadtests::allocator_like_modelgate("blocking-floor");
    let args = Args::parse();
    // The replica inherits this process's CPU affinity, as modelgate's replicas do.
    // The replica ends when its socket closes, that is when this process does.
    let (_child, replica) = match args.hop {
        true => {
            let (child, stream) = start_replica(
                std::process::Command::new(&args.replica.runtime),
                &args.replica,
            );
            (
                Some(child),
                Some(Arc::new(Mutex::new((stream, Vec::new())))),
            )
        }
        false => (None, None),
    };
    let listener = TcpListener::bind(&args.listen).expect("bind");
    println!(
        "blocking-floor listening on http://{}",
        listener.local_addr().expect("addr")
    );
    for tcp in listener.incoming() {
        let tcp = match tcp {
            Ok(tcp) => tcp,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin on the CPU under test.
                eprintln!("blocking-floor: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let replica = replica.clone();
        std::thread::spawn(move || {
            let _ = connection(tcp, replica.as_ref());
        });
    }
}

/// Serves one keep-alive connection until the client closes it or sends what this tool does not
/// read.
fn connection(mut tcp: TcpStream, replica: Option<&Replica>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut filled = 0;
    let mut out = Vec::with_capacity(512);
    loop {
        // The head, then the body, both read into `buf`.
        let (head_end, body_len) = loop {
            if let Some(head) = find_head(&buf[..filled]) {
                break head;
            }
            if filled == buf.len() {
                return Ok(());
            }
            let n = tcp.read(&mut buf[filled..])?;
            if n == 0 {
                return Ok(());
            }
            filled += n;
        };
        let body_len = match body_len {
            Some(n) if n <= MAX_BODY => n,
            _ => return Ok(()),
        };
        let end = head_end + body_len;
        if buf.len() < end {
            buf.resize(end, 0);
        }
        while filled < end {
            let n = tcp.read(&mut buf[filled..])?;
            if n == 0 {
                return Ok(());
            }
            filled += n;
        }
        out.clear();
        match replica {
            None => respond(&mut out, "200 OK", FIXED_ANSWER),
            Some(replica) => {
                let answer = serde_json::from_slice::<Envelope>(&buf[head_end..end])
                    .ok()
                    .map(|env| call(replica, env.request.get().as_bytes()));
                match answer {
                    Some((kind, payload)) if Kind::from_u8(kind) == Some(Kind::ResultOk) => {
                        let body = success_body(&payload, "blocking-floor-0");
                        respond(&mut out, "200 OK", &body);
                    }
                    _ => respond(&mut out, "502 Bad Gateway", br#"{"success":false}"#),
                }
            }
        }
        tcp.write_all(&out)?;
        buf.copy_within(end..filled, 0);
        filled -= end;
    }
}

/// One request to the replica: header and payload in one vectored write, then frames read until
/// its terminal answer (one `read` when it fits the buffer, as an answer to the add model does).
/// Frames of other kinds are skipped, as the protocol asks. Any failure once the write has begun
/// ends the process: the next request would read this one's answer, and a measurement of wrongly
/// paired answers must not go on (`hop-floor` does the same).
fn call(replica: &Replica, request: &[u8]) -> (u8, Vec<u8>) {
    let mut guard = replica.lock().expect("replica lock");
    let (sock, buf) = &mut *guard;
    let fail = |what: &str, e: std::io::Error| -> ! {
        eprintln!("blocking-floor: {what} the replica failed: {e}; stopping");
        std::process::exit(1)
    };
    let header = protocol::encode_header(Kind::Predict, request.len());
    let mut bufs = [
        std::io::IoSlice::new(&header),
        std::io::IoSlice::new(request),
    ];
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        match sock.write_vectored(bufs) {
            Ok(0) => fail("writing to", std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => fail("writing to", e),
        }
    }
    // Nothing is left over between calls: the replica sends nothing unasked, and a call that
    // finds bytes after its answer stops the process.
    let mut filled = 0;
    loop {
        if filled >= protocol::HEADER_LEN {
            let h = buf[..protocol::HEADER_LEN].try_into().expect("header");
            let header = protocol::decode_header(h)
                .unwrap_or_else(|e| fail("reading from", std::io::Error::other(e)));
            let end = protocol::HEADER_LEN + header.payload_len;
            if filled >= end {
                if !matches!(
                    Kind::from_u8(header.kind),
                    Some(Kind::ResultOk | Kind::ResultErr)
                ) {
                    // Not the answer: skip the frame.
                    buf.copy_within(end..filled, 0);
                    filled -= end;
                    continue;
                }
                if filled > end {
                    fail(
                        "reading from",
                        std::io::Error::other("bytes after the answer"),
                    );
                }
                return (header.kind, buf[protocol::HEADER_LEN..end].to_vec());
            }
            if buf.len() < end {
                buf.resize(end, 0);
            }
        }
        if buf.len() < filled + 4096 {
            buf.resize(filled + 4096, 0);
        }
        match sock.read(&mut buf[filled..]) {
            Ok(0) => fail("reading from", std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => fail("reading from", e),
        }
    }
}

fn respond(out: &mut Vec<u8>, status: &str, body: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// Where the head ends (after its blank line) and its body's length, once the whole head is in
/// `buf`: its `Content-Length` (digits only), 0 without one; `None` for a length that is not a
/// number or a `Transfer-Encoding`, which this tool does not read.
fn find_head(buf: &[u8]) -> Option<(usize, Option<usize>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let mut len = Some(0);
    for line in buf[..end].split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Some((end, None));
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            len = (!value.is_empty() && value.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(value).ok()?.parse().ok())
                .flatten();
        }
    }
    Some((end, len))
}
