//! Identity and access end to end: users, API keys, collaborators, model authentication, the
//! audit trail and TLS, against the real binary, real replicas and a real SQLite file.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{admin_key, Server};
use serde_json::{json, Value};

/// A model table whose function appends to `calls` on every call.
fn counted_model(name: &str, calls: &Path, auth: bool) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\npath = \"{}\"\nfile = \"funcs.py\"\nfunction = \"counted\"\naccess_key = \"{}\"\nenable_authentication = {auth}\nenv = {{ CALLS_FILE = \"{}\" }}\n",
        common::fixtures().display(),
        common::key_for(name),
        calls.display()
    )
}

fn calls(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

struct Caller<'a> {
    server: &'a Server,
    c: reqwest::Client,
}

impl Caller<'_> {
    /// An API call with `key` as the bearer token (none when `None`).
    async fn api(
        &self,
        key: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .c
            .request(method, self.server.url(&format!("/api/v2{path}")));
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self
            .api(Some(admin_key()), method.clone(), path, body)
            .await;
        assert!((200..300).contains(&s), "{method} {path}: {s} {v}");
        v
    }

    /// `POST /model` with an optional raw `Authorization` header value.
    async fn predict(&self, access_key: &str, authorization: Option<&str>) -> (u16, Value) {
        let mut req = self
            .c
            .post(self.server.url("/model"))
            .json(&json!({"accessKey": access_key, "request": {}}));
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    async fn user(&self, name: &str) -> i64 {
        self.admin(
            reqwest::Method::POST,
            "/users",
            Some(json!({"username": name})),
        )
        .await["id"]
            .as_i64()
            .unwrap()
    }

    /// Creates a key for `user` as the admin; returns (secret, key id).
    async fn key(&self, user: &str, body: Value) -> (String, String) {
        let v = self
            .admin(
                reqwest::Method::POST,
                &format!("/users/{user}/keys"),
                Some(body),
            )
            .await;
        (
            v["key"].as_str().unwrap().to_owned(),
            v["key_id"].as_str().unwrap().to_owned(),
        )
    }
}

