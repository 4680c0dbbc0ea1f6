//! The control plane end to end: projects, models, builds and deployments through the REST API,
//! against the real binary, real replica processes, real pip and a real SQLite file.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    common::admin_client(Duration::from_secs(120))
}

struct Api<'a> {
    server: &'a Server,
    c: reqwest::Client,
}

impl Api<'_> {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .c
            .request(method, self.server.url(&format!("/api/v2{path}")));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Creates a project from `dir`, a model in it, and returns (project id, model id, access key).
    async fn project_and_model(&self, name: &str, dir: &Path) -> (i64, i64, String) {
        let (s, p) = self
            .post("/projects", json!({"name": name, "path": dir}))
            .await;
        assert_eq!(s, 201, "{p}");
        let pid = p["id"].as_i64().unwrap();
        let (s, m) = self
            .post(&format!("/projects/{pid}/models"), json!({"name": name}))
            .await;
        assert_eq!(s, 201, "{m}");
        (
            pid,
            m["id"].as_i64().unwrap(),
            m["access_key"].as_str().unwrap().to_owned(),
        )
    }

    /// Starts a build and waits for it to finish; returns the build and its log.
    async fn build(&self, pid: i64, mid: i64, file: &str, function: &str) -> (Value, String) {
        let base = format!("/projects/{pid}/models/{mid}/builds");
        let (s, b) = self
            .post(&base, json!({"file_path": file, "function_name": function}))
            .await;
        assert_eq!(s, 201, "{b}");
        assert_eq!(b["status"], "pending");
        let bid = b["id"].as_i64().unwrap();
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let (_, b) = self.get(&format!("{base}/{bid}")).await;
            if b["status"] == "built" || b["status"] == "build failed" {
                let log = self
                    .c
                    .get(self.server.url(&format!("/api/v2{base}/{bid}/log")))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                return (b, log);
            }
            assert!(Instant::now() < deadline, "build did not finish: {b}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deploys a build and waits until it is `deployed`; returns the deployment id.
    async fn deploy(&self, pid: i64, mid: i64, build_id: i64, replicas: u32, env: Value) -> i64 {
        let base = format!("/projects/{pid}/models/{mid}/deployments");
        let (s, d) = self
            .post(
                &base,
                json!({"build_id": build_id, "replicas": replicas, "environment": env}),
            )
            .await;
        assert_eq!(s, 201, "{d}");
        let did = d["id"].as_i64().unwrap();
        self.wait_deployment(&format!("{base}/{did}"), "deployed")
            .await;
        did
    }

    async fn wait_deployment(&self, path: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, d) = self.get(path).await;
            if d["status"] == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "deployment not {status}: {d}\n{}",
                self.server.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn write_model(dir: &Path, version: u32) {
    std::fs::write(
        dir.join("model.py"),
        format!(
            "import os\n\nVERSION = {version}\n\ndef predict(args):\n    return {{'sum': args['a'] + args['b'], 'version': VERSION, 'tier': os.environ.get('TIER')}}\n"
        ),
    )
    .unwrap();
}

#[tokio::test]
async fn build_deploy_redeploy_rollback_stop_restart_delete() {
    let server = Server::start("", &[]);
    let api = Api {
        server: &server,
        c: client(),
    };
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    write_model(dir, 1);
    std::fs::create_dir_all(dir.join(".git/refs")).unwrap();
    std::fs::write(dir.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(dir.join(".gitignore"), "*.log\n").unwrap();
    std::fs::write(dir.join("debug.log"), "noise\n").unwrap();

    let (pid, mid, key) = api.project_and_model("adder", dir).await;
    let c = client();
    // No deployment yet: the key is known but nothing serves it.
    let (s, body) = server.predict(&c, &key, json!({"a": 1, "b": 2})).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (503, Some("model.unavailable"))
    );

    let (b1, log) = api.build(pid, mid, "model.py", "predict").await;
    assert_eq!(b1["status"], "built", "{log}");
    assert_eq!(b1["build_number"], 1);
    assert_eq!(b1["sha256"].as_str().unwrap().len(), 64);
    assert!(log.contains("no requirements.txt"), "{log}");
    let artifact = server
        .dir
        .path()
        .join("data/builds")
        .join(b1["id"].to_string())
        .join("src");
    assert!(artifact.join("model.py").is_file());
    assert!(
        !artifact.join(".git").exists(),
        ".git copied into the build"
    );
    assert!(
        !artifact.join("debug.log").exists(),
        "ignored file copied into the build"
    );

    let d1 = api
        .deploy(
            pid,
            mid,
            b1["id"].as_i64().unwrap(),
            2,
            json!({"TIER": "gold"}),
        )
        .await;
    let (s, body) = server.predict(&c, &key, json!({"a": 1, "b": 2})).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        body["response"],
        json!({"sum": 3, "version": 1, "tier": "gold"})
    );
    let (_, replicas) = api
        .get(&format!("/projects/{pid}/models/{mid}/replicas"))
        .await;
    assert_eq!(
        replicas["replicas"].as_array().unwrap().len(),
        2,
        "{replicas}"
    );
    // The listing says how much memory each replica may use, and how that is enforced.
    assert_eq!(replicas["replicas"][0]["memory_limit_mb"], 2048);
    let enforcement = replicas["replicas"][0]["memory_enforcement"].as_str();
    assert!(
        matches!(enforcement, Some("cgroup_v2" | "cgroup_v1" | "rlimit_as")),
        "{replicas}"
    );

    // A second build, deployed while a load loop runs: no request may fail.
    write_model(dir, 2);
    let (b2, _) = api.build(pid, mid, "model.py", "predict").await;
    assert_eq!(
        (b2["status"].as_str(), b2["build_number"].as_i64()),
        (Some("built"), Some(2))
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, url, key, c) = (stop.clone(), server.url("/model"), key.clone(), c.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed, mut versions) =
                (0, Vec::new(), std::collections::BTreeSet::new());
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let r = c
                    .post(&url)
                    .json(&json!({"accessKey": key, "request": {"a": 1, "b": 1}}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap();
                if status == 200 {
                    ok += 1;
                    versions.insert(v["response"]["version"].as_i64().unwrap());
                } else {
                    failed.push(v);
                }
            }
            (ok, failed, versions)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d2 = api
        .deploy(pid, mid, b2["id"].as_i64().unwrap(), 2, json!({}))
        .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, versions) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} requests failed during the redeploy: {failed:?}",
        failed.len()
    );
    assert!(ok > 20, "{ok}");
    assert_eq!(versions.into_iter().collect::<Vec<_>>(), vec![1, 2]);
    let (_, old) = api
        .get(&format!("/projects/{pid}/models/{mid}/deployments/{d1}"))
        .await;
    assert_eq!(old["status"], "stopped");
    // Deployment environment is not inherited by the next deployment.
    let (_, body) = server.predict(&c, &key, json!({"a": 1, "b": 2})).await;
    assert_eq!(
        body["response"],
        json!({"sum": 3, "version": 2, "tier": null})
    );

    // Rollback to build 1.
    let d3 = api
        .deploy(pid, mid, b1["id"].as_i64().unwrap(), 1, json!({}))
        .await;
    let (_, body) = server.predict(&c, &key, json!({"a": 1, "b": 2})).await;
    assert_eq!(body["response"]["version"], 1);
    assert_ne!(d2, d3);

    // Delete is refused while a deployment is active.
    let (s, body) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/projects/{pid}/models/{mid}"),
            None,
        )
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (409, Some("resource.conflict"))
    );

    // Stop → 503; restart → serving again.
    let dpath = format!("/projects/{pid}/models/{mid}/deployments/{d3}");
    let (s, body) = api.post(&format!("{dpath}/stop"), json!({})).await;
    assert_eq!(
        (s, body["status"].as_str()),
        (200, Some("stopped")),
        "{body}"
    );
    let (s, body) = server.predict(&c, &key, json!({"a": 1, "b": 2})).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (503, Some("model.unavailable"))
    );
    let (s, _) = api.post(&format!("{dpath}/restart"), json!({})).await;
    assert_eq!(s, 202);
    api.wait_deployment(&dpath, "deployed").await;
    let (s, _) = server.predict(&c, &key, json!({"a": 1, "b": 2})).await;
    assert_eq!(s, 200);

    // Regenerating the access key: the old one fails on the very next request.
    let (s, m) = api
        .post(
            &format!("/projects/{pid}/models/{mid}/access_key"),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    let new_key = m["access_key"].as_str().unwrap().to_owned();
    assert_ne!(new_key, key);
    let (s, body) = server.predict(&c, &key, json!({"a": 1, "b": 2})).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (401, Some("access_key.invalid"))
    );
    let (s, _) = server.predict(&c, &new_key, json!({"a": 1, "b": 2})).await;
    assert_eq!(s, 200);

    // Stopped, the model can be deleted, with its builds and deployments.
    api.post(&format!("{dpath}/stop"), json!({})).await;
    let (s, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/projects/{pid}/models/{mid}"),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = api.get(&format!("/projects/{pid}/models/{mid}")).await;
    assert_eq!(s, 404);
    let (s, body) = server.predict(&c, &new_key, json!({"a": 1, "b": 2})).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (401, Some("access_key.invalid"))
    );
    assert!(!artifact.exists(), "build artifacts removed with the model");
}

