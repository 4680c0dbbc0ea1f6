//! Entry point for the `json_python` fuzz target and its corpus replay: arbitrary bytes go
//! through the JSON → Python → JSON path of a model that returns its argument. Whatever the
//! input, the call must not panic or crash the interpreter, anything it answers must be valid
//! JSON (the proxy splices answers into responses without parsing them), and for UTF-8 input it
//! must answer exactly what the `json` module's own methods answer.

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
    let answer = echo().predict(data);
    if std::str::from_utf8(data).is_ok() {
        assert_eq!(
            answer,
            echo().predict_through_methods(data),
            "the replica's JSON paths disagree on {:?}",
            String::from_utf8_lossy(data)
        );
    }
    if let Ok(answer) = answer {
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&answer) {
            panic!(
                "the replica answered invalid JSON ({e}): {:?}",
                String::from_utf8_lossy(&answer)
            );
        }
    }
}
