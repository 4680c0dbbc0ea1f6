//! `POST /model`: the prediction request, phase by phase.
//!
//! 1. **Read and parse** the body as it arrives, refusing it past `max_request_bytes` by
//!    Content-Length or while streaming; the envelope `{"accessKey", "request"}` is parsed frame
//!    by frame ([`crate::envelope`]) and `request` is kept as slices of the frames (small pieces
//!    of a request spread over many frames are copied together).
//! 2. **Route** by access key through the routing snapshot (no store access), and when the model
//!    has authentication enabled, check the caller's API key against the in-memory auth index.
//! 3. **Queue** in the model's FIFO for a free replica, up to `queue_timeout`.
//! 4. **Call** the replica, up to `request_timeout`; past it the replica's process group is killed.
//! 5. **Respond**: the function's JSON is spliced, unparsed, into the success envelope.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::auth::{Action, Auth};
use crate::envelope::{Envelope, Scanner};
use crate::error::{json_response, ApiError, Body};
use crate::pool::{AcquireError, Pool};
use crate::replica::{CallError, KillReason, ReplicaConn, Reply};
use crate::routing::{ModelRoute, Routes};
use crate::server::ClientAddr;
use modelgate_protocol::ModelErrorKind;

/// Answers up to this size are copied into one buffer with their envelope; larger ones are
/// sent in place.
const SPLICE_COPY_LIMIT: usize = 64 * 1024;

/// Limits applied to every prediction.
#[derive(Debug, Clone, Copy)]
pub struct PredictLimits {
    pub max_request_bytes: u64,
    pub request_timeout: Duration,
    pub queue_timeout: Duration,
    /// How long the client may take to send the whole body.
    pub body_timeout: Duration,
}

/// Which model and replica a request reached, for the metric labels.
#[derive(Default)]
pub struct Reached {
    pub route: Option<Arc<ModelRoute>>,
    pub slot_index: Option<usize>,
}

