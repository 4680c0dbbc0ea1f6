//! `hop-floor`: the least a proxy in front of a replica can do — a bare hyper server that takes
//! `request` out of each `/model` envelope, sends it to one real `replica-runtime` over the
//! replica protocol, and wraps the answer. No routing, authentication, limits, timeouts, metrics,
//! supervision or error handling beyond a 502. It measures what HTTP plus one hop to a separate
//! Python process costs on this machine, which is the floor for modelgate's design (one process
//! per replica); `floor` measures HTTP alone.
//!
//! `--pipeline 1` (the default) sends one request at a time, as modelgate did before it wrote
//! waiting requests together: a request holds the connection (a FIFO-fair lock) from its write to
//! its answer. `--pipeline N` lets up to N requests be written ahead of their answers, each in its
//! own write, which a reader task hands back in order.
//!
//! `--batch N` is the floor for modelgate as it is now: one dispatcher task takes every request
//! already waiting (up to N, after one yield so that connections woken together all queue), writes
//! them in one write and reads all their answers before the next batch. No budget, no fairness
//! between replicas (there is one), no timeouts.
//!
//! `--stream` is the floor for large bodies: no parse and no gathering copy. Each frame of the
//! body goes to the replica as it arrives, trusting the envelope to be loadgen's
//! `{"accessKey":"...","request":...}`: the request runs from after `"request":` to the body's
//! last byte, which must be `}`. The replica is held from the first frame to the answer.
//! The frames up to `"request":` are copied (to find it); the rest are sent as they came.
//! `--stream --whole` receives the whole body first (the frames after the first kept as they
//! came, not copied together) and only then takes the replica and writes the request in one
//! vectored write: the floor for a proxy that, like modelgate, never lets a slow client hold a
//! replica.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use modelgate_loadtests::{start_replica, success_body, Envelope, ReplicaArgs};
use modelgate_protocol::{self as protocol, Kind};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, Semaphore};

/// A bare hyper server in front of one real replica: the floor of modelgate's design.
#[derive(Parser)]
struct Args {
    /// Address to listen on (use 127.0.0.1).
    #[arg(long, default_value = "127.0.0.1:18901")]
    listen: String,
    #[command(flatten)]
    replica: ReplicaArgs,
    /// Requests written ahead of their answers (1: one at a time).
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Forward each body frame as it arrives, unparsed (one request at a time).
    #[arg(long, conflicts_with = "pipeline")]
    stream: bool,
    /// With --stream: receive the whole body before taking the replica, then forward its frames.
    #[arg(long, requires = "stream")]
    whole: bool,
    /// Write the requests already waiting (up to N) in one write, then read all their answers
    /// (0: off).
    #[arg(long, default_value_t = 0, conflicts_with_all = ["pipeline", "stream"])]
    batch: usize,
}

/// The replica connection: registered for input only, as modelgate registers its replica
/// sockets, so the replica reading a request does not wake this process. A request that does not
/// fit the socket buffer waits for room through a duplicate descriptor registered for output
/// until the request is written (`Room`); modelgate keeps one duplicate per connection and
/// registers it while one write lasts, which for modelgate is the whole request.
struct Conn {
    fd: AsyncFd<UnixStream>,
}

impl Conn {
    async fn write_frame(&self, body: &[u8]) -> std::io::Result<()> {
        let header = protocol::encode_header(Kind::Predict, body.len());
        self.write_all(&[&header, body], &mut None).await
    }