#[tokio::test]
async fn failed_builds_say_why_and_the_dependency_cache_is_reused() {
    let server = Server::start("", &[]);
    let api = Api {
        server: &server,
        c: client(),
    };
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    write_model(dir, 1);
    let (pid, mid, _key) = api.project_and_model("failing", dir).await;

    let (b, log) = api.build(pid, mid, "model.py", "no_such_function").await;
    assert_eq!(b["status"], "build failed");
    assert!(
        log.contains("function \"no_such_function\" not found in model.py"),
        "{log}"
    );

    std::fs::write(dir.join("build.sh"), "echo building; exit 3\n").unwrap();
    let (b, log) = api.build(pid, mid, "model.py", "predict").await;
    assert_eq!(b["status"], "build failed");
    assert!(
        log.contains("building") && log.contains("build.sh failed"),
        "{log}"
    );
    std::fs::remove_file(dir.join("build.sh")).unwrap();

    std::fs::write(
        dir.join("requirements.txt"),
        "modelgate-no-such-package-7f3a==0.0.1\n",
    )
    .unwrap();
    let (b, log) = api.build(pid, mid, "model.py", "predict").await;
    assert_eq!(b["status"], "build failed");
    assert!(log.contains("pip install failed"), "{log}");

    // A real dependency, imported by the model: installed once, then served from the cache.
    std::fs::write(dir.join("requirements.txt"), "six==1.16.0\n").unwrap();
    std::fs::write(
        dir.join("uses_six.py"),
        "import six\n\ndef predict(args):\n    return {'six': six.__version__, 'from': six.__file__}\n",
    )
    .unwrap();
    let (b1, log1) = api.build(pid, mid, "uses_six.py", "predict").await;
    assert_eq!(b1["status"], "built", "{log1}");
    assert!(log1.contains("dependency cache miss"), "{log1}");
    let (b2, log2) = api.build(pid, mid, "uses_six.py", "predict").await;
    assert_eq!(b2["status"], "built", "{log2}");
    assert!(log2.contains("dependency cache hit"), "{log2}");
    assert!(!log2.contains("Collecting six"), "{log2}");

    let (_, m) = api.get(&format!("/projects/{pid}/models/{mid}")).await;
    let key = m["access_key"].as_str().unwrap().to_owned();
    api.deploy(pid, mid, b2["id"].as_i64().unwrap(), 1, json!({}))
        .await;
    let (s, body) = server.predict(&client(), &key, json!({})).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["response"]["six"], "1.16.0");
    assert!(
        body["response"]["from"]
            .as_str()
            .unwrap()
            .contains("/cache/deps/"),
        "{body}"
    );

    // Bad input to the API is a clear 400.
    let (s, body) = api
        .post(
            &format!("/projects/{pid}/models/{mid}/builds"),
            json!({"file_path": "../x.py", "function_name": "f"}),
        )
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (400, Some("request.invalid"))
    );
    let (s, _) = api
        .post(
            &format!("/projects/{pid}/models/{mid}/deployments"),
            json!({"build_id": b["id"], "replicas": 1}),
        )
        .await;
    assert_eq!(s, 409, "a failed build cannot be deployed");
    let (s, _) = api
        .post(
            &format!("/projects/{pid}/models/{mid}/deployments"),
            json!({"build_id": b2["id"], "replicas": 10}),
        )
        .await;
    assert_eq!(s, 400, "more replicas than max_replicas");
    let (s, _) = api
        .post("/projects", json!({"name": "failing", "path": dir}))
        .await;
    assert_eq!(s, 409, "duplicate project name");
    let (s, _) = api.get("/projects/999/models").await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn deployments_come_back_after_a_restart() {
    let mut server = Server::start("", &[]);
    let project = tempfile::tempdir().unwrap();
    write_model(project.path(), 7);
    let (pid, mid, key, did) = {
        let api = Api {
            server: &server,
            c: client(),
        };
        let (pid, mid, key) = api.project_and_model("durable", project.path()).await;
        let (b, log) = api.build(pid, mid, "model.py", "predict").await;
        assert_eq!(b["status"], "built", "{log}");
        let did = api
            .deploy(pid, mid, b["id"].as_i64().unwrap(), 1, json!({"TIER": "x"}))
            .await;
        (pid, mid, key, did)
    };
    for kill in [false, true] {
        let before = server.pid();
        server.restart(kill);
        let api = Api {
            server: &server,
            c: client(),
        };
        api.wait_deployment(
            &format!("/projects/{pid}/models/{mid}/deployments/{did}"),
            "deployed",
        )
        .await;
        let (s, body) = server
            .predict(&client(), &key, json!({"a": 2, "b": 2}))
            .await;
        assert_eq!(s, 200, "after restart (kill: {kill}): {body}");
        assert_eq!(
            body["response"],
            json!({"sum": 4, "version": 7, "tier": "x"})
        );
        // The replica cgroups of the stopped (or killed) modelgate are gone.
        let left = cgroups_of(before);
        assert!(left.is_empty(), "after restart (kill: {kill}): {left:?}");
        assert!(!cgroups_of(server.pid()).is_empty() || !cgroups_in_use());
    }
}

