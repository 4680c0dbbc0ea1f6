//! `blocking-floor`: the fewest system calls an HTTP server (and a proxy in front of a replica)
//! can make per request on this machine. A thread per connection, blocking reads and writes on
//! std sockets, no event loop: a request costs two system calls, the `read` that waits for it
//! and the `write` of the answer. With `--hop`, each request's `request` also goes to one real
//! `replica-runtime` over the replica protocol with one `write` and comes back with the blocking
//! `read` that waits for the answer (4 calls in all), as `hop-floor` does with tokio.
//!
//! It is a measuring tool for one question: how small can "modelgate minus the direct replica"
//! be at concurrency 1, where a server spends its time in system calls and wake-ups rather than
//! in its own code. A thread per connection is not a design for a proxy (it costs a thread per
//! client and cannot bound a request's wait for a replica); at c=1 it is the least work.
//!
//! HTTP/1.1 with `Content-Length` bodies only, as `loadgen` sends; anything else, or a body
//! over 1 MB, closes the connection.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use clap::Parser;
use modelgate_loadtests::{start_replica, ReplicaArgs};
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

const FIXED: &[u8] = br#"{"success":true,"response":8,"replicaId":"floor-0"}"#;
const MAX_BODY: usize = 1 << 20;

#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    request: &'a serde_json::value::RawValue,
}

/// One replica connection and the bytes read from it, one request at a time: the lock is held
/// from the write to the answer.
type Replica = Arc<Mutex<(UnixStream, Vec<u8>)>>;

fn main() {
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
    for tcp in listener.incoming().flatten() {
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
            None => respond(&mut out, "200 OK", FIXED),
            Some(replica) => {
                let answer = serde_json::from_slice::<Envelope>(&buf[head_end..end])
                    .ok()
                    .and_then(|env| call(replica, env.request.get().as_bytes()).ok());
                match answer {
                    Some((kind, payload)) if Kind::from_u8(kind) == Some(Kind::ResultOk) => {
                        let mut body = Vec::with_capacity(payload.len() + 64);
                        body.extend_from_slice(br#"{"success":true,"response":"#);
                        body.extend_from_slice(&payload);
                        body.extend_from_slice(br#","replicaId":"blocking-floor-0"}"#);
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

/// One request to the replica: header and payload in one vectored write, the answer read back
/// (one `read` when it fits the buffer, as an answer to the add model does).
fn call(replica: &Replica, request: &[u8]) -> std::io::Result<(u8, Vec<u8>)> {
    let mut guard = replica.lock().expect("replica lock");
    let (sock, buf) = &mut *guard;
    let header = protocol::encode_header(Kind::Predict, request.len());
    let mut bufs = [
        std::io::IoSlice::new(&header),
        std::io::IoSlice::new(request),
    ];
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        let n = sock.write_vectored(bufs)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut bufs, n);
    }
    let mut filled = 0;
    let (kind, end) = loop {
        if filled >= protocol::HEADER_LEN {
            let h = buf[..protocol::HEADER_LEN].try_into().expect("header");
            let header = protocol::decode_header(h).map_err(std::io::Error::other)?;
            let end = protocol::HEADER_LEN + header.payload_len;
            if filled >= end {
                break (header.kind, end);
            }
            if buf.len() < end {
                buf.resize(end, 0);
            }
        }
        if buf.len() < filled + 4096 {
            buf.resize(filled + 4096, 0);
        }
        match sock.read(&mut buf[filled..])? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
    };
    // One request at a time, so the answer is the last thing in the socket.
    debug_assert_eq!(filled, end);
    Ok((kind, buf[protocol::HEADER_LEN..end].to_vec()))
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
/// `buf`: its `Content-Length`, 0 without one, `None` when that is not a number.
fn find_head(buf: &[u8]) -> Option<(usize, Option<usize>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let value = buf[..end].split(|&b| b == b'\n').find_map(|line| {
        let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
        name.eq_ignore_ascii_case(b"content-length")
            .then_some(&value[1..])
    });
    let len = match value {
        None => Some(0),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.trim().parse().ok()),
    };
    Some((end, len))
}
