//! The dispatcher: the task that drives one replica while its model's queue has work.
//!
//! It takes a batch from the front of the queue ([`Pool::next_batch`]), writes it to the replica
//! in one write and reads the answers, which come back in the order written because the replica
//! runs one request at a time. Each request gets its own deadline, counted from the answer before
//! it (from the write, for the first). When the queue is empty the replica goes back to the pool.
//!
//! A call that leaves the replica unusable (it died, timed out, answered out of memory, or broke
//! the protocol) gets its error and the replica is killed (the supervisor restarts it). The
//! requests written behind it go back to the front of the queue when they cannot have run: the
//! replica runs them in order, and stops reading after an out-of-memory answer. A replica holds
//! an answer while the next request can start at once, so when the process dies with several
//! requests of the batch unanswered, any of them may have run and the request that ended it may
//! be any of them: all go back, each to be sent alone ([`Pool::requeue_alone`]), where a death is
//! the request's own. A timeout is the one case where the replica may have finished
//! the request just before the kill and started the next, so after that kill the dispatcher
//! reads what the replica wrote before it died ([`settle`]). After a protocol error the stream
//! cannot say what ran, so the requests behind it fail with it.
//!
//! The dispatcher is a task of its own, so a client that goes away takes nothing with it: its
//! answer is dropped and the other requests of the batch are served.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use modelgate_protocol::ModelErrorKind;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::pool::{Dispatcher, Next, Pending, Pool};
use crate::replica::{CallError, KillReason, ReplicaConn, Reply};

/// How long a dispatcher reads a killed replica's last answers before it gives up on knowing
/// which requests ran.
const SETTLE: Duration = Duration::from_secs(2);

/// Drives the replica behind `conn` for its process's life: woken through `me` when requests
/// wait, it serves batches until the queue is empty, then waits in the pool's idle list again.
/// It ends when its process has ended ([`Pool::process_ended`]) or when it writes the replica
/// off.
pub(crate) async fn run(pool: Arc<Pool>, mut conn: ReplicaConn, me: Arc<Dispatcher>) {
    let mut batch = Vec::new();
    // The one timer for the requests' timeouts (see `serve`): far off until the first request.
    let mut deadline = std::pin::pin!(tokio::time::sleep_until(Instant::now() + FAR));
    // The slot's next process may be serving already when this one's dispatcher stops.
    let busy = |conn: &ReplicaConn, v: f64| {
        if conn.slot.is_current(conn.generation) {
            conn.slot.busy.set(v);
        }
    };
    loop {
        me.wake.notified().await;
        if me.stop.load(Ordering::SeqCst) {
            pool.ended(&me);
            return;
        }
        busy(&conn, 1.0);
        // Requests that became ready in the same turn of the runtime (a burst of connections
        // woken by one `epoll_wait`) join the queue before the first batch is taken, while that
        // pays. After a batch there is no point: the next requests of those connections come
        // after their answers, through the runtime's next `epoll_wait`.
        let yielded = pool.wait_for_company();
        if yielded {
            tokio::task::yield_now().await;
        }
        let mut served = None;
        loop {
            match pool.next_batch(&me, &mut batch, served, yielded) {
                Next::Serve => {}
                Next::Park => break,
                Next::Stop => {
                    busy(&conn, 0.0);
                    return;
                }
            }
            pool.batch_size.record(batch.len() as f64);
            match serve(&pool, &mut conn, &mut batch, deadline.as_mut()).await {
                Ok(per_request) => served = Some(per_request),
                Err(spent) => {
                    pool.retire(spent);
                    busy(&conn, 0.0);
                    return;
                }
            }
        }
        busy(&conn, 0.0);
    }
}

/// Far enough to mean "not armed".
const FAR: Duration = Duration::from_secs(86_400 * 365);