    /// Writes `pieces` in order with vectored writes, waiting for space through `room`, which is
    /// registered on first need and kept for the caller's next writes of the same request.
    async fn write_all(&self, pieces: &[&[u8]], room: &mut Room) -> std::io::Result<()> {
        let mut slices: Vec<std::io::IoSlice> =
            pieces.iter().map(|p| std::io::IoSlice::new(p)).collect();
        let mut bufs = &mut slices[..];
        // Drops leading empty pieces, so that nothing left means everything written.
        std::io::IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            // At most IOV_MAX (1,024 on Linux) slices a call.
            match self
                .fd
                .get_ref()
                .write_vectored(&bufs[..bufs.len().min(1024)])
            {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if room.is_none() {
                        let dup = self.fd.get_ref().try_clone()?;
                        #[allow(deprecated)] // a UnixStream owns one descriptor for its life
                        let fd = AsyncFd::with_interest(dup, Interest::WRITABLE)?;
                        *room = Some(fd);
                    }
                    let fd = room.as_ref().expect("registered");
                    fd.writable().await?.clear_ready();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads one frame. `st` keeps the bytes of the frames after it; its buffer only grows, so
    /// a large payload is read in place and zero-filled once. A read that leaves the socket
    /// empty does not clear tokio's readiness, so the next frame's first read is tried before
    /// any wait: like modelgate's `Speculation` when it is on, always.
    async fn read_frame(&self, st: &mut ReadState) -> std::io::Result<Frame> {
        loop {
            if st.filled >= protocol::HEADER_LEN {
                let h: [u8; protocol::HEADER_LEN] =
                    st.buf[..protocol::HEADER_LEN].try_into().expect("header");
                let header = protocol::decode_header(h).map_err(std::io::Error::other)?;
                let end = protocol::HEADER_LEN + header.payload_len;
                if st.filled >= end {
                    let payload = st.buf[protocol::HEADER_LEN..end].to_vec();
                    st.buf.copy_within(end..st.filled, 0);
                    st.filled -= end;
                    return Ok((header.kind, payload));
                }
                if st.buf.len() < end {
                    st.buf.resize(end, 0);
                }
            }
            if st.buf.len() - st.filled < 8192 {
                st.buf.resize(st.filled + 8192, 0);
            }
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| fd.get_ref().read(&mut st.buf[st.filled..])) {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(Ok(n)) => st.filled += n,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }
}

/// A duplicate of the replica socket registered for output, while one request is written.
type Room = Option<AsyncFd<UnixStream>>;

/// Bytes read from the replica: `buf[..filled]`.
#[derive(Default)]
struct ReadState {
    buf: Vec<u8>,
    filled: usize,
}

/// Armed while a request is between its write and its answer: dropping it there (the client
/// went away) would leave an answer in the socket for the next request, so the process ends
/// instead of measuring wrong pairs.
struct InStep;

impl Drop for InStep {
    fn drop(&mut self) {
        eprintln!("hop-floor: a call was dropped between its write and its answer; stopping");
        std::process::exit(1);
    }
}

/// A frame's kind and payload.
type Frame = (u8, Vec<u8>);

enum Dispatch {
    /// One request at a time: the lock is held from the write to the answer.
    OneByOne(tokio::sync::Mutex<(Conn, ReadState)>),
    /// Up to N written ahead; the reader task answers them in order.
    Pipelined {
        conn: Arc<Conn>,
        slots: Semaphore,
        /// Held for a whole write, so frames do not interleave.
        writer: tokio::sync::Mutex<()>,
        waiting: Mutex<VecDeque<oneshot::Sender<Frame>>>,
    },
    /// `--batch`: a dispatcher task takes what is queued and writes it in one go.
    Batched(tokio::sync::mpsc::UnboundedSender<(Vec<u8>, oneshot::Sender<Frame>)>),
}

async fn call(d: &Dispatch, request: &[u8]) -> Option<Frame> {
    match d {
        Dispatch::OneByOne(lock) => {
            let mut held = lock.lock().await;
            let (conn, st) = &mut *held;
            let in_step = InStep;
            if conn.write_frame(request).await.is_err() {
                eprintln!("hop-floor: writing to the replica failed");
                std::process::exit(1);
            }
            let frame = conn.read_frame(st).await;
            std::mem::forget(in_step);
            frame.ok()
        }
        Dispatch::Pipelined {
            conn,
            slots,
            writer,
            waiting,
        } => {
            let _slot = slots.acquire().await.ok()?;
            let (tx, rx) = oneshot::channel();
            {
                // Queued and written under the writer lock, so answers come back in queue order.
                let _writing = writer.lock().await;
                waiting.lock().expect("queue").push_back(tx);
                // Queued but not (wholly) written if dropped here: later answers would shift.
                let in_step = InStep;
                if conn.write_frame(request).await.is_err() {
                    eprintln!("hop-floor: writing to the replica failed");
                    std::process::exit(1);
                }
                std::mem::forget(in_step);
            }
            rx.await.ok()
        }
        Dispatch::Batched(q) => {
            let (tx, rx) = oneshot::channel();
            q.send((request.to_vec(), tx)).ok()?;
            rx.await.ok()
        }
    }
}

/// `--batch`: the dispatcher. Requests are copied into one buffer with their headers.
async fn batcher(
    conn: Conn,
    mut q: tokio::sync::mpsc::UnboundedReceiver<(Vec<u8>, oneshot::Sender<Frame>)>,
    most: usize,
) {
    let mut st = ReadState::default();
    let mut out = Vec::new();
    let mut waiting = Vec::new();
    while let Some(first) = q.recv().await {
        waiting.push(first);
        // Let the connections that are ready queue their requests first.
        tokio::task::yield_now().await;
        while waiting.len() < most {
            match q.try_recv() {
                Ok(next) => waiting.push(next),
                Err(_) => break,
            }
        }
        out.clear();
        for (req, _) in &waiting {
            out.extend_from_slice(&protocol::encode_header(Kind::Predict, req.len()));
            out.extend_from_slice(req);
        }
        if conn.write_all(&[&out], &mut None).await.is_err() {
            eprintln!("hop-floor: writing to the replica failed");
            std::process::exit(1);
        }
        for (_, tx) in waiting.drain(..) {
            let Ok(frame) = conn.read_frame(&mut st).await else {
                eprintln!("hop-floor: the replica went away");
                std::process::exit(1);
            };
            let _ = tx.send(frame);
        }
    }
}

/// `--stream`: sends the request to the replica frame by frame as the body arrives (see the
/// module docs for the envelope it trusts), then reads the answer. `whole`: only once the body
/// has arrived.
async fn stream(d: &Dispatch, whole: bool, req: Request<Incoming>) -> Option<Frame> {
    const MARK: &[u8] = br#""request":"#;
    let Dispatch::OneByOne(lock) = d else {
        unreachable!("--stream sends one request at a time")
    };
    let total: usize = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    let mut body = req.into_body();
    let mut head = Vec::new();
    let start = loop {
        // Only where the mark could end in the bytes that came last.
        let from = head.len().saturating_sub(MARK.len() - 1);
        let frame = body.frame().await?.ok()?.into_data().ok()?;
        head.extend_from_slice(&frame);
        if let Some(at) = head[from..].windows(MARK.len()).position(|w| w == MARK) {
            break from + at + MARK.len();
        }
    };
    // The request's bytes: from `start` up to the closing `}` of the envelope.
    let len = total.checked_sub(start + 1)?;
    let mut received = Vec::new();
    if whole {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.ok()?.into_data() {
                received.push(data);
            }
        }
    }
    let mut held = lock.lock().await;
    let (conn, st) = &mut *held;
    let in_step = InStep;
    let mut sent = head.len() - start;
    let mut last = head.last().copied();
    let fail = |e: std::io::Error| {
        eprintln!("hop-floor: writing to the replica failed: {e}");
        std::process::exit(1)
    };
    let header = protocol::encode_header(Kind::Predict, len);
    let first = &head[start..start + sent.min(len)];
    let mut room = None;
    if whole {
        // One vectored write of the whole request, as modelgate writes it.
        let mut pieces: Vec<&[u8]> = vec![&header, first];
        for data in &received {
            pieces.push(&data[..data.len().min(len.saturating_sub(sent))]);
            sent += data.len();
            last = data.last().copied().or(last);
        }
        conn.write_all(&pieces, &mut room)
            .await
            .unwrap_or_else(fail);
    } else {
        conn.write_all(&[&header, first], &mut room)
            .await
            .unwrap_or_else(fail);
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map(|f| f.into_data()) else {
                eprintln!("hop-floor: the body ended early; stopping");
                std::process::exit(1);
            };
            let Ok(data) = data else { continue };
            let upto = data.len().min(len.saturating_sub(sent));
            conn.write_all(&[&data[..upto]], &mut room)
                .await
                .unwrap_or_else(fail);
            sent += data.len();
            last = data.last().copied().or(last);
        }
    }
    if sent != len + 1 || last != Some(b'}') {
        eprintln!("hop-floor: the body was not {total} bytes ending in `}}`; stopping");
        std::process::exit(1);
    }
    // Registered for output no longer: the replica reading the rest must not wake this process.
    drop(room);
    let frame = conn.read_frame(st).await;
    std::mem::forget(in_step);
    frame.ok()
}

async fn answer(
    d: Arc<Dispatch>,
    streaming: Option<bool>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = if let Some(whole) = streaming {
        stream(&d, whole, req).await
    } else {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        match serde_json::from_slice::<Envelope>(&body) {
            Ok(env) => call(&d, env.request.get().as_bytes()).await,
            Err(_) => None,
        }
    };
    let resp = match reply {
        Some((kind, payload)) if Kind::from_u8(kind) == Some(Kind::ResultOk) => {
            let out = success_body(&payload, "hop-floor-0");
            let mut r = Response::new(Full::new(Bytes::from(out)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(br#"{"success":false}"#)));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            r
        }
    };
    Ok(resp)
}

fn main() {
    modelgate_loadtests::allocator_like_modelgate("hop-floor");
    modelgate_loadtests::server_runtime().block_on(serve());
}

async fn serve() {
    let args = Args::parse();
    // The replica inherits this process's CPU affinity, as modelgate's replicas do.
    let (mut child, stream) = start_replica(
        std::process::Command::new(&args.replica.runtime),
        &args.replica,
    );
    stream.set_nonblocking(true).expect("nonblocking");
    #[allow(deprecated)] // a UnixStream owns one descriptor for its whole life
    let fd = AsyncFd::with_interest(stream, Interest::READABLE).expect("register");
    let conn = Conn { fd };
    let args_stream = args.stream.then_some(args.whole);
    let dispatch = if args.batch > 0 {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(batcher(conn, rx, args.batch));
        Arc::new(Dispatch::Batched(tx))
    } else if args.pipeline <= 1 {
        Arc::new(Dispatch::OneByOne(tokio::sync::Mutex::new((
            conn,
            ReadState::default(),
        ))))
    } else {
        let conn = Arc::new(conn);
        let d = Arc::new(Dispatch::Pipelined {
            conn: conn.clone(),
            slots: Semaphore::new(args.pipeline),
            writer: tokio::sync::Mutex::new(()),
            waiting: Mutex::new(VecDeque::new()),
        });
        let reader = d.clone();
        tokio::spawn(async move {
            let Dispatch::Pipelined { waiting, .. } = &*reader else {
                unreachable!()
            };
            let mut st = ReadState::default();
            while let Ok(frame) = conn.read_frame(&mut st).await {
                let tx = waiting.lock().expect("queue").pop_front();
                if let Some(tx) = tx {
                    let _ = tx.send(frame);
                }
            }
            eprintln!("hop-floor: the replica went away");
            std::process::exit(1);
        });
        d
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .expect("bind");
    println!(
        "hop-floor listening on http://{}",
        listener.local_addr().expect("addr")
    );
    let serve = async {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let d = dispatch.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req| answer(d.clone(), args_stream, req));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = modelgate_loadtests::stopped() => {}
    }
    let _ = child.kill();
    let _ = child.wait();
}
