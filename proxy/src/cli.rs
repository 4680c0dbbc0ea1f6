//! The client half of the `modelgate` binary: every API resource as a subcommand, printing
//! tables for people and (with `--json`) the API's JSON for scripts.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use clap::Subcommand;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// Where the API is, who calls it and how to print.
pub struct Target {
    pub url: String,
    pub json: bool,
    /// Sent as `Authorization: Bearer`; see [`api_key`].
    pub api_key: Option<String>,
}

/// The caller's API key: `MODELGATE_API_KEY`, else the file named by `MODELGATE_API_KEY_FILE`,
/// else the file `modelgate login` writes. Never a command-line argument, which would land in
/// shell history and process listings.
pub fn api_key() -> Option<String> {
    if let Ok(k) = std::env::var("MODELGATE_API_KEY") {
        return Some(k.trim().to_owned());
    }
    let path = std::env::var_os("MODELGATE_API_KEY_FILE")
        .map(std::path::PathBuf::from)
        .or_else(credentials_path)?;
    std::fs::read_to_string(path)
        .ok()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
}

/// `$XDG_CONFIG_HOME/modelgate/api-key`, or `~/.config/modelgate/api-key`.
fn credentials_path() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".config")))?;
    Some(base.join("modelgate").join("api-key"))
}

#[derive(Subcommand)]
pub enum Projects {
    /// List projects.
    List,
    /// Create a project: from a directory on the server (--path), or by uploading a local
    /// directory (--upload).
    Create {
        #[arg(long)]
        name: String,
        /// Directory on the server holding the project's files.
        #[arg(long, conflicts_with = "upload", required_unless_present = "upload")]
        path: Option<std::path::PathBuf>,
        /// Local directory to upload as the project's files (`.git` directories are left out).
        #[arg(long)]
        upload: Option<std::path::PathBuf>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Replace a project's environment variables (a deployment's own ones take precedence).
    SetEnv {
        #[arg(long)]
        project: i64,
        /// KEY=VALUE (repeatable); none clears the environment.
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
    },
    /// Replace an uploaded project's files with a local directory.
    Upload {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        dir: std::path::PathBuf,
    },
}

/// Packs a directory as tar.gz, leaving out `.git` directories and keeping symlinks as links.
fn tar_gz(dir: &std::path::Path) -> Result<Vec<u8>, String> {
    fn add(
        b: &mut tar::Builder<flate2::write::GzEncoder<Vec<u8>>>,
        root: &std::path::Path,
        dir: &std::path::Path,
    ) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path.strip_prefix(root).expect("under root");
            let ft = e.file_type()?;
            if ft.is_dir() {
                if e.file_name() == ".git" {
                    continue;
                }
                b.append_dir(rel, &path)?;
                add(b, root, &path)?;
            } else {
                b.append_path_with_name(&path, rel)?;
            }
        }
        Ok(())
    }
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    b.follow_symlinks(false);
    add(&mut b, dir, dir).map_err(|e| format!("packing {}: {e}", dir.display()))?;
    b.into_inner()
        .and_then(|gz| gz.finish())
        .map_err(|e| format!("packing {}: {e}", dir.display()))
}