/// Writes `batch` and hands out the answers. Returns the time per request; or, when the
/// replica was written off (every request of the batch has been answered or requeued), the time
/// spent on the batch.
///
/// The requests' timeouts share one timer, `deadline`, which is only moved earlier: a request's
/// own deadline is rarely earlier than the one before it (they count from the answer before), so
/// the timer is re-armed about once per request timeout rather than once per request. When it
/// fires before the current request's deadline, it is re-armed for it.
async fn serve(
    pool: &Arc<Pool>,
    conn: &mut ReplicaConn,
    batch: &mut Vec<Pending>,
    mut deadline: std::pin::Pin<&mut tokio::time::Sleep>,
) -> Result<Duration, Duration> {
    let taken_at = Instant::now();
    let n = batch.len();
    let write_deadline = taken_at + batch[0].timeout;
    let mut rest = batch.drain(..);
    let requests = rest.as_slice().iter().map(|p| &p.request[..]);
    let ahead = rest.as_slice().first().and_then(|p| p.ahead.as_deref());
    match tokio::time::timeout_at(write_deadline, conn.send(requests, ahead)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            // The stream is broken or out of step: the replica goes. Answers it wrote before
            // that are still read below; the first request without one gets the error.
            tracing::warn!(replica = %conn.slot.id, "writing to the replica failed: {err}");
            conn.kill(KillReason::None);
        }
        Err(_elapsed) => {
            // The replica stopped reading: the first request did not reach it whole.
            Box::pin(timed_out(pool, conn, rest.collect(), taken_at)).await;
            return Err(taken_at.elapsed());
        }
    }
    let mut start = taken_at;
    while let Some(p) = rest.next() {
        let due = start + p.timeout;
        if deadline.deadline() > due {
            deadline.as_mut().reset(due);
        }
        let result = {
            let mut call = std::pin::pin!(conn.finish_call());
            loop {
                tokio::select! {
                    biased;
                    result = &mut call => break Ok(result),
                    () = deadline.as_mut() => {
                        if Instant::now() >= due {
                            break Err(());
                        }
                        deadline.as_mut().reset(due);
                    }
                }
            }
        };
        match result {
            Ok(Ok(reply)) if !is_out_of_memory(&reply) => {
                start = Instant::now();
                p.answer(Ok(reply), &conn.slot, taken_at);
            }
            Ok(result) => {
                let died = matches!(result, Err(CallError::Closed | CallError::Io(_)));
                let (outcome, out_of_step) = ended_badly(conn, result);
                let rest: Vec<Pending> = rest.collect();
                if died && !rest.is_empty() {
                    // `p` and those after it may have run with their answers held, and any of
                    // them may have ended the process: all go back, each to go out alone.
                    conn.slot.died_mid_batch(conn.generation);
                    let memory = match outcome {
                        Err(ApiError::MemoryLimit(why)) => Some(why),
                        _ => None,
                    };
                    let error = || match &memory {
                        Some(why) => ApiError::MemoryLimit(why.clone()),
                        None => ApiError::Shutdown,
                    };
                    let all = std::iter::once(p).chain(rest).collect();
                    pool.requeue_alone(all, error, &conn.slot, taken_at);
                    return Err(taken_at.elapsed());
                }
                p.answer(outcome, &conn.slot, taken_at);
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
                return Err(taken_at.elapsed());
            }
            Err(()) => {
                Box::pin(timed_out(
                    pool,
                    conn,
                    std::iter::once(p).chain(rest).collect(),
                    taken_at,
                ))
                .await;
                return Err(taken_at.elapsed());
            }
        }
    }
    // `start` is when the last answer was read.
    Ok((start - taken_at) / n as u32)
}

fn is_out_of_memory(reply: &Reply) -> bool {
    matches!(reply, Reply::Err(err) if err.kind == ModelErrorKind::OutOfMemory)
}

/// The first of `left` ran past its timeout: the replica is killed, then [`settle`]d. Called
/// boxed, so that its state does not grow the dispatcher's future on the common path.
#[cold]
#[inline(never)]
async fn timed_out(
    pool: &Arc<Pool>,
    conn: &mut ReplicaConn,
    left: Vec<Pending>,
    taken_at: Instant,
) {
    let timeout = left[0].timeout;
    tracing::warn!(replica = %conn.slot.id, "request timed out after {timeout:?}; killing the replica");
    conn.kill(KillReason::Timeout);
    settle(pool, conn, left, taken_at).await;
}