#[tokio::test]
async fn under_rlimit_a_replica_over_its_memory_limit_fails_the_request_and_is_replaced() {
    let server = Server::start("replica_limits = \"rlimit\"", &[]);
    let api = Api {
        server: &server,
        c: client(),
    };
    let project = tempfile::tempdir().unwrap();
    std::fs::write(
        project.path().join("hog.py"),
        "import os\n\ndef f(args):\n    if args.get('hog'):\n        block = bytearray(args['hog'] * 1024 * 1024)\n        return len(block)\n    return os.getpid()\n",
    )
    .unwrap();
    let (pid, mid, key) = api.project_and_model("hog", project.path()).await;
    let (b, log) = api.build(pid, mid, "hog.py", "f").await;
    assert_eq!(b["status"], "built", "{log}");
    let base = format!("/projects/{pid}/models/{mid}/deployments");
    let (s, d) = api
        .post(
            &base,
            json!({"build_id": b["id"], "replicas": 1, "memory_mb": 256}),
        )
        .await;
    assert_eq!(s, 201, "{d}");
    api.wait_deployment(&format!("{base}/{}", d["id"]), "deployed")
        .await;
    let c = client();
    let (_, before) = server.predict(&c, &key, json!({})).await;
    // Under the limit: fine. Over it: a clear error, and the replica is replaced.
    let (s, body) = server.predict(&c, &key, json!({"hog": 64})).await;
    assert_eq!(
        (s, body["response"].as_i64()),
        (200, Some(64 * 1024 * 1024)),
        "{body}"
    );
    let (s, body) = server.predict(&c, &key, json!({"hog": 1024})).await;
    assert_eq!(s, 500, "{body}");
    assert_eq!(body["error"]["code"], "model.out_of_memory");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MemoryError"),
        "{body}"
    );
    assert_eq!(
        server
            .wait_metric(r#"modelgate_replica_restarts_total{model="hog",replica="hog-0",reason="memory_limit"}"#, 1.0)
            .await,
        Some(1.0)
    );
    let (s, after) = server.predict(&c, &key, json!({})).await;
    assert_eq!(s, 200, "{after}");
    assert_ne!(
        before["response"], after["response"],
        "a fresh process serves"
    );
}

