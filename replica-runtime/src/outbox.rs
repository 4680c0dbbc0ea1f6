//! Answers on their way to the proxy.
//!
//! The proxy writes the requests waiting for a replica together, and the replica answers them one
//! by one. Sending each answer as it is ready costs a system call per answer, and each send can
//! wake the proxy for one answer. So while the next request is already whole in the read buffer,
//! an answer is *held*: written into the buffer and sent with the ones after it, when the replica
//! runs out of requests it can start at once.
//!
//! A held answer must not wait on a request that turns out to be slow, or be lost with a replica
//! the proxy replaces because that request hung: a flusher thread sends answers held longer than
//! [`HOLD_LIMIT`]. It only ticks while answers are being held, and sleeps on a condition variable
//! once none have been for a while, so an idle replica costs no wake-ups.

use std::io::{self, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use modelgate_protocol::{self as protocol, Kind};

/// The longest an answer waits for the ones behind it before the flusher sends it (it looks every
/// `HOLD_LIMIT`, so an answer is sent at most twice this after it was held).
pub const HOLD_LIMIT: Duration = Duration::from_millis(2);

/// Ticks with nothing held after which the flusher goes back to sleep.
const IDLE_TICKS: u32 = 50;

/// The replica's writing half: frames are sent now ([`Outbox::send`]) or held
/// ([`Outbox::hold`]).
pub struct Outbox {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Tells the flusher to start ticking, or that the outbox is gone.
    wake: Condvar,
}

struct State {
    writer: BufWriter<UnixStream>,
    /// When the oldest answer not yet sent was held; `None` when none is.
    held_since: Option<Instant>,
    ticking: bool,
    /// A send that failed on the flusher's thread, reported by the next call.
    failed: Option<io::Error>,
    closed: bool,
}

impl State {
    fn write_frame(&mut self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        self.writer
            .write_all(&protocol::encode_header(kind, payload.len()))?;
        self.writer.write_all(payload)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.held_since = None;
        self.writer.flush()
    }
}

impl Outbox {
    pub fn new(stream: UnixStream) -> io::Result<Outbox> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                writer: BufWriter::with_capacity(64 * 1024, stream),
                held_since: None,
                ticking: false,
                failed: None,
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let flusher = shared.clone();
        std::thread::Builder::new()
            .name("answer-flusher".into())
            // Little stack: it counts against the replica's address-space limit (as does the
            // malloc arena glibc gives the thread, which `main.rs` allows for).
            .stack_size(64 * 1024)
            .spawn(move || flusher.run())?;
        Ok(Outbox { shared })
    }

    /// Sends `payload` as a frame of `kind` now, after any answers held.
    pub fn send(&self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        let mut state = self.shared.lock();
        state.write_frame(kind, payload)?;
        state.flush()
    }

    /// Writes `payload` as a frame of `kind` to be sent with what follows it, within
    /// [`HOLD_LIMIT`] or so.
    pub fn hold(&self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        let mut state = self.shared.lock();
        state.write_frame(kind, payload)?;
        if state.held_since.is_none() {
            state.held_since = Some(Instant::now());
        }
        if !state.ticking {
            state.ticking = true;
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Sends the answers held, if any.
    pub fn flush(&self) -> io::Result<()> {
        let mut state = self.shared.lock();
        if let Some(err) = state.failed.take() {
            return Err(err);
        }
        if state.held_since.is_some() {
            state.flush()?;
        }
        Ok(())
    }
}

impl Drop for Outbox {
    /// Sends what is held (the replica is leaving: the proxy hung up, or sent what it cannot
    /// read) and stops the flusher.
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        let _ = state.flush();
        state.closed = true;
        drop(state);
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The flusher thread.
    fn run(&self) {
        let mut idle = 0;
        let mut state = self.lock();
        loop {
            while !state.ticking && !state.closed {
                state = self
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.closed {
                return;
            }
            drop(state);
            std::thread::sleep(HOLD_LIMIT);
            state = self.lock();
            match state.held_since {
                Some(since) if since.elapsed() >= HOLD_LIMIT => {
                    idle = 0;
                    if let Err(err) = state.flush() {
                        state.failed = Some(err);
                    }
                }
                Some(_) => idle = 0,
                None => {
                    idle += 1;
                    if idle >= IDLE_TICKS {
                        state.ticking = false;
                        idle = 0;
                    }
                }
            }
        }
    }
}

/// Whether `buffered` starts with a whole frame, so that the request after an answer can start
/// without waiting for the proxy (and the answer can be held).
pub fn starts_with_whole_frame(buffered: &[u8]) -> bool {
    let Some(header) = buffered.first_chunk::<{ protocol::HEADER_LEN }>() else {
        return false;
    };
    protocol::decode_header(*header)
        .is_ok_and(|h| buffered.len() - protocol::HEADER_LEN >= h.payload_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut f = protocol::encode_header(kind, payload.len()).to_vec();
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn whole_frames_are_told_from_partial_ones() {
        let f = frame(Kind::Predict, b"{}");
        assert!(starts_with_whole_frame(&f));
        assert!(starts_with_whole_frame(&[&f[..], b"more"].concat()));
        for cut in 0..f.len() {
            assert!(!starts_with_whole_frame(&f[..cut]), "cut at {cut}");
        }
        // A header that does not decode is never whole: the answer before it is sent at once.
        assert!(!starts_with_whole_frame(&[0, 0, 0, 0, 0xff, b'x']));
    }

    #[test]
    fn held_answers_go_out_with_the_next_send_in_order() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let outbox = Outbox::new(ours).unwrap();
        outbox.hold(Kind::ResultOk, b"1").unwrap();
        outbox.hold(Kind::ResultOk, b"2").unwrap();
        outbox.send(Kind::ResultOk, b"3").unwrap();
        let expected = [
            frame(Kind::ResultOk, b"1"),
            frame(Kind::ResultOk, b"2"),
            frame(Kind::ResultOk, b"3"),
        ]
        .concat();
        let mut got = vec![0; expected.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, expected);
    }

    #[test]
    fn a_held_answer_is_sent_within_the_limit_when_nothing_follows() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let outbox = Outbox::new(ours).unwrap();
        // Twice: the second time the flusher is already ticking.
        for payload in [b"a", b"b"] {
            let held = Instant::now();
            outbox.hold(Kind::ResultOk, payload).unwrap();
            // As a replica busy with a slow request would: no send, no flush.
            let mut got = [0; protocol::HEADER_LEN + 1];
            peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            peer.read_exact(&mut got).unwrap();
            assert_eq!(got.to_vec(), frame(Kind::ResultOk, payload));
            // Generous for a loaded machine; without the flusher the read times out at 5 s.
            assert!(
                held.elapsed() < Duration::from_millis(500),
                "{:?}",
                held.elapsed()
            );
        }
    }

    #[test]
    fn flush_sends_what_is_held_at_once() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        peer.set_nonblocking(true).unwrap();
        let outbox = Outbox::new(ours).unwrap();
        outbox.flush().unwrap();
        let mut got = [0; protocol::HEADER_LEN];
        let nothing = peer.read(&mut got).unwrap_err();
        assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
        outbox.hold(Kind::Pong, b"").unwrap();
        outbox.flush().unwrap();
        // Sent by `flush` itself: the flusher would wait HOLD_LIMIT first.
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, protocol::encode_header(Kind::Pong, 0));
    }
}
