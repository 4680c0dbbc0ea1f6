//! `POST /model`: the prediction request, phase by phase.
//!
//! 1. **Read and parse** the body as it arrives, refusing it past `max_request_bytes` by
//!    Content-Length or while streaming; the envelope `{"accessKey", "request"}` is parsed frame
//!    by frame ([`crate::envelope`]) and `request` is kept as slices of the frames (small pieces
//!    of a request spread over many frames are copied together).
//! 2. **Route** by access key through the routing snapshot (no store access), and when the model
//!    has authentication enabled, check the caller's API key against the in-memory auth index.
//! 3. **Queue** in the model's FIFO for a replica, up to the queue timeout.
//! 4. **Call**: the replica's dispatcher ([`crate::dispatch`]) writes the request, with others
//!    waiting behind it, and reads its answer, up to `request_timeout`; past it the replica's
//!    process group is killed.
//! 5. **Respond**: the function's JSON is spliced, unparsed, into the success envelope.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::auth::{Action, Auth};
use crate::early::{Ahead, EarlyRegion, EarlyWriter, EARLY_MIN_BODY};
use crate::envelope::{Envelope, Scanner};
use crate::error::{json_response, ApiError, Body};
use crate::pool::AcquireError;
use crate::replica::Reply;
use crate::routing::{ModelRoute, Routes};
use crate::timer::timeout_at_unless_ready;
use modelgate_protocol::ModelErrorKind;

/// Answers up to this size are copied into one buffer with their envelope; larger ones are
/// sent in place.
const SPLICE_COPY_LIMIT: usize = 64 * 1024;

/// Limits applied to every prediction.
#[derive(Debug, Clone, Copy)]
pub struct PredictLimits {
    pub max_request_bytes: u64,
    pub request_timeout: Duration,
    /// How long the client may take to send the whole body.
    pub body_timeout: Duration,
}

/// Which model and replica a request reached, for the metric labels.
#[derive(Default)]
pub struct Reached {
    pub route: Option<Arc<ModelRoute>>,
    pub slot_index: Option<usize>,
}

/// What the prediction needs from the request head; the rest of the head is dropped before the
/// first await, so the request's state machine carries only this.
struct Head {
    authorization: Option<http::HeaderValue>,
    remote: std::net::SocketAddr,
    content_length: Option<u64>,
    /// HTTP/1.x, where a first frame as long as the Content-Length is the whole body.
    http1: bool,
}

/// The whole prediction. Its future keeps only what crosses an await (the router boxes it, once
/// per request), and the rare paths (API keys, errors) live in functions of their own, out of the
/// way of the code every request runs through.
pub fn handle(
    routes: Arc<Routes>,
    auth: Arc<Auth>,
    limits: PredictLimits,
    req: Request<Incoming>,
    remote: std::net::SocketAddr,
) -> impl std::future::Future<Output = Response<Body>> + Send + 'static {
    let head = Head {
        authorization: req.headers().get(http::header::AUTHORIZATION).cloned(),
        remote,
        content_length: req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok()),
        http1: req.version() < http::Version::HTTP_2,
    };
    predict(routes, auth, limits, head, req.into_body())
}

/// Runs the phases, then counts the prediction. The phases run in an inner async function that
/// borrows what it can: an async function's arguments are stored once more in every future that
/// moves them on, and this future is allocated for every request (the size of a small allocation
/// keeps it in the allocator's per-thread cache).
async fn predict(
    routes: Arc<Routes>,
    auth: Arc<Auth>,
    limits: PredictLimits,
    mut head: Head,
    body: Incoming,
) -> Response<Body> {
    let started = Instant::now();
    let mut reached = Reached::default();
    let result = phases(
        &routes,
        &auth,
        &limits,
        &mut head,
        body,
        started,
        &mut reached,
    )
    .await;
    match result {
        Ok(resp) => {
            if let Some(route) = &reached.route {
                route.metrics.finished(started);
                if let Some(i) = reached.slot_index {
                    route.metrics.ok_by_slot[i].increment(1);
                }
            }
            resp
        }
        Err(err) => failed(err, &reached, started),
    }
}

/// Counts a failed prediction and renders its error.
#[cold]
#[inline(never)]
fn failed(err: ApiError, reached: &Reached, started: Instant) -> Response<Body> {
    let (model, replica) = match &reached.route {
        Some(route) => {
            route.metrics.finished(started);
            let replica = reached
                .slot_index
                .map(|i| route.slots[i].id.to_string())
                .unwrap_or_default();
            (route.name.to_string(), replica)
        }
        None => (String::new(), String::new()),
    };
    metrics::counter!(crate::metrics::REQUESTS, "model" => model, "replica" => replica, "code" => err.code()).increment(1);
    err.into_response()
}

