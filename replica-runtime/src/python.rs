//! The embedded interpreter: importing the model and calling its function with JSON in and out.
//!
//! JSON in the common case is converted by [`crate::json`], straight between bytes and Python
//! objects. What it leaves, and every error, goes through Python's own `json` module
//! (C-accelerated; a decoder and an encoder built once at load), whose results [`crate::json`]
//! matches exactly. The `json` module keeps integers of any size
//! exact and, with `allow_nan=False`, refuses NaN and infinities, so whatever it returns is valid
//! JSON that the proxy can splice into its response without parsing.
//!
//! The calls go straight to the module's C parts, built once, rather than through
//! `JSONDecoder.decode` and `JSONEncoder.encode`: those are Python methods that, on every call,
//! run two regular expressions (the decoder) or build a new C encoder, a closure and a dict (the
//! encoder), which cost more than the conversion of a small request. The results and errors are
//! the same: a request the scanner does not take whole goes through `decode`, and the C encoder
//! is the one `encode` builds, with the same settings. One difference remains: Python's recursion
//! limit. Without those methods' two Python frames on the stack, a request or an answer may nest
//! two levels deeper (about 998 instead of 996) before the limit refuses it; and [`crate::json`]
//! converts up to 64 levels without consulting it, so a model that lowers the limit below that
//! still gets such requests.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use modelgate_protocol::{ModelError, ModelErrorKind};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

pub struct Model {
    function: Py<PyAny>,
    /// `json.JSONDecoder().decode`: takes the request as a `str`.
    decode: Py<PyAny>,
    /// The same decoder's `scan_once`: `(value, end)` for the JSON value at an index of a `str`.
    scan_once: Py<PyAny>,
    /// `json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode`,
    /// built once so a call passes no keyword arguments.
    encode: Py<PyAny>,
    /// The C encoder `encode` would build on each call, built once; `None` without the C
    /// accelerator.
    c_encoder: Option<CEncoder>,
}

/// `json.encoder.c_make_encoder(markers, ...)` and its `markers` dict (the containers being
/// encoded, by id, for circular references). The encoder empties `markers` when it succeeds; after
/// an error it leaves them there, alive, so they are cleared.
struct CEncoder {
    encoder: Py<PyAny>,
    markers: Py<PyDict>,
}

impl Model {
    /// Imports `file` from the first of `path` and resolves `function` in it. On failure the
    /// traceback is printed to stderr, which is the replica's log.
    pub fn load(path: &[PathBuf], file: &str, function: &str) -> Result<Model, ModelError> {
        Python::initialize();
        Python::attach(|py| {
            Self::load_inner(py, path, file, function).map_err(|err| {
                err.display(py);
                model_error(py, ModelErrorKind::Load, &err)
            })
        })
    }

    fn load_inner(py: Python<'_>, path: &[PathBuf], file: &str, function: &str) -> PyResult<Model> {
        let sys = py.import("sys")?;
        let sys_path = sys.getattr("path")?.cast_into::<PyList>()?;
        for (i, dir) in path.iter().enumerate() {
            sys_path.insert(i, dir.to_string_lossy().as_ref())?;
        }
        sys.setattr("argv", PyList::new(py, [file])?)?;

        let module_name = std::path::Path::new(file)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.to_owned());
        let file_path = path[0].join(file);
        if !file_path.is_file() {
            return Err(pyo3::exceptions::PyFileNotFoundError::new_err(format!(
                "model file {file:?} not found in {}",
                path[0].display()
            )));
        }
        // Import by file location, registered under the file's stem, so `predict.py` is the module
        // `predict` and pickles that reference its classes resolve.
        let util = py.import("importlib.util")?;
        let spec = util.call_method1(
            "spec_from_file_location",
            (&module_name, file_path.to_string_lossy().as_ref()),
        )?;
        let module = util.call_method1("module_from_spec", (&spec,))?;
        sys.getattr("modules")?.set_item(&module_name, &module)?;
        spec.getattr("loader")?
            .call_method1("exec_module", (&module,))?;