/// Whether this machine gives modelgate cgroups (a v1 memory hierarchy, or v2): where it does
/// not, replicas run under RLIMIT_AS and there are no groups to look for.
fn cgroups_in_use() -> bool {
    std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        || std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
}

/// The `modelgate-<pid>` groups of modelgate process `pid`, in any hierarchy.
fn cgroups_of(pid: u32) -> Vec<std::path::PathBuf> {
    let name = format!("modelgate-{pid}");
    let mut found = Vec::new();
    let mut dirs = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if entry.file_name().to_str() == Some(name.as_str()) {
                found.push(entry.path());
            } else if !entry
                .file_name()
                .to_string_lossy()
                .starts_with("modelgate-")
            {
                dirs.push(entry.path());
            }
        }
    }
    found
}

/// A model that can allocate, spin, and report its own CPU time and cgroups.
const LIMITED_MODEL: &str = r#"
import os, time

def f(args):
    if args.get("hog"):
        block = bytearray(args["hog"] * 1024 * 1024)
        return {"bytes": len(block)}
    if args.get("spin"):
        start_cpu, start = time.process_time(), time.monotonic()
        while time.monotonic() - start < args["spin"]:
            pass
        return {"cpu": time.process_time() - start_cpu}
    return {"pid": os.getpid(), "cgroup": open("/proc/self/cgroup").read()}