async fn phases(
    routes: &Routes,
    auth: &Auth,
    limits: &PredictLimits,
    head: &mut Head,
    body: Incoming,
    started: Instant,
    reached: &mut Reached,
) -> Result<Response<Body>, ApiError> {
    // Phase 1: read and parse; a large request may be written ahead into its replica (boxed:
    // its state stays out of every request's future).
    let (envelope, ahead) = if head.content_length.is_some_and(|len| len >= EARLY_MIN_BODY) {
        read_ahead(routes, auth, limits, head, body, started).await?
    } else {
        let read = read_envelope(body, head, limits.max_request_bytes, |_| {});
        let envelope = timeout_at_unless_ready(started + limits.body_timeout, read)
            .await
            .map_err(body_timeout(limits))??;
        (envelope, None)
    };

    // Phase 2: route.
    let entry = routes
        .load()
        .by_access_key(&envelope.access_key)
        .cloned()
        .ok_or(ApiError::InvalidAccessKey)?;
    let route = entry.route;
    reached.route = Some(route.clone());
    if entry.authenticate {
        check_api_key(auth, head, entry.project_id, &route.name)?;
    }
    // The caller's API key is not kept while the request waits and runs.
    head.authorization = None;
    route.metrics.request_size.record(envelope.body_len as f64);

    // Phases 3 and 4: queue, then the call, both driven by the model's pool.
    let served = route
        .pool
        .call_with(envelope.request, ahead, limits.request_timeout)
        .await
        .map_err(|e| not_acquired(e, &route.name, route.pool.queue_timeout()))?;
    route
        .metrics
        .queue_wait
        .record(served.queue_wait.as_secs_f64());
    reached.slot_index = route
        .slots
        .iter()
        .position(|s| Arc::ptr_eq(s, &served.slot));

    // Phase 5: respond.
    respond(served.result?, &served.slot.id, &route)
}

/// Checks the caller's API key for a model with authentication on.
#[inline(never)]
fn check_api_key(auth: &Auth, head: &Head, project_id: i64, model: &str) -> Result<(), ApiError> {
    let target = || format!("model:{model}");
    let who = auth.authenticate(head.authorization.as_ref(), Some(head.remote), &target)?;
    auth.authorize(
        &who,
        project_id,
        Action::Predict,
        Some(head.remote),
        &target,
    )
    .map_err(|_| ApiError::Forbidden("User APikey not authorized to access model".into()))
}

#[cold]
#[inline(never)]
fn not_acquired(e: AcquireError, model: &str, queue_timeout: Duration) -> ApiError {
    match e {
        AcquireError::Busy(reason) => ApiError::Busy {
            reason,
            retry_after_secs: queue_timeout.as_secs().clamp(1, 30),
        },
        AcquireError::Unavailable => ApiError::Unavailable {
            model: model.to_string(),
        },
        AcquireError::Dropped => ApiError::Shutdown,
    }
}

/// The function's JSON, unparsed, inside the success envelope; or the model's error.
fn respond(reply: Reply, replica_id: &str, route: &ModelRoute) -> Result<Response<Body>, ApiError> {
    match reply {
        Reply::Ok(payload) => {
            const HEAD: &[u8] = b"{\"success\":true,\"response\":";
            const ID: &[u8] = b",\"replicaId\":\"";
            const END: &[u8] = b"\"}";
            let id = replica_id.as_bytes();
            let tail_len = ID.len() + id.len() + END.len();
            let size = HEAD.len() + payload.len() + tail_len;
            route.metrics.response_size.record(size as f64);
            // Small answers are copied into one buffer (one write); large ones are sent as they
            // came from the replica, with the envelope around them, never copied.
            let whole = payload.len() <= SPLICE_COPY_LIMIT;
            let mut out = BytesMut::with_capacity(if whole { size } else { tail_len });
            if whole {
                out.extend_from_slice(HEAD);
                out.extend_from_slice(&payload);
            }
            out.extend_from_slice(ID);
            out.extend_from_slice(id);
            out.extend_from_slice(END);
            if whole {
                return Ok(json_response(StatusCode::OK, out.freeze()));
            }
            let body = crate::body::parts([Bytes::from_static(HEAD), payload, out.freeze()]);
            let mut resp = Response::new(body);
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Ok(resp)
        }
        Reply::Err(err) => Err(model_failed(err)),
    }
}

#[cold]
#[inline(never)]
fn model_failed(err: modelgate_protocol::ModelError) -> ApiError {
    if err.kind == ModelErrorKind::OutOfMemory {
        ApiError::OutOfMemory {
            exception: err.exception,
            message: err.message,
        }
    } else {
        ApiError::Model {
            exception: err.exception,
            message: err.message,
        }
    }
}

/// The error of a body not read within the body timeout.
fn body_timeout<E>(limits: &PredictLimits) -> impl FnOnce(E) -> ApiError {
    let secs = limits.body_timeout.as_secs_f64();
    move |_| ApiError::BodyTimeout { secs }
}

