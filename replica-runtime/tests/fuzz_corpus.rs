//! Replays the committed `json_python` fuzz corpus (`fuzz/corpus/json_python/`) through the
//! replica's JSON → Python → JSON path, as an ordinary test.

#[test]
fn json_python_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/json_python");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        replica_runtime::fuzzing::json_python(&data);
        n += 1;
    }
    assert!(n > 0, "no corpus in {}", dir.display());
}
