//! `replica-runtime check`: imports the module and resolves the function, for build validation.

use std::path::Path;
use std::process::Command;

fn check(file: &str, function: &str) -> std::process::Output {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy/tests/fixtures/models");
    Command::new(env!("CARGO_BIN_EXE_replica-runtime"))
        .args([
            "check",
            "--dir",
            dir.to_str().unwrap(),
            "--file",
            file,
            "--function",
            function,
        ])
        .output()
        .unwrap()
}

#[test]
fn check_accepts_a_loadable_function() {
    let out = check("funcs.py", "add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_reports_missing_function_import_error_and_missing_file() {
    for (file, function, needle) in [
        (
            "funcs.py",
            "nope",
            "function \"nope\" not found in funcs.py",
        ),
        ("funcs.py", "DATA", "is not callable"),
        (
            "broken_import.py",
            "predict",
            "No module named 'module_that_does_not_exist'",
        ),
        (
            "missing.py",
            "predict",
            "model file \"missing.py\" not found",
        ),
    ] {
        let out = check(file, function);
        assert_eq!(out.status.code(), Some(1), "{file} {function}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{file} {function}: {err}");
    }
}
