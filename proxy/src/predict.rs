//! `POST /model`: the prediction request, phase by phase.
//!
//! 1. **Read** the body, refusing it past `max_request_bytes` by Content-Length or while streaming.
//! 2. **Parse** the envelope `{"accessKey", "request"}`; `request` stays a borrowed slice.
//! 3. **Route** by access key through the routing snapshot (no store access), and when the model
//!    has authentication enabled, check the caller's API key against the in-memory auth index.
//! 4. **Queue** in the model's FIFO for a free replica, up to `queue_timeout`.
//! 5. **Call** the replica, up to `request_timeout`; past it the replica's process group is killed.
//! 6. **Respond**: the function's JSON is spliced, unparsed, into the success envelope.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::auth::{Action, Auth};
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

/// The request envelope, borrowing from the body buffer.
#[derive(Deserialize)]
pub struct Envelope<'a> {
    #[serde(rename = "accessKey", borrow, default)]
    pub access_key: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub request: Option<&'a RawValue>,
}

/// Parses the envelope; `request` must be a JSON object.
pub fn parse_envelope(body: &[u8]) -> Result<(Cow<'_, str>, &RawValue), ApiError> {
    let env: Envelope<'_> = serde_json::from_slice(body).map_err(|e| {
        ApiError::InvalidRequest(format!(
            "request body must be a JSON object with \"accessKey\" and \"request\": {e}"
        ))
    })?;
    let key = env
        .access_key
        .ok_or_else(|| ApiError::InvalidRequest("missing \"accessKey\"".into()))?;
    let request = env
        .request
        .ok_or_else(|| ApiError::InvalidRequest("missing \"request\"".into()))?;
    if !request.get().starts_with('{') {
        return Err(ApiError::InvalidRequest(
            "\"request\" must be a JSON object".into(),
        ));
    }
    Ok((key, request))
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
    // Phase 1: read.
    let content_length = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = tokio::time::timeout(
        limits.body_timeout,
        read_body(req.into_body(), content_length, limits.max_request_bytes),
    )
    .await
    .map_err(|_| ApiError::BodyTimeout {
        secs: limits.body_timeout.as_secs_f64(),
    })??;

    // Phase 2: parse.
    let (access_key, request) = parse_envelope(&body)?;

    // Phase 3: route.
    let entry = routes
        .load()
        .by_access_key(&access_key)
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
    route.metrics.request_size.record(body.len() as f64);

    // Phase 4: queue.
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

    // Phase 5: call.
    let reply = call_replica(
        &route.pool,
        conn,
        request.get().as_bytes(),
        limits.request_timeout,
    )
    .await?;

    // Phase 6: respond.
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

async fn read_body(
    body: Incoming,
    content_length: Option<u64>,
    limit: u64,
) -> Result<Bytes, ApiError> {
    if content_length.is_some_and(|len| len > limit) {
        return Err(ApiError::TooLarge { limit });
    }
    let mut body = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    // A body that arrives as one frame is used as is; otherwise frames are copied into one buffer
    // sized from Content-Length, so at most one copy of the body is ever held.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
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
        if buf.is_empty() && first.is_none() {
            first = Some(data);
            continue;
        }
        if let Some(f) = first.take() {
            let hint = content_length.unwrap_or(0).min(limit) as usize;
            buf.reserve(hint.max(f.len() + data.len()));
            buf.extend_from_slice(&f);
        }
        buf.extend_from_slice(&data);
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

struct Answered {
    reply: Reply,
    replica_id: Arc<str>,
}

async fn call_replica(
    pool: &Arc<Pool>,
    conn: ReplicaConn,
    request: &[u8],
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
            conn.slot.kill(KillReason::MemoryLimit);
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
                    conn.slot.kill(KillReason::ProtocolError);
                    Err(ApiError::BadReplicaResponse(what))
                }
                // The process died (or is dying): make sure, and let the supervisor restart it.
                CallError::Closed | CallError::Io(_) => {
                    if let Some(why) = conn.slot.memory_killed(conn.generation) {
                        conn.slot.kill(KillReason::MemoryLimit);
                        return Err(ApiError::MemoryLimit(why));
                    }
                    conn.slot.kill(KillReason::None);
                    Err(ApiError::Shutdown)
                }
            }
        }
        Err(_elapsed) => {
            conn.slot.busy.set(0.0);
            tracing::warn!(replica = %replica_id, "request timed out after {timeout:?}; killing the replica");
            conn.slot.kill(KillReason::Timeout);
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
            conn.slot.kill(KillReason::ProtocolError);
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
                    conn.slot.kill(KillReason::None);
                }
                Err(_) => {
                    conn.slot.busy.set(0.0);
                    conn.slot.kill(KillReason::Timeout);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_cases() {
        let ok = br#"{"accessKey":"k1","request":{"a":1}}"#;
        let (k, r) = parse_envelope(ok).unwrap();
        assert_eq!(k, "k1");
        assert_eq!(r.get(), r#"{"a":1}"#);
        let escaped = br#"{"accessKey":"k\u0031","request":{}, "extra": [1]}"#;
        assert_eq!(parse_envelope(escaped).unwrap().0, "k1");
        for bad in [
            &b"not json"[..],
            br#"{"request":{}}"#,
            br#"{"accessKey":"k"}"#,
            br#"{"accessKey":5,"request":{}}"#,
            br#"{"accessKey":"k","request":[1]}"#,
            br#"{"accessKey":"k","request":{}"#,
            br#"[]"#,
            b"",
        ] {
            let err = parse_envelope(bad).unwrap_err();
            assert_eq!(
                err.code(),
                "request.invalid",
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