#[derive(Subcommand)]
pub enum Models {
    List {
        #[arg(long)]
        project: i64,
    },
    Create {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    Get {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
    },
    /// Delete a model (refused while a deployment is active).
    Delete {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
    },
    /// Change the description or `enable_authentication` (that one needs the project admin role).
    Update {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        enable_authentication: Option<bool>,
    },
    /// Replace the access key; the old one stops working at once.
    RegenerateKey {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
    },
}

#[derive(Subcommand)]
pub enum Builds {
    List {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
    },
    /// Start a build; with --follow, print its log live until it ends (exit 1 if it failed).
    Create {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
        /// Python file, relative to the project.
        #[arg(long)]
        file: String,
        #[arg(long)]
        function: String,
        #[arg(long)]
        follow: bool,
    },
    /// Print a build's log; with --follow, until the build ends.
    Log {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
        #[arg(long)]
        build: i64,
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
pub enum Deployments {
    List {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
    },
    /// Deploy a build; with --wait, until it serves (exit 1 if it failed).
    Create {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
        #[arg(long)]
        build: i64,
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        #[arg(long, default_value_t = 1.0)]
        cpu: f64,
        #[arg(long, default_value_t = 2048)]
        memory_mb: u32,
        /// Environment variable for the replicas, KEY=VALUE (repeatable).
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        #[arg(long)]
        wait: bool,
    },
    Stop {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
        #[arg(long)]
        deployment: i64,
    },
    Restart {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
        #[arg(long)]
        deployment: i64,
    },
}

#[derive(Subcommand)]
pub enum Replicas {
    List {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
    },
    /// The replica's captured stdout and stderr.
    Logs {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        model: i64,
        #[arg(long)]
        replica: String,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

type CliResult = Result<(), String>;

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

struct Api<'a> {
    target: &'a Target,
    client: Client<Connector, Full<Bytes>>,
}

/// A connector for `http://` and `https://` URLs. HTTPS trusts the system's roots and, when
/// set, the PEM certificates in `MODELGATE_CA_CERT` (for a private CA or a self-signed server).
fn connector() -> Result<Connector, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = std::env::var_os("MODELGATE_CA_CERT") {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(&path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("MODELGATE_CA_CERT: {e}"))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("MODELGATE_CA_CERT: {e}"))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build())
}

impl<'a> Api<'a> {
    fn new(target: &'a Target) -> Self {
        let connector = connector().unwrap_or_else(|e| {
            eprintln!("modelgate: {e}");
            std::process::exit(1)
        });
        Api {
            target,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Adds the caller's credentials.
    fn authorize(&self, req: http::request::Builder) -> http::request::Builder {
        match &self.target.api_key {
            Some(k) => req.header(http::header::AUTHORIZATION, format!("Bearer {k}")),
            None => req,
        }
    }

    /// One API call: (status, body).
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Bytes), String> {
        let url = format!("{}{path}", self.target.url.trim_end_matches('/'));
        let payload = body
            .map(|b| serde_json::to_vec(&b).expect("JSON"))
            .unwrap_or_default();
        let req = self
            .authorize(http::Request::builder())
            .method(method)
            .uri(&url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| format!("bad request for {url}: {e}"))?;
        let resp = tokio::time::timeout(Duration::from_secs(120), self.client.request(req))
            .await
            .map_err(|_| format!("{url}: no answer within 120 s"))?
            .map_err(|e| format!("cannot reach {url}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer from {url}: {e}"))?
            .to_bytes();
        Ok((status, body))
    }

    /// A JSON API call that must succeed; an error answer becomes the CLI's error message.
    async fn json(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let (status, bytes) = self.call(method, path, body).await?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            let msg = value["error"]["message"].as_str().unwrap_or("(no message)");
            let code = value["error"]["code"].as_str().unwrap_or("unknown");
            return Err(format!("{status} {code}: {msg}"));
        }
        Ok(value)
    }

    /// A JSON API call whose answer is printed: a table of `columns` (of the list under
    /// `list_key`, or of the object itself), or the JSON with `--json`.
    async fn show(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
        columns: &[&str],
        list_key: Option<&str>,
    ) -> Result<(), String> {
        let v = self.json(method, path, body).await?;
        self.print(&v, columns, list_key);
        Ok(())
    }