        let func = module.getattr(function).map_err(|_| {
            pyo3::exceptions::PyAttributeError::new_err(format!(
                "function {function:?} not found in {file}"
            ))
        })?;
        if !func.is_callable() {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "{function:?} in {file} is not callable"
            )));
        }
        let json = py.import("json")?;
        let options = PyDict::new(py);
        options.set_item("allow_nan", false)?;
        options.set_item("ensure_ascii", false)?;
        options.set_item("separators", (",", ":"))?;
        let encoder = json.getattr("JSONEncoder")?.call((), Some(&options))?;
        let decoder = json.getattr("JSONDecoder")?.call0()?;
        Ok(Model {
            function: func.unbind(),
            decode: decoder.getattr("decode")?.unbind(),
            scan_once: decoder.getattr("scan_once")?.unbind(),
            encode: encoder.getattr("encode")?.unbind(),
            // Only a shortcut: without it, `encode` does the same.
            c_encoder: c_encoder(py, &encoder).unwrap_or(None),
        })
    }

    pub fn python_version(&self) -> String {
        Python::version_str()
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_owned()
    }

    /// Runs the functions the model registered with `atexit`, as the interpreter does when a
    /// Python program ends (the interpreter itself is never finalised here). Their exceptions are
    /// printed to stderr, the replica's log, by `atexit` itself.
    pub fn run_exit_handlers(&self) {
        Python::attach(|py| {
            if let Err(err) = py
                .import("atexit")
                .and_then(|atexit| atexit.call_method0("_run_exitfuncs"))
            {
                err.display(py);
            }
        })
    }

    /// Gives SIGTERM its default action back in every process forked through Python from now on
    /// (`os.register_at_fork`), so the replica's own handler does not keep a model's
    /// multiprocessing workers alive when they are terminated. SIGTERM is blocked across the
    /// fork, so one sent to the child before it has reset the action is not lost to the
    /// handler: it stays pending and ends the child as it unblocks.
    pub fn reset_sigterm_in_forked_children(&self) -> Result<(), String> {
        Python::attach(|py| {
            let globals = PyDict::new(py);
            py.run(
                c"import os, signal, threading
saved = threading.local()
def before():
    saved.mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
def after_in_parent():
    signal.pthread_sigmask(signal.SIG_SETMASK, saved.mask)
def after_in_child():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, saved.mask)
os.register_at_fork(before=before, after_in_parent=after_in_parent, after_in_child=after_in_child)
",
                Some(&globals),
                None,
            )
            .map_err(|err| err.to_string())
        })
    }

    /// Calls the function with the JSON `request` and returns its JSON-encoded result.
    pub fn predict(&self, request: &[u8]) -> Result<Vec<u8>, ModelError> {
        Python::attach(|py| {
            // The proxy only forwards requests it parsed as JSON, so they are UTF-8.
            let text = match simdutf8::basic::from_utf8(request) {
                Ok(text) => text,
                Err(_) => return Err(not_utf8(request)),
            };
            // pyo3 panics when Python cannot allocate an object (after printing Python's
            // error): the `json` module then tries again and raises `MemoryError` as before.
            let fast = catch_unwind(AssertUnwindSafe(|| crate::json::decode(py, text)));
            let args = match fast.ok().flatten() {
                Some(args) => args,
                None => self.decode_with_module(&PyString::new(py, text))?,
            };
            let result = self.function.call1(py, (args,)).map_err(|err| {
                err.display(py);
                let kind = if err.is_instance_of::<pyo3::exceptions::PyMemoryError>(py) {
                    ModelErrorKind::OutOfMemory
                } else {
                    ModelErrorKind::Exception
                };
                model_error(py, kind, &err)
            })?;
            let mut out = Vec::new();
            let fast = catch_unwind(AssertUnwindSafe(|| {
                crate::json::encode(result.bind(py), &mut out)
            }));
            if matches!(fast, Ok(true)) {
                return Ok(out);
            }
            self.encode_into_utf8(result.bind(py))
        })
    }

    /// `decode(text)`, through the C scanner when it takes the text whole.
    fn decode_with_module<'py>(
        &self,
        text: &Bound<'py, PyString>,
    ) -> Result<Bound<'py, PyAny>, ModelError> {
        let py = text.py();
        match self.scan_whole(text) {
            Some(args) => Ok(args),
            None => self
                .decode
                .bind(py)
                .call1((text,))
                .map_err(|err| model_error(py, ModelErrorKind::BadRequest, &err)),
        }
    }

    /// The request as `decode` would return it, when it is one JSON value with nothing around it
    /// (what the proxy sends); `None` for anything else, which `decode` then answers or refuses.
    fn scan_whole<'py>(&self, text: &Bound<'py, PyString>) -> Option<Bound<'py, PyAny>> {
        let py = text.py();
        let (value, end): (Bound<'py, PyAny>, usize) = self
            .scan_once
            .bind(py)
            .call1((text, 0))
            .ok()?
            .extract()
            .ok()?;
        (end == text.len().ok()?).then_some(value)
    }

    /// `encode(result)`, as UTF-8.
    fn encode_into_utf8(&self, result: &Bound<'_, PyAny>) -> Result<Vec<u8>, ModelError> {
        let py = result.py();
        let not_serializable = |err: PyErr| {
            let mut e = model_error(py, ModelErrorKind::NotSerializable, &err);
            e.message = format!("return value is not JSON-serializable: {}", e.message);
            e
        };
        let not_a_string = || ModelError {
            kind: ModelErrorKind::NotSerializable,
            exception: "TypeError".into(),
            message: "json.dumps did not return a string".into(),
        };
        let utf8 = |s: &Bound<'_, PyString>, out: &mut Vec<u8>| {
            s.to_str()
                .map(|s| out.extend_from_slice(s.as_bytes()))
                .map_err(|err| model_error(py, ModelErrorKind::NotSerializable, &err))
        };
        let mut out = Vec::new();
        let Some(c) = &self.c_encoder else {
            let encoded = self
                .encode
                .bind(py)
                .call1((result,))
                .map_err(not_serializable)?;
            let encoded = encoded
                .cast_into::<PyString>()
                .map_err(|_| not_a_string())?;
            utf8(&encoded, &mut out)?;
            return Ok(out);
        };
        // What `encode` does with it: the chunks, joined.
        let chunks = match c.encoder.bind(py).call1((result, 0)) {
            Ok(chunks) => chunks,
            Err(err) => {
                c.markers.bind(py).clear();
                return Err(not_serializable(err));
            }
        };
        let pieces = chunks
            .try_iter()
            .map_err(|_| not_a_string())?
            .map(|chunk| chunk.ok()?.cast_into::<PyString>().ok())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(not_a_string)?;
        let Ok(texts) = pieces
            .iter()
            .map(|piece| piece.to_str())
            .collect::<PyResult<Vec<&str>>>()
        else {
            // Not UTF-8 (a lone surrogate): the error of the joined string, as `encode` gives
            // it, with the position counted from the start of the whole answer.
            let joined = PyString::new(py, "")
                .call_method1("join", (chunks,))
                .map_err(not_serializable)?
                .cast_into::<PyString>()
                .map_err(|_| not_a_string())?;
            utf8(&joined, &mut out)?;
            return Ok(out);
        };
        out.reserve_exact(texts.iter().map(|t| t.len()).sum());
        for text in texts {
            out.extend_from_slice(text.as_bytes());
        }
        Ok(out)
    }

    /// `predict` through `JSONDecoder.decode` and `JSONEncoder.encode` only: what the direct
    /// calls and [`crate::json`] must match (the tests and the `json_python` fuzz target check).
    /// The input must be UTF-8.
    pub(crate) fn predict_through_methods(&self, request: &[u8]) -> Result<Vec<u8>, ModelError> {
        Python::attach(|py| {
            let text = std::str::from_utf8(request).expect("UTF-8");
            let args = self
                .decode
                .call1(py, (PyString::new(py, text),))
                .map_err(|err| model_error(py, ModelErrorKind::BadRequest, &err))?;
            let result = self
                .function
                .call1(py, (args,))
                .map_err(|err| model_error(py, ModelErrorKind::Exception, &err))?;
            let encoded = self.encode.bind(py).call1((result,)).map_err(|err| {
                let mut e = model_error(py, ModelErrorKind::NotSerializable, &err);
                e.message = format!("return value is not JSON-serializable: {}", e.message);
                e
            })?;
            let encoded = encoded.cast_into::<PyString>().expect("a str");
            encoded
                .to_str()
                .map(|s| s.as_bytes().to_vec())
                .map_err(|err| model_error(py, ModelErrorKind::NotSerializable, &err))
        })
    }
}

