//! The replicas of one model and the strict-FIFO queue of requests waiting for them.
//!
//! Every request joins the back of the queue with its bytes. Each replica process is driven by a
//! dispatcher task of its own ([`crate::dispatch`]): while the queue has work it takes requests
//! from the front, writes them to the replica (several at once when several wait, see
//! [`Batching`]) and hands each its answer. A replica runs one request at a time, in the order
//! written, so requests are served in arrival order. An idle dispatcher waits in the pool's idle
//! list; a request that finds one wakes it. The idle list is a FIFO too, which spreads load over
//! all replicas. The lock is a plain mutex held for a few pointer moves, never across an await.
//!
//! The queue timeout is one timer for the whole queue, not one per request: every request of a
//! pool waits at most the same [`Queueing::timeout`], so queue deadlines come in queue order and
//! a sweeper task ([`sweep`]) sleeps until the front's. A request that wakes an idle dispatcher
//! does not arm it at all: the dispatcher takes it at once (or, should its process end first,
//! arms it on its way out).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use metrics::{Counter, Gauge, Histogram};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::early::{Ahead, EarlyRegion};
use crate::error::ApiError;
use crate::replica::{ReplicaConn, Reply, Slot, Speculation};

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
    /// The request was taken but its dispatcher ended without an answer (the runtime is
    /// shutting down).
    Dropped,
}

/// How many waiting requests a dispatcher writes to its replica at once.
///
/// Writing the requests already waiting together lets the replica read them in one go and the
/// proxy read their answers in one go: one round of wake-ups for the lot instead of one per
/// request, which on a core shared with the replica is most of a small request's cost. The
/// replica still runs them one at a time, so a batch only pays while the function is quick next
/// to that cost, and a request written behind others waits for them in the replica rather than in
/// the queue. A batch therefore takes at most `max` requests, at most its share of the queue when
/// the model has several replicas, and only as many as the replica's recent time per request fits
/// in `budget` (a function that takes longer than `budget` gets one request at a time).
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max: usize,
    pub budget: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max: 16,
            budget: Duration::from_micros(250),
        }
    }
}

/// How a model's requests wait for its replicas; fixed for the pool's life.
#[derive(Debug, Clone, Copy)]
pub struct Queueing {
    /// Requests that may wait at once; past it, 429.
    pub max_queue: usize,
    /// How long a request may wait for a replica; past it, 429.
    pub timeout: Duration,
    pub batching: Batching,
}

impl Default for Queueing {
    fn default() -> Self {
        Queueing {
            max_queue: 1024,
            timeout: Duration::from_secs(30),
            batching: Batching::default(),
        }
    }
}

/// Why a request left the queue without a replica when its queue timeout passed.
pub(crate) const QUEUE_TIMED_OUT: &str = "no replica became free within the queue timeout";

/// Requests larger than this are written alone, and a batch stops growing past this many bytes:
/// small requests are copied into one buffer to go out in one write.
pub const BATCH_BYTES: usize = 64 * 1024;

/// A request in the queue, or in a batch on its way to a replica.
pub struct Pending {
    /// The request's JSON text, as slices of the body.
    pub request: Vec<Bytes>,
    enqueued: Instant,
    /// Past this, a request that is (back) in the queue gets 429 instead of a replica.
    queue_deadline: Instant,
    /// How long the function may run before its replica is killed.
    pub timeout: Duration,
    /// Goes to its replica in a batch of its own: it was in a batch whose replica died before
    /// answering it, and may not be the request that ended the process ([`Pool::requeue_alone`]).
    alone: bool,
    /// What its upload wrote ahead into a replica's region ([`crate::early`]).
    pub ahead: Option<Box<Ahead>>,
    tx: oneshot::Sender<Result<Served, AcquireError>>,
}

impl Pending {
    fn len(&self) -> usize {
        self.request.iter().map(Bytes::len).sum()
    }

    /// Hands the request its outcome; `taken_at` is when it left the queue. A caller that went
    /// away is not told.
    pub fn answer(self, result: Result<Reply, ApiError>, slot: &Arc<Slot>, taken_at: Instant) {
        let _ = self.tx.send(Ok(Served {
            result,
            slot: slot.clone(),
            queue_wait: taken_at.saturating_duration_since(self.enqueued),
        }));
    }
}