/// (case, API key, method, path under /api/v2, body, expected status, expected code)
type ApiCase<'a> = (
    &'a str,
    Option<&'a str>,
    reqwest::Method,
    String,
    Option<Value>,
    u16,
    &'a str,
);

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Flips one character of a key's body, keeping its shape: the checksum no longer matches.
fn corrupt(key: &str) -> String {
    let mut b = key.as_bytes().to_vec();
    b[12] = if b[12] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

#[tokio::test]
async fn every_credential_failure_is_refused_before_the_replica_and_revocations_apply_at_once() {
    let work = tempfile::tempdir().unwrap();
    let calls_file = work.path().join("calls");
    let server = Server::start(
        "",
        &[
            counted_model("guarded", &calls_file, true),
            counted_model("open", &calls_file, false),
        ],
    );
    server.wait_ready().await;
    let t = Caller {
        server: &server,
        c: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
    };
    use reqwest::Method as M;
    let guarded = common::key_for("guarded");
    let open = common::key_for("open");

    // The declared model's project, owned by the first admin.
    let projects = t.admin(M::GET, "/projects", None).await;
    let project = |name: &str| {
        projects["projects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["id"]
            .as_i64()
            .unwrap()
    };
    let (pid, open_pid) = (project("guarded"), project("open"));
    let models = t
        .admin(M::GET, &format!("/projects/{pid}/models"), None)
        .await;
    let mid = models["models"][0]["id"].as_i64().unwrap();
    let collab = |user: &str| format!("/projects/{pid}/collaborators/{user}");

    // Users: a viewer, a stranger, and viewers whose access is about to go.
    for name in ["viewer", "stranger", "removed", "inactive", "wiped"] {
        t.user(name).await;
    }
    for name in ["viewer", "removed", "inactive", "wiped"] {
        t.admin(M::PUT, &collab(name), Some(json!({"role": "viewer"})))
            .await;
    }
    let (viewer, _) = t.key("viewer", json!({})).await;
    let (short, short_id) = t.key("viewer", json!({"expires_in_seconds": 2})).await;
    let short_made = Instant::now();
    let (deleted, deleted_id) = t.key("viewer", json!({"description": "to delete"})).await;
    let (stranger, _) = t.key("stranger", json!({})).await;
    let (removed, _) = t.key("removed", json!({})).await;
    let (inactive, _) = t.key("inactive", json!({})).await;
    let (wiped1, _) = t.key("wiped", json!({})).await;
    let (wiped2, _) = t.key("wiped", json!({})).await;
    let unknown = modelgate::auth::key::generate().0;

    // Each credential about to be revoked works right before, and fails on the very next
    // request after (the table below is that next request).
    for key in [&short, &deleted, &removed, &inactive, &wiped1, &wiped2] {
        let (s, v) = t.predict(&guarded, Some(&bearer(key))).await;
        assert_eq!(s, 200, "{v}");
    }
    let before = calls(&calls_file);
    assert_eq!(before, 6);
    t.admin(M::DELETE, &format!("/users/viewer/keys/{deleted_id}"), None)
        .await;
    t.admin(M::DELETE, &collab("removed"), None).await;
    t.admin(M::PATCH, "/users/inactive", Some(json!({"active": false})))
        .await;
    let wiped = t.admin(M::DELETE, "/users/wiped/keys", None).await;
    assert_eq!(wiped["deleted"], 2);
    // The short key's 2 s run out.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(short_made.elapsed())).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    const NOT_AUTHORIZED: &str = "User APikey not authorized to access model";
    let cases: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        ("no key", &guarded, None, 401, "auth.unauthorized"),
        (
            "not a bearer token",
            &guarded,
            Some(viewer.clone()),
            401,
            "auth.unauthorized",
        ),
        (
            "malformed key",
            &guarded,
            Some(bearer("mgk_short")),
            401,
            "auth.unauthorized",
        ),
        (
            "bad checksum",
            &guarded,
            Some(bearer(&corrupt(&viewer))),
            401,
            "auth.unauthorized",
        ),
        (
            "unknown key",
            &guarded,
            Some(bearer(&unknown)),
            401,
            "auth.unauthorized",
        ),
        (
            "expired key",
            &guarded,
            Some(bearer(&short)),
            401,
            "auth.unauthorized",
        ),
        (
            "deleted key",
            &guarded,
            Some(bearer(&deleted)),
            401,
            "auth.unauthorized",
        ),
        (
            "deactivated user",
            &guarded,
            Some(bearer(&inactive)),
            401,
            "auth.unauthorized",
        ),
        (
            "all keys deleted (1)",
            &guarded,
            Some(bearer(&wiped1)),
            401,
            "auth.unauthorized",
        ),
        (
            "all keys deleted (2)",
            &guarded,
            Some(bearer(&wiped2)),
            401,
            "auth.unauthorized",
        ),
        (
            "not a collaborator",
            &guarded,
            Some(bearer(&stranger)),
            403,
            "auth.forbidden",
        ),
        (
            "removed from the project",
            &guarded,
            Some(bearer(&removed)),
            403,
            "auth.forbidden",
        ),
        (
            "unknown access key",
            "no-such-access-key-0000",
            Some(bearer(&viewer)),
            401,
            "access_key.invalid",
        ),
    ];
    for (name, access_key, auth, status, code) in &cases {
        let (s, v) = t.predict(access_key, auth.as_deref()).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (*status, Some(*code)),
            "{name}: {v}"
        );
        if *status == 403 {
            assert_eq!(v["error"]["message"], NOT_AUTHORIZED, "{name}");
        }
        if *name == "expired key" {
            assert!(
                v["error"]["message"].as_str().unwrap().contains("expired"),
                "{v}"
            );
        }
    }
    assert_eq!(
        calls(&calls_file),
        before,
        "a refused request reached the replica"
    );

    // What is allowed: a viewer's key; any caller of a model without authentication. The
    // replica ran for each.
    let (s, v) = t.predict(&guarded, Some(&bearer(&viewer))).await;
    assert_eq!((s, v["response"]["ok"].clone()), (200, json!(true)), "{v}");
    // The admin key given to modelgate never reaches a replica's environment.
    assert_eq!(v["response"]["secret_seen"], "");
    let (s, _) = t.predict(&open, None).await;
    assert_eq!(s, 200);
    let (s, _) = t.predict(&open, Some(&bearer(&stranger))).await;
    assert_eq!(s, 200, "a model without authentication ignores API keys");
    assert_eq!(calls(&calls_file), before + 3);

    // Turning authentication off and on takes effect on the next call.
    let model_path = format!("/projects/{pid}/models/{mid}");
    let (s, v) = t
        .api(
            Some(&viewer),
            M::PATCH,
            &model_path,
            Some(json!({"enable_authentication": false})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("auth.forbidden"))
    );
    t.admin(
        M::PATCH,
        &model_path,
        Some(json!({"enable_authentication": false})),
    )
    .await;
    assert_eq!(t.predict(&guarded, None).await.0, 200);
    t.admin(
        M::PATCH,
        &model_path,
        Some(json!({"enable_authentication": true})),
    )
    .await;
    assert_eq!(t.predict(&guarded, None).await.0, 401);

    // A regenerated access key: the old one fails on the next request, the new one works.
    let regenerated = t
        .admin(M::POST, &format!("{model_path}/access_key"), None)
        .await;
    let new_access = regenerated["access_key"].as_str().unwrap().to_owned();
    let (s, v) = t.predict(&guarded, Some(&bearer(&viewer))).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("access_key.invalid"))
    );
    assert_eq!(t.predict(&new_access, Some(&bearer(&viewer))).await.0, 200);

    // The control plane: same keys, same rules.
    let api_cases: Vec<ApiCase> = vec![
        (
            "no key",
            None,
            M::GET,
            "/projects".into(),
            None,
            401,
            "auth.unauthorized",
        ),
        (
            "malformed key",
            Some("mgk_nope"),
            M::GET,
            "/projects".into(),
            None,
            401,
            "auth.unauthorized",
        ),
        (
            "expired key",
            Some(&short),
            M::GET,
            "/users/me".into(),
            None,
            401,
            "auth.unauthorized",
        ),
        (
            "deleted key",
            Some(&deleted),
            M::GET,
            "/users/me".into(),
            None,
            401,
            "auth.unauthorized",
        ),
        (
            "deactivated user",
            Some(&inactive),
            M::GET,
            "/users/me".into(),
            None,
            401,
            "auth.unauthorized",
        ),
        (
            "viewer deploys",
            Some(&viewer),
            M::POST,
            format!("{model_path}/deployments"),
            Some(json!({"build_id": 1})),
            403,
            "auth.forbidden",
        ),
        (
            "viewer builds",
            Some(&viewer),
            M::POST,
            format!("{model_path}/builds"),
            Some(json!({"file_path": "funcs.py", "function_name": "add"})),
            403,
            "auth.forbidden",
        ),
        (
            "viewer reads replica logs",
            Some(&viewer),
            M::GET,
            format!("{model_path}/replicas/guarded-0/logs"),
            None,
            403,
            "auth.forbidden",
        ),
        (
            "viewer adds a collaborator",
            Some(&viewer),
            M::PUT,
            collab("stranger"),
            Some(json!({"role": "admin"})),
            403,
            "auth.forbidden",
        ),
        (
            "user makes a project from a server directory",
            Some(&stranger),
            M::POST,
            "/projects".into(),
            Some(json!({"name": "etc", "path": "/etc"})),
            403,
            "auth.forbidden",
        ),
        (
            "stranger reads the project",
            Some(&stranger),
            M::GET,
            format!("/projects/{pid}"),
            None,
            403,
            "auth.forbidden",
        ),
        (
            "user lists users",
            Some(&viewer),
            M::GET,
            "/users".into(),
            None,
            403,
            "auth.forbidden",
        ),
        (
            "user reads the audit",
            Some(&viewer),
            M::GET,
            "/audit".into(),
            None,
            403,
            "auth.forbidden",
        ),
        (
            "user makes a key for another",
            Some(&viewer),
            M::POST,
            "/users/stranger/keys".into(),
            Some(json!({})),
            403,
            "auth.forbidden",
        ),
        (
            "user wipes another's keys",
            Some(&viewer),
            M::DELETE,
            "/users/stranger/keys".into(),
            None,
            403,
            "auth.forbidden",
        ),
        (
            "user promotes themself",
            Some(&viewer),
            M::PATCH,
            "/users/viewer".into(),
            Some(json!({"role": "admin"})),
            403,
            "auth.forbidden",
        ),
    ];
    for (name, key, method, path, body, status, code) in api_cases {
        let (s, v) = t.api(key, method, &path, body).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{name}: {v}"
        );
    }
    // Any user may create a project (to upload files into) and becomes its owner and admin.
    let (s, v) = t
        .api(
            Some(&stranger),
            M::POST,
            "/projects",
            Some(json!({"name": "mine"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let mine = v["id"].as_i64().unwrap();
    let (s, v) = t
        .api(
            Some(&stranger),
            M::GET,
            &format!("/projects/{mine}/collaborators"),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["collaborators"][0]["username"], "stranger");
    assert_eq!(v["collaborators"][0]["owner"], true);
    let (s, _) = t
        .api(Some(&viewer), M::GET, &format!("/projects/{mine}"), None)
        .await;
    assert_eq!(s, 403);
    // A viewer sees their project and nothing else, and may read what is in it.
    let (s, v) = t.api(Some(&viewer), M::GET, "/projects", None).await;
    assert_eq!(s, 200);
    let ids: Vec<i64> = v["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![pid]);
    assert!(!ids.contains(&open_pid));
    let (s, _) = t
        .api(Some(&viewer), M::GET, &format!("{model_path}/builds"), None)
        .await;
    assert_eq!(s, 200);
    // Promoted to operator, the same key may read replica logs (no redeploy, no new key).
    t.admin(M::PUT, &collab("viewer"), Some(json!({"role": "operator"})))
        .await;
    let (s, v) = t
        .api(
            Some(&viewer),
            M::GET,
            &format!("{model_path}/replicas/guarded-0/logs"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // The owner stays an admin of their project.
    let (s, v) = t
        .api(Some(admin_key()), M::DELETE, &collab("admin"), None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("resource.conflict"))
    );
    // The last active admin cannot be demoted.
    let (s, v) = t
        .api(
            Some(admin_key()),
            M::PATCH,
            "/users/admin",
            Some(json!({"role": "user"})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("resource.conflict"))
    );

    // Expiry: default one year, an admin-set maximum, and asking for more is an error.
    let (s, v) = t
        .api(Some(&viewer), M::POST, "/users/me/keys", Some(json!({})))
        .await;
    assert_eq!(s, 201, "{v}");
    let year = v["expires_at"].as_i64().unwrap() - modelgate::auth::now_unix();
    assert!((364 * 86_400..=365 * 86_400).contains(&year), "{v}");
    t.admin(
        M::PATCH,
        "/settings",
        Some(json!({"api_key_max_expiry_days": 30, "api_key_default_expiry_days": 7})),
    )
    .await;
    let (s, v) = t
        .api(
            Some(&viewer),
            M::POST,
            "/users/me/keys",
            Some(json!({"expires_in_days": 31})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("api_key.expiry_too_long")),
        "{v}"
    );
    assert!(v.get("key").is_none());
    let (s, v) = t
        .api(
            Some(&viewer),
            M::POST,
            "/users/me/keys",
            Some(json!({"expires_in_days": 30})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    // A key list shows ids and expiry, never a secret.
    let (s, v) = t.api(Some(&viewer), M::GET, "/users/me/keys", None).await;
    assert_eq!(s, 200);
    let listed = v.to_string();
    assert!(listed.contains(&short_id) && !listed.contains(&viewer[20..]));
    assert!(v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["key_id"] == short_id.as_str() && k["expired"] == true));

    // Below contributor, environment variables show their names only.
    let (s, v) = t
        .api(
            Some(&viewer),
            M::GET,
            &format!("{model_path}/deployments"),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        v["deployments"][0]["environment"]["CALLS_FILE"], "(hidden)",
        "{v}"
    );
    let v = t
        .admin(M::GET, &format!("{model_path}/deployments"), None)
        .await;
    assert_eq!(
        v["deployments"][0]["environment"]["CALLS_FILE"],
        calls_file.to_str().unwrap()
    );
    // Other users are not revealed to those who may not list them; digit-only names are refused.
    let (s, _) = t.api(Some(&viewer), M::GET, "/users/nobody", None).await;
    assert_eq!(
        s, 403,
        "a refusal must not depend on whether the user exists"
    );
    let (s, v) = t
        .api(
            Some(admin_key()),
            M::POST,
            "/users",
            Some(json!({"username": "42"})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("request.invalid"))
    );
    // An operator restarts the latest deployment, but bringing back an older one is a rollback.
    let first = t
        .admin(M::GET, &format!("{model_path}/deployments"), None)
        .await["deployments"][0]
        .clone();
    let redeployed = t
        .admin(
            M::POST,
            &format!("{model_path}/deployments"),
            Some(json!({"build_id": first["build_id"], "environment": first["environment"]})),
        )
        .await;
    let (s, v) = t
        .api(
            Some(&viewer),
            M::POST,
            &format!("{model_path}/deployments/{}/restart", first["id"]),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("auth.forbidden")),
        "{v}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = t
            .admin(
                M::GET,
                &format!("{model_path}/deployments/{}", redeployed["id"]),
                None,
            )
            .await;
        if d["status"] == "deployed" {
            break;
        }
        assert!(Instant::now() < deadline, "redeploy did not finish: {d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, v) = t
        .api(
            Some(&viewer),
            M::POST,
            &format!("{model_path}/deployments/{}/restart", redeployed["id"]),
            None,
        )
        .await;
    assert_eq!(s, 202, "{v}");

    // The audit trail: failures with where they came from, key lifecycle, role changes.
    let deadline = Instant::now() + Duration::from_secs(10);
    let audit = loop {
        let audit = t.admin(M::GET, "/audit?limit=1000", None).await;
        let text = audit.to_string();
        if text.contains("api_key.expired") || Instant::now() > deadline {
            break audit;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let events = audit["events"].as_array().unwrap();
    let has = |action: &str, detail: &str| {
        events
            .iter()
            .any(|e| e["action"] == action && e["detail"].as_str().unwrap_or("").contains(detail))
    };
    assert!(has("auth.failed", "expired"), "{audit}");
    assert!(has("auth.failed", "checksum"));
    assert!(has("auth.failed", "deactivated"));
    assert!(has("authz.denied", "Predict"));
    assert!(has("authz.denied", "Deploy"));
    assert!(has("api_key.created", "expires_at"));
    assert!(has("api_key.deleted", ""));
    assert!(has("api_key.deleted_all", "2 key(s)"));
    assert!(
        has("api_key.expired", ""),
        "the expiry was not recorded: {audit}"
    );
    assert!(has("collaborator.set", "operator"));
    assert!(has("collaborator.removed", ""));
    assert!(has("user.updated", "active: true -> false"));
    assert!(has("model.access_key_regenerated", ""));
    assert!(has("model.authentication_changed", "false"));
    assert!(events
        .iter()
        .filter(|e| e["action"] == "auth.failed")
        .all(|e| e["remote"].as_str().unwrap().starts_with("127.0.0.1:")));

    // No secret anywhere: not in modelgate's log, the replicas' logs or the audit trail.
    let replica_logs = t
        .admin(
            M::GET,
            &format!("{model_path}/replicas/guarded-0/logs"),
            None,
        )
        .await
        .to_string();
    let all_text = format!("{}\n{replica_logs}\n{audit}", server.logs());
    for secret in [
        admin_key(),
        &viewer,
        &short,
        &deleted,
        &stranger,
        &removed,
        &inactive,
        &wiped1,
        &wiped2,
        &unknown,
    ] {
        // The id part is public; the secret part must not appear.
        assert!(
            !all_text.contains(&secret[12..]),
            "a secret appeared in a log or the audit trail"
        );
    }
}

#[tokio::test]
async fn tls_serves_http1_and_http2_by_alpn_and_the_cli_trusts_a_given_ca() {
    let work = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let (cert_path, key_path) = (work.path().join("cert.pem"), work.path().join("key.pem"));
    std::fs::write(&cert_path, &cert_pem).unwrap();
    std::fs::write(&key_path, &key_pem).unwrap();
    let server = Server::start(
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            cert_path.display(),
            key_path.display()
        ),
        &[counted_model("tls", &work.path().join("calls"), true)],
    );
    let base = format!("https://{}", server.addr);
    let root = reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap();
    let client = |http1: bool| {
        let b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(root.clone())
            .timeout(Duration::from_secs(30));
        if http1 { b.http1_only() } else { b }.build().unwrap()
    };
    // Readiness over TLS.
    let deadline = Instant::now() + Duration::from_secs(120);
    while client(true)
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "not ready: {}", server.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (http1, version) in [
        (true, reqwest::Version::HTTP_11),
        (false, reqwest::Version::HTTP_2),
    ] {
        let c = client(http1);
        let r = c
            .post(format!("{base}/model"))
            .bearer_auth(admin_key())
            .json(&json!({"accessKey": common::key_for("tls"), "request": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), version);
        assert_eq!(r.status(), 200);
        let r = c
            .get(format!("{base}/api/v2/users/me"))
            .bearer_auth(admin_key())
            .send()
            .await
            .unwrap();
        assert_eq!((r.version(), r.status().as_u16()), (version, 200));
        let me: Value = r.json().await.unwrap();
        assert_eq!(me["username"], "admin");
    }
    // Cleartext to the TLS listener gets no HTTP answer.
    assert!(reqwest::Client::new()
        .get(format!("http://{}/healthz", server.addr))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map(|r| !r.status().is_success())
        .unwrap_or(true));
    // The CLI over HTTPS, trusting the test CA from MODELGATE_CA_CERT, key from the environment.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(["--url", &base, "--json", "users", "get"])
        .env("MODELGATE_CA_CERT", &cert_path)
        .env("MODELGATE_API_KEY", admin_key())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let me: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(me["role"], "admin");
}

#[tokio::test]
async fn a_lost_admin_key_is_replaced_from_the_data_directory_while_modelgate_runs() {
    let server = Server::start("", &[]);
    let data = server.dir.path().join("data");
    let recover = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
            .args(["recover-admin", "--data-dir", data.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = recover();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = data.join("admin-api-key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let key = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&key));
    // The running server notices the change made by another process.
    let c = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c
            .get(server.url("/api/v2/users/me"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            let me: Value = r.json().await.unwrap();
            assert_eq!(me["username"], "admin");
            break;
        }
        assert!(Instant::now() < deadline, "the new key never worked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An existing key file is never overwritten.
    let out = recover();
    assert!(!out.status.success());
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim(),
        key,
        "the key file was replaced"
    );
}
