//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same entry points
//! the fuzz targets use, as ordinary tests: what once was found (or seeded) stays fixed.
//! The fuzzers themselves run with `fuzz/run.sh` (nightly, libFuzzer).

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            (path, data)
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no corpus for {target}");
    inputs
}

#[test]
fn envelope_corpus() {
    for (_, data) in corpus("envelope") {
        modelgate::fuzzing::envelope(&data);
    }
}

#[test]
fn api_key_corpus() {
    for (_, data) in corpus("api_key") {
        modelgate::fuzzing::api_key(&data);
    }
}

#[test]
fn config_corpus() {
    for (_, data) in corpus("config") {
        modelgate::fuzzing::config(&data);
    }
}

#[test]
fn archive_corpus() {
    for (_, data) in corpus("archive") {
        modelgate_control::archive::fuzz_extract(&data);
    }
}
