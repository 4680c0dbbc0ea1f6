//! The embedded interpreter: importing the model and calling its function with JSON in and out.
//!
//! JSON is converted by Python's own `json` module (C-accelerated; a decoder and an encoder built
//! once at load): it keeps integers of any size
//! exact and, with `allow_nan=False`, refuses NaN and infinities, so whatever it returns is valid
//! JSON that the proxy can splice into its response without parsing.

use std::path::PathBuf;

use modelgate_protocol::{ModelError, ModelErrorKind};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

pub struct Model {
    function: Py<PyAny>,
    /// `json.JSONDecoder().decode`: takes the request as a `str`.
    decode: Py<PyAny>,
    /// `json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode`,
    /// built once so a call passes no keyword arguments.
    encode: Py<PyAny>,
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
            encode: encoder.getattr("encode")?.unbind(),
        })
    }

    pub fn python_version(&self) -> String {
        Python::version_str()
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_owned()
    }

    /// Calls the function with the JSON `request` and returns its JSON-encoded result.
    pub fn predict(&self, request: &[u8]) -> Result<Vec<u8>, ModelError> {
        Python::attach(|py| {
            // The proxy only forwards requests it parsed as JSON, so they are UTF-8.
            let text = std::str::from_utf8(request).map_err(|e| ModelError {
                kind: ModelErrorKind::BadRequest,
                exception: "UnicodeDecodeError".into(),
                message: e.to_string(),
            })?;
            let args = self
                .decode
                .call1(py, (PyString::new(py, text),))
                .map_err(|err| model_error(py, ModelErrorKind::BadRequest, &err))?;
            let result = self.function.call1(py, (args,)).map_err(|err| {
                err.display(py);
                let kind = if err.is_instance_of::<pyo3::exceptions::PyMemoryError>(py) {
                    ModelErrorKind::OutOfMemory
                } else {
                    ModelErrorKind::Exception
                };
                model_error(py, kind, &err)
            })?;
            let encoded = self.encode.bind(py).call1((result,)).map_err(|err| {
                let mut e = model_error(py, ModelErrorKind::NotSerializable, &err);
                e.message = format!("return value is not JSON-serializable: {}", e.message);
                e
            })?;
            let encoded = encoded.cast_into::<PyString>().map_err(|_| ModelError {
                kind: ModelErrorKind::NotSerializable,
                exception: "TypeError".into(),
                message: "json.dumps did not return a string".into(),
            })?;
            encoded
                .to_str()
                .map(|s| s.as_bytes().to_vec())
                .map_err(|err| model_error(py, ModelErrorKind::NotSerializable, &err))
        })
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
