//! A coarse timer for hyper's HTTP/1 header-read timeout.
//!
//! hyper arms the header-read timeout every time a keep-alive connection starts waiting for its
//! next request head, and drops it when the head has arrived: one timer set and cancelled per
//! request. With tokio's timer (`hyper_util`'s `TokioTimer`) that is a boxed `Sleep` holding a
//! runtime handle, inserted into and removed from the timer wheel. This timer does the same
//! for about 420 fewer user-space instructions a request at concurrency 16 (2 % of modelgate's,
//! by callgrind), and in 60 ns where tokio's takes 460–480 (the `header_timer` bench;
//! docs/PERFORMANCE.md, twenty-first session).
//!
//! Here a sleep is an entry in a slab behind a lock (one slab per CPU, picked by the thread that
//! first polls it): created without touching the runtime, registered on its first pending poll,
//! removed when dropped. One ticker task, which the owner of the timer runs, looks through the
//! entries every `resolution` and wakes those past their deadline. A sleep therefore ends between
//! its deadline and `resolution` after it (plus the ticker's scheduling delay), never before: the
//! precision a timeout of seconds needs. The ticker parks after four looks that found no entry,
//! and a registration wakes it. Connections idle for the timeout are closed, so an idle server
//! does no periodic work; a busy one pays a look every `resolution` (a quarter of a second by
//! default) instead of a comparison of deadlines per request, which waking at the earliest
//! deadline would need (about 120 instructions a request).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;
use tokio::sync::Notify;

/// Looks in a row that found no entry, after which the ticker parks until a registration.
const EMPTY_LOOKS_BEFORE_PARKING: u32 = 4;

/// A [`hyper::rt::Timer`] whose sleeps end within `resolution` after their deadline.
#[derive(Clone)]
pub struct CoarseTimer {
    shared: Arc<Shared>,
}

struct Shared {
    resolution: Duration,
    shards: Box<[Mutex<Slab<Entry>>]>,
    /// Set by the ticker before it parks; a registration that sees it wakes the ticker.
    parked: AtomicBool,
    /// Held by the ticker too, which holds the rest weakly: notified on a registration while it
    /// is parked, and when the last timer and sleep are gone (it then ends).
    unpark: Arc<Notify>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.unpark.notify_one();
    }
}

struct Entry {
    deadline: Instant,
    /// Taken by the ticker when it wakes the sleep.
    waker: Option<Waker>,
    fired: bool,
}

impl CoarseTimer {
    /// A timer and its ticker, which must run (spawned on the runtime) for sleeps to end. The
    /// ticker ends once the timer, its clones and its sleeps are all dropped.
    pub fn new(resolution: Duration) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let shards = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(64);
        let shared = Arc::new(Shared {
            resolution: resolution.max(Duration::from_millis(1)),
            shards: (0..shards).map(|_| Mutex::new(Slab::new())).collect(),
            parked: AtomicBool::new(false),
            unpark: Arc::new(Notify::new()),
        });
        let ticker = tick(
            Arc::downgrade(&shared),
            shared.unpark.clone(),
            shared.resolution,
        );
        (CoarseTimer { shared }, ticker)
    }

    /// The resolution for a timeout: a twentieth of it, between 10 and 250 ms.
    pub fn resolution_for(timeout: Duration) -> Duration {
        (timeout / 20).clamp(Duration::from_millis(10), Duration::from_millis(250))
    }

    fn sleep_until_inner(&self, deadline: Instant) -> CoarseSleep {
        CoarseSleep {
            shared: self.shared.clone(),
            deadline,
            slot: None,
            fired: false,
        }
    }

    /// Sleeps registered and not yet dropped.
    #[cfg(test)]
    fn registered(&self) -> usize {
        self.shared.shards.iter().map(|s| lock(s).len()).sum()
    }
}

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.sleep_until_inner(Instant::now() + duration))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.sleep_until_inner(deadline))
    }
}

fn lock(shard: &Mutex<Slab<Entry>>) -> MutexGuard<'_, Slab<Entry>> {
    // An entry is plain data, left consistent by every critical section.
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

/// This thread's shard: threads take shards in turn the first time they ask.
fn shard_index(shards: usize) -> usize {
    if shards == 1 {
        // One CPU: no thread-local lookup.
        return 0;
    }
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    MINE.with(|i| *i) % shards
}

/// One sleep: an entry in its shard's slab from its first pending poll until it is dropped.
struct CoarseSleep {
    shared: Arc<Shared>,
    deadline: Instant,
    /// Shard and key, once registered.
    slot: Option<(usize, usize)>,
    fired: bool,
}

