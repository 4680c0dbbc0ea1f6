//! Graceful drain of the HTTP connections: on shutdown every open connection is told to finish
//! the request it is serving and close, and [`Drain::shutdown`] waits until all have.
//!
//! It replaces `hyper_util`'s `GracefulShutdown`, which polls a `watch` channel's `changed()`
//! future (a lock and a waker registration) every time a connection's future is polled, a few
//! times per request. Here a connection registers its task's waker once, and afterwards each poll
//! costs one atomic load: the shutdown sets a flag, then wakes every registered task, which sees
//! the flag on its next poll.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use slab::Slab;
use tokio::sync::Notify;

/// The connections of one listener.
#[derive(Clone, Default)]
pub struct Drain {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    draining: AtomicBool,
    /// One entry per open connection: its task's waker, once polled.
    conns: Mutex<Slab<Option<Waker>>>,
    /// Notified when the last connection closes while draining.
    closed: Notify,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Slab<Option<Waker>>> {
        // A panic while holding this lock leaves the slab consistent: every operation on it is
        // a single call.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drain {
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Counts a connection as open from now (before a TLS handshake, say) until the returned
    /// handle, or the connection it then watches, is dropped.
    pub fn enter(&self) -> Entered {
        let key = self.shared.conns().insert(None);
        Entered {
            shared: self.shared.clone(),
            key,
        }
    }

    /// Open connections.
    #[cfg(test)]
    fn count(&self) -> usize {
        self.shared.conns().len()
    }

    /// Tells every open connection to finish what it is serving and close, then waits until all
    /// have closed. A connection entered after the drain started is told on its first poll, and
    /// waited for if it is still open when this looks.
    pub async fn shutdown(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        let wakers: Vec<Waker> = self
            .shared
            .conns()
            .iter_mut()
            .filter_map(|(_, w)| w.take())
            .collect();
        for waker in wakers {
            waker.wake();
        }
        loop {
            let closed = self.shared.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.shared.conns().is_empty() {
                return;
            }
            closed.await;
        }
    }
}

/// An open connection, counted until dropped.
pub struct Entered {
    shared: Arc<Shared>,
    key: usize,
}

impl Entered {
    /// Drives `conn`, calling `on_drain` on it once when the drain starts (hyper's
    /// `graceful_shutdown`).
    pub fn watch<C, F>(self, conn: C, on_drain: F) -> Watched<C, F>
    where
        C: Future,
        F: FnMut(Pin<&mut C>),
    {
        Watched {
            conn,
            entered: self,
            waker: None,
            on_drain: Some(on_drain),
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut conns = self.shared.conns();
        conns.try_remove(self.key);
        let last = conns.is_empty();
        drop(conns);
        if last && self.shared.draining.load(Ordering::SeqCst) {
            self.shared.closed.notify_one();
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection's future, told to close when the drain starts.
    pub struct Watched<C, F> {
        #[pin]
        conn: C,
        entered: Entered,
        // The waker registered for this connection; a task's waker rarely changes, so this
        // saves the lock on every poll.
        waker: Option<Waker>,
        // Until the connection is told.
        on_drain: Option<F>,
    }
}

impl<C, F> Future for Watched<C, F>
where
    C: Future,
    F: FnMut(Pin<&mut C>),
{
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if this.on_drain.is_some() {
            // Registered before the flag is read: a drain that sets the flag after this read
            // takes the lock after this registration, so it finds the waker and wakes the task.
            if !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                let waker = cx.waker().clone();
                if let Some(slot) = this.entered.shared.conns().get_mut(this.entered.key) {
                    *slot = Some(waker.clone());
                }
                *this.waker = Some(waker);
            }
            if this.entered.shared.draining.load(Ordering::SeqCst) {
                if let Some(mut on_drain) = this.on_drain.take() {
                    on_drain(this.conn.as_mut());
                }
            }
        }
        this.conn.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// A connection that ends one poll after it is told to drain.
    struct Conn {
        told: Arc<AtomicUsize>,
        ending: bool,
    }

    impl Future for Conn {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.ending {
                return Poll::Ready(());
            }
            if self.told.load(Ordering::SeqCst) > 0 {
                self.ending = true;
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    }

    fn conn(drain: &Drain, told: &Arc<AtomicUsize>) -> impl Future<Output = ()> {
        let told = told.clone();
        drain.enter().watch(
            Conn {
                told: told.clone(),
                ending: false,
            },
            move |_c: Pin<&mut Conn>| {
                told.fetch_add(1, Ordering::SeqCst);
            },
        )
    }

    #[tokio::test]
    async fn shutdown_tells_every_connection_once_and_waits_for_them() {
        let drain = Drain::new();
        let told = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..5).map(|_| tokio::spawn(conn(&drain, &told))).collect();
        // Let every task poll once (registering its waker).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(drain.count(), 5);
        assert_eq!(told.load(Ordering::SeqCst), 0);
        tokio::time::timeout(Duration::from_secs(5), drain.shutdown())
            .await
            .expect("every connection closed");
        assert_eq!(told.load(Ordering::SeqCst), 5, "each told once");
        assert_eq!(drain.count(), 0);
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_connection_polled_first_after_the_drain_started_is_told() {
        let drain = Drain::new();
        let told = Arc::new(AtomicUsize::new(0));
        let c = conn(&drain, &told);
        let shutdown = tokio::spawn({
            let drain = drain.clone();
            async move { drain.shutdown().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!shutdown.is_finished(), "waits for the open connection");
        tokio::spawn(c).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), shutdown)
            .await
            .expect("drained")
            .unwrap();
        assert_eq!(told.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_in_its_handshake_holds_the_drain_until_dropped() {
        let drain = Drain::new();
        let entered = drain.enter();
        let shutdown = tokio::spawn({
            let drain = drain.clone();
            async move { drain.shutdown().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!shutdown.is_finished());
        drop(entered);
        tokio::time::timeout(Duration::from_secs(5), shutdown)
            .await
            .expect("drained")
            .unwrap();
    }
}