/// What a replica made of a request.
pub struct Served {
    /// The function's answer, or why the call failed.
    pub result: Result<Reply, ApiError>,
    /// The replica slot that ran it.
    pub slot: Arc<Slot>,
    /// Time from joining the queue to being written to the replica.
    pub queue_wait: Duration,
}

pub struct Pool {
    pub model: Arc<str>,
    state: Mutex<State>,
    max_queue: usize,
    queue_timeout: Duration,
    batching: Batching,
    /// Wakes the sweeper for an earlier deadline (or, once the pool is dropped, to end).
    sweeper_wake: Arc<Notify>,
    queue_depth: Gauge,
    pub(crate) batch_size: Histogram,
    pub(crate) requeued: Counter,
}

/// A dispatcher as the pool sees it: woken for work, or told to stop.
pub struct Dispatcher {
    pub(crate) wake: tokio::sync::Notify,
    /// Where an upload may write ahead for this dispatcher's replica.
    region: Option<EarlyRegion>,
    /// Set (under the pool's lock, then `wake`) when its process has ended or no replica of the
    /// model is worth waiting for: an idle dispatcher ends at once, a busy one after its batch.
    pub(crate) stop: std::sync::atomic::AtomicBool,
    /// Taken off the idle list for the queue and not yet at its first batch (counted in
    /// `State::starting`). Changed under the pool's lock only.
    woken: std::sync::atomic::AtomicBool,
}

impl Dispatcher {
    /// Wakes it for the queue (it was just taken off the idle list).
    fn start(&self) {
        self.wake.notify_one();
    }

    fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// What a dispatcher does after [`Pool::next_batch`].
pub(crate) enum Next {
    /// Serve the batch.
    Serve,
    /// Nothing waits: it is back in the idle list; wait to be woken.
    Park,
    /// Its process has ended: end.
    Stop,
}

struct State {
    /// Dispatchers with nothing to do, each holding its replica's connection.
    idle: VecDeque<Arc<Dispatcher>>,
    waiters: VecDeque<Pending>,
    health: Vec<SlotHealth>,
    /// The replicas' recent time per request, for the batch size: it rises at once with a slower
    /// batch and falls back over about eight.
    per_request: Duration,
    /// Idle dispatchers woken for the queue that have not taken their first batch yet: the
    /// requests they are about to take do not count against `max_queue`.
    starting: usize,
    /// Dispatchers serving a batch.
    serving: usize,
    /// Whether a woken dispatcher's yield, which lets the requests of connections woken with the
    /// one that woke it join the first batch, has been finding any.
    company: Speculation,
    /// When the sweeper next looks for requests past their queue deadline; `None` while it
    /// waits to be woken. Every waiter's deadline is at or after it, except those of requests an
    /// idle dispatcher woken for them is about to take.
    sweep_at: Option<Instant>,
    /// Whether the sweeper task has been started (by the first request that had to wait).
    sweeper: bool,
}

impl State {
    /// Slots with a ready process.
    fn ready(&self) -> usize {
        self.health
            .iter()
            .filter(|h| **h == SlotHealth::Ready)
            .count()
    }

    fn available(&self) -> bool {
        self.health
            .iter()
            .any(|h| matches!(h, SlotHealth::Starting | SlotHealth::Ready))
    }

    /// An idle dispatcher for the requests waiting, to be woken.
    fn idle_for_waiting(&mut self) -> Option<Arc<Dispatcher>> {
        if self.waiters.is_empty() {
            return None;
        }
        let d = self.idle.pop_front()?;
        self.starting += 1;
        d.woken.store(true, std::sync::atomic::Ordering::Relaxed);
        Some(d)
    }

    /// Dispatcher `me` reached its first batch, or ended before it; true if it had been woken
    /// for the queue (rather than only told to stop).
    fn left_starting(&mut self, me: &Dispatcher) -> bool {
        let woken = me.woken.swap(false, std::sync::atomic::Ordering::Relaxed);
        if woken {
            self.starting -= 1;
        }
        woken
    }

    /// [`Pool::ended`] under the lock.
    fn ending(&mut self, me: &Dispatcher) -> (Option<Arc<Dispatcher>>, Sweeper) {
        self.left_starting(me);
        (self.idle_for_waiting(), self.arm_front())
    }

