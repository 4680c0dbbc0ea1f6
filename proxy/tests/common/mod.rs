//! Test harness: starts the real `modelgate` binary (which spawns real `replica-runtime`
//! processes) on 127.0.0.1 with a config written for the test, and talks to it over real sockets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADD_KEY: &str = "test-add-key-0123456789";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A model table for the config; `function` is in `tests/fixtures/models/funcs.py` by default.
pub fn model(name: &str, function: &str, replicas: u32) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\npath = \"{}\"\nfile = \"funcs.py\"\nfunction = \"{function}\"\nreplicas = {replicas}\naccess_key = \"{}\"\nenv = {{ GREETING = \"hi\" }}\nenable_authentication = false\n",
        fixtures().display(),
        key_for(name)
    )
}

/// A model table for the config: `function` in `file` of the model directory `dir`, with the
/// access key [`key_for`]`(name)` and authentication left at its default (on).
pub fn model_at(name: &str, dir: &Path, file: &str, function: &str) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\npath = \"{}\"\nfile = \"{file}\"\nfunction = \"{function}\"\naccess_key = \"{}\"\n",
        dir.display(),
        key_for(name)
    )
}

/// The first admin's API key, handed to every server this test process starts through
/// `MODELGATE_ADMIN_API_KEY` (generated once per process; never a fixed string).
pub fn admin_key() -> &'static str {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| modelgate::auth::key::generate().0)
}

/// A client that sends the admin's API key with every request.
pub fn admin_client(timeout: Duration) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", admin_key()).parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(timeout)
        .build()
        .unwrap()
}

pub fn key_for(name: &str) -> String {
    format!("key-for-{name}-0123456789")
}

pub struct Server {
    pub child: Child,
    pub args: Vec<String>,
    pub addr: String,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl Server {
    /// Starts modelgate with `[server]` settings `server` and the given model tables, and waits
    /// until it listens. Replicas may still be starting. With `MODELGATE_TEST_WORKER_THREADS` set
    /// (CI runs the serving tests again with 1, the single-threaded runtime), that many workers.
    pub fn start(server: &str, models: &[String]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("modelgate.toml");
        let workers = std::env::var("MODELGATE_TEST_WORKER_THREADS")
            .ok()
            .filter(|_| !server.contains("worker_threads"))
            .map(|n| format!("worker_threads = {n}\n"))
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{workers}{server}\n{}",
                models.join("\n")
            ),
        )
        .unwrap();
        Self::start_with(&["serve", "--config", config.to_str().unwrap()], dir)
    }

    pub fn start_with(args: &[&str], dir: tempfile::TempDir) -> Server {
        let log = dir.path().join("modelgate.log");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, addr) = Self::spawn(&args, &log);
        Server {
            child,
            args,
            addr,
            dir,
            log,
        }
    }

    /// Stops modelgate (SIGKILL when `kill`, else SIGTERM and a clean exit) and starts it again
    /// with the same configuration and data directory.
    pub fn restart(&mut self, kill: bool) {
        if kill {
            self.child.kill().unwrap();
            self.child.wait().unwrap();
        } else {
            self.signal(nix::sys::signal::Signal::SIGTERM);
            assert!(self.wait_exit(Duration::from_secs(30)).success());
        }
        let (child, addr) = Self::spawn(&self.args, &self.log);
        self.child = child;
        self.addr = addr;
    }

    fn spawn(args: &[String], log: &Path) -> (Child, String) {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_modelgate"))
            .args(args)
            .env("MODELGATE_LOG", "info")
            .env("MODELGATE_ADMIN_API_KEY", admin_key())
            .env("MODELGATE_TEST_FAILPOINTS", "1")
            .env_remove("MODEL_REQUEST_TIMEOUT_SECONDS")
            // The allocator settings are modelgate's own, whatever the test runner's are.
            .env_remove("GLIBC_TUNABLES")
            .env_remove("MODELGATE_MALLOC_SET")
            .env_remove("MODELGATE_REPLICA_MALLOC_SET")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("start modelgate");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let addr = line
                    .strip_prefix("modelgate listening on http://")
                    .or_else(|| line.strip_prefix("modelgate listening on https://"));
                if let Some(addr) = addr {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "modelgate did not start; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        (child, addr)
    }

    /// The process id of the running modelgate.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/readyz` says every model has a ready replica.
    pub async fn wait_ready(&self) {
        // Generous: declared models are built first, and a build may pip-install packages.
        let deadline = Instant::now() + Duration::from_secs(600);
        let client = reqwest::Client::new();
        loop {
            if let Ok(r) = client.get(self.url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not ready in time; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every listed replica slot has reported ready at least once (per the log).
    pub async fn wait_replicas_ready(&self, ids: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let logs = self.logs();
            let all = ids.iter().all(|id| {
                logs.lines().any(|l| {
                    l.contains("replica ready in") && l.contains(&format!("replica={id} "))
                })
            });
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replicas {ids:?} not ready; log:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends one prediction from a task of its own, for a request that must be in flight while
    /// the test does something else: resolves to the status and the JSON body.
    pub fn predict_in_background(
        &self,
        client: &reqwest::Client,
        key: &str,
        request: serde_json::Value,
    ) -> tokio::task::JoinHandle<(u16, serde_json::Value)> {
        let (c, url) = (client.clone(), self.url("/model"));
        let body = serde_json::json!({ "accessKey": key, "request": request });
        tokio::spawn(async move {
            let r = c.post(url).json(&body).send().await.expect("request sent");
            (r.status().as_u16(), r.json().await.expect("JSON body"))
        })
    }

    pub async fn predict(
        &self,
        client: &reqwest::Client,
        key: &str,
        request: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let resp = client
            .post(self.url("/model"))
            .bearer_auth(admin_key())
            .json(&serde_json::json!({ "accessKey": key, "request": request }))
            .send()
            .await
            .expect("request sent");
        let status = resp.status().as_u16();
        let body = resp.json().await.expect("JSON body");
        (status, body)
    }

    /// Value of one sample of the exposition, e.g. `modelgate_requests_total{model="a",...}`.
    pub async fn metric(&self, name_and_labels: &str) -> Option<f64> {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// Waits (up to 10 s) until a sample reaches at least `want`; returns the last value seen.
    pub async fn wait_metric(&self, name_and_labels: &str, want: f64) -> Option<f64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(name_and_labels).await;
            if v.is_some_and(|v| v >= want) || Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Direct children of the modelgate process (the replica processes).
    pub fn children(&self) -> Vec<u32> {
        let pid = self.child.id();
        let mut kids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) else {
                continue;
            };
            let ppid = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .and_then(|v| v.trim().parse::<u32>().ok());
            if ppid == Some(pid) {
                kids.push(p);
            }
        }
        kids
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits for the process to exit; returns its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "modelgate did not exit in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    /// Stops modelgate the way an operator would (SIGTERM), so it removes its socket directory
    /// and stops its replicas; SIGKILL if it does not exit within 10 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// True while a process with this pid exists (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.contains(") Z "),
        Err(_) => false,
    }
}
