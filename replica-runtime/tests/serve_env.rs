//! `replica-runtime serve` restarts itself once with its allocator settings (`GLIBC_TUNABLES`), so
//! a large request reuses the memory of the one before instead of faulting in fresh pages; the
//! environment's own settings win.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::read_frame;
use modelgate_protocol::{encode_header, Kind};

/// Starts a replica of `memory.faults` with `GLIBC_TUNABLES` set to `tunables` (or unset) and
/// returns the page faults of a round of eight 1.5 MB strings built and dropped (12 MB, as a
/// large request makes), after three such rounds. Strings under 2 MiB, so that transparent huge
/// pages cannot hide fresh mappings.
fn faults_of_large_requests(tunables: Option<&str>) -> u64 {
    let dir = std::env::temp_dir().join(format!("replica-serve-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join(format!("{}.sock", tunables.is_some()));
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy/tests/fixtures/models");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_replica-runtime"));
    cmd.arg("serve")
        .arg("--connect")
        .arg(&sock)
        .arg("--dir")
        .arg(&models)
        .args(["--file", "memory.py", "--function", "faults"])
        .stdin(Stdio::null());
    match tunables {
        Some(t) => cmd.env("GLIBC_TUNABLES", t),
        None => cmd.env_remove("GLIBC_TUNABLES"),
    };
    let mut child = cmd.spawn().unwrap();
    listener.set_nonblocking(true).unwrap();
    let started = Instant::now();
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(child.try_wait().unwrap().is_none(), "the replica exited");
                assert!(started.elapsed() < Duration::from_secs(60), "no connection");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    assert_eq!(read_frame(&mut stream).0, Some(Kind::Ready));
    let request = br#"{"size":1500000,"count":8,"rounds":4}"#;
    stream
        .write_all(&encode_header(Kind::Predict, request.len()))
        .unwrap();
    stream.write_all(request).unwrap();
    let (kind, payload) = read_frame(&mut stream);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        kind,
        Some(Kind::ResultOk),
        "{}",
        String::from_utf8_lossy(&payload)
    );
    String::from_utf8(payload).unwrap().parse().unwrap()
}

#[test]
fn large_requests_reuse_memory_and_the_environments_settings_win() {
    // Eight 1.5 MB strings are about 2,900 pages.
    let faults = faults_of_large_requests(None);
    assert!(
        faults < 200,
        "{faults} page faults with the replica's settings"
    );
    // Thresholds set by the environment are kept: with these (glibc's starting values, fixed),
    // every round maps and faults its strings in again.
    let faults = faults_of_large_requests(Some(
        "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072",
    ));
    assert!(
        faults > 2_000,
        "{faults} page faults with the environment's thresholds"
    );
}
