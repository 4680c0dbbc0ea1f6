//! `replica-runtime serve` restarts itself once with its allocator settings (`GLIBC_TUNABLES`), so
//! a large request reuses the memory of the one before instead of faulting in fresh pages; the
//! environment's own settings win.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};

use modelgate_protocol::{decode_header, encode_header, Kind, HEADER_LEN};

fn read_frame(s: &mut impl Read) -> (Option<Kind>, Vec<u8>) {
    let mut header = [0u8; HEADER_LEN];
    s.read_exact(&mut header).unwrap();
    let header = decode_header(header).unwrap();
    let mut payload = vec![0u8; header.payload_len];
    s.read_exact(&mut payload).unwrap();
    (Kind::from_u8(header.kind), payload)
}

/// Starts a replica of `memory.faults` with `GLIBC_TUNABLES` set to `tunables` (or unset) and
/// returns the page faults of a round of three 5 MB strings built and dropped, after three such
/// rounds.
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
    let (mut stream, _) = listener.accept().unwrap();
    assert_eq!(read_frame(&mut stream).0, Some(Kind::Ready));
    let request = br#"{"size":5000000,"count":3,"rounds":4}"#;
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
    // Three 5 MB strings are about 3,700 pages.
    let faults = faults_of_large_requests(None);
    assert!(
        faults < 200,
        "{faults} page faults with the replica's settings"
    );
    // glibc's defaults, set by the environment: kept, and every round faults its pages in again.
    let faults = faults_of_large_requests(Some(
        "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072",
    ));
    assert!(faults > 3_000, "{faults} page faults with glibc's defaults");
}