    /// Makes sure the sweeper looks at the queue by `deadline`. Returns what to do about the
    /// sweeper once the lock is released.
    fn arm(&mut self, deadline: Instant) -> Sweeper {
        if self.sweep_at.is_some_and(|at| at <= deadline) {
            return Sweeper::Leave;
        }
        self.sweep_at = Some(deadline);
        if std::mem::replace(&mut self.sweeper, true) {
            Sweeper::Wake
        } else {
            Sweeper::Start
        }
    }

    /// [`State::arm`] for the front of the queue, if anyone waits.
    fn arm_front(&mut self) -> Sweeper {
        match self.waiters.front() {
            Some(w) => {
                let deadline = w.queue_deadline;
                self.arm(deadline)
            }
            None => Sweeper::Leave,
        }
    }
}

/// What [`State::arm`] asks of the sweeper.
#[must_use]
enum Sweeper {
    /// It already looks in time.
    Leave,
    /// It sleeps past the new deadline, or waits to be woken.
    Wake,
    /// It has not been started.
    Start,
}

impl Pool {
    pub fn new(model: Arc<str>, slots: usize, queueing: Queueing) -> Pool {
        let label = || [("model", model.to_string())];
        let queue_depth = metrics::gauge!(crate::metrics::QUEUE_DEPTH, &label());
        queue_depth.set(0.0);
        Pool {
            state: Mutex::new(State {
                idle: VecDeque::with_capacity(slots),
                waiters: VecDeque::new(),
                health: vec![SlotHealth::Starting; slots],
                per_request: Duration::ZERO,
                starting: 0,
                serving: 0,
                company: Speculation::default(),
                sweep_at: None,
                sweeper: false,
            }),
            max_queue: queueing.max_queue,
            queue_timeout: queueing.timeout,
            batching: queueing.batching,
            sweeper_wake: Arc::new(Notify::new()),
            queue_depth,
            batch_size: metrics::histogram!(crate::metrics::BATCH_SIZE, &label()),
            requeued: metrics::counter!(crate::metrics::REQUEUED, &label()),
            model,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue half-updated (every update is a
        // single push or pop), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waiters time out of the queue after this.
    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }

    /// Queues `request` and waits for its answer. The queue is FIFO; a request still queued
    /// after the queue timeout leaves it with [`AcquireError::Busy`]. Once written to a replica,
    /// the dispatcher answers it (past `request_timeout` with a timeout), or puts it back in the
    /// queue if its replica ended before running it.
    pub async fn call(
        self: &Arc<Self>,
        request: Vec<Bytes>,
        request_timeout: Duration,
    ) -> Result<Served, AcquireError> {
        self.call_with(request, None, request_timeout).await
    }

    /// The replica a request would go to now, if it went now, when it could write ahead into
    /// its region ([`crate::early`]): the first idle one while nothing waits.
    pub fn early_region(&self) -> Option<EarlyRegion> {
        let st = self.lock();
        if !st.waiters.is_empty() {
            return None;
        }
        st.idle.front()?.region.clone()
    }

    /// [`Self::call`] for a request whose upload wrote `ahead` into a replica's region.
    pub async fn call_with(
        self: &Arc<Self>,
        request: Vec<Bytes>,
        ahead: Option<Box<Ahead>>,
        request_timeout: Duration,
    ) -> Result<Served, AcquireError> {
        // Requests of clients that went away, dropped (with their bodies) after the lock.
        let mut abandoned = VecDeque::new();
        let (rx, start, sweeper) = {
            let mut st = self.lock();
            if !st.available() {
                return Err(AcquireError::Unavailable);
            }
            // Requests a starting dispatcher is about to take are not waiting for a replica.
            if st.waiters.len() >= self.max_queue + st.starting {
                let (live, gone) = std::mem::take(&mut st.waiters)
                    .into_iter()
                    .partition(|w: &Pending| !w.tx.is_closed());
                st.waiters = live;
                abandoned = gone;
                if st.waiters.len() >= self.max_queue + st.starting {
                    return Err(AcquireError::Busy("the model's request queue is full"));
                }
            }
            let (tx, rx) = oneshot::channel();
            // Read under the lock, so that deadlines come in queue order.
            let enqueued = Instant::now();
            let queue_deadline = enqueued + self.queue_timeout;
            st.waiters.push_back(Pending {
                request,
                enqueued,
                queue_deadline,
                timeout: request_timeout,
                alone: false,
                ahead,
                tx,
            });
            self.queue_depth.set(st.waiters.len() as f64);
            let start = st.idle_for_waiting();
            // A dispatcher woken for it takes it at once: no timer needed.
            let sweeper = match start {
                Some(_) => Sweeper::Leave,
                None => st.arm(queue_deadline),
            };
            (rx, start, sweeper)
        };
        drop(abandoned);
        if let Some(d) = start {
            d.start();
        }
        self.sweeper(sweeper);
        // The dispatcher answers it, or the sweeper when its queue deadline passes first; once
        // written to a replica that ends before running it, `requeue` refuses it if late.
        rx.await.unwrap_or(Err(AcquireError::Dropped))
    }

    fn sweeper(self: &Arc<Self>, what: Sweeper) {
        match what {
            Sweeper::Leave => {}
            Sweeper::Wake => self.sweeper_wake.notify_one(),
            Sweeper::Start => {
                tokio::spawn(sweep(Arc::downgrade(self), self.sweeper_wake.clone()));
            }
        }
    }

    /// For the sweeper: answers the waiters past their queue deadline (and drops those whose
    /// callers went away) from the front of the queue; returns when to look next.
    fn sweep_expired(&self) -> Option<Instant> {
        let mut late = Vec::new();
        let mut abandoned = Vec::new();
        let next = {
            let mut st = self.lock();
            let now = Instant::now();
            while let Some(front) = st.waiters.front() {
                if front.tx.is_closed() {
                    abandoned.extend(st.waiters.pop_front());
                } else if front.queue_deadline <= now {
                    late.extend(st.waiters.pop_front());
                } else {
                    break;
                }
            }
            self.queue_depth.set(st.waiters.len() as f64);
            st.sweep_at = st.waiters.front().map(|w| w.queue_deadline);
            st.sweep_at
        };
        for w in late {
            let _ = w.tx.send(Err(AcquireError::Busy(QUEUE_TIMED_OUT)));
        }
        drop(abandoned);
        next
    }

    /// A replica whose process has just become ready: its dispatcher starts on the queue, or
    /// waits idle. The caller hands the dispatcher back to [`Pool::process_ended`] when the
    /// process ends.
    pub fn release(self: &Arc<Self>, conn: ReplicaConn) -> Arc<Dispatcher> {
        let d = Arc::new(Dispatcher {
            wake: tokio::sync::Notify::new(),
            region: conn.early_region(),
            stop: std::sync::atomic::AtomicBool::new(false),
            woken: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(crate::dispatch::run(self.clone(), conn, d.clone()));
        let start = {
            let mut st = self.lock();
            st.idle.push_back(d.clone());
            st.idle_for_waiting()
        };
        if let Some(d) = start {
            d.start();
        }
        d
    }

    /// For a dispatcher just woken: whether to yield before its first batch. Under load, the
    /// request that woke it is one of a burst of connections woken together, which a yield lets queue
    /// (the multi-thread runtime runs a task it just woke next, before the tasks already waiting;
    /// the current-thread one, used with one worker, runs them in order, and its yield waits for
    /// the queue to empty and one `epoll_wait`); alone, the yield only costs an `epoll_wait`.
    pub(crate) fn wait_for_company(&self) -> bool {
        self.lock().company.should_try()
    }

    /// For dispatcher `me`: the next requests for its replica, oldest first, in `batch` (which
    /// must be empty). `served` is the time per request of the batch just served (`None` on the
    /// first call after a wake-up, when `yielded` says whether it yielded first).
    pub(crate) fn next_batch(
        self: &Arc<Self>,
        me: &Arc<Dispatcher>,
        batch: &mut Vec<Pending>,
        served: Option<Duration>,
        yielded: bool,
    ) -> Next {
        // Requests of clients that went away, dropped (with their bodies) after the lock.
        let mut abandoned = Vec::new();
        let mut st = self.lock();
        match served {
            Some(t) => {
                st.serving -= 1;
                st.per_request = t.max((st.per_request * 7 + t) / 8);
            }
            None => {
                if st.left_starting(me) && yielded {
                    let company = st.waiters.len() > 1;
                    st.company.record(company);
                }
            }
        }
        if me.stopped() {
            drop(st);
            self.ended(me);
            return Next::Stop;
        }
        let most = self.batch_limit(&st);
        let mut bytes = 0;
        while let Some(front) = st.waiters.front() {
            if front.tx.is_closed() {
                abandoned.extend(st.waiters.pop_front());
                continue;
            }
            let (len, alone) = (front.len(), front.alone);
            if !batch.is_empty() && (batch.len() == most || bytes + len > BATCH_BYTES || alone) {
                break;
            }
            bytes += len;
            batch.extend(st.waiters.pop_front());
            if alone {
                break;
            }
        }
        self.queue_depth.set(st.waiters.len() as f64);
        if batch.is_empty() {
            st.idle.push_back(me.clone());
            return Next::Park;
        }
        st.serving += 1;
        // Those left may include requests that woke a dispatcher this batch was taken for.
        let sweeper = st.arm_front();
        drop(st);
        self.sweeper(sweeper);
        Next::Serve
    }

    /// Dispatcher `me` found itself stopped and ends: the requests it may have been woken for go
    /// to another idle dispatcher, and are the sweeper's until one takes them.
    pub(crate) fn ended(self: &Arc<Self>, me: &Dispatcher) {
        let (next, sweeper) = self.lock().ending(me);
        if let Some(d) = next {
            d.start();
        }
        self.sweeper(sweeper);
    }

    /// For a dispatcher whose replica was written off in the middle of a batch, `spent` into it:
    /// that time counts as the replica's time per request, so a function that just hung or
    /// crashed is sent one request at a time until it proves quick again.
    pub(crate) fn retire(&self, spent: Duration) {
        let mut st = self.lock();
        st.serving -= 1;
        st.per_request = st.per_request.max(spent);
    }

    fn batch_limit(&self, st: &State) -> usize {
        let ready = st.ready();
        // Shared among the replicas not already serving a batch (this one included).
        let free = ready.saturating_sub(st.serving).max(1);
        let share = st.waiters.len().div_ceil(free);
        let fits = if st.per_request.is_zero() {
            1
        } else {
            (self.batching.budget.as_nanos() / st.per_request.as_nanos()) as usize
        };
        self.batching.max.min(share).min(fits).max(1)
    }

    /// Puts back the unanswered requests of a batch whose replica died, each to go out alone.
    /// The replica holds an answer while the request after it can start at once (replica-runtime's
    /// outbox), so any of `rest` may have run and any may have ended the process; alone, a
    /// request that ends its replica again is the one that did. Each runs at most once more. Those
    /// that cannot go back now (past their queue deadline, or no replica left) get `error()`, the
    /// death's own error, with `slot` and `taken_at` as for an answer, rather than a 429 inviting a
    /// retry of what may be the request that ends replicas; once back, they wait like any other.
    pub(crate) fn requeue_alone(
        self: &Arc<Self>,
        mut rest: Vec<Pending>,
        error: impl Fn() -> ApiError,
        slot: &Arc<Slot>,
        taken_at: Instant,
    ) {
        for p in &mut rest {
            p.alone = true;
        }
        self.requeue_with(rest, |w, _| w.answer(Err(error()), slot, taken_at));
    }

    /// Puts requests that were written to a replica but never ran (it died, or was killed for
    /// an earlier request in the same batch) back at the front of the queue, in arrival order. Those past
    /// their queue deadline get 429 instead, and all get 503 if no replica is left to wait for.
    pub(crate) fn requeue(self: &Arc<Self>, rest: Vec<Pending>) {
        self.requeue_with(rest, |w, why| {
            let _ = w.tx.send(Err(why));
        });
    }

    /// [`Pool::requeue`], with `give_up` telling those that cannot go back why.
    fn requeue_with(self: &Arc<Self>, rest: Vec<Pending>, give_up: impl Fn(Pending, AcquireError)) {
        if rest.is_empty() {
            return;
        }
        let late;
        let mut refused = Vec::new();
        let mut sweeper = Sweeper::Leave;
        let start = {
            let mut st = self.lock();
            // Read under the lock: the sweeper, from now on, finds a request back in the queue
            // or already refused.
            let now = Instant::now();
            let (back, gone): (Vec<Pending>, Vec<Pending>) =
                rest.into_iter().partition(|w| w.queue_deadline > now);
            late = gone;
            if st.available() {
                self.requeued.increment(back.len() as u64);
                let n = back.len();
                // Each goes back to its place in arrival order, which keeps deadlines in queue
                // order: in front of everything but requests put back earlier from another
                // replica's batch that arrived before it.
                let mut at = 0;
                for w in back {
                    while st.waiters.get(at).is_some_and(|x| x.enqueued < w.enqueued) {
                        at += 1;
                    }
                    st.waiters.insert(at, w);
                    at += 1;
                }
                self.queue_depth.set(st.waiters.len() as f64);
                sweeper = st.arm_front();
                (0..n)
                    .map_while(|_| st.idle_for_waiting())
                    .collect::<Vec<_>>()
            } else {
                refused = back;
                Vec::new()
            }
        };
        for w in late {
            give_up(w, AcquireError::Busy(QUEUE_TIMED_OUT));
        }
        for w in refused {
            give_up(w, AcquireError::Unavailable);
        }
        for d in start {
            d.start();
        }
        self.sweeper(sweeper);
    }

    /// The process behind dispatcher `d` has ended (or is being stopped): `d` ends, at once if
    /// it is idle, after its batch if it is serving one. True when it was idle (the replica was
    /// not serving a request).
    pub fn process_ended(&self, d: &Arc<Dispatcher>) -> bool {
        let was_idle = {
            let mut st = self.lock();
            d.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let at = st.idle.iter().position(|i| Arc::ptr_eq(i, d));
            at.and_then(|at| st.idle.remove(at)).is_some()
        };
        d.wake.notify_one();
        was_idle
    }

    /// Records a slot's health; when no slot is worth waiting for, every waiter gets 503 now
    /// instead of 429 later.
    pub fn set_health(&self, slot_index: usize, health: SlotHealth) {
        let (idle, waiters) = {
            let mut st = self.lock();
            st.health[slot_index] = health;
            if st.available() {
                return;
            }
            self.queue_depth.set(0.0);
            (
                std::mem::take(&mut st.idle),
                std::mem::take(&mut st.waiters),
            )
        };
        for d in idle {
            d.stop();
        }
        for w in waiters {
            let _ = w.tx.send(Err(AcquireError::Unavailable));
        }
    }

    /// Number of slots with a ready process.
    pub fn ready_count(&self) -> usize {
        self.lock().ready()
    }

    /// True when any slot has failed to load or is crash-looping.
    pub fn any_failed(&self) -> bool {
        self.lock().health.contains(&SlotHealth::Failed)
    }

    /// True when nobody waits and every ready replica is back in the idle set: nothing in flight.
    pub fn drained(&self) -> bool {
        let st = self.lock();
        st.waiters.iter().all(|w| w.tx.is_closed()) && st.idle.len() >= st.ready()
    }

    pub fn health(&self) -> Vec<SlotHealth> {
        self.lock().health.clone()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The sweeper holds the pool weakly; woken, it finds it gone and ends.
        self.sweeper_wake.notify_one();
    }
}

/// The queue timeout's one timer: sleeps until the front of the queue's deadline (or until woken
/// for an earlier one), answers the waiters past theirs with 429, and goes on until the pool is
/// dropped.
async fn sweep(pool: Weak<Pool>, wake: Arc<Notify>) {
    loop {
        let next = match pool.upgrade() {
            Some(pool) => pool.sweep_expired(),
            None => return,
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::Poll;

    use super::*;

    fn pool(queue_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool::new(
            "m".into(),
            1,
            Queueing {
                timeout: queue_timeout,
                ..Queueing::default()
            },
        ))
    }

    fn request() -> Vec<Bytes> {
        vec![Bytes::from_static(b"{}")]
    }

    /// Requests waiting for a replica that never comes leave the queue one by one, each at its
    /// own queue deadline: the one timer re-arms for the next.
    #[tokio::test]
    async fn waiters_time_out_each_at_its_own_deadline() {
        let pool = pool(Duration::from_millis(300));
        // The slot stays `Starting`: worth waiting for, never ready.
        let calls: Vec<_> = (0..3)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(100 * i)).await;
                    let joined = Instant::now();
                    let outcome = pool.call(request(), Duration::from_secs(1)).await;
                    (outcome.err(), joined.elapsed())
                })
            })
            .collect();
        for call in calls {
            let (err, waited) = tokio::time::timeout(Duration::from_secs(5), call)
                .await
                .expect("every waiter times out")
                .unwrap();
            assert_eq!(err, Some(AcquireError::Busy(QUEUE_TIMED_OUT)));
            assert!(
                waited >= Duration::from_millis(300),
                "not early: {waited:?}"
            );
            assert!(waited < Duration::from_millis(1300), "not late: {waited:?}");
        }
        assert_eq!(pool.lock().waiters.len(), 0);
    }

