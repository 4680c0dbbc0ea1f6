//! `loadgen`: load generator for modelgate's `POST /model`. It owns the closed-loop and the
//! open-loop (fixed-rate, coordinated-omission-correct) request loops, the check of every
//! response, and the latency/error report. It sends traffic only to what `--url` names, and
//! every loop stops by itself after warm-up + duration (+ one request timeout) or
//! `--max-requests`, whichever comes first.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::{CommandFactory, Parser, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;
use tokio_util::either::Either;

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "Load generator for modelgate's POST /model")]
struct Args {
    /// Endpoint to load: http://, or https:// with --ca-cert. Use a 127.0.0.1 address for
    /// local runs.
    #[arg(long, default_value = "http://127.0.0.1:8080/model")]
    url: Uri,
    /// PEM certificates to trust for an https:// --url (the only roots used: load tests run
    /// against a server of one's own, usually with a self-signed certificate). The URL's host
    /// must be a name or address the server's certificate holds.
    #[arg(long, value_name = "PEM")]
    ca_cert: Option<std::path::PathBuf>,
    /// The model's access key, sent as `accessKey` in every body.
    #[arg(long, env = "MODELGATE_ACCESS_KEY", hide_env_values = true)]
    access_key: String,
    /// JSON of the `request` object.
    #[arg(long, default_value = r#"{"a":3,"b":5}"#, value_parser = json_arg)]
    #[arg(conflicts_with = "payload_bytes")]
    body: Value,
    /// JSON value the `response` field must equal (e.g. `8`); unchecked when absent.
    #[arg(long, value_parser = json_arg)]
    expect: Option<Value>,
    /// Send `{"pad": "<N chars>"}` instead of --body, for echo-style models.
    #[arg(long, value_name = "N")]
    payload_bytes: Option<usize>,
    /// The `response` must equal the request object (for echo-style models).
    #[arg(long, conflicts_with = "expect")]
    expect_echo: bool,
    /// Sent as `Authorization: Bearer <KEY>` when given (prefer the environment variable:
    /// arguments land in shell history).
    #[arg(
        long,
        value_name = "KEY",
        env = "MODELGATE_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// closed: workers send back-to-back; open: requests start at fixed intervals (--rate).
    #[arg(long, value_enum, default_value_t = Mode::Closed)]
    mode: Mode,
    /// Closed loop: number of workers, each with its own keep-alive connection (a stream of
    /// the one shared connection with --http2).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Open loop: target requests per second.
    #[arg(long, required_if_eq("mode", "open"))]
    rate: Option<f64>,
    /// Open loop: most requests in flight, each on its own connection (streams with --http2).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// Seconds of load before recording starts.
    #[arg(long, default_value = "1", value_parser = secs_arg)]
    warmup: Duration,
    /// Seconds of recorded load.
    #[arg(long, default_value = "5", value_parser = secs_arg)]
    duration: Duration,
    /// Most requests to send in total, warm-up included.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// Seconds one request may take before it counts as a `timeout` error.
    #[arg(long, default_value = "10", value_parser = secs_arg)]
    timeout: Duration,
    /// Use HTTP/2 on one multiplexed connection: with prior knowledge (h2c) over http://,
    /// by ALPN over https://.
    #[arg(long)]
    http2: bool,
    /// Print only the JSON report.
    #[arg(long)]
    json: bool,
    /// Never sleep between answers: one worker thread, and one task that keeps it polling for
    /// I/O, so the server's send of an answer never has to wake this process. Over loopback
    /// that wake-up is charged to the server's CPU (the sender runs the receiver's TCP
    /// processing), which a client on another machine would not cost it. Costs this process's
    /// whole CPU. In the open loop the same task releases each slot as its time comes, to the
    /// microsecond, instead of a pacer thread that sleeps between slots.
    #[arg(long)]
    spin: bool,
    /// Speak HTTP/1.1 over the socket directly instead of through hyper's client: the request's
    /// bytes prepared once and written whole, the answer's head parsed with `httparse`, its body
    /// read to its `Content-Length`. The client's own cost per request is lower, so a fast server
    /// at high concurrency is not held to what this one CPU can send (plain http:// only;
    /// answers must carry `Content-Length`).
    #[arg(long, conflicts_with = "http2")]
    raw: bool,
    /// Statuses that count as success, comma-separated (e.g. `200,429` under overload).
    #[arg(long, value_delimiter = ',', default_value = "200")]
    expect_status: Vec<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Mode {
    Closed,
    Open,
}

fn json_arg(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

fn secs_arg(text: &str) -> Result<Duration, String> {
    let secs = text.parse::<f64>().map_err(|e| e.to_string())?;
    Duration::try_from_secs_f64(secs).map_err(|_| "not a number of seconds >= 0".into())
}

/// Everything the workers share: settings, schedule, connections and the tally.
struct Plan {
    args: Args,
    addr: String,
    /// For https://: the client side of TLS and the name the certificate must hold.
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    /// Origin-form for HTTP/1.1 (with a Host header), absolute for h2 (becomes `:authority`).
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    /// `--raw`: the whole request (head and body) as it goes on the wire.
    raw: Option<Bytes>,
    workers: u32,
    start: Instant,
    measure_start: Instant,
    end: Instant,
    /// Requests allowed in total: `--max-requests`, and for the open loop the schedule length.
    limit: u64,
    /// Open loop: gap between intended start times, in nanoseconds.
    interval_ns: u64,
    /// Hands out request numbers, so the count bound holds across all workers.
    tickets: AtomicU64,
    /// Open loop: one permit per slot of the schedule whose time has come (see `pace`).
    permits: Semaphore,
    /// The h2 connection all workers multiplex over; re-dialled if it closes.
    h2: Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
    /// One tally for all workers: a lock per request costs far less than the exchange.
    stats: std::sync::Mutex<Stats>,
}

/// Turns the arguments into a plan starting now; an error is a usage error.
fn plan(mut args: Args) -> Result<Plan, String> {
    let url = &args.url;
    let (tls, default_port) = match (url.scheme_str(), &args.ca_cert) {
        (Some("http"), None) => (None, 80),
        (Some("http"), Some(_)) => return Err("--ca-cert is for https:// URLs".into()),
        (Some("https"), Some(ca)) => {
            let host = url.host().ok_or("--url has no host")?;
            // An IPv6 literal comes bracketed in the URL and bare in the certificate.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("--url: {e}"))?;
            (Some((tls_connector(ca, args.http2)?, name)), 443)
        }
        (Some("https"), None) => return Err("an https:// --url needs --ca-cert".into()),
        _ => return Err("--url must start with http:// or https://".into()),
    };
    let authority = url.authority().ok_or("--url has no host")?.as_str();
    let addr = match url.port() {
        Some(_) => authority.to_owned(),
        None => format!("{authority}:{default_port}"),
    };
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if !args.http2 {
        headers.insert(HOST, authority.parse().map_err(|_| "--url: bad host")?);
    }
    if let Some(key) = args.api_key.as_deref().filter(|k| !k.is_empty()) {
        let bearer = format!("Bearer {key}")
            .parse()
            .map_err(|_| "--api-key: bad value")?;
        headers.insert(AUTHORIZATION, bearer);
    }
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let uri = if args.http2 {
        url.clone()
    } else {
        Uri::try_from(path).map_err(|e| e.to_string())?
    };
    let request = match args.payload_bytes {
        Some(n) => json!({ "pad": "x".repeat(n) }),
        None => args.body.clone(),
    };
    let body = json!({ "accessKey": args.access_key, "request": request }).to_string();
    if args.expect_echo {
        args.expect = Some(request);
    }
    if args.duration.is_zero() || args.timeout.is_zero() {
        return Err("--duration and --timeout must be > 0".into());
    }
    let (mut limit, mut interval_ns, mut workers) = (args.max_requests, 0, args.concurrency);
    if let (Mode::Open, Some(rate)) = (args.mode, args.rate) {
        if !(rate.is_finite() && (0.001..=10_000_000.0).contains(&rate)) {
            return Err("--rate must be between 0.001 and 10000000 requests/s".into());
        }
        interval_ns = ((1e9 / rate).round() as u64).max(1);
        // Slot i starts at i * interval; only slots that start inside the run are scheduled.
        let slots = (args.warmup + args.duration)
            .as_nanos()
            .div_ceil(interval_ns.into());
        limit = limit.min(u64::try_from(slots).unwrap_or(u64::MAX));
        workers = args.connections;
    }
    let raw = match (args.raw, &tls) {
        (false, _) => None,
        (true, Some(_)) => return Err("--raw is for http:// URLs".into()),
        (true, None) => {
            let mut wire = format!("POST {path} HTTP/1.1\r\n").into_bytes();
            for (name, value) in &headers {
                wire.extend_from_slice(name.as_str().as_bytes());
                wire.extend_from_slice(b": ");
                wire.extend_from_slice(value.as_bytes());
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
            wire.extend_from_slice(body.as_bytes());
            Some(Bytes::from(wire))
        }
    };
    let start = Instant::now();
    let (measure_start, end) = (start + args.warmup, start + args.warmup + args.duration);
    Ok(Plan {
        addr,
        tls,
        uri,
        headers,
        body: body.into(),
        raw,
        workers,
        start,
        measure_start,
        end,
        limit,
        interval_ns,
        tickets: AtomicU64::new(0),
        permits: Semaphore::new(0),
        h2: Mutex::new(None),
        stats: Default::default(),
        args,
    })
}

/// A worker's own HTTP/1.1 connection; `None` until dialled, or after it failed.
type H1 = Option<http1::SendRequest<Full<Bytes>>>;

/// What a worker keeps between its requests.
#[derive(Default)]
struct Conn {
    h1: H1,
    /// `--raw`: the socket, `None` until dialled or after it failed.
    raw: Option<TcpStream>,
    /// `--raw`: where an answer's head is read.
    head: Vec<u8>,
    /// The last answer's body. Emptied and filled again for every answer, so that it keeps its
    /// capacity: collecting each answer into a buffer of its own put a fresh allocation of the
    /// answer's size on the clock of every request, for megabytes memory the kernel had to fault
    /// in page by page, which the client charged to the server (about 1 ms of a 5 MB echo here,
    /// docs/PERFORMANCE.md).
    answer: Vec<u8>,
}

/// Why one request did not count as ok: `kind` is the report's error bucket.
struct Failure {
    kind: String,
    detail: String,
}

fn fail(kind: impl Into<String>, detail: impl std::fmt::Display) -> Failure {
    let detail = detail.to_string().chars().take(200).collect();
    let kind = kind.into();
    Failure { kind, detail }
}

/// A client TLS configuration trusting only the certificates in `ca`, offering the one
/// protocol the run uses by ALPN.
fn tls_connector(ca: &std::path::Path, http2: bool) -> Result<tokio_rustls::TlsConnector, String> {
    let bad = |e: &dyn std::fmt::Display| format!("--ca-cert {}: {e}", ca.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no certificate in the file"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if http2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A connection to the server, without TLS (left) or with it (right).
type Stream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// A TCP connection to the server, with Nagle off: it would add delay to every exchange of
/// small requests and answers.
async fn dial_tcp(plan: &Plan) -> Result<TcpStream, Failure> {
    let connect = |e| fail("transport", format!("connect {}: {e}", plan.addr));
    let tcp = TcpStream::connect(&plan.addr).await.map_err(connect)?;
    tcp.set_nodelay(true).map_err(connect)?;
    Ok(tcp)
}

async fn dial(plan: &Plan) -> Result<TokioIo<Stream>, Failure> {
    let tcp = dial_tcp(plan).await?;
    let Some((connector, name)) = &plan.tls else {
        return Ok(TokioIo::new(Either::Left(tcp)));
    };
    let tls = connector.connect(name.clone(), tcp).await;
    let tls = tls.map_err(|e| fail("tls", format!("handshake with {}: {e}", plan.addr)))?;
    Ok(TokioIo::new(Either::Right(Box::new(tls))))
}

type Answer = Result<Response<Incoming>, Failure>;

async fn send(plan: &Plan, h1: &mut H1, req: Request<Full<Bytes>>) -> Answer {
    let transport = |e: hyper::Error| fail("transport", e);
    if plan.args.http2 {
        let mut shared = plan.h2.lock().await;
        let tx = match shared.take() {
            Some(tx) if !tx.is_closed() => tx,
            _ => {
                let io = dial(plan).await?;
                let handshake = http2::handshake(TokioExecutor::new(), io).await;
                let (tx, conn) = handshake.map_err(transport)?;
                tokio::spawn(conn);
                tx
            }
        };
        let mut tx = shared.insert(tx).clone();
        drop(shared);
        tx.ready().await.map_err(transport)?;
        return tx.send_request(req).await.map_err(transport);
    }
    let tx = match h1.take() {
        Some(tx) if !tx.is_closed() => tx,
        _ => {
            let (tx, conn) = http1::handshake(dial(plan).await?)
                .await
                .map_err(transport)?;
            tokio::spawn(conn);
            tx
        }
    };
    let tx = h1.insert(tx);
    tx.ready().await.map_err(transport)?;
    tx.send_request(req).await.map_err(transport)
}

/// Sends one request and checks the answer; `Ok` carries the (accepted) status. Also returns
/// when the exchange ended: the answer's last byte, or the failure. Checking the answer comes
/// after that instant, so with one request in flight a large answer's parse is not counted as
/// the server's latency (with more, one worker's check can still delay reading another's answer
/// on the client's CPU).
async fn exchange(plan: &Plan, conn: &mut Conn) -> (Result<u16, Failure>, Instant) {
    let fetched = match &plan.raw {
        Some(wire) => fetch_raw(plan, wire, conn).await,
        None => fetch(plan, &mut conn.h1, &mut conn.answer).await,
    };
    match fetched {
        Ok((status, done)) => (check(plan, status, &conn.answer), done),
        Err(failure) => {
            // A failed or abandoned exchange may leave the connection mid-request: never reuse it.
            conn.h1 = None;
            conn.raw = None;
            (Err(failure), Instant::now())
        }
    }
}

/// Sends one request and reads its whole answer into `body` ([`Conn::answer`]): returns the
/// status and when the last byte came.
async fn fetch(plan: &Plan, h1: &mut H1, body: &mut Vec<u8>) -> Result<(u16, Instant), Failure> {
    let mut req = Request::new(Full::new(plan.body.clone()));
    *req.method_mut() = hyper::Method::POST;
    *req.uri_mut() = plan.uri.clone();
    *req.headers_mut() = plan.headers.clone();
    let attempt = async {
        let resp = send(plan, h1, req).await?;
        let status = resp.status().as_u16();
        let mut incoming = resp.into_body();
        body.clear();
        while let Some(frame) = incoming.frame().await {
            if let Ok(data) = frame.map_err(|e| fail("transport", e))?.into_data() {
                body.extend_from_slice(&data);
            }
        }
        Ok((status, Instant::now()))
    };
    let timeout = plan.args.timeout;
    match tokio::time::timeout(timeout, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Err(fail("timeout", format!("no answer in {timeout:?}"))),
    }
}

/// [`fetch`] for `--raw`: writes `wire`, reads the answer's head into [`Conn::head`] and its body
/// into [`Conn::answer`].
async fn fetch_raw(plan: &Plan, wire: &[u8], conn: &mut Conn) -> Result<(u16, Instant), Failure> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let transport = |e: std::io::Error| fail("transport", e);
    let attempt = async {
        let stream = match &mut conn.raw {
            Some(stream) => stream,
            None => conn.raw.insert(dial_tcp(plan).await?),
        };
        stream.write_all(wire).await.map_err(transport)?;
        conn.head.clear();
        let (status, head_len, body_len) = loop {
            conn.head.reserve(4096);
            if stream.read_buf(&mut conn.head).await.map_err(transport)? == 0 {
                return Err(fail("transport", "connection closed before an answer"));
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut head = httparse::Response::new(&mut headers);
            let parsed = head.parse(&conn.head).map_err(|e| fail("transport", e))?;
            if let httparse::Status::Complete(head_len) = parsed {
                let length = head
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"));
                let length = length
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .ok_or_else(|| fail("transport", "--raw: an answer without Content-Length"))?;
                break (head.code.unwrap_or(0), head_len, length);
            }
        };
        conn.answer.clear();
        conn.answer.extend_from_slice(&conn.head[head_len..]);
        while conn.answer.len() < body_len {
            conn.answer.reserve(body_len - conn.answer.len());
            if stream.read_buf(&mut conn.answer).await.map_err(transport)? == 0 {
                return Err(fail("transport", "connection closed in an answer"));
            }
        }
        if conn.answer.len() > body_len {
            return Err(fail("transport", "bytes past the end of an answer"));
        }
        Ok((status, Instant::now()))
    };
    let timeout = plan.args.timeout;
    match tokio::time::timeout(timeout, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Err(fail("timeout", format!("no answer in {timeout:?}"))),
    }
}

/// Whether an answer is one the run expects: an accepted status and, for a 200, `success: true`
/// with the expected `response`.
fn check(plan: &Plan, status: u16, body: &[u8]) -> Result<u16, Failure> {
    let text = || String::from_utf8_lossy(body).into_owned();
    if !plan.args.expect_status.contains(&status) {
        return Err(fail(format!("status_{status}"), text()));
    }
    if status == 200 {
        let answer: Value = serde_json::from_slice(body)
            .map_err(|e| fail("wrong_answer", format!("{e}: {}", text())))?;
        let expected = |want: &Value| answer["response"] == *want;
        if answer["success"] != true || !plan.args.expect.as_ref().is_none_or(expected) {
            return Err(fail("wrong_answer", text()));
        }
    }
    Ok(status)
}

/// Latency in µs, 1 µs to 10 min at 3 significant digits; longer values saturate at the top.
struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"))
    }
}

/// What the run saw. Only the measured window is counted, except `warmup_errors` and
/// `attempted`, so errors during warm-up still fail the run.
#[derive(Default)]
struct Stats {
    latency_us: Latency,
    ok: u64,
    statuses: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    /// The first failure of each kind, to show what went wrong.
    samples: BTreeMap<String, String>,
    warmup_errors: u64,
    /// Requests actually sent, warm-up included; the open loop's `unsent` is the rest.
    attempted: u64,
    last_done: Option<Instant>,
    /// Slowest answer per 100 ms of intended start time, to tell a steady tail from stalls.
    window_max_us: Vec<u64>,
}

/// Width of the windows behind `worst_windows` in the report.
const WINDOW: Duration = Duration::from_millis(100);

impl Plan {
    /// `began` is when the request was *meant* to start: in the open loop that is its slot in
    /// the schedule, so time spent waiting for a free connection counts as latency. `done` is
    /// when its answer's last byte arrived (or it failed); its latency is the time between.
    fn record(&self, began: Instant, outcome: Result<u16, Failure>, done: Instant) {
        let measured = began >= self.measure_start;
        let mut stats = self.stats.lock().expect("no panic while recording");
        stats.attempted += 1;
        match outcome {
            Ok(_) if !measured => {}
            Ok(status) => {
                stats.ok += 1;
                *stats.statuses.entry(status.to_string()).or_default() += 1;
                let us = (done - began).as_micros() as u64;
                stats.latency_us.0.saturating_record(us);
                let w = ((began - self.measure_start).as_nanos() / WINDOW.as_nanos()) as usize;
                if stats.window_max_us.len() <= w {
                    stats.window_max_us.resize(w + 1, 0);
                }
                stats.window_max_us[w] = stats.window_max_us[w].max(us);
            }
            Err(failure) => {
                if measured {
                    *stats.errors.entry(failure.kind.clone()).or_default() += 1;
                } else {
                    stats.warmup_errors += 1;
                }
                stats.samples.entry(failure.kind).or_insert(failure.detail);
            }
        }
        if measured {
            // Workers record in the order their checks finish, not their answers'.
            stats.last_done = stats.last_done.max(Some(done));
        }
    }

    /// When the worker's next request starts, or `None` once the run is over. Closed loop:
    /// now. Open loop: the next slot whose time has come. When every open-loop worker is busy,
    /// slots are taken late, and that wait shows up in the latency instead of vanishing.
    async fn next_start(&self) -> Option<Instant> {
        if self.args.mode == Mode::Closed {
            let go = Instant::now() < self.end && self.tickets.fetch_add(1, Relaxed) < self.limit;
            return go.then(Instant::now);
        }
        self.permits.acquire().await.ok()?.forget();
        let slot = self.tickets.fetch_add(1, Relaxed);
        // Past end + timeout the schedule is abandoned; the slots left are reported `unsent`.
        if slot >= self.limit || Instant::now() >= self.end + self.args.timeout {
            return None;
        }
        Some(self.start + Duration::from_nanos(self.interval_ns.saturating_mul(slot)))
    }
}

async fn worker(plan: Arc<Plan>) {
    let mut conn = Conn::default();
    while let Some(began) = plan.next_start().await {
        let (outcome, done) = exchange(&plan, &mut conn).await;
        let broken = matches!(&outcome, Err(f) if f.kind == "transport" || f.kind == "tls");
        plan.record(began, outcome, done);
        if broken && plan.args.mode == Mode::Closed {
            // A refused or reset connection, or a refused handshake, fails in microseconds; the
            // pause keeps a server that went away from turning the rest of the run into a
            // connect storm.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The open loop's clock: releases one permit per slot as its time comes, then one per worker
/// so that all stop. tokio's timer ticks in whole milliseconds, which at thousands of
/// requests/s would add up to a millisecond of invented latency to each request, so the clock
/// is either a thread of its own that sleeps to the next slot or, with `--spin`, the spinning
/// task, which looks at it between two polls of the I/O driver.
struct Pacer {
    start: std::time::Instant,
    released: u64,
}

impl Pacer {
    fn new(plan: &Plan) -> Pacer {
        let start = plan.start.into_std();
        Pacer { start, released: 0 }
    }

    /// Releases the slots whose time has come. `None` once every slot and the stop permits
    /// are out (it is not called again), else when the next slot is due.
    fn release(&mut self, plan: &Plan) -> Option<std::time::Instant> {
        let due = self.start.elapsed().as_nanos() / u128::from(plan.interval_ns) + 1;
        let due = plan.limit.min(u64::try_from(due).unwrap_or(u64::MAX));
        if due > self.released {
            plan.permits.add_permits((due - self.released) as usize);
            self.released = due;
        }
        if self.released == plan.limit {
            plan.permits.add_permits(plan.workers as usize);
            return None;
        }
        Some(self.start + Duration::from_nanos(self.released * plan.interval_ns))
    }
}

/// The pacer as a thread of its own, for a client that sleeps.
fn pace(plan: &Plan) {
    let mut pacer = Pacer::new(plan);
    while let Some(next) = pacer.release(plan) {
        std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
    }
}

/// The report as JSON; the text table is rendered from it, so the two cannot disagree.
fn report(plan: &Plan, stats: &Stats) -> Value {
    let (args, mut errors) = (&plan.args, stats.errors.clone());
    // Slots of the schedule never sent because the generator fell behind past the hard stop:
    // counted as errors, since leaving them out would hide that backlog.
    let unsent = plan.limit.saturating_sub(stats.attempted);
    if args.mode == Mode::Open && unsent > 0 {
        errors.insert("unsent".into(), unsent);
    }
    let elapsed = stats
        .last_done
        .map_or(0.0, |t| (t - plan.measure_start).as_secs_f64());
    let rps = stats.ok as f64 / elapsed.max(1e-9);
    let latency = &stats.latency_us.0;
    let q = |quantile| latency.value_at_quantile(quantile);
    let mut worst: Vec<(usize, u64)> = stats.window_max_us.iter().copied().enumerate().collect();
    worst.sort_by_key(|&(_, max)| std::cmp::Reverse(max));
    let worst: Vec<Value> = worst
        .iter()
        .take(5)
        .map(|&(w, max)| json!({"at_ms": w as u64 * WINDOW.as_millis() as u64, "max_us": max}))
        .collect();
    json!({
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "url": args.url.to_string(),
        "http2": args.http2,
        "workers": plan.workers,
        "target_rps": args.rate.filter(|_| args.mode == Mode::Open),
        "duration_s": args.duration.as_secs_f64(),
        "sent": stats.ok + stats.errors.values().sum::<u64>(),
        "ok": stats.ok,
        "statuses": stats.statuses,
        "error_total": errors.values().sum::<u64>(),
        "errors": errors,
        "warmup_errors": stats.warmup_errors,
        "error_samples": stats.samples,
        "achieved_rps": (rps * 10.0).round() / 10.0,
        "latency_us": {
            "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99_9": q(0.999), "max": latency.max()
        },
        // The five slowest 100 ms windows of the measured run, by when their requests were due.
        "worst_windows": worst,
    })
}

fn print_table(r: &Value) {
    // serde_json's Display ignores width, and quotes strings: render to plain text first.
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let row = |name: &str, value: &Value| println!("  {name:<22}{:>14}", text(value));
    let rows = |map: &Value, prefix: &str| {
        for (key, n) in map.as_object().into_iter().flatten() {
            row(&format!("  {prefix}{key}"), n);
        }
    };
    let header =
        ["mode", "workers", "http2", "duration_s", "url"].map(|k| format!("{k} {}", text(&r[k])));
    println!("loadgen: {}", header.join(", "));
    if !r["target_rps"].is_null() {
        row("target req/s", &r["target_rps"]);
    }
    row("requests sent", &r["sent"]);
    row("ok", &r["ok"]);
    rows(&r["statuses"], "status ");
    row("errors", &r["error_total"]);
    rows(&r["errors"], "");
    row("warm-up errors", &r["warmup_errors"]);
    row("achieved req/s", &r["achieved_rps"]);
    for key in ["p50", "p90", "p99", "p99_9", "max"] {
        row(&format!("latency {key} (us)"), &r["latency_us"][key]);
    }
    for (kind, detail) in r["error_samples"].as_object().into_iter().flatten() {
        println!("  first {kind}: {}", text(detail));
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.spin {
        // Only a worker that never blocks keeps answers from having to wake this process; with
        // more than one, another would sleep in `epoll_wait` holding the I/O driver.
        runtime.worker_threads(1);
    }
    runtime
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let plan = match plan(args) {
        Ok(plan) => Arc::new(plan),
        Err(message) => Args::command()
            .error(clap::error::ErrorKind::ValueValidation, message)
            .exit(),
    };
    // Fail fast, with one clear message, when nothing listens: otherwise the closed loop would
    // spend the whole run collecting refused connections.
    if let Err(failure) = dial(&plan).await {
        let url = &plan.args.url;
        eprintln!("loadgen: cannot reach {url}: {}", failure.detail);
        return ExitCode::FAILURE;
    }
    if plan.args.spin {
        // Each yield returns to the runtime, which polls the I/O driver without blocking
        // before running the task again. Dropped with the runtime at the end of main.
        let mut pacer = (plan.args.mode == Mode::Open).then(|| Pacer::new(&plan));
        let plan = plan.clone();
        tokio::spawn(async move {
            loop {
                if let Some(p) = &mut pacer {
                    if p.release(&plan).is_none() {
                        pacer = None;
                    }
                }
                tokio::task::yield_now().await;
            }
        });
    }
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..plan.workers {
        tasks.spawn(worker(plan.clone()));
    }
    let pacer = (plan.args.mode == Mode::Open && !plan.args.spin).then(|| {
        let plan = plan.clone();
        std::thread::spawn(move || pace(&plan))
    });
    while let Some(done) = tasks.join_next().await {
        done.expect("worker panicked");
    }
    if let Some(pacer) = pacer {
        pacer.join().expect("pacer panicked");
    }
    let report = report(&plan, &plan.stats.lock().expect("workers are done"));
    if !plan.args.json {
        print_table(&report);
        print!("JSON: ");
    }
    println!("{report}");
    // Any error fails the run, warm-up included, so a CI smoke run can assert on the status.
    if report["error_total"] == 0 && report["warmup_errors"] == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
