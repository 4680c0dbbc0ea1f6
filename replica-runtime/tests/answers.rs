//! A replica holds an answer while the next request can start at once, and sends it with the
//! ones after it; a request that turns out slow does not hold the answers before it for long.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::read_frame;
use modelgate_protocol::{encode_header, Kind};

/// A replica of `funcs.slow`, connected and ready.
fn slow_replica(name: &str) -> (Child, UnixStream, tempfile_dir::Dir) {
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
        .args(["--file", "funcs.py", "--function", "slow"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let (mut stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    assert_eq!(read_frame(&mut stream).0, Some(Kind::Ready));
    (child, stream, dir)
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