    /// A request that wakes an idle dispatcher is not timed: the dispatcher takes it at once.
    /// When the dispatcher's process ends before it does, the request is handed to the sweeper
    /// and still leaves the queue at its queue timeout, and the dispatcher stops counting as
    /// about to take requests (which would raise `max_queue`).
    #[tokio::test]
    async fn a_request_whose_woken_dispatcher_ended_first_still_times_out() {
        let pool = pool(Duration::from_millis(200));
        pool.set_health(0, SlotHealth::Ready);
        let (ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
        let slot = Arc::new(Slot::new("m".into(), 0));
        let d = pool.release(ReplicaConn::new(slot, 1, ours).unwrap());
        let call = pool.call(request(), Duration::from_secs(1));
        tokio::pin!(call);
        // One poll, without yielding: the request joins the queue and wakes the dispatcher,
        // which has not run yet.
        std::future::poll_fn(|cx| {
            assert!(call.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        assert_eq!(pool.lock().starting, 1);
        assert!(pool.lock().sweep_at.is_none(), "not timed");
        assert!(!pool.process_ended(&d), "woken, so no longer idle");
        let joined = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("the queue timeout still fires");
        assert_eq!(outcome.err(), Some(AcquireError::Busy(QUEUE_TIMED_OUT)));
        assert!(joined.elapsed() >= Duration::from_millis(150));
        assert_eq!(pool.lock().starting, 0);
    }

    /// Requests put back from two replicas' batches end up in arrival order, whichever replica
    /// ended first, so the front keeps the earliest queue deadline.
    #[tokio::test]
    async fn requests_put_back_keep_arrival_order() {
        let pool = pool(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut answers = Vec::new();
        let mut pending = |name: &'static str, ms: u64| {
            let (tx, rx) = oneshot::channel();
            answers.push(rx);
            let enqueued = t0 + Duration::from_millis(ms);
            Pending {
                request: vec![Bytes::from_static(name.as_bytes())],
                enqueued,
                queue_deadline: enqueued + Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                alone: false,
                ahead: None,
                tx,
            }
        };
        // One replica took [a, b], another then [c, d]; each ran its first request and died.
        let (a, b, c, d) = (
            pending("a", 0),
            pending("b", 1),
            pending("c", 2),
            pending("d", 3),
        );
        drop(a);
        drop(c);
        pool.requeue(vec![b]);
        pool.requeue(vec![d]);
        let st = pool.lock();
        let order: Vec<&[u8]> = st.waiters.iter().map(|w| &w.request[0][..]).collect();
        assert_eq!(order, [&b"b"[..], b"d"]);
        assert_eq!(
            st.sweep_at,
            Some(t0 + Duration::from_millis(1) + Duration::from_secs(10))
        );
    }

    /// The sweeper holds its pool weakly and ends when the pool goes (a redeploy replaces
    /// pools).
    #[tokio::test]
    async fn the_sweeper_ends_with_its_pool() {
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let pool = pool(Duration::from_millis(50));
        let outcome = tokio::time::timeout(
            Duration::from_secs(5),
            pool.call(request(), Duration::from_secs(1)),
        )
        .await
        .expect("the queue timeout fires");
        assert_eq!(outcome.err(), Some(AcquireError::Busy(QUEUE_TIMED_OUT)));
        assert_eq!(tasks(), 1, "the sweeper");
        drop(pool);
        for _ in 0..100 {
            if tasks() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(tasks(), 0, "the sweeper ended");
    }
}