/// The C encoder `encoder.encode` builds on every call (`JSONEncoder.iterencode` with
/// `_one_shot`), built once from the encoder's own settings.
fn c_encoder(py: Python<'_>, encoder: &Bound<'_, PyAny>) -> PyResult<Option<CEncoder>> {
    let module = py.import("json.encoder")?;
    let make = module.getattr("c_make_encoder")?;
    if make.is_none()
        || !encoder.getattr("indent")?.is_none()
        || !encoder.getattr("check_circular")?.is_truthy()?
    {
        return Ok(None);
    }
    let markers = PyDict::new(py);
    let escape = if encoder.getattr("ensure_ascii")?.is_truthy()? {
        module.getattr("encode_basestring_ascii")?
    } else {
        module.getattr("encode_basestring")?
    };
    let built = make.call1((
        &markers,
        encoder.getattr("default")?,
        escape,
        encoder.getattr("indent")?,
        encoder.getattr("key_separator")?,
        encoder.getattr("item_separator")?,
        encoder.getattr("sort_keys")?,
        encoder.getattr("skipkeys")?,
        encoder.getattr("allow_nan")?,
    ))?;
    Ok(Some(CEncoder {
        encoder: built.unbind(),
        markers: markers.unbind(),
    }))
}

/// The error for a request that is not UTF-8, in std's words (which say where it breaks).
#[cold]
fn not_utf8(request: &[u8]) -> ModelError {
    ModelError {
        kind: ModelErrorKind::BadRequest,
        exception: "UnicodeDecodeError".into(),
        message: std::str::from_utf8(request)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
    }
}