    fn print(&self, value: &Value, columns: &[&str], list_key: Option<&str>) {
        if self.target.json {
            println!("{}", serde_json::to_string_pretty(value).expect("JSON"));
            return;
        }
        let rows: Vec<&Value> = match list_key {
            Some(k) => value[k]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default(),
            None => vec![value],
        };
        print_table(columns, &rows);
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Object(o) if o.is_empty() => "-".into(),
        other => other.to_string(),
    }
}

fn print_table(columns: &[&str], rows: &[&Value]) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |items: Vec<String>| {
        items
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!(
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for r in cells {
        println!("{}", line(r));
    }
}

const PROJECT_COLS: &[&str] = &["id", "name", "source_path", "created_at"];
const MODEL_COLS: &[&str] = &[
    "id",
    "project_id",
    "name",
    "access_key",
    "enable_authentication",
    "created_at",
];
const BUILD_COLS: &[&str] = &[
    "id",
    "build_number",
    "status",
    "file_path",
    "function_name",
    "sha256",
    "finished_at",
];
const DEPLOYMENT_COLS: &[&str] = &[
    "id",
    "build_id",
    "status",
    "replicas",
    "environment",
    "updated_at",
];
const REPLICA_COLS: &[&str] = &["id", "deployment_id", "status", "pid"];

fn model_path(project: i64, model: i64) -> String {
    format!("/api/v2/projects/{project}/models/{model}")
}

pub async fn projects(target: &Target, cmd: Projects) -> CliResult {
    let api = Api::new(target);
    match cmd {
        Projects::List => {
            api.show(
                http::Method::GET,
                "/api/v2/projects",
                None,
                PROJECT_COLS,
                Some("projects"),
            )
            .await?;
        }
        Projects::Create {
            name,
            path,
            upload,
            description,
        } => {
            let mut body = json!({"name": name, "description": description});
            if let Some(path) = path {
                body["path"] = json!(std::path::absolute(&path).map_err(|e| e.to_string())?);
            }
            let v = api
                .json(http::Method::POST, "/api/v2/projects", Some(body))
                .await?;
            if let Some(dir) = upload {
                upload_dir(&api, v["id"].as_i64().unwrap_or_default(), &dir).await?;
            }
            api.print(&v, PROJECT_COLS, None);
        }
        Projects::SetEnv { project, env } => {
            let environment: BTreeMap<String, String> = env.into_iter().collect();
            api.show(
                http::Method::PATCH,
                &format!("/api/v2/projects/{project}"),
                Some(json!({ "environment": environment })),
                &["id", "name", "environment", "updated_at"],
                None,
            )
            .await?;
        }
        Projects::Upload { project, dir } => {
            let v = upload_dir(&api, project, &dir).await?;
            if target.json {
                println!("{v}");
            } else {
                println!("uploaded {} entries to project {project}", v["entries"]);
            }
        }
    }
    Ok(())
}

async fn upload_dir(api: &Api<'_>, project: i64, dir: &std::path::Path) -> Result<Value, String> {
    let dir = dir.to_owned();
    let archive = tokio::task::spawn_blocking(move || tar_gz(&dir))
        .await
        .map_err(|e| e.to_string())??;
    let url = format!(
        "{}/api/v2/projects/{project}/files",
        api.target.url.trim_end_matches('/')
    );
    let req = api
        .authorize(http::Request::put(&url))
        .header(http::header::CONTENT_TYPE, "application/gzip")
        .body(Full::new(Bytes::from(archive)))
        .map_err(|e| e.to_string())?;
    let resp = api
        .client
        .request(req)
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if status != 200 {
        return Err(format!(
            "{status} {}: {}",
            cell(&v["error"]["code"]),
            cell(&v["error"]["message"])
        ));
    }
    Ok(v)
}

pub async fn models(target: &Target, cmd: Models) -> CliResult {
    let api = Api::new(target);
    match cmd {
        Models::List { project } => {
            api.show(
                http::Method::GET,
                &format!("/api/v2/projects/{project}/models"),
                None,
                MODEL_COLS,
                Some("models"),
            )
            .await?;
        }
        Models::Create {
            project,
            name,
            description,
        } => {
            api.show(
                http::Method::POST,
                &format!("/api/v2/projects/{project}/models"),
                Some(json!({"name": name, "description": description})),
                MODEL_COLS,
                None,
            )
            .await?;
        }
        Models::Get { project, model } => {
            api.show(
                http::Method::GET,
                &model_path(project, model),
                None,
                MODEL_COLS,
                None,
            )
            .await?;
        }
        Models::Delete { project, model } => {
            api.json(http::Method::DELETE, &model_path(project, model), None)
                .await?;
            if !target.json {
                println!("model {model} deleted");
            }
        }
        Models::Update {
            project,
            model,
            description,
            enable_authentication,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(d) = description {
                body.insert("description".into(), json!(d));
            }
            if let Some(a) = enable_authentication {
                body.insert("enable_authentication".into(), json!(a));
            }
            api.show(
                http::Method::PATCH,
                &model_path(project, model),
                Some(Value::Object(body)),
                MODEL_COLS,
                None,
            )
            .await?;
        }
        Models::RegenerateKey { project, model } => {
            api.show(
                http::Method::POST,
                &format!("{}/access_key", model_path(project, model)),
                None,
                MODEL_COLS,
                None,
            )
            .await?;
        }
    }
    Ok(())
}

/// Prints a build's log from the start, following it until the build ends when `follow`.
/// Returns the final status.
async fn follow_log(api: &Api<'_>, path: &str, follow: bool) -> Result<String, String> {
    use std::io::Write;
    let mut offset = 0u64;
    loop {
        let url = format!(
            "{}/api/v2{path}/log?offset={offset}",
            api.target.url.trim_end_matches('/')
        );
        let req = api
            .authorize(http::Request::get(&url))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = api
            .client
            .request(req)
            .await
            .map_err(|e| format!("cannot reach {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: {}", resp.status()));
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let (status, finished, next) = (
            header("x-build-status"),
            header("x-build-finished") == "true",
            header("x-log-next-offset"),
        );
        let chunk = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let mut out = std::io::stdout();
        let _ = out.write_all(&chunk);
        let _ = out.flush();
        offset = next.parse().unwrap_or(offset + chunk.len() as u64);
        if finished || !follow {
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn builds(target: &Target, cmd: Builds) -> CliResult {
    let api = Api::new(target);
    match cmd {
        Builds::List { project, model } => {
            api.show(
                http::Method::GET,
                &format!("{}/builds", model_path(project, model)),
                None,
                BUILD_COLS,
                Some("builds"),
            )
            .await?;
        }
        Builds::Create {
            project,
            model,
            file,
            function,
            follow,
        } => {
            let v = api
                .json(
                    http::Method::POST,
                    &format!("{}/builds", model_path(project, model)),
                    Some(json!({"file_path": file, "function_name": function})),
                )
                .await?;
            if !follow {
                api.print(&v, BUILD_COLS, None);
                return Ok(());
            }
            let path = format!("/projects/{project}/models/{model}/builds/{}", v["id"]);
            let status = follow_log(&api, &path, true).await?;
            api.show(
                http::Method::GET,
                &format!("/api/v2{path}"),
                None,
                BUILD_COLS,
                None,
            )
            .await?;
            if status != "built" {
                return Err(format!("build {} ended as {status:?}", v["build_number"]));
            }
        }
        Builds::Log {
            project,
            model,
            build,
            follow,
        } => {
            follow_log(
                &api,
                &format!("/projects/{project}/models/{model}/builds/{build}"),
                follow,
            )
            .await?;
        }
    }
    Ok(())
}

pub async fn deployments(target: &Target, cmd: Deployments) -> CliResult {
    let api = Api::new(target);
    match cmd {
        Deployments::List { project, model } => {
            api.show(
                http::Method::GET,
                &format!("{}/deployments", model_path(project, model)),
                None,
                DEPLOYMENT_COLS,
                Some("deployments"),
            )
            .await?;
        }
        Deployments::Create {
            project,
            model,
            build,
            replicas,
            cpu,
            memory_mb,
            env,
            wait,
        } => {
            let environment: BTreeMap<String, String> = env.into_iter().collect();
            let v = api
                .json(
                    http::Method::POST,
                    &format!("{}/deployments", model_path(project, model)),
                    Some(json!({"build_id": build, "replicas": replicas, "cpu": cpu, "memory_mb": memory_mb, "environment": environment})),
                )
                .await?;
            let path = format!("{}/deployments/{}", model_path(project, model), v["id"]);
            let mut v = v;
            if wait {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(900);
                loop {
                    v = api.json(http::Method::GET, &path, None).await?;
                    match v["status"].as_str() {
                        Some("deployed") => break,
                        Some("failed") => {
                            return Err(format!(
                                "deployment {} failed; see the server log",
                                v["id"]
                            ))
                        }
                        _ if tokio::time::Instant::now() > deadline => {
                            return Err("deployment not ready after 900 s".into())
                        }
                        _ => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            }
            api.print(&v, DEPLOYMENT_COLS, None);
        }
        Deployments::Stop {
            project,
            model,
            deployment,
        } => {
            api.show(
                http::Method::POST,
                &format!(
                    "{}/deployments/{deployment}/stop",
                    model_path(project, model)
                ),
                None,
                DEPLOYMENT_COLS,
                None,
            )
            .await?;
        }
        Deployments::Restart {
            project,
            model,
            deployment,
        } => {
            api.show(
                http::Method::POST,
                &format!(
                    "{}/deployments/{deployment}/restart",
                    model_path(project, model)
                ),
                None,
                DEPLOYMENT_COLS,
                None,
            )
            .await?;
        }
    }
    Ok(())
}

pub async fn replicas(target: &Target, cmd: Replicas) -> CliResult {
    let api = Api::new(target);
    match cmd {
        Replicas::List { project, model } => {
            api.show(
                http::Method::GET,
                &format!("{}/replicas", model_path(project, model)),
                None,
                REPLICA_COLS,
                Some("replicas"),
            )
            .await?;
        }
        Replicas::Logs {
            project,
            model,
            replica,
        } => {
            let v = api
                .json(
                    http::Method::GET,
                    &format!("{}/replicas/{replica}/logs", model_path(project, model)),
                    None,
                )
                .await?;
            if target.json {
                println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
            } else {
                for line in v["lines"].as_array().into_iter().flatten() {
                    println!("{}", line.as_str().unwrap_or(""));
                }
            }
        }
    }
    Ok(())
}

/// Calls a model: prints the response, or fails with the error's code and message.
pub async fn predict(target: &Target, access_key: &str, data: &str) -> CliResult {
    let request: Value =
        serde_json::from_str(data).map_err(|e| format!("--data is not JSON: {e}"))?;
    let api = Api::new(target);
    let (status, bytes) = api
        .call(
            http::Method::POST,
            "/model",
            Some(json!({"accessKey": access_key, "request": request})),
        )
        .await?;
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|_| format!("{status}: not a JSON answer"))?;
    if target.json {
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
    } else if v["success"] == true {
        println!("{}", v["response"]);
    }
    if v["success"] != true {
        return Err(format!(
            "{status} {}: {}",
            cell(&v["error"]["code"]),
            cell(&v["error"]["message"])
        ));
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum Users {
    /// List users with their role, state and number of API keys (site admins).
    List,
    /// Create a user (site admins). Give them a key with `keys create --user NAME`.
    Create {
        #[arg(long)]
        username: String,
        /// `user` or `admin`.
        #[arg(long, default_value = "user")]
        role: String,
    },
    /// Show a user; yourself by default.
    Get {
        #[arg(long, default_value = "me")]
        user: String,
    },
    /// Change a user's site role or (de)activate them; takes effect on their next request.
    Update {
        #[arg(long)]
        user: String,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        active: Option<bool>,
    },
}

#[derive(Subcommand)]
pub enum Keys {
    /// List API keys (ids and expiry, never the secret); yours by default.
    List {
        #[arg(long, default_value = "me")]
        user: String,
    },
    /// Create an API key; the secret is printed once.
    Create {
        #[arg(long, default_value = "me")]
        user: String,
        /// Lifetime: `90s`, `12h`, `30d` (plain numbers are days). Default: the site's default.
        #[arg(long, value_parser = parse_lifetime)]
        expires_in: Option<i64>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete one key; it fails from the next request on.
    Delete {
        #[arg(long, default_value = "me")]
        user: String,
        #[arg(long)]
        key_id: String,
    },
    /// Delete every key of a user (site admins).
    DeleteAll {
        #[arg(long)]
        user: String,
    },
}

#[derive(Subcommand)]
pub enum Collaborators {
    List {
        #[arg(long)]
        project: i64,
    },
    /// Add a collaborator or change their role: viewer, operator, contributor or admin.
    Set {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        user: String,
        #[arg(long)]
        role: String,
    },
    Remove {
        #[arg(long)]
        project: i64,
        #[arg(long)]
        user: String,
    },
}

#[derive(Subcommand)]
pub enum Settings {
    /// Show the API key expiry settings.
    Get,
    /// Change the API key expiry settings (site admins).
    Set {
        #[arg(long)]
        default_expiry_days: Option<i64>,
        #[arg(long)]
        max_expiry_days: Option<i64>,
    },
}

fn parse_lifetime(s: &str) -> Result<i64, String> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 'd'),
    };
    let n: i64 = num
        .parse()
        .map_err(|_| format!("expected e.g. 90s, 12h or 30d, got {s:?}"))?;
    let unit = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("unknown unit in {s:?}; use s, m, h or d")),
    };
    n.checked_mul(unit)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is not a positive lifetime"))
}

const USER_COLS: &[&str] = &["id", "username", "role", "active", "api_keys", "created_at"];
const KEY_COLS: &[&str] = &["key_id", "user_id", "description", "expires_at", "expired"];
const COLLABORATOR_COLS: &[&str] = &["user_id", "username", "role", "owner"];
const AUDIT_COLS: &[&str] = &[
    "id", "at", "actor", "action", "target", "outcome", "remote", "detail",
];

pub async fn users(target: &Target, cmd: Users) -> CliResult {
    let api = Api::new(target);
    match cmd {
        Users::List => {
            api.show(
                http::Method::GET,
                "/api/v2/users",
                None,
                USER_COLS,
                Some("users"),
            )
            .await
        }
        Users::Create { username, role } => {
            api.show(
                http::Method::POST,
                "/api/v2/users",
                Some(json!({"username": username, "role": role})),
                USER_COLS,
                None,
            )
            .await
        }
        Users::Get { user } => {
            api.show(
                http::Method::GET,
                &format!("/api/v2/users/{user}"),
                None,
                USER_COLS,
                None,
            )
            .await
        }
        Users::Update { user, role, active } => {
            let mut body = serde_json::Map::new();
            if let Some(r) = role {
                body.insert("role".into(), json!(r));
            }
            if let Some(a) = active {
                body.insert("active".into(), json!(a));
            }
            api.show(
                http::Method::PATCH,
                &format!("/api/v2/users/{user}"),
                Some(Value::Object(body)),
                USER_COLS,
                None,
            )
            .await
        }
    }
}

pub async fn keys(target: &Target, cmd: Keys) -> CliResult {
    let api = Api::new(target);
    match cmd {
        Keys::List { user } => {
            api.show(
                http::Method::GET,
                &format!("/api/v2/users/{user}/keys"),
                None,
                KEY_COLS,
                Some("keys"),
            )
            .await
        }
        Keys::Create {
            user,
            expires_in,
            description,
        } => {
            let mut body = json!({ "description": description });
            if let Some(secs) = expires_in {
                body["expires_in_seconds"] = json!(secs);
            }
            let v = api
                .json(
                    http::Method::POST,
                    &format!("/api/v2/users/{user}/keys"),
                    Some(body),
                )
                .await?;
            if target.json {
                println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
            } else {
                println!("key id:  {}", cell(&v["key_id"]));
                println!("expires: {} (unix time)", cell(&v["expires_at"]));
                println!("API key: {}", cell(&v["key"]));
                eprintln!("This is the only time the key is shown; store it now.");
            }
            Ok(())
        }
        Keys::Delete { user, key_id } => {
            if key_id.starts_with(modelgate::auth::key::PREFIX) {
                return Err(
                    "--key-id takes the key's 8-character id (see `keys list`), not the key itself"
                        .into(),
                );
            }
            api.json(
                http::Method::DELETE,
                &format!("/api/v2/users/{user}/keys/{key_id}"),
                None,
            )
            .await?;
            if !target.json {
                println!("key {key_id} deleted");
            }
            Ok(())
        }
        Keys::DeleteAll { user } => {
            api.show(
                http::Method::DELETE,
                &format!("/api/v2/users/{user}/keys"),
                None,
                &["deleted"],
                None,
            )
            .await
        }
    }
}

pub async fn collaborators(target: &Target, cmd: Collaborators) -> CliResult {
    let api = Api::new(target);
    match cmd {
        Collaborators::List { project } => {
            api.show(
                http::Method::GET,
                &format!("/api/v2/projects/{project}/collaborators"),
                None,
                COLLABORATOR_COLS,
                Some("collaborators"),
            )
            .await
        }
        Collaborators::Set {
            project,
            user,
            role,
        } => {
            api.show(
                http::Method::PUT,
                &format!("/api/v2/projects/{project}/collaborators/{user}"),
                Some(json!({ "role": role })),
                COLLABORATOR_COLS,
                None,
            )
            .await
        }
        Collaborators::Remove { project, user } => {
            api.json(
                http::Method::DELETE,
                &format!("/api/v2/projects/{project}/collaborators/{user}"),
                None,
            )
            .await?;
            if !target.json {
                println!("{user} removed from project {project}");
            }
            Ok(())
        }
    }
}

pub async fn audit(target: &Target, after: i64, limit: i64) -> CliResult {
    Api::new(target)
        .show(
            http::Method::GET,
            &format!("/api/v2/audit?after={after}&limit={limit}"),
            None,
            AUDIT_COLS,
            Some("events"),
        )
        .await
}

pub async fn settings(target: &Target, cmd: Settings) -> CliResult {
    let api = Api::new(target);
    let cols = &["api_key_default_expiry_days", "api_key_max_expiry_days"];
    match cmd {
        Settings::Get => {
            api.show(http::Method::GET, "/api/v2/settings", None, cols, None)
                .await
        }
        Settings::Set {
            default_expiry_days,
            max_expiry_days,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(d) = default_expiry_days {
                body.insert("api_key_default_expiry_days".into(), json!(d));
            }
            if let Some(m) = max_expiry_days {
                body.insert("api_key_max_expiry_days".into(), json!(m));
            }
            api.show(
                http::Method::PATCH,
                "/api/v2/settings",
                Some(Value::Object(body)),
                cols,
                None,
            )
            .await
        }
    }
}

/// Reads an API key from standard input, checks it against the server, and stores it where
/// the other commands find it (mode 0600).
pub async fn login(target: &Target) -> CliResult {
    use std::io::{BufRead, Write};
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprint!("API key: ");
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("reading the key: {e}"))?;
    let key = line.trim().to_owned();
    modelgate::auth::key::parse(&key)
        .map_err(|_| "that is not a modelgate API key (mgk_...)".to_string())?;
    let checked = Target {
        url: target.url.clone(),
        json: target.json,
        api_key: Some(key.clone()),
    };
    let me = Api::new(&checked)
        .json(http::Method::GET, "/api/v2/users/me", None)
        .await?;
    let path = credentials_path().ok_or("cannot find a home directory for the key file")?;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // `mode` applies only to a new file: an existing one is narrowed before the key goes in.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(file, "{key}").map_err(|e| format!("{}: {e}", path.display()))?;
    println!(
        "logged in as {} ({}); key stored in {}",
        cell(&me["username"]),
        cell(&me["role"]),
        path.display()
    );
    Ok(())
}
