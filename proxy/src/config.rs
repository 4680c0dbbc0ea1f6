//! The configuration tree: parsed from TOML, overridden by CLI and environment, validated before
//! any port is bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The configuration `modelgate serve` uses without `--config`: the bundled examples, resolved
/// against the working directory.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/default.toml");

/// Hard ceiling on `server.max_replicas`.
pub const MAX_REPLICAS_CEILING: u32 = 199;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub builds: BuildsConfig,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuildsConfig {
    /// Interpreter used for `pip install` and build scripts. Default `python3`.
    pub python: PathBuf,
    /// Largest single file a build accepts, in bytes. Default 52428800 (50 MB).
    pub max_file_bytes: u64,
    /// Seconds a pip install or build script may run. Default 1800.
    pub timeout_secs: f64,
    /// Largest project archive upload, in bytes. Default 536870912 (512 MB).
    pub max_upload_bytes: u64,
    /// Most bytes an uploaded archive may unpack to. Default 2147483648 (2 GB).
    pub max_project_bytes: u64,
}

impl Default for BuildsConfig {
    fn default() -> Self {
        BuildsConfig {
            python: "python3".into(),
            max_file_bytes: 50 * 1024 * 1024,
            timeout_secs: 1800.0,
            max_upload_bytes: 512 * 1024 * 1024,
            max_project_bytes: 2 * 1024 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP listener binds. Default `127.0.0.1:8080`.
    pub listen: String,
    /// Largest accepted request body, in bytes. Default 5242880 (5 MB).
    pub max_request_bytes: u64,
    /// Seconds a model function may run before its replica is killed (504). Default 30.
    pub request_timeout_secs: f64,
    /// Seconds a request may wait for a free replica before 429. Default 30.
    pub queue_timeout_secs: f64,
    /// Requests that may wait per model; beyond it requests get 429 at once. Default 1024.
    pub max_queue: usize,
    /// Most waiting requests written to a replica together (it still runs them one at a time,
    /// in order); 1 writes a request only once its replica is free. Default 16.
    pub max_batch: usize,
    /// Microseconds of the replica's recent time per request a batch may add up to: a function
    /// slower than this gets one request at a time. Default 250.
    pub batch_budget_us: u64,
    /// Seconds a client may take to send request headers. Default 10.
    pub header_read_timeout_secs: f64,
    /// Seconds a client may take to send a prediction's whole body; past it, 408 and the
    /// connection is closed. Default 30.
    pub body_read_timeout_secs: f64,
    /// Most client connections open at once; further connections wait in the kernel's accept
    /// queue until one closes. Default 10000.
    pub max_connections: usize,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT. Default 30.
    pub shutdown_grace_secs: f64,
    /// Seconds a replica may take to import its model and report ready. Default 120.
    pub replica_start_timeout_secs: f64,
    /// Largest `replicas` a model may ask for (1..=199). Default 9.
    pub max_replicas: u32,
    /// Path of the `replica-runtime` binary. Default: next to the `modelgate` executable.
    pub replica_runtime: Option<PathBuf>,
    /// Most concurrent HTTP/2 streams per connection. Default 256.
    pub max_concurrent_streams: u32,
    /// Directory of the store, builds and caches, relative to the config file. Default `./data`
    /// in the working directory; `--data-dir` overrides.
    pub data_dir: Option<PathBuf>,
    /// Environment of every replica; a project's and a deployment's variables take precedence.
    pub env: BTreeMap<String, String>,
    /// Threads serving HTTP and dispatch. Default: the CPUs this process may run on. With 1, the
    /// runtime is tokio's current-thread one.
    pub worker_threads: Option<usize>,
    /// Address of a second listener serving only `/metrics`, `/healthz` and `/readyz` (with TLS
    /// when configured); when set, the main listener no longer serves `/metrics`.
    pub metrics_listen: Option<String>,
    /// PEM certificate chain; with `tls_key`, the listener serves HTTPS only (HTTP/2 and
    /// HTTP/1.1 by ALPN). Relative to the config file.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// How replica memory and CPU limits are enforced: `auto` (cgroup v2, else cgroup v1, else
    /// RLIMIT_AS without a CPU limit), `cgroup` (refuse to start without one) or `rlimit`.
    pub replica_limits: crate::cgroup::LimitsMode,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            max_request_bytes: 5 * 1024 * 1024,
            request_timeout_secs: 30.0,
            queue_timeout_secs: 30.0,
            max_queue: 1024,
            max_batch: 16,
            batch_budget_us: 250,
            header_read_timeout_secs: 10.0,
            body_read_timeout_secs: 30.0,
            max_connections: 10_000,
            shutdown_grace_secs: 30.0,
            replica_start_timeout_secs: 120.0,
            max_replicas: 9,
            replica_runtime: None,
            max_concurrent_streams: 256,
            data_dir: None,
            env: BTreeMap::new(),
            worker_threads: None,
            metrics_listen: None,
            tls_cert: None,
            tls_key: None,
            replica_limits: crate::cgroup::LimitsMode::Auto,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model name: letters, digits, `-`, `_` and `.`; unique.
    pub name: String,
    /// Model directory, relative to the config file or absolute.
    pub path: PathBuf,
    /// Python file in the model directory.
    pub file: String,
    /// Function in that file.
    pub function: String,
    /// Number of replicas, 1..=`server.max_replicas`. Default 1.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Access key; generated (and printed at start-up) when absent.
    pub access_key: Option<String>,
    /// Environment variables for the replicas.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Whether callers also need the API key of a project viewer (site admins qualify).
    /// Default true; the model's project is owned by the first admin.
    #[serde(default = "yes")]
    pub enable_authentication: bool,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

/// Settings that come from outside the file: CLI flags and environment, injected so tests never
/// touch the process environment. Precedence: CLI > environment > file > default.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// Environment variables (only `MODEL_REQUEST_TIMEOUT_SECONDS` is read).
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Reads a config file; relative model paths resolve against the file's directory.
    pub fn from_file(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_str(&text, &path.display().to_string(), base, overrides)
    }

    /// The bundled examples, resolved against `base` (normally the working directory).
    pub fn embedded(base: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::from_str(EMBEDDED_DEFAULT, "embedded default config", base, overrides)
    }

    pub fn from_str(
        text: &str,
        origin: &str,
        base: &Path,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source: Box::new(source),
        })?;
        let mut errors = Vec::new();
        if let Some(v) = overrides.env.get("MODEL_REQUEST_TIMEOUT_SECONDS") {
            match v.trim().parse::<f64>() {
                Ok(secs) => config.server.request_timeout_secs = secs,
                Err(_) => errors.push(format!(
                    "MODEL_REQUEST_TIMEOUT_SECONDS must be a number of seconds, got {v:?}"
                )),
            }
        }
        if let Some(listen) = &overrides.listen {
            config.server.listen = listen.clone();
        }
        config.server.data_dir = match (&overrides.data_dir, &config.server.data_dir) {
            (Some(dir), _) => Some(dir.clone()),
            (None, Some(dir)) => Some(base.join(dir)),
            (None, None) => Some(PathBuf::from("data")),
        };
        for path in [&mut config.server.tls_cert, &mut config.server.tls_key]
            .into_iter()
            .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        for model in &mut config.models {
            if model.path.is_relative() {
                model.path = base.join(&model.path);
            }
        }
        config.validate(&mut errors);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    fn validate(&self, errors: &mut Vec<String>) {
        let s = &self.server;
        if s.listen.parse::<SocketAddr>().is_err() {
            errors.push(format!(
                "server.listen must be an IP:port address, got {:?}",
                s.listen
            ));
        }
        if let Some(m) = &s.metrics_listen {
            if m.parse::<SocketAddr>().is_err() {
                errors.push(format!(
                    "server.metrics_listen must be an IP:port address, got {m:?}"
                ));
            } else if *m == s.listen && !m.ends_with(":0") {
                errors.push("server.metrics_listen must differ from server.listen".into());
            }
        }
        if s.max_request_bytes == 0 {
            errors.push("server.max_request_bytes must be at least 1".into());
        }
        for (name, v) in [
            ("request_timeout_secs", s.request_timeout_secs),
            ("queue_timeout_secs", s.queue_timeout_secs),
            ("header_read_timeout_secs", s.header_read_timeout_secs),
            ("body_read_timeout_secs", s.body_read_timeout_secs),
            ("replica_start_timeout_secs", s.replica_start_timeout_secs),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                errors.push(format!(
                    "server.{name} must be between 0 and 86400 seconds (exclusive of 0), got {v}"
                ));
            }
        }
        if !(s.shutdown_grace_secs.is_finite() && (0.0..=3600.0).contains(&s.shutdown_grace_secs)) {
            errors.push("server.shutdown_grace_secs must be between 0 and 3600".into());
        }
        if s.worker_threads.is_some_and(|n| n == 0 || n > 1024) {
            errors.push("server.worker_threads must be between 1 and 1024".into());
        }
        match (&s.tls_cert, &s.tls_key) {
            (Some(cert), Some(key)) => {
                for (name, path) in [("tls_cert", cert), ("tls_key", key)] {
                    if !path.is_file() {
                        errors.push(format!("server.{name}: {} is not a file", path.display()));
                    }
                }
            }
            (None, None) => {}
            _ => errors.push("server.tls_cert and server.tls_key go together".into()),
        }
        if s.max_connections == 0 {
            errors.push("server.max_connections must be at least 1".into());
        }
        if s.max_queue == 0 {
            errors.push("server.max_queue must be at least 1".into());
        }
        if s.max_batch == 0 {
            errors.push("server.max_batch must be at least 1".into());
        }
        if s.max_concurrent_streams == 0 {
            errors.push("server.max_concurrent_streams must be at least 1".into());
        }
        if !(1..=MAX_REPLICAS_CEILING).contains(&s.max_replicas) {
            errors.push(format!(
                "server.max_replicas must be between 1 and {MAX_REPLICAS_CEILING}, got {}",
                s.max_replicas
            ));
        }
        if !(self.builds.timeout_secs.is_finite() && self.builds.timeout_secs > 0.0) {
            errors.push("builds.timeout_secs must be positive".into());
        }
        let mut names = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let at = format!("models[{i}] ({:?})", m.name);
            if !valid_name(&m.name) {
                errors.push(format!(
                    "{at}: name must be 1-64 letters, digits, '-', '_' or '.'"
                ));
            }
            if !names.insert(m.name.as_str()) {
                errors.push(format!("{at}: duplicate model name"));
            }
            if !m.path.is_dir() {
                errors.push(format!(
                    "{at}: path {} is not a directory",
                    m.path.display()
                ));
            } else if !m.path.join(&m.file).is_file() {
                errors.push(format!(
                    "{at}: file {:?} not found in {}",
                    m.file,
                    m.path.display()
                ));
            }
            if !valid_identifier(&m.function) {
                errors.push(format!(
                    "{at}: function {:?} is not a Python identifier",
                    m.function
                ));
            }
            if !(1..=s.max_replicas).contains(&m.replicas) {
                errors.push(format!(
                    "{at}: replicas must be between 1 and {} (server.max_replicas), got {}",
                    s.max_replicas, m.replicas
                ));
            }
            if let Some(key) = &m.access_key {
                if key.len() < 16 || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                    errors.push(format!(
                        "{at}: access_key must be 16-128 printable ASCII characters"
                    ));
                } else if !keys.insert(key.as_str()) {
                    errors.push(format!("{at}: access_key is used by another model"));
                }
            }
            for k in m.env.keys() {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    errors.push(format!("{at}: invalid environment variable name {k:?}"));
                }
            }
        }
    }
}

