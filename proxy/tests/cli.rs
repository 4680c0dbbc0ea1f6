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

#[tokio::test]
async fn the_cli_covers_users_keys_collaborators_audit_settings_and_login() {
    let server = Server::start("", &[]);
    // An admin creates a user, a project for them to see, a key, and a role.
    let ana = json(&server, &["users", "create", "--username", "ana"]);
    assert_eq!(
        (ana["username"].as_str(), ana["role"].as_str()),
        (Some("ana"), Some("user"))
    );
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("m.py"), "def f(args):\n    return 1\n").unwrap();
    let project = json(
        &server,
        &[
            "projects",
            "create",
            "--name",
            "shared",
            "--upload",
            files.path().to_str().unwrap(),
        ],
    );
    let pid = project["id"].to_string();
    let set = json(
        &server,
        &[
            "collaborators",
            "set",
            "--project",
            &pid,
            "--user",
            "ana",
            "--role",
            "viewer",
        ],
    );
    assert_eq!(set["role"], "viewer");
    let (ok, table, _) = run(&server, &["collaborators", "list", "--project", &pid]);
    assert!(
        ok && table.contains("ana") && table.contains("viewer"),
        "{table}"
    );
    let created = json(
        &server,
        &["keys", "create", "--user", "ana", "--expires-in", "2h"],
    );
    let key = created["key"].as_str().unwrap().to_owned();
    let lifetime = created["expires_at"].as_i64().unwrap() - modelgate::auth::now_unix();
    assert!((7000..=7200).contains(&lifetime), "{created}");

    // Ana logs in: the key is read from standard input (never an argument) and stored 0600.
    let home = tempfile::tempdir().unwrap();
    let as_ana = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_modelgate"))
            .arg("--url")
            .arg(format!("http://{}", server.addr))
            .args(args)
            .env_remove("MODELGATE_API_KEY")
            .env("XDG_CONFIG_HOME", home.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = as_ana(&["users", "get"], None);
    assert!(!ok && err.contains("401 auth.unauthorized"), "{err}");
    let (ok, _, err) = as_ana(&["login"], Some("mgk_not-a-key\n"));
    assert!(!ok && err.contains("not a modelgate API key"), "{err}");
    let (ok, out, err) = as_ana(&["login"], Some(&format!("{key}\n")));
    assert!(ok, "{err}");
    assert!(out.contains("logged in as ana"), "{out}");
    let stored = home.path().join("modelgate/api-key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&stored).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let (ok, out, err) = as_ana(&["--json", "users", "get"], None);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["username"],
        "ana"
    );
    let (ok, out, _) = as_ana(&["projects", "list"], None);
    assert!(ok && out.contains("shared"), "{out}");
    // Ana may not do what viewers and users may not.
    let (ok, _, err) = as_ana(&["users", "list"], None);
    assert!(!ok && err.contains("403 auth.forbidden"), "{err}");
    let (ok, _, err) = as_ana(
        &[
            "collaborators",
            "set",
            "--project",
            &pid,
            "--user",
            "ana",
            "--role",
            "admin",
        ],
        None,
    );
    assert!(!ok && err.contains("403 auth.forbidden"), "{err}");
    // Her own keys: list (no secret), create another.
    let (ok, out, _) = as_ana(&["keys", "list"], None);
    assert!(
        ok && out.contains(created["key_id"].as_str().unwrap()),
        "{out}"
    );
    assert!(!out.contains(&key[12..]), "a key list shows a secret");

    // Settings and the maximum expiry.
    let s = json(
        &server,
        &[
            "settings",
            "set",
            "--max-expiry-days",
            "10",
            "--default-expiry-days",
            "5",
        ],
    );
    assert_eq!(s["api_key_max_expiry_days"], 10);
    let (ok, _, err) = as_ana(&["keys", "create", "--expires-in", "11d"], None);
    assert!(!ok && err.contains("400 api_key.expiry_too_long"), "{err}");

    // The admin deactivates her: the stored key stops working at once.
    let updated = json(
        &server,
        &["users", "update", "--user", "ana", "--active", "false"],
    );
    assert_eq!(updated["active"], false);
    let (ok, _, err) = as_ana(&["users", "get"], None);
    assert!(!ok && err.contains("401 auth.unauthorized"), "{err}");
    let wiped = json(&server, &["keys", "delete-all", "--user", "ana"]);
    assert_eq!(wiped["deleted"], 1);
    let (ok, _, _) = run(
        &server,
        &[
            "collaborators",
            "remove",
            "--project",
            &pid,
            "--user",
            "ana",
        ],
    );
    assert!(ok);

    // The audit trail shows it all, and no secret.
    let audit = json(&server, &["audit", "--limit", "1000"]);
    let text = audit.to_string();
    for action in [
        "user.created",
        "collaborator.set",
        "api_key.created",
        "auth.failed",
        "authz.denied",
        "settings.updated",
        "user.updated",
        "api_key.deleted_all",
        "collaborator.removed",
    ] {
        assert!(text.contains(action), "{action} missing from {text}");
    }
    assert!(!text.contains(&key[12..]));
    assert!(!server.logs().contains(&key[12..]));
}