fn model_error(py: Python<'_>, kind: ModelErrorKind, err: &PyErr) -> ModelError {
    let exception = err
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".into());
    let message = err
        .value(py)
        .str()
        .map(|s| s.to_string())
        .unwrap_or_default();
    ModelError {
        kind,
        exception,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FUNCTIONS: &str = r#"
import math

def echo(args):
    return args

class Thing:
    pass

def returns(args):
    what = args["what"]
    if what == "nan":
        return {"x": [1, math.nan]}
    if what == "circular":
        loop = []
        loop.append(loop)
        return {"x": loop}
    if what == "set":
        return {"x": {1, 2}}
    if what == "object":
        return [Thing()]
    if what == "surrogate":
        return "\ud800"
    if what == "str":
        return "caf\u00e9 \"quoted\"\n"
    if what == "keys":
        return {1: "int", 2.5: "float", True: "bool", None: "none"}
    if what == "tuple":
        return (1, [2, (3,)])
    if what == "big":
        return 10 ** 40
    if what == "float":
        return [0.1, 1e300, -0.0]
    if what == "deep":
        x = []
        for _ in range(100000):
            x = [x]
        return x
    if what == "long surrogate":
        return [0] * 60000 + ["\ud800"]
    return args
"#;

    fn model(function: &str) -> Model {
        let dir = std::env::temp_dir().join(format!(
            "modelgate-json-paths-{}-{function}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("funcs.py"), FUNCTIONS).unwrap();
        Model::load(std::slice::from_ref(&dir), "funcs.py", function).unwrap()
    }

    /// The C scanner and the C encoder, called directly, answer exactly what `decode` and
    /// `encode` answer, errors included, and an error leaves nothing behind for the next call.
    #[test]
    fn direct_json_calls_answer_what_the_methods_answer() {
        let echo = model("echo");
        let requests: Vec<&[u8]> = vec![
            br#"{"a":3,"b":5}"#,
            br#"  {"a":1}  "#,
            br#"{"a":1} x"#,
            br#"{"a":1}{"b":2}"#,
            br#"{"a":"\u00e9\ud83d\ude00","b":[1,2.5,-3e4,true,false,null]}"#,
            br#"{"a":NaN,"b":Infinity}"#,
            br#"{"a":123456789012345678901234567890}"#,
            br#"{"a":"#,
            br#""#,
            br#"[1,2]"#,
            br#""text""#,
            br#"{"a":"\ud800"}"#,
            br#"{"a" : 1 , "a" : 2}"#,
        ];
        for request in &requests {
            assert_eq!(
                echo.predict(request),
                echo.predict_through_methods(request),
                "{}",
                String::from_utf8_lossy(request)
            );
        }
        let corpus =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/json_python");
        let mut n = 0;
        for entry in std::fs::read_dir(corpus).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            if std::str::from_utf8(&data).is_ok() {
                assert_eq!(echo.predict(&data), echo.predict_through_methods(&data));
                n += 1;
            }
        }
        assert!(n > 50, "{n} corpus entries");
        let returns = model("returns");
        for what in [
            "nan",
            "circular",
            "set",
            "object",
            "surrogate",
            "str",
            "keys",
            "tuple",
            "big",
            "float",
            "deep",
            "long surrogate",
            "none",
        ] {
            let request = format!(r#"{{"what":"{what}"}}"#);
            let direct = returns.predict(request.as_bytes());
            assert_eq!(
                direct,
                returns.predict_through_methods(request.as_bytes()),
                "{what}"
            );
            // A failure leaves no containers in `markers` (which would keep them alive, and
            // could take the next ones for circular references).
            let c = returns.c_encoder.as_ref().expect("CPython's C accelerator");
            Python::attach(|py| assert_eq!(c.markers.bind(py).len(), 0, "after {what}"));
            assert_eq!(
                returns.predict(br#"{"what":"tuple"}"#).unwrap(),
                b"[1,[2,[3]]]",
                "after {what}: {direct:?}"
            );
        }
    }
}