/// What reading a large body gives: the envelope, and what was written ahead.
type ReadAhead<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<(Envelope, Option<Box<Ahead>>), ApiError>>
            + Send
            + 'a,
    >,
>;

/// Reads a large body, writing its request ahead into its replica when it can: once the body
/// has named a model the caller may call, and that model's next request would go to a replica
/// that takes requests in its memory ([`crate::early`]). Nothing is recorded on the way: the
/// checks that count come after the body, as for every request.
fn read_ahead<'a>(
    routes: &'a Routes,
    auth: &'a Auth,
    limits: &'a PredictLimits,
    head: &'a Head,
    body: Incoming,
    started: Instant,
) -> ReadAhead<'a> {
    Box::pin(async move {
        // Looked for once `accessKey` and the request's first piece have arrived.
        let mut looked = false;
        let mut writer: Option<EarlyWriter> = None;
        let after_frame = |scanner: &Scanner| {
            if !looked {
                let (Some(key), false) =
                    (scanner.access_key(), scanner.request_so_far().is_empty())
                else {
                    return;
                };
                looked = true;
                writer = early_region(routes, auth, head, key).map(EarlyWriter::new);
            }
            if writer
                .as_mut()
                .is_some_and(|w| !w.offer(scanner.request_so_far()))
            {
                writer = None;
            }
        };
        let read = read_envelope(body, head, limits.max_request_bytes, after_frame);
        let envelope = tokio::time::timeout_at(started + limits.body_timeout, read)
            .await
            .map_err(body_timeout(limits))??;
        let written = match writer {
            Some(writer) => writer
                .finish(started + limits.body_timeout)
                .await
                .map(Box::new),
            None => None,
        };
        Ok((envelope, written))
    })
}

/// The region of the replica the model's next request would go to, if the caller may call it.
fn early_region(routes: &Routes, auth: &Auth, head: &Head, key: &str) -> Option<EarlyRegion> {
    let routes = routes.load();
    let entry = routes.by_access_key(key)?;
    let permitted = !entry.authenticate
        || auth.permits(
            head.authorization.as_ref(),
            entry.project_id,
            Action::Predict,
        );
    permitted.then(|| entry.route.pool.early_region()).flatten()
}

/// Reads the body frame by frame into the envelope parser. A body that is too large is refused
/// as such even when it is also malformed, so the rest is still read (and dropped) after a parse
/// error, up to the limit. `after_frame` sees the parser after every frame it parsed.
async fn read_envelope(
    body: Incoming,
    head: &Head,
    limit: u64,
    mut after_frame: impl FnMut(&Scanner),
) -> Result<Envelope, ApiError> {
    let content_length = head.content_length;
    if content_length.is_some_and(|len| len > limit) {
        return Err(ApiError::TooLarge { limit });
    }
    let mut body = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let mut scanner = Scanner::new();
    let mut invalid = None;
    let mut first = true;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                ApiError::TooLarge { limit }
            } else {
                ApiError::InvalidRequest(format!("could not read the request body: {e}"))
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        // The whole body in its first frame, the usual small request: the one-pass parse, which
        // leaves anything it does not take to the scanner. Over HTTP/1 only: hyper has read the
        // body to its declared length, so the connection stays usable without polling for its
        // end; an HTTP/2 stream may still carry more (a protocol error, which the scanner's
        // path sees before the model is called).
        if std::mem::take(&mut first) && head.http1 && content_length == Some(data.len() as u64) {
            if let Some(envelope) = crate::envelope::parse_plain(&data) {
                return Ok(envelope);
            }
        }
        if invalid.is_none() {
            invalid = scanner.feed(&data).err();
            if invalid.is_none() {
                after_frame(&scanner);
            }
        }
    }
    match invalid {
        Some(e) => Err(ApiError::InvalidRequest(e.0)),
        None => scanner.finish().map_err(|e| ApiError::InvalidRequest(e.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Handle<F> =
        fn(Arc<Routes>, Arc<Auth>, PredictLimits, Request<Incoming>, std::net::SocketAddr) -> F;

    fn future_size<F>(_: Handle<F>) -> usize {
        std::mem::size_of::<F>()
    }

    /// The router boxes this future for every prediction (1,008 bytes on 2026-11-30, the same in
    /// debug and release builds). glibc serves allocations of up to
    /// 1,032 bytes from a per-thread cache; past that, each one takes the arena's lock and its
    /// slower path (about 500 more instructions a request, malloc and free together). Moving an
    /// argument into an inner async function stores it twice, which is how it grew past.
    #[test]
    fn the_prediction_future_stays_a_small_allocation() {
        let size = future_size(handle);
        assert!(size <= 1032, "{size} bytes");
    }
}