impl ServerConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_secs)
    }
    pub fn queue_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.queue_timeout_secs)
    }
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.header_read_timeout_secs)
    }
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.body_read_timeout_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_secs)
    }
    /// The resolved data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("data"))
    }
    pub fn replica_start_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.replica_start_timeout_secs)
    }
}

/// Names of projects and models: 1-64 letters, digits, `-`, `_` and `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        Config::from_str(text, "test", &base, overrides)
    }

    const ADD: &str = r#"
[[models]]
name = "add"
path = "examples/add_numbers"
file = "add_numbers.py"
function = "add"
"#;

    #[test]
    fn embedded_default_is_valid() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let config = Config::embedded(&base, &Overrides::default()).unwrap();
        assert!(config.models.iter().any(|m| m.name == "add"));
        assert_eq!(config.server.max_request_bytes, 5_242_880);
        assert_eq!(config.server.request_timeout_secs, 30.0);
    }

    #[test]
    fn commented_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/modelgate.example.toml");
        let config = Config::from_file(&path, &Overrides::default()).unwrap();
        assert_eq!(config.models.len(), 2);
        assert_eq!(config.builds.max_file_bytes, 52_428_800);
    }

    #[test]
    fn precedence_cli_over_env_over_file() {
        let text = format!("[server]\nlisten = \"127.0.0.1:1\"\nrequest_timeout_secs = 5\n{ADD}");
        let c = parse(&text, &Overrides::default()).unwrap();
        assert_eq!(c.server.request_timeout_secs, 5.0);
        let mut o = Overrides {
            listen: Some("127.0.0.1:2".into()),
            ..Default::default()
        };
        o.env
            .insert("MODEL_REQUEST_TIMEOUT_SECONDS".into(), "7.5".into());
        let c = parse(&text, &o).unwrap();
        assert_eq!(c.server.request_timeout_secs, 7.5);
        assert_eq!(c.server.listen, "127.0.0.1:2");
    }

    #[test]
    fn rejects_bad_configs_with_clear_messages() {
        let cases: &[(&str, &str)] = &[
            ("[server]\nlisten = \"nope\"\n", "server.listen"),
            ("[server]\nbogus = 1\n", "unknown field `bogus`"),
            ("[server]\nrequest_timeout_secs = 0\n", "request_timeout_secs"),
            ("[server]\nmax_replicas = 200\n", "max_replicas"),
            ("[server]\nmax_request_bytes = 0\n", "max_request_bytes"),
            (
                "[[models]]\nname = \"a b\"\npath = \"examples/add_numbers\"\nfile = \"add_numbers.py\"\nfunction = \"add\"\n",
                "name must be",
            ),
            (
                "[[models]]\nname = \"x\"\npath = \"examples/add_numbers\"\nfile = \"missing.py\"\nfunction = \"add\"\n",
                "not found",
            ),
            (
                "[[models]]\nname = \"x\"\npath = \"examples/add_numbers\"\nfile = \"add_numbers.py\"\nfunction = \"1x\"\n",
                "not a Python identifier",
            ),
            (
                "[[models]]\nname = \"x\"\npath = \"examples/add_numbers\"\nfile = \"add_numbers.py\"\nfunction = \"add\"\nreplicas = 10\n",
                "replicas must be between 1 and 9",
            ),
            (
                "[[models]]\nname = \"x\"\npath = \"examples/add_numbers\"\nfile = \"add_numbers.py\"\nfunction = \"add\"\naccess_key = \"short\"\n",
                "access_key",
            ),
            (
                "[[models]]\nname = \"x\"\npath = \"examples/add_numbers\"\nfile = \"add_numbers.py\"\nfunction = \"add\"\nextra = 1\n",
                "unknown field `extra`",
            ),
        ];
        for (text, needle) in cases {
            let text = if text.contains("[[models]]") {
                text.to_string()
            } else {
                format!("{text}{ADD}")
            };
            let err = parse(&text, &Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err:?} lacks {needle:?}");
        }
        let dup = format!("{ADD}{ADD}");
        let err = parse(&dup, &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("duplicate model name"), "{err}");
        let mut o = Overrides::default();
        o.env
            .insert("MODEL_REQUEST_TIMEOUT_SECONDS".into(), "soon".into());
        let err = parse(ADD, &o).unwrap_err().to_string();
        assert!(err.contains("MODEL_REQUEST_TIMEOUT_SECONDS"), "{err}");
    }
}
