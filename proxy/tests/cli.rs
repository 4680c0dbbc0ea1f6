//! The `modelgate` command-line client against a real server: every resource, tables and JSON.

mod common;

use std::process::Command;

use common::Server;
use serde_json::Value;

fn run(server: &Server, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .arg("--url")
        .arg(format!("http://{}", server.addr))
        .args(args)
        .env_remove("MODELGATE_ACCESS_KEY")
        .env("MODELGATE_API_KEY", common::admin_key())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(server: &Server, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = run(server, &all);
    assert!(ok, "modelgate {args:?} failed: {err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

#[tokio::test]
async fn the_cli_covers_projects_models_builds_deployments_replicas_and_predict() {
    let server = Server::start("", &[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.py"),
        "import os\n\ndef f(args):\n    print('serving', args)\n    return {'double': args['x'] * 2, 'mode': os.environ.get('MODE')}\n",
    )
    .unwrap();
    let path = dir.path().to_str().unwrap();
    let p = json(
        &server,
        &["projects", "create", "--name", "cli", "--path", path],
    );
    let pid = p["id"].to_string();
    let m = json(
        &server,
        &["models", "create", "--project", &pid, "--name", "doubler"],
    );
    let mid = m["id"].to_string();
    let key = m["access_key"].as_str().unwrap().to_owned();

    // A build followed live: its log goes to stdout, then the build row.
    let (ok, out, err) = run(
        &server,
        &[
            "builds",
            "create",
            "--project",
            &pid,
            "--model",
            &mid,
            "--file",
            "m.py",
            "--function",
            "f",
            "--follow",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("snapshotting") && out.contains("built: sha256"),
        "{out}"
    );
    assert!(
        out.contains("BUILD_NUMBER") && out.contains("built"),
        "table header and row: {out}"
    );
    let builds = json(
        &server,
        &["builds", "list", "--project", &pid, "--model", &mid],
    );
    let bid = builds["builds"][0]["id"].to_string();

    // A failing build exits non-zero.
    let (ok, _, err) = run(
        &server,
        &[
            "builds",
            "create",
            "--project",
            &pid,
            "--model",
            &mid,
            "--file",
            "m.py",
            "--function",
            "nope",
            "--follow",
        ],
    );
    assert!(!ok);
    assert!(err.contains("build failed"), "{err}");

    // The project's environment is overridden by the deployment's own.
    let p = json(
        &server,
        &[
            "projects",
            "set-env",
            "--project",
            &pid,
            "--env",
            "MODE=project",
        ],
    );
    assert_eq!(p["environment"]["MODE"], "project");

    let d = json(
        &server,
        &[
            "deployments",
            "create",
            "--project",
            &pid,
            "--model",
            &mid,
            "--build",
            &bid,
            "--replicas",
            "2",
            "--env",
            "MODE=cli",
            "--wait",
        ],
    );
    assert_eq!(d["status"], "deployed");
    let did = d["id"].to_string();

    let predict = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelgate"));
        cmd.args([
            "--url",
            &format!("http://{}", server.addr),
            "predict",
            "--data",
            r#"{"x": 21}"#,
        ])
        .env("MODELGATE_ACCESS_KEY", &key)
        .env_remove("MODELGATE_API_KEY");
        cmd
    };
    // The model was created with authentication on (the default): the access key alone fails.
    let out = predict().output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401 auth.unauthorized"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = predict()
        .env("MODELGATE_API_KEY", common::admin_key())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer, serde_json::json!({"double": 42, "mode": "cli"}));

    let replicas = json(
        &server,
        &["replicas", "list", "--project", &pid, "--model", &mid],
    );
    let ids: Vec<&str> = replicas["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["doubler-0", "doubler-1"]);
    // Whichever replica served it printed the request.
    let mut printed = false;
    for id in ids {
        let (ok, out, _) = run(
            &server,
            &[
                "replicas",
                "logs",
                "--project",
                &pid,
                "--model",
                &mid,
                "--replica",
                id,
            ],
        );
        assert!(ok);
        printed |= out.contains("stdout serving {'x': 21}");
    }
    assert!(printed, "replica output not in the replica logs");

    // Errors are reported with their code, and exit non-zero.
    let (ok, _, err) = run(
        &server,
        &["models", "delete", "--project", &pid, "--model", &mid],
    );
    assert!(!ok);
    assert!(err.contains("409 resource.conflict"), "{err}");
    let stopped = json(
        &server,
        &[
            "deployments",
            "stop",
            "--project",
            &pid,
            "--model",
            &mid,
            "--deployment",
            &did,
        ],
    );
    assert_eq!(stopped["status"], "stopped");
    let (ok, _, err) = run(
        &server,
        &["--json", "predict", "--access-key", &key, "--data", "{}"],
    );
    assert!(!ok);
    assert!(err.contains("503 model.unavailable"), "{err}");
    let (ok, out, _) = run(
        &server,
        &["deployments", "list", "--project", &pid, "--model", &mid],
    );
    assert!(ok && out.contains("stopped"), "{out}");
    let (ok, _, _) = run(
        &server,
        &["models", "delete", "--project", &pid, "--model", &mid],
    );
    assert!(ok);
    let (ok, out, _) = run(&server, &["projects", "list"]);
    assert!(ok && out.contains("cli"), "{out}");
}

#[tokio::test]
async fn projects_can_be_uploaded_as_archives_and_hostile_ones_are_refused() {
    let server = Server::start("", &[]);
    let dir = tempfile::tempdir().unwrap();
    let write = |version: u32| {
        std::fs::write(
            dir.path().join("m.py"),
            format!("def f(args):\n    return {version}\n"),
        )
        .unwrap()
    };
    write(1);
    std::fs::create_dir_all(dir.path().join(".git")).unwrap();
    std::fs::write(dir.path().join(".git/HEAD"), "ref").unwrap();
    std::os::unix::fs::symlink("m.py", dir.path().join("alias.py")).unwrap();
    let local = dir.path().to_str().unwrap();
    let p = json(
        &server,
        &[
            "projects", "create", "--name", "uploaded", "--upload", local,
        ],
    );
    let pid = p["id"].to_string();
    let files = std::path::PathBuf::from(p["source_path"].as_str().unwrap());
    assert!(files.join("m.py").is_file());
    assert!(files.join("alias.py").is_symlink());
    assert!(
        !files.join(".git").exists(),
        "the CLI leaves .git out of uploads"
    );

    let m = json(
        &server,
        &["models", "create", "--project", &pid, "--name", "up"],
    );
    let mid = m["id"].to_string();
    let key = m["access_key"].as_str().unwrap().to_owned();
    let b = json(
        &server,
        &[
            "builds",
            "create",
            "--project",
            &pid,
            "--model",
            &mid,
            "--file",
            "alias.py",
            "--function",
            "f",
        ],
    );
    let mut bid = b["id"].to_string();
    for _ in 0..2 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let builds = json(
                &server,
                &["builds", "list", "--project", &pid, "--model", &mid],
            );
            let status = builds["builds"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["id"] == bid.parse::<i64>().unwrap())
                .unwrap()["status"]
                .clone();
            if status == "built" {
                break;
            }
            assert!(
                status != "build failed" && std::time::Instant::now() < deadline,
                "{builds}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        json(
            &server,
            &[
                "deployments",
                "create",
                "--project",
                &pid,
                "--model",
                &mid,
                "--build",
                &bid,
                "--wait",
            ],
        );
        let (status, body) = server
            .predict(&reqwest::Client::new(), &key, serde_json::json!({}))
            .await;
        assert_eq!(status, 200, "{body}");
        if b["id"] == bid.parse::<i64>().unwrap() {
            assert_eq!(body["response"], 1);
            // New files replace the old ones; the next build sees them.
            write(2);
            let (ok, out, err) = run(
                &server,
                &["projects", "upload", "--project", &pid, "--dir", local],
            );
            assert!(ok && out.contains("uploaded"), "{err}");
            let b2 = json(
                &server,
                &[
                    "builds",
                    "create",
                    "--project",
                    &pid,
                    "--model",
                    &mid,
                    "--file",
                    "m.py",
                    "--function",
                    "f",
                ],
            );
            bid = b2["id"].to_string();
        } else {
            assert_eq!(body["response"], 2);
        }
    }

    // Not an archive: a clear 400. A server-path project takes no uploads: 409.
    let c = common::admin_client(std::time::Duration::from_secs(60));
    let r = c
        .put(server.url(&format!("/api/v2/projects/{pid}/files")))
        .body("definitely not a tar archive, just some text that goes on for a while....")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("archive refused"),
        "{v}"
    );
    let other = json(
        &server,
        &["projects", "create", "--name", "onpath", "--path", local],
    );
    let r = c
        .put(server.url(&format!("/api/v2/projects/{}/files", other["id"])))
        .body(vec![0u8; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
}
