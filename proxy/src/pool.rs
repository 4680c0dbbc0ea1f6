//! The replicas of one model and the strict-FIFO queue of requests waiting for them.
//!
//! A request takes an idle replica if nobody is waiting, or joins the back of the queue. A replica
//! coming free goes to the front waiter, so requests are served in arrival order and a replica
//! never holds two requests. Idle replicas are kept in a FIFO too, which spreads load over all of
//! them. The lock is a plain mutex held for a few pointer moves, never across an await.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use metrics::Gauge;
use tokio::sync::oneshot;

use crate::replica::ReplicaConn;

/// Health of one replica slot, as the supervisor reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotHealth {
    /// A process is starting (or restarting after a transient failure): worth waiting for.
    Starting,
    /// A process is ready and serving.
    Ready,
    /// Loading failed or the slot is crash-looping: not worth waiting for.
    Failed,
    /// Stopped for good (shutdown).
    Stopped,
}

#[derive(Debug, PartialEq, Eq)]
pub enum AcquireError {
    /// The queue is full, or no replica came free within the queue timeout.
    Busy(&'static str),
    /// No slot is ready or starting.
    Unavailable,
}

type Waiter = oneshot::Sender<Result<ReplicaConn, AcquireError>>;

pub struct Pool {
    pub model: Arc<str>,
    state: Mutex<State>,
    max_queue: usize,
    queue_depth: Gauge,
}

struct State {
    idle: VecDeque<ReplicaConn>,
    waiters: VecDeque<Waiter>,
    health: Vec<SlotHealth>,
}

impl State {
    fn available(&self) -> bool {
        self.health
            .iter()
            .any(|h| matches!(h, SlotHealth::Starting | SlotHealth::Ready))
    }
}

impl Pool {
    pub fn new(model: Arc<str>, slots: usize, max_queue: usize) -> Pool {
        let queue_depth =
            metrics::gauge!(crate::metrics::QUEUE_DEPTH, "model" => model.to_string());
        queue_depth.set(0.0);
        Pool {
            model,
            state: Mutex::new(State {
                idle: VecDeque::with_capacity(slots),
                waiters: VecDeque::new(),
                health: vec![SlotHealth::Starting; slots],
            }),
            max_queue,
            queue_depth,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue half-updated (every update is a
        // single push or pop), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits, in FIFO order, for a replica of this model.
    pub async fn acquire(&self, queue_timeout: Duration) -> Result<ReplicaConn, AcquireError> {
        let rx = {
            let mut st = self.lock();
            if !st.available() {
                return Err(AcquireError::Unavailable);
            }
            if st.waiters.is_empty() {
                if let Some(conn) = st.idle.pop_front() {
                    return Ok(conn);
                }
            }
            if st.waiters.len() >= self.max_queue {
                st.waiters.retain(|w| !w.is_closed());
                if st.waiters.len() >= self.max_queue {
                    return Err(AcquireError::Busy("the model's request queue is full"));
                }
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(tx);
            self.queue_depth.set(st.waiters.len() as f64);
            rx
        };
        let mut waiting = WaitingTurn {
            rx: Some(rx),
            pool: self,
        };
        let rx = waiting.rx.as_mut().expect("receiver present until dropped");
        match tokio::time::timeout(queue_timeout, rx).await {
            Ok(Ok(result)) => {
                waiting.rx = None;
                result
            }
            Ok(Err(_)) => {
                waiting.rx = None;
                Err(AcquireError::Unavailable)
            }
            Err(_elapsed) => {
                // A replica may have been handed over just as the timer fired: take it rather
                // than lose it.
                let mut rx = waiting.rx.take().expect("receiver present");
                rx.close();
                match rx.try_recv() {
                    Ok(result) => result,
                    Err(_) => Err(AcquireError::Busy(
                        "no replica became free within the queue timeout",
                    )),
                }
            }
        }
    }

    /// Returns a healthy replica: to the first live waiter, or to the idle set.
    pub fn release(&self, mut conn: ReplicaConn) {
        let mut st = self.lock();
        while let Some(waiter) = st.waiters.pop_front() {
            match waiter.send(Ok(conn)) {
                Ok(()) => {
                    self.queue_depth.set(st.waiters.len() as f64);
                    return;
                }
                Err(Ok(back)) => conn = back,
                Err(Err(_)) => unreachable!("we sent Ok"),
            }
        }
        self.queue_depth.set(0.0);
        st.idle.push_back(conn);
    }

    /// Drops the idle connection of `slot_id`, if any (its process has exited).
    /// Drops the slot's connection from the idle list; true when it was there (the replica was
    /// not serving a request).
    pub fn remove_idle(&self, slot_id: &str) -> bool {
        let mut st = self.lock();
        let before = st.idle.len();
        st.idle.retain(|c| &*c.slot.id != slot_id);
        st.idle.len() != before
    }

    /// Records a slot's health; when no slot is worth waiting for, every waiter gets 503 now
    /// instead of 429 later.
    pub fn set_health(&self, slot_index: usize, health: SlotHealth) {
        let mut st = self.lock();
        st.health[slot_index] = health;
        if !st.available() {
            st.idle.clear();
            for w in st.waiters.drain(..) {
                let _ = w.send(Err(AcquireError::Unavailable));
            }
            self.queue_depth.set(0.0);
        }
    }

    /// Number of slots with a ready process.
    pub fn ready_count(&self) -> usize {
        self.lock()
            .health
            .iter()
            .filter(|h| **h == SlotHealth::Ready)
            .count()
    }

    /// True when any slot has failed to load or is crash-looping.
    pub fn any_failed(&self) -> bool {
        self.lock().health.contains(&SlotHealth::Failed)
    }

    /// True when nobody waits and every ready replica is back in the idle set: nothing in flight.
    pub fn drained(&self) -> bool {
        let st = self.lock();
        let ready = st
            .health
            .iter()
            .filter(|h| **h == SlotHealth::Ready)
            .count();
        st.waiters.iter().all(|w| w.is_closed()) && st.idle.len() >= ready
    }

    pub fn health(&self) -> Vec<SlotHealth> {
        self.lock().health.clone()
    }
}

/// A place in the queue. If the request is dropped (client gone, timeout) after a replica was
/// handed to it, the replica goes back to the pool instead of being lost.
struct WaitingTurn<'a> {
    rx: Option<oneshot::Receiver<Result<ReplicaConn, AcquireError>>>,
    pool: &'a Pool,
}

impl Drop for WaitingTurn<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Ok(conn)) = rx.try_recv() {
                self.pool.release(conn);
            }
        }
    }
}