/// After a kill for a timeout: the replica may have finished the request (`left[0]`) between the
/// deadline and the kill, and started the next. Reads what it wrote before it died, up to
/// [`SETTLE`], so that every answer it wrote reaches its caller; a request that may have started
/// without answering fails; the requests after it never started and go back to the queue. After
/// an out-of-memory answer the replica ran nothing more, so the rest go back too; after a
/// protocol error nothing can be told, so the rest fail with it.
async fn settle(pool: &Arc<Pool>, conn: &mut ReplicaConn, left: Vec<Pending>, taken_at: Instant) {
    let until = Instant::now() + SETTLE;
    let slot = conn.slot.clone();
    let mut left = left.into_iter();
    let mut first = true;
    while let Some(p) = left.next() {
        // What the one that may have been running when the kill landed gets, if it never
        // answered: the timed-out one its timeout, the ones after it a shutdown.
        let unanswered = if first {
            ApiError::Timeout {
                secs: p.timeout.as_secs_f64(),
            }
        } else {
            ApiError::Shutdown
        };
        match tokio::time::timeout_at(until, conn.finish_call()).await {
            // It finished after all, just before the kill: the next one may have started,
            // unless this was an out-of-memory answer, after which the replica runs nothing.
            Ok(Ok(reply)) => {
                let out_of_memory = is_out_of_memory(&reply);
                p.answer(Ok(reply), &slot, taken_at);
                if out_of_memory {
                    pool.requeue(left.collect());
                    return;
                }
            }
            Ok(Err(CallError::Protocol(what))) => {
                p.answer(Err(ApiError::BadReplicaResponse(what)), &slot, taken_at);
                for p in left {
                    p.answer(Err(ApiError::BadReplicaResponse(what)), &slot, taken_at);
                }
                return;
            }
            // The stream ended: this one did not answer (it was running, or its answer was still
            // held when the kill landed). Those after it never finished or had their answers held
            // too: they go back, to run at most once more.
            Ok(Err(_)) => {
                p.answer(Err(unanswered), &slot, taken_at);
                pool.requeue(left.collect());
                return;
            }
            // No telling what ran.
            Err(_) => {
                p.answer(Err(unanswered), &slot, taken_at);
                for p in left {
                    p.answer(Err(ApiError::Shutdown), &slot, taken_at);
                }
                return;
            }
        }
        first = false;
    }
}