"#;

#[tokio::test]
async fn with_cgroups_memory_over_the_limit_is_killed_and_cpu_is_capped() {
    let server = Server::start("replica_limits = \"cgroup\"", &[]);
    let api = Api {
        server: &server,
        c: client(),
    };
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("limited.py"), LIMITED_MODEL).unwrap();
    std::fs::write(
        project.path().join("bloated.py"),
        "ballast = bytearray(400 * 1024 * 1024)\n\ndef f(args):\n    return 1\n",
    )
    .unwrap();
    let (pid, mid, key) = api.project_and_model("limited", project.path()).await;
    let (b, log) = api.build(pid, mid, "limited.py", "f").await;
    assert_eq!(b["status"], "built", "{log}");
    let base = format!("/projects/{pid}/models/{mid}");
    let (s, d) = api
        .post(
            &format!("{base}/deployments"),
            json!({"build_id": b["id"], "replicas": 1, "memory_mb": 256, "cpu": 0.2}),
        )
        .await;
    assert_eq!(s, 201, "{d}");
    api.wait_deployment(&format!("{base}/deployments/{}", d["id"]), "deployed")
        .await;

    // The replica runs in a group of its own, under modelgate's.
    let (_, replicas) = api.get(&format!("{base}/replicas")).await;
    let replica = &replicas["replicas"][0];
    let enforcement = replica["memory_enforcement"].as_str().unwrap();
    assert!(enforcement.starts_with("cgroup_v"), "{replicas}");
    assert_eq!(replica["cpu_enforced"], true, "{replicas}");
    assert!(
        replica["memory_bytes"].as_u64().unwrap() > 1_000_000,
        "{replicas}"
    );
    let c = client();
    let (s, before) = server.predict(&c, &key, json!({})).await;
    assert_eq!(s, 200, "{before}");
    let groups = before["response"]["cgroup"].as_str().unwrap();
    let modelgate_group = format!("/modelgate-{}/", server.pid());
    assert!(groups.contains(&modelgate_group), "{groups}");

    // CPU: 0.2 of a core, so one second of spinning gets about 0.2 s of CPU time.
    let (s, spun) = server.predict(&c, &key, json!({"spin": 1.0})).await;
    assert_eq!(s, 200, "{spun}");
    let cpu = spun["response"]["cpu"].as_f64().unwrap();
    assert!(
        cpu > 0.05 && cpu < 0.45,
        "CPU time in 1 s at cpu=0.2: {cpu}"
    );

    // Memory: under the limit is fine; over it, the kernel kills the replica, only that request
    // fails, with a clear error, and a fresh process serves the next one.
    let (s, body) = server.predict(&c, &key, json!({"hog": 64})).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = server.predict(&c, &key, json!({"hog": 1024})).await;
    assert_eq!(s, 500, "{body}\n{}", server.logs());
    assert_eq!(body["error"]["code"], "model.out_of_memory", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("memory limit of 256 MB"), "{message}");
    assert_eq!(
        server
            .wait_metric(r#"modelgate_replica_restarts_total{model="limited",replica="limited-0",reason="memory_limit"}"#, 1.0)
            .await,
        Some(1.0)
    );
    let (s, after) = server.predict(&c, &key, json!({})).await;
    assert_eq!(s, 200, "{after}");
    assert_ne!(before["response"]["pid"], after["response"]["pid"]);
    let (_, logs) = api.get(&format!("{base}/replicas/limited-0/logs")).await;
    assert!(
        logs.to_string().contains("over its memory limit of 256 MB"),
        "{logs}"
    );

    // A model whose import alone is over the limit fails to deploy, and the log says why.
    let (b2, log) = api.build(pid, mid, "bloated.py", "f").await;
    assert_eq!(b2["status"], "built", "{log}");
    let (s, d2) = api
        .post(
            &format!("{base}/deployments"),
            json!({"build_id": b2["id"], "replicas": 1, "memory_mb": 128}),
        )
        .await;
    assert_eq!(s, 201, "{d2}");
    api.wait_deployment(&format!("{base}/deployments/{}", d2["id"]), "failed")
        .await;
    assert!(
        server.logs().contains("over its memory limit of 128 MB"),
        "{}",
        server.logs()
    );
    // The earlier deployment still serves.
    let (s, body) = server.predict(&c, &key, json!({})).await;
    assert_eq!(s, 200, "{body}");
}

