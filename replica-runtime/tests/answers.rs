//! A replica holds an answer while the next request can start at once, and sends it with the
//! ones after it; a request that turns out slow does not hold the answers before it for long.
//! Requests of any length follow each other on one connection. Stopped with SIGTERM, a replica
//! still answers the request under way, starts none after it, and runs the model's `atexit`
//! functions as it exits.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::read_frame;
use modelgate_protocol::{decode_lent, encode_header, encode_in_place, InPlace, Kind, Ready};

/// A replica of `funcs.slow`, connected and ready.
fn slow_replica(name: &str) -> (Child, UnixStream, tempfile_dir::Dir) {
    replica(name, "slow")
}

/// A replica of `function` in `funcs.py`, connected and ready.
fn replica(name: &str, function: &str) -> (Child, UnixStream, tempfile_dir::Dir) {
    let (child, stream, _, dir) = replica_with(name, function, &[]);
    (child, stream, dir)
}

/// Same, with more arguments to `serve`; also returns the `Ready` frame.
fn replica_with(
    name: &str,
    function: &str,
    extra: &[&str],
) -> (Child, UnixStream, Ready, tempfile_dir::Dir) {
    let dir = tempfile_dir::Dir::new(name);
    let sock = dir.0.join("r.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy/tests/fixtures/models");
    let child = Command::new(env!("CARGO_BIN_EXE_replica-runtime"))
        .arg("serve")
        .arg("--connect")
        .arg(&sock)
        .arg("--dir")
        .arg(&models)
        .args(["--file", "funcs.py", "--function", function])
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let (mut stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let (kind, payload) = read_frame(&mut stream);
    assert_eq!(kind, Some(Kind::Ready));
    let ready = serde_json::from_slice(&payload).unwrap();
    (child, stream, ready, dir)
}

/// Three requests in one write, as the proxy sends a batch.
fn batch(secs: [f64; 3]) -> Vec<u8> {
    let mut out = Vec::new();
    for (seq, secs) in secs.iter().enumerate() {
        let request = format!(r#"{{"seq":{seq},"secs":{secs}}}"#);
        out.extend_from_slice(&encode_header(Kind::Predict, request.len()));
        out.extend_from_slice(request.as_bytes());
    }
    out
}

fn seq_of(payload: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    v["seq"].as_u64().unwrap()
}

/// Writes `payload` as one prediction request.
fn send(stream: &mut UnixStream, payload: &[u8]) {
    send_frame(stream, Kind::Predict, payload);
}

fn send_frame(stream: &mut UnixStream, kind: Kind, payload: &[u8]) {
    let mut out = encode_header(kind, payload.len()).to_vec();
    out.extend_from_slice(payload);
    stream.write_all(&out).unwrap();
}

#[test]
fn requests_longer_and_shorter_than_the_last_are_read_whole() {
    // The replica reads each request over the bytes of the one before: a long request, then
    // shorter and longer ones, all answered with exactly what they said.
    let (mut child, mut stream, _dir) = replica("sizes", "echo");
    let requests: Vec<String> = [300_000, 10, 70_000, 0, 400_000]
        .iter()
        .enumerate()
        .map(|(i, n)| format!(r#"{{"i":{i},"pad":"{}"}}"#, "y".repeat(*n)))
        .collect();
    // Written from another thread: the answers are as long as the requests, so neither side
    // may wait for the other to finish first.
    let mut writer = stream.try_clone().unwrap();
    let sent = requests.clone();
    let writing = std::thread::spawn(move || {
        for request in &sent {
            send(&mut writer, request.as_bytes());
        }
    });
    for request in &requests {
        let (kind, payload) = read_frame(&mut stream);
        assert_eq!(kind, Some(Kind::ResultOk));
        let got: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            got,
            serde_json::from_str::<serde_json::Value>(request).unwrap()
        );
    }
    writing.join().unwrap();
    // Not UTF-8: the request's fault, with where it breaks; the replica goes on serving.
    send(&mut stream, b"{\"pad\":\"ab\xff\"}");
    let (kind, payload) = read_frame(&mut stream);
    assert_eq!(kind, Some(Kind::ResultErr));
    let err: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(err["kind"], "bad_request", "{err}");
    assert_eq!(err["exception"], "UnicodeDecodeError", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("from index 10"),
        "{err}"
    );
    send(&mut stream, br#"{"i":5}"#);
    assert_eq!(
        read_frame(&mut stream),
        (Some(Kind::ResultOk), br#"{"i":5}"#.to_vec())
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn answers_of_a_batch_come_back_in_order() {
    let (mut child, mut stream, _dir) = slow_replica("order");
    for _ in 0..50 {
        stream.write_all(&batch([0.0; 3])).unwrap();
        for seq in 0..3 {
            let (kind, payload) = read_frame(&mut stream);
            assert_eq!(kind, Some(Kind::ResultOk));
            assert_eq!(seq_of(&payload), seq);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn an_answer_held_behind_a_slow_request_is_sent_within_milliseconds() {
    let (mut child, mut stream, _dir) = slow_replica("slow");
    let sent = Instant::now();
    stream.write_all(&batch([0.0, 1.5, 0.0])).unwrap();
    let (_, first) = read_frame(&mut stream);
    let first_after = sent.elapsed();
    assert_eq!(seq_of(&first), 0);
    for seq in 1..3 {
        assert_eq!(seq_of(&read_frame(&mut stream).1), seq);
    }
    let _ = child.kill();
    let _ = child.wait();
    // Without the flusher the first answer waits for the second request's 1.5 s.
    assert!(first_after < Duration::from_millis(700), "{first_after:?}");
    assert!(sent.elapsed() >= Duration::from_millis(1500));
}

/// Writes `request` into the replica's region from this process, as the proxy does.
fn write_region(child: &Child, region: InPlace, request: &[u8]) {
    let written = nix::sys::uio::process_vm_writev(
        nix::unistd::Pid::from_raw(child.id() as i32),
        &[std::io::IoSlice::new(request)],
        &[nix::sys::uio::RemoteIoVec {
            base: region.addr as usize,
            len: request.len(),
        }],
    )
    .unwrap();
    assert_eq!(written, request.len());
}

#[test]
fn requests_written_into_the_region_are_read_at_the_length_the_frame_gives() {
    let (mut child, mut stream, ready, _dir) =
        replica_with("in-place", "echo", &["--in-place-bytes", "1048576"]);
    let region = ready.in_place.expect("a region is offered");
    // Whole 2 MiB pages, at a 2 MiB boundary.
    assert!(
        region.len >= 1 << 20 && region.len % (2 << 20) == 0,
        "{region:?}"
    );
    assert_eq!(region.addr % (2 << 20), 0, "{region:?}");
    // Without the flag there is none.
    let (mut plain, _, plain_ready, _plain_dir) = replica_with("no-region", "echo", &[]);
    assert_eq!(plain_ready.in_place, None);
    let _ = plain.kill();
    let _ = plain.wait();

    // A long request, then a shorter one over its bytes: each read at its own length.
    for n in [900_000, 70_000] {
        let request = format!(r#"{{"n":{n},"pad":"{}"}}"#, "z".repeat(n));
        write_region(&child, region, request.as_bytes());
        send_frame(
            &mut stream,
            Kind::PredictInPlace,
            &encode_in_place(request.len()),
        );
        let (kind, payload) = read_frame(&mut stream);
        assert_eq!(kind, Some(Kind::ResultOk));
        assert!(payload == request.as_bytes(), "echo of {n}");
    }
    // Lengths past the region or of 0, and payloads that are not 8 bytes, are refused; the replica
    // goes on serving.
    for len in [region.len as usize + 1, 0] {
        send_frame(&mut stream, Kind::PredictInPlace, &encode_in_place(len));
        let (kind, payload) = read_frame(&mut stream);
        assert_eq!(kind, Some(Kind::ResultErr), "{len}");
        assert!(String::from_utf8_lossy(&payload).contains("does not fit the region"));
    }
    send_frame(&mut stream, Kind::PredictInPlace, b"1234");
    assert_eq!(read_frame(&mut stream).0, Some(Kind::ResultErr));
    send(&mut stream, br#"{"after":1}"#);
    let (kind, payload) = read_frame(&mut stream);
    assert_eq!(kind, Some(Kind::ResultOk));
    assert_eq!(payload, br#"{"after":1}"#);
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads a lent answer out of the replica's memory from this process, as the proxy does.
fn read_lent(child: &Child, payload: &[u8]) -> Vec<u8> {
    let (addr, len) = decode_lent(payload).unwrap();
    let mut out = vec![0u8; len];
    let read = nix::sys::uio::process_vm_readv(
        nix::unistd::Pid::from_raw(child.id() as i32),
        &mut [std::io::IoSliceMut::new(&mut out)],
        &[nix::sys::uio::RemoteIoVec {
            base: addr as usize,
            len,
        }],
    )
    .unwrap();
    assert_eq!(read, len);
    out
}

/// Told it may, a replica lends large answers, one at a time: the one lent stays as it was until
/// the proxy says it has taken it, and meanwhile large answers come over the socket.
#[test]
fn large_answers_are_lent_one_at_a_time_and_kept_until_taken() {
    let (mut child, mut stream, _dir) = replica("lend", "echo");
    let big = |tag: char| format!(r#"{{"pad":"{}"}}"#, tag.to_string().repeat(100_000));
    // Not told yet: over the socket.
    send(&mut stream, big('a').as_bytes());
    assert_eq!(
        read_frame(&mut stream),
        (Some(Kind::ResultOk), big('a').into_bytes())
    );
    send_frame(&mut stream, Kind::Lend, &[]);
    // Lent; the next large one (before Taken) and a small one come over the socket, and the lent
    // bytes are still the first answer's.
    send(&mut stream, big('b').as_bytes());
    let (kind, lent) = read_frame(&mut stream);
    assert_eq!(kind, Some(Kind::ResultLent));
    send(&mut stream, big('c').as_bytes());
    assert_eq!(
        read_frame(&mut stream),
        (Some(Kind::ResultOk), big('c').into_bytes())
    );
    send(&mut stream, br#"{"small":1}"#);
    assert_eq!(
        read_frame(&mut stream),
        (Some(Kind::ResultOk), br#"{"small":1}"#.to_vec())
    );
    assert!(
        read_lent(&child, &lent) == big('b').as_bytes(),
        "the lent answer changed"
    );
    // Taken: the next large answer is lent again.
    send_frame(&mut stream, Kind::Taken, &[]);
    send(&mut stream, big('d').as_bytes());
    let (kind, lent) = read_frame(&mut stream);
    assert_eq!(kind, Some(Kind::ResultLent));
    assert!(read_lent(&child, &lent) == big('d').as_bytes());
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to 10 s for the replica to exit; kills it and fails if it does not.
fn exits_within_10s(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the replica did not exit within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

#[test]
fn sigterm_lets_the_request_under_way_finish_and_starts_no_other() {
    let (mut child, mut stream, dir) = replica("sigterm-busy", "note_at_exit");
    let first = dir.0.join("first");
    let second = dir.0.join("second");
    let started = dir.0.join("started");
    // Two requests in one write, as the proxy sends a batch: the first takes 2 s.
    let mut out = Vec::new();
    for request in [
        serde_json::json!({"path": first, "secs": 2, "started": started}),
        serde_json::json!({"path": second}),
    ] {
        let request = request.to_string();
        out.extend_from_slice(&encode_header(Kind::Predict, request.len()));
        out.extend_from_slice(request.as_bytes());
    }
    stream.write_all(&out).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the first request never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    sigterm(&child);

    // The request under way is answered...
    let (kind, payload) = read_frame(&mut stream);
    assert_eq!(kind, Some(Kind::ResultOk));
    let answer: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(answer["noted"], first.to_str().unwrap());
    // ...the one behind it is not started (the proxy sends it to another replica), and the
    // replica exits cleanly, running the atexit function the first request registered.
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut rest).unwrap();
    assert!(rest.is_empty(), "no answer after SIGTERM: {rest:?}");
    assert!(exits_within_10s(&mut child).success());
    assert_eq!(std::fs::read_to_string(&first).unwrap(), "ran");
    assert!(!second.exists(), "the request behind the stop ran");
}

#[test]
fn an_idle_replica_exits_at_once_on_sigterm_running_atexit_functions() {
    let (mut child, mut stream, dir) = replica("sigterm-idle", "note_at_exit");
    let note = dir.0.join("note");
    send(
        &mut stream,
        serde_json::json!({"path": note}).to_string().as_bytes(),
    );
    assert_eq!(read_frame(&mut stream).0, Some(Kind::ResultOk));
    assert!(!note.exists(), "atexit ran before the exit");
    let stopped = Instant::now();
    sigterm(&child);
    assert!(exits_within_10s(&mut child).success());
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "an idle replica waited {:?} to stop",
        stopped.elapsed()
    );
    assert_eq!(std::fs::read_to_string(&note).unwrap(), "ran");
}

/// A replica stopped while an answer is lent keeps it until the proxy has taken it: the proxy
/// is copying it out of the replica's memory.
#[test]
fn a_replica_stopped_with_an_answer_lent_keeps_it_until_taken() {
    let (mut child, mut stream, _dir) = replica("sigterm-lent", "echo");
    let big = format!(r#"{{"pad":"{}"}}"#, "e".repeat(100_000));
    send_frame(&mut stream, Kind::Lend, &[]);
    send(&mut stream, big.as_bytes());
    let (kind, lent) = read_frame(&mut stream);
    assert_eq!(kind, Some(Kind::ResultLent));
    sigterm(&child);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited with an answer lent"
    );
    // A request sent now is not started; the answer is still there, unchanged.
    send(&mut stream, br#"{"small":1}"#);
    assert!(
        read_lent(&child, &lent) == big.as_bytes(),
        "the lent answer changed"
    );
    send_frame(&mut stream, Kind::Taken, &[]);
    assert!(exits_within_10s(&mut child).success());
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut rest).unwrap();
    assert!(rest.is_empty(), "answered after SIGTERM: {rest:?}");
}

/// A process the model forks does not keep the replica's SIGTERM handler: its `terminate()` ends
/// it, and that SIGTERM does not stop the replica.
#[test]
fn a_forked_child_of_the_model_is_ended_by_sigterm_and_does_not_stop_the_replica() {
    let (mut child, mut stream, _dir) = replica("sigterm-fork", "terminate_child");
    for _ in 0..2 {
        send(&mut stream, b"{}");
        let (kind, payload) = read_frame(&mut stream);
        assert_eq!(
            kind,
            Some(Kind::ResultOk),
            "{}",
            String::from_utf8_lossy(&payload)
        );
        let answer: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            answer["exitcode"], -15,
            "the child was not ended by SIGTERM"
        );
    }
    assert!(child.try_wait().unwrap().is_none(), "the replica stopped");
    let _ = child.kill();
    let _ = child.wait();
}

/// A child forked behind Python's back keeps the replica's handler, and its SIGTERM wakes the
/// replica through the socket they share; the replica, not signalled itself, goes on serving.
#[test]
fn a_sigterm_to_a_child_forked_behind_pythons_back_does_not_stop_the_replica() {
    let (mut child, mut stream, _dir) = replica("sigterm-raw-fork", "raw_fork_terminated");
    for _ in 0..2 {
        send(&mut stream, b"{}");
        assert_eq!(
            read_frame(&mut stream),
            (Some(Kind::ResultOk), br#""ok""#.to_vec())
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "the replica stopped");
    let _ = child.kill();
    let _ = child.wait();
}

/// The model's atexit functions get 5 s as the replica ends, here on EOF (the proxy gone): one
/// that never returns does not keep the process alive.
#[test]
fn atexit_functions_that_never_return_are_cut_short() {
    use std::os::unix::process::ExitStatusExt;
    let (mut child, mut stream, dir) = replica("atexit-hang", "note_at_exit");
    let note = dir.0.join("note");
    send(
        &mut stream,
        serde_json::json!({"path": note, "hang": true})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(read_frame(&mut stream).0, Some(Kind::ResultOk));
    let hung_up = Instant::now();
    drop(stream);
    let status = exits_within_10s(&mut child);
    assert_eq!(status.signal(), Some(nix::libc::SIGKILL), "{status:?}");
    assert!(
        hung_up.elapsed() >= Duration::from_secs(4),
        "{:?}",
        hung_up.elapsed()
    );
    assert_eq!(std::fs::read_to_string(&note).unwrap(), "ran");
}

mod tempfile_dir {
    /// A directory under the system's temporary directory, removed on drop.
    pub struct Dir(pub std::path::PathBuf);

    impl Dir {
        pub fn new(name: &str) -> Dir {
            let path =
                std::env::temp_dir().join(format!("replica-answers-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