/// A call that leaves its replica unusable: out of memory, or a broken or closed stream. The
/// replica's process is killed (the supervisor restarts it). Returns the call's outcome and, when
/// the stream is out of step so the requests written after it cannot be known not to have run,
/// what was wrong (`None`: they never ran).
#[cold]
#[inline(never)]
fn ended_badly(
    conn: &ReplicaConn,
    result: Result<Reply, CallError>,
) -> (Result<Reply, ApiError>, Option<&'static str>) {
    let replica_id = &conn.slot.id;
    match result {
        Ok(reply) => {
            // The interpreter hit its memory limit: its state is suspect, so it is replaced.
            tracing::warn!(replica = %replica_id, "replica out of memory; replacing it");
            conn.kill(KillReason::MemoryLimit);
            (Ok(reply), None)
        }
        Err(err) => {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{AcquireError, Batching, Queueing, SlotHealth};
    use crate::replica::Slot;
    use bytes::Bytes;
    use modelgate_protocol::{self as protocol, Kind};
    use std::io::{Read, Write};

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut f = protocol::encode_header(kind, payload.len()).to_vec();
        f.extend_from_slice(payload);
        f
    }

    /// The race a timeout leaves: the replica finishes the request just after its deadline and
    /// starts the next before the kill lands. The far end of the socket plays that replica: it
    /// reads a batch of four, answers the first two late, then dies. The first two get their
    /// answers, the third (which may have run) fails, and only the fourth, which cannot have
    /// started, goes back to the queue.
    #[tokio::test]
    async fn after_a_timeout_answers_written_before_the_kill_reach_their_callers() {
        let pool = Arc::new(Pool::new(
            "m".into(),
            1,
            Queueing {
                max_queue: 16,
                timeout: Duration::from_millis(800),
                batching: Batching {
                    max: 16,
                    budget: Duration::from_secs(1000),
                },
            },
        ));
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let theirs = theirs.into_std().unwrap();
        theirs.set_nonblocking(false).unwrap();
        let replica = std::thread::spawn(move || {
            let mut theirs = theirs;
            let read_request = |theirs: &mut std::os::unix::net::UnixStream| {
                let mut h = [0u8; protocol::HEADER_LEN];
                theirs.read_exact(&mut h).unwrap();
                let mut payload = vec![0; protocol::decode_header(h).unwrap().payload_len];
                theirs.read_exact(&mut payload).unwrap();
            };
            // A first request, answered at once: the pool learns the replica is quick.
            read_request(&mut theirs);
            theirs.write_all(&frame(Kind::ResultOk, b"0")).unwrap();
            for _ in 0..4 {
                read_request(&mut theirs);
            }
            std::thread::sleep(Duration::from_millis(300));
            theirs.write_all(&frame(Kind::ResultOk, b"1")).unwrap();
            theirs.write_all(&frame(Kind::ResultOk, b"2")).unwrap();
        });
        pool.set_health(0, SlotHealth::Ready);
        let slot = Arc::new(Slot::new("m".into(), 0));
        pool.release(ReplicaConn::new(slot, 1, ours).unwrap());
        let first = pool
            .call(vec![Bytes::from_static(b"{}")], Duration::from_secs(1))
            .await
            .unwrap();
        assert!(matches!(first.result, Ok(Reply::Ok(ref p)) if &p[..] == b"0"));
        let calls: Vec<_> = (0..4)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let request = vec![Bytes::from(format!("{{\"i\":{i}}}"))];
                    pool.call(request, Duration::from_millis(100)).await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        let mut calls = calls.into_iter();
        for call in calls.by_ref().take(3) {
            outcomes.push(call.await.unwrap());
        }
        replica.join().unwrap();
        // The replacement process comes up.
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let next = fake_replica(theirs, 1, Duration::ZERO, b"4");
        pool.release(ReplicaConn::new(Arc::new(Slot::new("m".into(), 0)), 2, ours).unwrap());
        outcomes.push(calls.next().unwrap().await.unwrap());
        let ok = |o: &Result<crate::pool::Served, AcquireError>, want: &[u8]| matches!(o, Ok(s) if matches!(&s.result, Ok(Reply::Ok(p)) if &p[..] == want));
        assert!(ok(&outcomes[0], b"1"), "the late answer reaches its caller");
        assert!(ok(&outcomes[1], b"2"), "so does the next one's");
        assert!(
            matches!(&outcomes[2], Ok(s) if matches!(s.result, Err(ApiError::Shutdown))),
            "the one that may have started fails"
        );
        // Put back, it is served by the next replica.
        assert!(
            ok(&outcomes[3], b"4"),
            "the one that never started runs on the next replica"
        );
        assert_eq!(next.join().unwrap(), 1, "once");
    }

    /// The far end of a replica socket, as a replica: answers `requests` requests with `answer`,
    /// each after `delay`, then closes. Returns how many it answered.
    fn fake_replica(
        theirs: tokio::net::UnixStream,
        requests: usize,
        delay: Duration,
        answer: &'static [u8],
    ) -> std::thread::JoinHandle<usize> {
        let theirs = theirs.into_std().unwrap();
        theirs.set_nonblocking(false).unwrap();
        std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut served = 0;
            for _ in 0..requests {
                let mut h = [0u8; protocol::HEADER_LEN];
                if theirs.read_exact(&mut h).is_err() {
                    break;
                }
                let mut payload = vec![0; protocol::decode_header(h).unwrap().payload_len];
                theirs.read_exact(&mut payload).unwrap();
                std::thread::sleep(delay);
                theirs.write_all(&frame(Kind::ResultOk, answer)).unwrap();
                served += 1;
            }
            served
        })
    }

    /// A process that ends while its dispatcher is serving: the dispatcher finishes the batch,
    /// then ends instead of waiting idle with a dead connection (the next request would fail on
    /// it), and lets go of the pool.
    #[tokio::test]
    async fn a_dispatcher_whose_process_ended_mid_batch_ends_after_it() {
        let pool = Arc::new(Pool::new(
            "m".into(),
            1,
            Queueing {
                timeout: Duration::from_millis(500),
                ..Queueing::default()
            },
        ));
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let replica = fake_replica(theirs, 1, Duration::from_millis(200), b"1");
        pool.set_health(0, SlotHealth::Ready);
        let slot = Arc::new(Slot::new("m".into(), 0));
        let d = pool.release(ReplicaConn::new(slot, 1, ours).unwrap());
        let call = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.call(vec![Bytes::from_static(b"{}")], Duration::from_secs(1))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pool.process_ended(&d), "it was serving, not idle");
        let served = call.await.unwrap().unwrap();
        assert!(matches!(served.result, Ok(Reply::Ok(ref p)) if &p[..] == b"1"));
        assert_eq!(replica.join().unwrap(), 1);
        assert!(
            !pool.drained(),
            "not back in the idle list, where it would count as a replica ready to serve"
        );
        // No dispatcher is left: the next request waits for one until its queue timeout.
        let next = pool
            .call(vec![Bytes::from_static(b"{}")], Duration::from_secs(1))
            .await;
        assert_eq!(
            next.err(),
            Some(AcquireError::Busy(crate::pool::QUEUE_TIMED_OUT))
        );
        assert_eq!(
            Arc::strong_count(&pool),
            1,
            "the dispatcher let go of the pool"
        );
    }
}