pub async fn handle(
    routes: &Routes,
    auth: &Auth,
    limits: PredictLimits,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let mut reached = Reached::default();
    let result = predict(routes, auth, limits, req, &mut reached).await;
    let elapsed = started.elapsed().as_secs_f64();
    match result {
        Ok(resp) => {
            if let Some(route) = &reached.route {
                route.metrics.duration.record(elapsed);
                if let Some(i) = reached.slot_index {
                    route.metrics.ok_by_slot[i].increment(1);
                }
            }
            resp
        }
        Err(err) => {
            let (model, replica) = match &reached.route {
                Some(route) => {
                    route.metrics.duration.record(elapsed);
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
    }
}

async fn predict(
    routes: &Routes,
    auth: &Auth,
    limits: PredictLimits,
    req: Request<Incoming>,
    reached: &mut Reached,
) -> Result<Response<Body>, ApiError> {
    // Kept from the head for phase 3; a HeaderValue clone shares its bytes.
    let authorization = req.headers().get(http::header::AUTHORIZATION).cloned();
    let remote = req.extensions().get::<ClientAddr>().map(|a| a.0);
    // Phase 1: read and parse.
    let content_length = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let envelope = tokio::time::timeout(
        limits.body_timeout,
        read_envelope(req.into_body(), content_length, limits.max_request_bytes),
    )
    .await
    .map_err(|_| ApiError::BodyTimeout {
        secs: limits.body_timeout.as_secs_f64(),
    })??;
    let access_key = &envelope.access_key;

    // Phase 2: route.
    let entry = routes
        .load()
        .by_access_key(access_key)
        .cloned()
        .ok_or(ApiError::InvalidAccessKey)?;
    let route = entry.route;
    reached.route = Some(route.clone());
    if entry.authenticate {
        let target = || format!("model:{}", route.name);
        let who = auth.authenticate(authorization.as_ref(), remote, &target)?;
        auth.authorize(&who, entry.project_id, Action::Predict, remote, &target)
            .map_err(|_| {
                ApiError::Forbidden("User APikey not authorized to access model".into())
            })?;
    }
    route.metrics.request_size.record(envelope.body_len as f64);

    // Phase 3: queue.
    let queued_at = Instant::now();
    let conn = route
        .pool
        .acquire(limits.queue_timeout)
        .await
        .map_err(|e| match e {
            AcquireError::Busy(reason) => ApiError::Busy {
                reason,
                retry_after_secs: limits.queue_timeout.as_secs().clamp(1, 30),
            },
            AcquireError::Unavailable => ApiError::Unavailable {
                model: route.name.to_string(),
            },
        })?;
    route
        .metrics
        .queue_wait
        .record(queued_at.elapsed().as_secs_f64());
    reached.slot_index = route.slots.iter().position(|s| Arc::ptr_eq(s, &conn.slot));

    // Phase 4: call.
    let reply = call_replica(&route.pool, conn, &envelope.request, limits.request_timeout).await?;

    // Phase 5: respond.
    match reply.reply {
        Reply::Ok(payload) => {
            const HEAD: &[u8] = b"{\"success\":true,\"response\":";
            let id = &reply.replica_id;
            let mut tail = BytesMut::with_capacity(id.len() + 16);
            tail.extend_from_slice(b",\"replicaId\":\"");
            tail.extend_from_slice(id.as_bytes());
            tail.extend_from_slice(b"\"}");
            let size = HEAD.len() + payload.len() + tail.len();
            route.metrics.response_size.record(size as f64);
            // Small answers are copied into one buffer (one write); large ones are sent as they
            // came from the replica, with the envelope around them, never copied.
            if payload.len() <= SPLICE_COPY_LIMIT {
                let mut out = BytesMut::with_capacity(size);
                out.extend_from_slice(HEAD);
                out.extend_from_slice(&payload);
                out.extend_from_slice(&tail);
                Ok(json_response(StatusCode::OK, out.freeze()))
            } else {
                let body = crate::body::parts([Bytes::from_static(HEAD), payload, tail.freeze()]);
                let mut resp = Response::new(body);
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                Ok(resp)
            }
        }
        Reply::Err(err) if err.kind == ModelErrorKind::OutOfMemory => Err(ApiError::OutOfMemory {
            exception: err.exception,
            message: err.message,
        }),
        Reply::Err(err) => Err(ApiError::Model {
            exception: err.exception,
            message: err.message,
        }),
    }
}

/// Reads the body frame by frame into the envelope parser. A body that is too large is refused
/// as such even when it is also malformed, so the rest is still read (and dropped) after a parse
/// error, up to the limit.
async fn read_envelope(
    body: Incoming,
    content_length: Option<u64>,
    limit: u64,
) -> Result<Envelope, ApiError> {
    if content_length.is_some_and(|len| len > limit) {
        return Err(ApiError::TooLarge { limit });
    }
    let mut body = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let mut scanner = Scanner::new();
    let mut invalid = None;
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
        if invalid.is_none() {
            invalid = scanner.feed(&data).err();
        }
    }
    match invalid {
        Some(e) => Err(ApiError::InvalidRequest(e.0)),
        None => scanner.finish().map_err(|e| ApiError::InvalidRequest(e.0)),
    }
}

struct Answered {
    reply: Reply,
    replica_id: Arc<str>,
}

async fn call_replica(
    pool: &Arc<Pool>,
    conn: ReplicaConn,
    request: &[Bytes],
    timeout: Duration,
) -> Result<Answered, ApiError> {
    conn.slot.busy.set(1.0);
    let deadline = Instant::now() + timeout;
    let mut in_flight = InFlight {
        conn: Some(conn),
        pool: pool.clone(),
        deadline,
    };
    let conn = in_flight.conn.as_mut().expect("present until taken");
    let result = tokio::time::timeout_at(deadline, conn.call(request)).await;
    let conn = in_flight.conn.take().expect("present until taken");
    let replica_id = conn.slot.id.clone();
    match result {
        Ok(Ok(Reply::Err(err))) if err.kind == ModelErrorKind::OutOfMemory => {
            // The interpreter hit its memory limit: its state is suspect, so it is replaced.
            conn.slot.busy.set(0.0);
            tracing::warn!(replica = %replica_id, "replica out of memory; replacing it");
            conn.kill(KillReason::MemoryLimit);
            Ok(Answered {
                reply: Reply::Err(err),
                replica_id,
            })
        }
        Ok(Ok(reply)) => {
            conn.slot.busy.set(0.0);
            pool.release(conn);
            Ok(Answered { reply, replica_id })
        }
        Ok(Err(err)) => {
            conn.slot.busy.set(0.0);
            tracing::warn!(replica = %replica_id, "request failed: {err}");
            match err {
                CallError::Protocol(what) => {
                    conn.kill(KillReason::ProtocolError);
                    Err(ApiError::BadReplicaResponse(what))
                }
                // The process died (or is dying): make sure, and let the supervisor restart it.
                CallError::Closed | CallError::Io(_) => {
                    if let Some(why) = conn.slot.memory_killed(conn.generation) {
                        conn.kill(KillReason::MemoryLimit);
                        return Err(ApiError::MemoryLimit(why));
                    }
                    conn.kill(KillReason::None);
                    Err(ApiError::Shutdown)
                }
            }
        }
        Err(_elapsed) => {
            conn.slot.busy.set(0.0);
            tracing::warn!(replica = %replica_id, "request timed out after {timeout:?}; killing the replica");
            conn.kill(KillReason::Timeout);
            Err(ApiError::Timeout {
                secs: timeout.as_secs_f64(),
            })
        }
    }
}

/// A replica lent to a request. If the request is dropped mid-call (the client went away), the
/// call is finished in the background and the replica returned, or killed if it cannot be.
struct InFlight {
    conn: Option<ReplicaConn>,
    pool: Arc<Pool>,
    deadline: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let pool = self.pool.clone();
        let deadline = self.deadline;
        if !conn.awaiting_reply() {
            // Cancelled mid-write: the stream is out of step, so the process must go.
            conn.slot.busy.set(0.0);
            conn.kill(KillReason::ProtocolError);
            return;
        }
        tokio::spawn(async move {
            match tokio::time::timeout_at(deadline, conn.finish_call()).await {
                Ok(Ok(_)) => {
                    conn.slot.busy.set(0.0);
                    pool.release(conn);
                }
                Ok(Err(_)) => {
                    conn.slot.busy.set(0.0);
                    conn.kill(KillReason::None);
                }
                Err(_) => {
                    conn.slot.busy.set(0.0);
                    conn.kill(KillReason::Timeout);
                }
            }
        });
    }
}
