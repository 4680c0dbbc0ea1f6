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

/// Where the API is and how to print.
pub struct Target {
    pub url: String,
    pub json: bool,
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

struct Api<'a> {
    target: &'a Target,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl<'a> Api<'a> {
    fn new(target: &'a Target) -> Self {
        Api {
            target,
            client: Client::builder(TokioExecutor::new()).build_http(),
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
        let req = http::Request::builder()
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
const MODEL_COLS: &[&str] = &["id", "project_id", "name", "access_key", "created_at"];
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
    let req = http::Request::put(&url)
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
        let req = http::Request::get(&url)
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