#[tokio::test]
async fn environment_precedence_is_deployment_over_project_over_global() {
    let server = Server::start(
        "env = { GLOBAL = \"g\", TIER = \"global\", PROJ = \"global\" }",
        &[],
    );
    let api = Api {
        server: &server,
        c: client(),
    };
    let project = tempfile::tempdir().unwrap();
    std::fs::write(
        project.path().join("env.py"),
        "import os\n\ndef f(args):\n    return {k: os.environ.get(k) for k in ('GLOBAL', 'PROJ', 'TIER')}\n",
    )
    .unwrap();
    let (pid, mid, key) = api.project_and_model("envs", project.path()).await;
    let (s, p) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/projects/{pid}"),
            Some(json!({"environment": {"PROJ": "project", "TIER": "project"}})),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["environment"]["PROJ"], "project");
    let (b, _) = api.build(pid, mid, "env.py", "f").await;
    let bid = b["id"].as_i64().unwrap();
    api.deploy(pid, mid, bid, 1, json!({"TIER": "deployment"}))
        .await;
    let (_, body) = server.predict(&client(), &key, json!({})).await;
    assert_eq!(
        body["response"],
        json!({"GLOBAL": "g", "PROJ": "project", "TIER": "deployment"})
    );
    // The next deployment does not inherit the previous one's variables.
    api.deploy(pid, mid, bid, 1, json!({})).await;
    let (_, body) = server.predict(&client(), &key, json!({})).await;
    assert_eq!(
        body["response"],
        json!({"GLOBAL": "g", "PROJ": "project", "TIER": "project"})
    );
}