impl hyper::rt::Sleep for CoarseSleep {}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.fired {
            return Poll::Ready(());
        }
        let shared = &*this.shared;
        match this.slot {
            None => {
                let shard = shard_index(shared.shards.len());
                let key = lock(&shared.shards[shard]).insert(Entry {
                    deadline: this.deadline,
                    waker: Some(cx.waker().clone()),
                    fired: false,
                });
                this.slot = Some((shard, key));
                // After the insert: a ticker that set `parked` before this load looks at the
                // shards after it (and finds this entry), or this load sees the flag.
                if shared.parked.load(Ordering::SeqCst) {
                    shared.unpark.notify_one();
                }
                Poll::Pending
            }
            Some((shard, key)) => {
                let mut entries = lock(&shared.shards[shard]);
                let entry = &mut entries[key];
                if entry.fired {
                    entries.remove(key);
                    drop(entries);
                    this.slot = None;
                    this.fired = true;
                    return Poll::Ready(());
                }
                match &entry.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => {
                        // The old waker is dropped after the lock: where a waker owns its
                        // task's future (some executors' do), dropping the last one drops the
                        // future, and perhaps another sleep of this shard with it.
                        let stale = entry.waker.replace(cx.waker().clone());
                        drop(entries);
                        drop(stale);
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        if let Some((shard, key)) = self.slot.take() {
            // The entry (and its waker) is dropped after the lock, as in `poll`.
            let entry = lock(&self.shared.shards[shard]).remove(key);
            drop(entry);
        }
    }
}

/// The ticker: every `resolution`, wakes the sleeps past their deadline; parks while there are
/// none, and ends when the timer is gone.
async fn tick(shared: Weak<Shared>, unpark: Arc<Notify>, resolution: Duration) {
    let mut interval = tokio::time::interval(resolution);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due: Vec<Waker> = Vec::new();
    let mut empty_looks = 0;
    loop {
        interval.tick().await;
        let Some(timer) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut registered = 0;
        for shard in timer.shards.iter() {
            let mut entries = lock(shard);
            registered += entries.len();
            for (_, entry) in entries.iter_mut() {
                if !entry.fired && entry.deadline <= now {
                    entry.fired = true;
                    due.extend(entry.waker.take());
                }
            }
        }
        for waker in due.drain(..) {
            waker.wake();
        }
        empty_looks = if registered == 0 { empty_looks + 1 } else { 0 };
        if empty_looks < EMPTY_LOOKS_BEFORE_PARKING {
            continue;
        }
        let unparked = unpark.notified();
        tokio::pin!(unparked);
        unparked.as_mut().enable();
        timer.parked.store(true, Ordering::SeqCst);
        let none = timer.shards.iter().all(|s| lock(s).is_empty());
        // Not held while parked, so that dropping the timer ends the ticker.
        drop(timer);
        if none {
            unparked.await;
        }
        let Some(timer) = shared.upgrade() else {
            return;
        };
        timer.parked.store(false, Ordering::SeqCst);
        empty_looks = 0;
        interval.reset();
    }
}

/// [`tokio::time::timeout_at`] for a future that is usually ready at once (a request body that
/// arrived with its head): polls it first, and makes tokio's timer only when it is pending.
/// tokio's `Timeout` makes its `Sleep` up front, which takes a runtime handle (a thread-local
/// lookup, and an atomic operation each way) even when it is never polled, and carries it inline,
/// which makes every request's future larger; here it is boxed, on the rare path.
pub(crate) fn timeout_at_unless_ready<F: Future>(
    deadline: tokio::time::Instant,
    fut: F,
) -> UnlessReady<F> {
    UnlessReady {
        fut,
        deadline,
        sleep: None,
    }
}

/// The deadline of a [`timeout_at_unless_ready`] passed first.
#[derive(Debug)]
pub(crate) struct TimedOut;

pin_project_lite::pin_project! {
    /// The future of [`timeout_at_unless_ready`].
    pub(crate) struct UnlessReady<F> {
        #[pin]
        fut: F,
        deadline: tokio::time::Instant,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F: Future> Future for UnlessReady<F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = self.project();
        if let Poll::Ready(out) = me.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let deadline = *me.deadline;
        me.sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)))
            .as_mut()
            .poll(cx)
            .map(|()| Err(TimedOut))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    const RES: Duration = Duration::from_millis(10);

    fn timer() -> CoarseTimer {
        let (timer, ticker) = CoarseTimer::new(RES);
        tokio::spawn(ticker);
        timer
    }

    #[tokio::test]
    async fn a_sleep_ends_after_its_deadline_within_the_resolution() {
        let timer = timer();
        for ms in [0, 30, 120] {
            let started = Instant::now();
            timer.sleep(Duration::from_millis(ms)).await;
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(ms), "{ms} ms: {took:?}");
            // The resolution, plus generous room for a loaded machine.
            assert!(
                took < Duration::from_millis(ms) + RES + Duration::from_millis(400),
                "{ms} ms: {took:?}"
            );
        }
        assert_eq!(timer.registered(), 0);
    }

    #[tokio::test]
    async fn only_the_sleeps_past_their_deadline_end() {
        let timer = timer();
        let mut late = timer.sleep(Duration::from_secs(60));
        let mut soon = timer.sleep(Duration::from_millis(40));
        // Registered by a first poll.
        assert!(futures_poll(&mut late).is_pending());
        assert!(futures_poll(&mut soon).is_pending());
        assert_eq!(timer.registered(), 2);
        soon.await;
        assert!(futures_poll(&mut late).is_pending());
        assert_eq!(timer.registered(), 1);
        drop(late);
        assert_eq!(timer.registered(), 0);
    }

    #[tokio::test]
    async fn a_parked_ticker_wakes_for_a_new_sleep() {
        let timer = timer();
        // Long enough for the ticker to park.
        tokio::time::sleep(RES * (EMPTY_LOOKS_BEFORE_PARKING + 6)).await;
        assert!(timer.shared.parked.load(Ordering::SeqCst));
        let started = Instant::now();
        timer.sleep(Duration::from_millis(20)).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(20) && took < Duration::from_millis(500),
            "{took:?}"
        );
        assert!(!timer.shared.parked.load(Ordering::SeqCst));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sleeps_moved_between_threads_end_and_are_removed() {
        let timer = timer();
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let timer = timer.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let wait = Duration::from_millis(5 * (i % 8));
                    let mut sleep = timer.sleep(wait);
                    // Cancelled ones are dropped registered.
                    if i % 3 == 0 {
                        assert!(futures_poll(&mut sleep).is_pending());
                        tokio::task::yield_now().await;
                        return;
                    }
                    sleep.await;
                    assert!(started.elapsed() >= wait);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(timer.registered(), 0);
    }

    #[tokio::test]
    async fn the_ticker_ends_with_the_timer() {
        let (timer, ticker) = CoarseTimer::new(RES);
        let ticker = tokio::spawn(ticker);
        let mut sleep = timer.sleep(Duration::from_secs(60));
        assert!(futures_poll(&mut sleep).is_pending());
        drop(timer);
        // A sleep keeps it going.
        tokio::time::sleep(RES * 3).await;
        assert!(!ticker.is_finished());
        drop(sleep);
        tokio::time::timeout(Duration::from_secs(5), ticker)
            .await
            .expect("the ticker ended")
            .unwrap();
        // And from parked.
        let (timer, ticker) = CoarseTimer::new(RES);
        let ticker = tokio::spawn(ticker);
        tokio::time::sleep(RES * (EMPTY_LOOKS_BEFORE_PARKING + 6)).await;
        assert!(timer.shared.parked.load(Ordering::SeqCst));
        drop(timer);
        tokio::time::timeout(Duration::from_secs(5), ticker)
            .await
            .expect("the ticker ended")
            .unwrap();
    }

    #[test]
    fn a_ready_future_needs_no_timer() {
        // A runtime without a time driver, where tokio's own timeout panics: a future that is
        // ready at once must not reach it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let out = rt.block_on(timeout_at_unless_ready(
            tokio::time::Instant::now(),
            std::future::ready(7),
        ));
        assert_eq!(out.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_pending_future_gets_its_timeout() {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
        let out = timeout_at_unless_ready(deadline, std::future::pending::<()>()).await;
        assert!(out.is_err());
        assert!(tokio::time::Instant::now() >= deadline);
        // Ready later, before the deadline: its output.
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.send(5).unwrap();
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let out = timeout_at_unless_ready(deadline, rx).await;
        assert_eq!(out.unwrap().unwrap(), 5);
    }

    /// One poll of a sleep with this task's waker.
    fn futures_poll(sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> Poll<()> {
        let waker = Waker::noop();
        sleep.as_mut().poll(&mut Context::from_waker(waker))
    }
}
