//! Entry point for the `json_python` fuzz target and its corpus replay: arbitrary bytes go
//! through the JSON → Python → JSON path of a model that returns its argument. Whatever the
//! input, the call must not panic or crash the interpreter, and anything it answers must be
//! valid JSON (the proxy splices answers into responses without parsing them).

use std::sync::OnceLock;

use crate::python::Model;

fn echo() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("modelgate-fuzz-echo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        std::fs::write(dir.join("echo.py"), "def echo(args):\n    return args\n")
            .expect("model file");
        Model::load(std::slice::from_ref(&dir), "echo.py", "echo").expect("echo model loads")
    })
}

pub fn json_python(data: &[u8]) {
    if let Ok(answer) = echo().predict(data) {
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&answer) {
            panic!(
                "the replica answered invalid JSON ({e}): {:?}",
                String::from_utf8_lossy(&answer)
            );
        }
    }
}