#[tokio::test]
async fn a_declared_model_whose_rebuild_fails_keeps_its_previous_deployment() {
    let project = tempfile::tempdir().unwrap();
    write_model(project.path(), 3);
    let mut server = Server::start("", &[declared("keep", project.path())]);
    server.wait_ready().await;
    assert_eq!(version(&server, "keep").await, 3);
    // The next start's build fails (a broken module); the last good build keeps serving.
    std::fs::write(project.path().join("model.py"), "this is not python\n").unwrap();
    server.restart(false);
    server.wait_ready().await;
    assert_eq!(version(&server, "keep").await, 3);
    assert!(server.logs().contains("restoring the previous deployment"));
}

/// A `[[models]]` table declaring the `write_model` model in `dir` as `name`.
fn declared(name: &str, dir: &Path) -> String {
    common::model_at(name, dir, "model.py", "predict")
}

/// The `version` the declared `write_model` model `name` answers with.
async fn version(server: &Server, name: &str) -> i64 {
    let (s, body) = server
        .predict(&client(), &common::key_for(name), json!({"a": 1, "b": 1}))
        .await;
    assert_eq!(s, 200, "{body}");
    body["response"]["version"].as_i64().unwrap()
}

#[tokio::test]
async fn an_unchanged_declared_model_is_not_rebuilt_at_start() {
    // The config, and so the data directory, live in the model's own directory, a common
    // layout: builds leave the data directory out (it would otherwise be copied into itself,
    // and its store's every write would count as a change).
    let project = tempfile::tempdir().unwrap();
    write_model(project.path(), 1);
    std::fs::write(project.path().join(".gitignore"), "modelgate.log\n").unwrap();
    let config = project.path().join("modelgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{}",
            declared("same", project.path())
        ),
    )
    .unwrap();
    let path = project.path().to_owned();
    let mut server = Server::start_with(&["serve", "--config", config.to_str().unwrap()], project);
    server.wait_ready().await;
    let api = Api {
        server: &server,
        c: client(),
    };
    let (_, projects) = api.get("/projects").await;
    let pid = projects["projects"][0]["id"].as_i64().unwrap();
    let (_, models) = api.get(&format!("/projects/{pid}/models")).await;
    let mid = models["models"][0]["id"].as_i64().unwrap();
    let builds_path = format!("/projects/{pid}/models/{mid}/builds");
    drop(api);
    assert_eq!(version(&server, "same").await, 1);

    // Restarted with nothing changed: the same build is deployed again, none is added.
    server.restart(false);
    server.wait_ready().await;
    assert_eq!(version(&server, "same").await, 1);
    let api = Api {
        server: &server,
        c: client(),
    };
    let (_, builds) = api.get(&builds_path).await;
    assert_eq!(builds["builds"].as_array().unwrap().len(), 1, "{builds}");
    assert!(server.logs().contains("unchanged since this build"));

    let snapshot = server.dir.path().join("data/builds/1/src");
    assert!(snapshot.join("model.py").is_file());
    assert!(
        !snapshot.join("data").exists(),
        "the data directory was copied"
    );
    let log = std::fs::read_to_string(server.dir.path().join("data/builds/1/build.log")).unwrap();
    assert!(
        log.contains("leaving out data/ (modelgate's data directory)"),
        "{log}"
    );

    // A changed file is a new build.
    write_model(&path, 2);
    drop(api);
    server.restart(false);
    server.wait_ready().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while version(&server, "same").await != 2 {
        assert!(
            Instant::now() < deadline,
            "the changed model was not rebuilt"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let api = Api {
        server: &server,
        c: client(),
    };
    let (_, builds) = api.get(&builds_path).await;
    let numbers: Vec<i64> = builds["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["build_number"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, vec![1, 2]);
}

#[tokio::test]
async fn a_build_log_streams_while_the_build_runs() {
    let server = Server::start("", &[]);
    let api = Api {
        server: &server,
        c: client(),
    };
    let project = tempfile::tempdir().unwrap();
    write_model(project.path(), 1);
    std::fs::write(
        project.path().join("build.sh"),
        "echo early-line\nsleep 1.5\necho late-line\n",
    )
    .unwrap();
    let (pid, mid, _) = api.project_and_model("streamed", project.path()).await;
    let base = format!("/projects/{pid}/models/{mid}/builds");
    let (s, b) = api
        .post(
            &base,
            json!({"file_path": "model.py", "function_name": "predict"}),
        )
        .await;
    assert_eq!(s, 201);
    let bid = b["id"].as_i64().unwrap();
    let mut resp = client()
        .get(server.url(&format!("/api/v2{base}/{bid}/log?follow=true")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut text = String::new();
    let mut seen_while_building = false;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if text.contains("early-line") && !text.contains("late-line") {
            let (_, now) = api.get(&format!("{base}/{bid}")).await;
            seen_while_building |= now["status"] == "building";
        }
    }
    assert!(
        seen_while_building,
        "no log arrived while the build ran: {text}"
    );
    assert!(
        text.contains("late-line") && text.contains("built: sha256"),
        "{text}"
    );
    let (_, done) = api.get(&format!("{base}/{bid}")).await;
    assert_eq!(done["status"], "built");
}

/// A redeploy drains the old build's replicas for at most the shutdown grace, then stops them
/// with SIGTERM, here while a request is still under way. The replica running it answers it,
/// once, instead of dying halfway (until then, the request failed), and the model's `atexit`
/// functions run as it exits. The request's work runs in a process the model forked
/// (multiprocessing), which the stop leaves working: SIGTERM goes to the replica alone.
#[tokio::test]
async fn a_replica_stopped_after_the_drain_bound_finishes_the_request_it_is_running() {
    let server = Server::start("shutdown_grace_secs = 1", &[]);
    let api = Api {
        server: &server,
        c: client(),
    };
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    let calls = dir.join("calls");
    let exits = dir.join("exits");
    let write = |version: u32| {
        std::fs::write(
            dir.join("model.py"),
            format!(
                "import atexit, multiprocessing, time\n\n\
                 atexit.register(lambda: open({exits:?}, 'a').write('v{version}\\n'))\n\n\
                 def predict(args):\n    \
                     open({calls:?}, 'a').write('v{version}\\n')\n    \
                     with multiprocessing.get_context('fork').Pool(1) as pool:\n        \
                         pool.apply(time.sleep, (args['secs'],))\n    \
                     return {{'version': {version}}}\n"
            ),
        )
        .unwrap()
    };
    write(1);
    let (pid, mid, key) = api.project_and_model("finisher", dir).await;
    let (b1, log) = api.build(pid, mid, "model.py", "predict").await;
    assert_eq!(b1["status"], "built", "{log}");
    api.deploy(pid, mid, b1["id"].as_i64().unwrap(), 1, json!({}))
        .await;
    write(2);
    let (b2, log) = api.build(pid, mid, "model.py", "predict").await;
    assert_eq!(b2["status"], "built", "{log}");

    let c = client();
    let in_flight = server.predict_in_background(&c, &key, json!({"secs": 5}));
    // The request is running in the old replica when the new build is deployed, and still is
    // when the 1 s drain bound ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&calls)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    api.deploy(pid, mid, b2["id"].as_i64().unwrap(), 1, json!({}))
        .await;
    let deployed = Instant::now();
    let (status, body) = in_flight.await.unwrap();
    // The stop came about 1.2 s after the new build was serving (the drain bound and its 200 ms
    // head start): the request was still running then, or this test proves nothing.
    assert!(
        deployed.elapsed() > Duration::from_millis(1_600),
        "the request ended {:?} after the redeploy, before the stop",
        deployed.elapsed()
    );
    assert_eq!(
        (status, &body["response"]),
        (200, &json!({"version": 1})),
        "{body}\n{}",
        server.logs()
    );
    assert_eq!(std::fs::read_to_string(&calls).unwrap(), "v1\n", "run once");
    // The old replica exited through its atexit functions; the new one serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&exits).unwrap_or_default() != "v1\n" {
        assert!(
            Instant::now() < deadline,
            "the old replica's atexit functions did not run: {:?}\n{}",
            std::fs::read_to_string(&exits),
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, body) = server.predict(&c, &key, json!({"secs": 0})).await;
    assert_eq!((s, &body["response"]), (200, &json!({"version": 2})));
}
