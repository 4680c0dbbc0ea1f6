//! The dispatcher: the task that drives one replica while its model's queue has work.
//!
//! It takes a batch from the front of the queue ([`Pool::next_batch`]), writes it to the replica
//! in one write and reads the answers, which come back in the order written because the replica
//! runs one request at a time. Each request gets its own deadline, counted from the answer before
//! it (from the write, for the first). When the queue is empty the replica goes back to the pool.
//!
//! A call that leaves the replica unusable (it died, timed out, answered out of memory, or broke
//! the protocol) gets its error and the replica is killed (the supervisor restarts it). The
//! requests written behind it never ran, since the replica runs them in order and stops at the
//! first that did not end well (an out-of-memory answer ends the replica's reading), so they go
//! back to the front of the queue. After a protocol error the stream cannot be trusted to say
//! what ran, so they fail with it instead.
//!
//! The dispatcher is a task of its own, so a client that goes away takes nothing with it: its
//! answer is dropped and the other requests of the batch are served.

use std::sync::Arc;
use std::time::Duration;

use modelgate_protocol::ModelErrorKind;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::pool::{Pending, Pool};
use crate::replica::{CallError, KillReason, ReplicaConn, Reply};

/// Drives `conn` until the queue is empty (the connection goes back to the pool) or the
/// replica is written off.
pub(crate) async fn run(pool: Arc<Pool>, mut conn: ReplicaConn) {
    conn.slot.busy.set(1.0);
    let mut batch = Vec::new();
    let mut served = None;
    loop {
        // Requests that became ready in the same turn of the runtime (a burst of connections
        // woken by one `epoll_wait`) join the queue before the batch is taken.
        tokio::task::yield_now().await;
        conn = match pool.next_batch(conn, &mut batch, served) {
            Some(conn) => conn,
            None => return,
        };
        pool.batch_size.record(batch.len() as f64);
        match serve(&pool, &mut conn, &mut batch).await {
            Some(per_request) => served = Some(per_request),
            None => {
                conn.slot.busy.set(0.0);
                return;
            }
        }
    }
}

/// Writes `batch` and hands out the answers. Returns the time per request, or `None` when the
/// replica was written off (the requests not answered are handled).
async fn serve(
    pool: &Arc<Pool>,
    conn: &mut ReplicaConn,
    batch: &mut Vec<Pending>,
) -> Option<Duration> {
    let taken_at = Instant::now();
    let n = batch.len();
    let mut rest = batch.drain(..);
    let written = conn
        .send(rest.as_slice().iter().map(|p| &p.request[..]))
        .await;
    if let Err(err) = written {
        // The stream is broken or out of step: the replica goes. Answers it wrote before that
        // are still read below; the first request without one gets the error.
        tracing::warn!(replica = %conn.slot.id, "writing to the replica failed: {err}");
        conn.kill(KillReason::None);
    }
    let mut start = taken_at;
    while let Some(p) = rest.next() {
        let result = tokio::time::timeout_at(start + p.timeout, conn.finish_call()).await;
        match result {
            Ok(Ok(reply)) if !is_out_of_memory(&reply) => {
                start = Instant::now();
                p.answer(Ok(reply), &conn.slot, taken_at);
            }
            result => {
                let timeout = p.timeout;
                let (outcome, out_of_step) = ended_badly(conn, result, timeout);
                p.answer(outcome, &conn.slot, taken_at);
                let rest: Vec<Pending> = rest.collect();
                match out_of_step {
                    Some(what) => {
                        for p in rest {
                            p.answer(
                                Err(ApiError::BadReplicaResponse(what)),
                                &conn.slot,
                                taken_at,
                            );
                        }
                    }
                    None => pool.requeue(rest),
                }
                return None;
            }
        }
    }
    // `start` is when the last answer was read.
    Some((start - taken_at) / n as u32)
}

fn is_out_of_memory(reply: &Reply) -> bool {
    matches!(reply, Reply::Err(err) if err.kind == ModelErrorKind::OutOfMemory)
}

/// A call that leaves its replica unusable: out of memory, a broken or closed stream, or past the
/// request timeout. The replica's process is killed (the supervisor restarts it). Returns the
/// call's outcome and, when the stream is out of step so the requests written after it cannot be
/// known not to have run, what was wrong (`None`: they never ran).
#[cold]
#[inline(never)]
fn ended_badly(
    conn: &ReplicaConn,
    result: Result<Result<Reply, CallError>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> (Result<Reply, ApiError>, Option<&'static str>) {
    let replica_id = &conn.slot.id;
    match result {
        Ok(Ok(reply)) => {
            // The interpreter hit its memory limit: its state is suspect, so it is replaced.
            tracing::warn!(replica = %replica_id, "replica out of memory; replacing it");
            conn.kill(KillReason::MemoryLimit);
            (Ok(reply), None)
        }
        Ok(Err(err)) => {
            tracing::warn!(replica = %replica_id, "request failed: {err}");
            match err {
                CallError::Protocol(what) => {
                    conn.kill(KillReason::ProtocolError);
                    (Err(ApiError::BadReplicaResponse(what)), Some(what))
                }
                // The process died (or is dying): make sure, and let the supervisor restart it.
                CallError::Closed | CallError::Io(_) => {
                    if let Some(why) = conn.slot.memory_killed(conn.generation) {
                        conn.kill(KillReason::MemoryLimit);
                        return (Err(ApiError::MemoryLimit(why)), None);
                    }
                    conn.kill(KillReason::None);
                    (Err(ApiError::Shutdown), None)
                }
            }
        }
        Err(_elapsed) => {
            tracing::warn!(replica = %replica_id, "request timed out after {timeout:?}; killing the replica");
            conn.kill(KillReason::Timeout);
            (
                Err(ApiError::Timeout {
                    secs: timeout.as_secs_f64(),
                }),
                None,
            )
        }
    }
}
