//! The REST API under `/api/v2`: projects → models → builds → deployments, JSON in and out.
//!
//! Every call first authenticates its `Authorization: Bearer <api key>` against the in-memory
//! auth index, then each handler asks [`Ctx::allow`] for the one action it performs (the table
//! is in `auth/roles.rs`). Handlers validate input, call the store on the blocking pool and the
//! [`ControlPlane`] for anything that runs (builds, deployments) or changes routing. Users, keys,
//! collaborators, audit and settings live in the `identity` submodule.

mod identity;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use modelgate_control::builds::BuildPaths;
use modelgate_control::store::{
    deployment_status as ds, Build, BuildStatus, Deployment, Model, NewDeployment, NewModel,
    NewProject, Project,
};
use serde::Deserialize;
use serde_json::json;

use std::net::SocketAddr;

use modelgate_control::identity::AuditEvent;

use crate::auth::{Action, Principal, SiteAction};
use crate::config::valid_name;
use crate::control::{blocking, ControlPlane};
use crate::error::{json_response, ApiError, Body};

/// Largest JSON body the API accepts.
const MAX_JSON_BYTES: usize = 1024 * 1024;

/// A request path fit for the audit trail: bounded, and with anything shaped like an API key
/// (someone pasting a key where its id belongs) cut down to its public prefix.
fn audit_path(path: &str) -> String {
    path.split('/')
        .map(|seg| match seg.strip_prefix(crate::auth::key::PREFIX) {
            Some(rest) => format!(
                "{}{}…",
                crate::auth::key::PREFIX,
                rest.chars()
                    .take(crate::auth::key::ID_LEN)
                    .collect::<String>()
            ),
            None => seg.chars().take(100).collect(),
        })
        .collect::<Vec<_>>()
        .join("/")
        .chars()
        .take(300)
        .collect()
}

/// Environment variables often hold secrets: below the role that may change them, callers see
/// their names only.
fn env_shown(ctx: &Ctx<'_>, project_id: i64, mut value: serde_json::Value) -> serde_json::Value {
    if !ctx
        .cp
        .auth
        .load()
        .allowed(&ctx.who, project_id, Action::EditProject)
    {
        if let Some(env) = value
            .get_mut("environment")
            .and_then(serde_json::Value::as_object_mut)
        {
            for v in env.values_mut() {
                *v = json!("(hidden)");
            }
        }
    }
    value
}

/// One API call: the control plane, the authenticated caller and where they called from.
pub(crate) struct Ctx<'a> {
    pub cp: &'a Arc<ControlPlane>,
    pub who: Principal,
    pub remote: Option<SocketAddr>,
}

impl Ctx<'_> {
    /// Checks a project action (and records a refusal).
    fn allow(&self, project_id: i64, action: Action) -> Result<(), ApiError> {
        self.cp
            .auth
            .authorize(&self.who, project_id, action, self.remote, &|| {
                format!("project:{project_id}")
            })
    }

    fn allow_site(&self, action: SiteAction) -> Result<(), ApiError> {
        self.cp.auth.authorize_site(&self.who, action, self.remote)
    }

    /// Records a change in the audit trail, durably, before the call answers.
    async fn audit(&self, action: &str, target: String, detail: String) -> Result<(), ApiError> {
        let event = AuditEvent {
            at: crate::now_rfc3339(),
            actor_id: Some(self.who.user_id),
            actor: self.who.username.to_string(),
            action: action.into(),
            target,
            outcome: "ok".into(),
            remote: self.remote.map(|a| a.to_string()).unwrap_or_default(),
            detail,
            ..Default::default()
        };
        let store = self.cp.store.clone();
        blocking(move || store.append_audit(&[event])).await
    }
}

pub async fn handle(
    cp: &Arc<ControlPlane>,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<Body> {
    let remote = Some(peer);
    let target = || format!("{} {}", req.method(), audit_path(req.uri().path()));
    let who = match cp.auth.authenticate(
        req.headers().get(http::header::AUTHORIZATION),
        remote,
        &target,
    ) {
        Ok(who) => who,
        Err(err) => return err.into_response(),
    };
    let ctx = Ctx { cp, who, remote };
    match route(&ctx, req).await {
        Ok(resp) => resp,
        Err(err) => err.into_response(),
    }
}

fn ok(status: StatusCode, value: serde_json::Value) -> Result<Response<Body>, ApiError> {
    Ok(json_response(
        status,
        serde_json::to_vec(&value).unwrap_or_default(),
    ))
}

fn id(segment: &str, what: &'static str) -> Result<i64, ApiError> {
    segment
        .parse()
        .map_err(|_| ApiError::ResourceNotFound(what))
}

async fn read_json<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = Limited::new(req.into_body(), MAX_JSON_BYTES)
        .collect()
        .await
        .map_err(|_| ApiError::TooLarge {
            limit: MAX_JSON_BYTES as u64,
        })?
        .to_bytes();
    let body: &[u8] = if body.is_empty() { b"{}" } else { &body };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))
}

async fn route(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let cp = ctx.cp;
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segs: Vec<&str> = path
        .strip_prefix("/api/v2")
        .unwrap_or("")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let method = req.method().clone();
    match (method, segs.as_slice()) {
        (Method::GET, ["projects"]) => {
            let store = cp.store.clone();
            let list = blocking(move || store.projects()).await?;
            // Everyone sees the projects they have a role on; site admins see all.
            let index = cp.auth.load();
            let list: Vec<_> = list
                .into_iter()
                .filter(|p| index.project_role(&ctx.who, p.id).is_some())
                .map(|p| env_shown(ctx, p.id, json!(p)))
                .collect();
            ok(StatusCode::OK, json!({ "projects": list }))
        }
        (Method::POST, ["projects"]) => {
            ctx.allow_site(SiteAction::CreateProject)?;
            create_project(ctx, read_json(req).await?).await
        }
        (Method::GET, ["projects", p]) => {
            let pid = id(p, "project")?;
            ctx.allow(pid, Action::View)?;
            let store = cp.store.clone();
            ok(
                StatusCode::OK,
                env_shown(ctx, pid, json!(blocking(move || store.project(pid)).await?)),
            )
        }
        (Method::PUT, ["projects", p, "files"]) => {
            let pid = id(p, "project")?;
            ctx.allow(pid, Action::UploadFiles)?;
            upload_files(cp, pid, req).await
        }
        (Method::PATCH, ["projects", p]) => {
            let pid = id(p, "project")?;
            ctx.allow(pid, Action::EditProject)?;
            let body: UpdateProject = read_json(req).await?;
            check_env(&body.environment)?;
            let store = cp.store.clone();
            let project =
                blocking(move || store.set_project_environment(pid, &body.environment)).await?;
            ok(StatusCode::OK, json!(project))
        }
        (method, ["projects", p, "collaborators", rest @ ..]) => {
            let pid = id(p, "project")?;
            identity::collaborators(ctx, method, pid, rest, req).await
        }
        (Method::GET, ["projects", p, "models"]) => {
            let pid = id(p, "project")?;
            ctx.allow(pid, Action::View)?;
            let store = cp.store.clone();
            let models = blocking(move || {
                store.project(pid)?;
                store.models(pid)
            })
            .await?;
            let list: Vec<_> = models.iter().map(model_json).collect();
            ok(StatusCode::OK, json!({ "models": list }))
        }
        (Method::POST, ["projects", p, "models"]) => {
            let pid = id(p, "project")?;
            ctx.allow(pid, Action::CreateModel)?;
            create_model(ctx, pid, read_json(req).await?).await
        }
        (method, ["projects", p, "models", m, rest @ ..]) => {
            let (pid, mid) = (id(p, "project")?, id(m, "model")?);
            ctx.allow(pid, model_action(&method, rest))?;
            let store = cp.store.clone();
            let model = blocking(move || {
                let model = store.model(mid)?;
                if model.project_id != pid {
                    return Err(modelgate_control::store::StoreError::NotFound("model"));
                }
                Ok(model)
            })
            .await?;
            model_routes(ctx, method, model, rest, req).await
        }
        (method, ["users", rest @ ..]) => identity::users(ctx, method, rest, req).await,
        (Method::GET, ["audit"]) => identity::audit(ctx, &req).await,
        (method, ["settings"]) => identity::settings(ctx, method, req).await,
        (_, _) => Err(ApiError::NotFound(path.chars().take(200).collect())),
    }
}

/// The action a request under a model performs, for the permission check made before the
/// model is even loaded (so a caller without a role learns nothing about what exists).
fn model_action(method: &Method, rest: &[&str]) -> Action {
    match (method, rest) {
        (&Method::GET, ["replicas", _, "logs"]) => Action::ReadReplicaLogs,
        (&Method::GET, _) => Action::View,
        (&Method::DELETE, []) => Action::DeleteModel,
        // PATCH may also need SetModelAuthentication, checked once the body is read.
        (&Method::PATCH, []) => Action::EditModel,
        (&Method::POST, ["access_key"]) => Action::RegenerateAccessKey,
        (&Method::POST, ["builds"]) => Action::Build,
        (&Method::POST, ["deployments"]) => Action::Deploy,
        (&Method::POST, ["deployments", _, "stop"]) => Action::StopDeployment,
        (&Method::POST, ["deployments", _, "restart"]) => Action::RestartDeployment,
        // Anything else is answered 404 by `model_routes`; viewers may learn that.
        _ => Action::View,
    }
}

async fn model_routes(
    ctx: &Ctx<'_>,
    method: Method,
    model: Model,
    rest: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let cp = ctx.cp;
    match (method, rest) {
        (Method::GET, []) => ok(StatusCode::OK, model_json(&model)),
        (Method::DELETE, []) => delete_model(cp, model).await,
        (Method::PATCH, []) => update_model(ctx, model, read_json(req).await?).await,
        (Method::POST, ["access_key"]) => {
            let key = crate::keys::generate_access_key();
            let store = cp.store.clone();
            let mid = model.id;
            let model = blocking(move || store.set_access_key(mid, &key)).await?;
            // Published before answering: the old key fails from the very next request.
            cp.publish().await?;
            ctx.audit(
                "model.access_key_regenerated",
                format!("model:{}", model.id),
                String::new(),
            )
            .await?;
            ok(StatusCode::OK, model_json(&model))
        }
        (Method::GET, ["builds"]) => {
            let store = cp.store.clone();
            let mid = model.id;
            let builds = blocking(move || store.builds(mid)).await?;
            ok(StatusCode::OK, json!({ "builds": builds }))
        }
        (Method::POST, ["builds"]) => create_build(cp, &model, read_json(req).await?).await,
        (Method::GET, ["builds", b]) => {
            let build = owned_build(cp, &model, b).await?;
            ok(StatusCode::OK, json!(build))
        }
        (Method::GET, ["builds", b, "log"]) => {
            let build = owned_build(cp, &model, b).await?;
            let query = |name: &str| {
                req.uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix(name)))
                    .map(str::to_owned)
            };
            let offset: u64 = query("offset=").and_then(|v| v.parse().ok()).unwrap_or(0);
            if query("follow=").as_deref() == Some("true") {
                return Ok(follow_build_log(cp, build, offset));
            }
            build_log(cp, &build, offset).await
        }
        (Method::GET, ["deployments"]) => {
            let store = cp.store.clone();
            let mid = model.id;
            let list = blocking(move || store.deployments(mid)).await?;
            let list: Vec<_> = list
                .into_iter()
                .map(|d| env_shown(ctx, model.project_id, json!(d)))
                .collect();
            ok(StatusCode::OK, json!({ "deployments": list }))
        }
        (Method::POST, ["deployments"]) => {
            create_deployment(cp, &model, read_json(req).await?).await
        }
        (Method::GET, ["deployments", d]) => {
            let dep = owned_deployment(cp, &model, d).await?;
            ok(StatusCode::OK, env_shown(ctx, model.project_id, json!(dep)))
        }
        (Method::POST, ["deployments", d, "stop"]) => {
            let dep = owned_deployment(cp, &model, d).await?;
            cp.stop_deployment(&dep).await?;
            let store = cp.store.clone();
            ok(
                StatusCode::OK,
                env_shown(
                    ctx,
                    model.project_id,
                    json!(blocking(move || store.deployment(dep.id)).await?),
                ),
            )
        }
        (Method::POST, ["deployments", d, "restart"]) => {
            let dep = owned_deployment(cp, &model, d).await?;
            // Restarting the model's latest deployment is an operator's job; bringing back an
            // older one is a rollback, which is deploying.
            let store = cp.store.clone();
            let mid = model.id;
            let latest = blocking(move || store.deployments(mid))
                .await?
                .iter()
                .map(|d| d.id)
                .max();
            if latest != Some(dep.id) {
                ctx.allow(model.project_id, Action::Deploy)?;
            }
            let cp2 = cp.clone();
            let dep2 = dep.clone();
            tokio::spawn(async move { cp2.run_deployment(dep2).await });
            ok(
                StatusCode::ACCEPTED,
                env_shown(ctx, model.project_id, json!(dep)),
            )
        }
        (Method::GET, ["replicas"]) => {
            let list = match cp.running(model.id).await {
                Some((dep, route)) => {
                    let store = cp.store.clone();
                    let deployment = blocking(move || store.deployment(dep)).await?;
                    let limits = &cp.replicas.limits;
                    let health = route.pool.health();
                    route
                        .slots
                        .iter()
                        .zip(health)
                        .map(|(s, h)| {
                            json!({
                                "id": &*s.id,
                                "deployment_id": dep,
                                "status": format!("{h:?}").to_lowercase(),
                                "pid": s.pgid(),
                                "memory_limit_mb": deployment.memory_mb,
                                "memory_enforcement": limits.enforcement().as_str(),
                                // Only a cgroup measures the whole process tree.
                                "memory_bytes": s.cgroup().and_then(|cg| cg.memory_current()),
                                "cpu": deployment.cpu,
                                "cpu_enforced": limits.cpu_enforced(deployment.cpu),
                            })
                        })
                        .collect()
                }
                None => Vec::new(),
            };
            ok(StatusCode::OK, json!({ "replicas": list }))
        }
        (Method::GET, ["replicas", r, "logs"]) => {
            let slots = cp
                .running(model.id)
                .await
                .map(|(_, route)| route.slots.clone())
                .unwrap_or_default();
            let slot = slots
                .iter()
                .find(|s| &*s.id == *r)
                .ok_or(ApiError::ResourceNotFound("replica"))?;
            ok(
                StatusCode::OK,
                json!({ "replica": &*slot.id, "lines": slot.log_lines() }),
            )
        }
        _ => Err(ApiError::NotFound(format!(
            "model resource {}",
            rest.join("/")
        ))),
    }
}

fn model_json(m: &Model) -> serde_json::Value {
    json!({
        "id": m.id,
        "project_id": m.project_id,
        "name": m.name,
        "description": m.description,
        "owner": m.owner,
        "access_key": m.access_key,
        "enable_authentication": m.enable_authentication,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateProject {
    name: String,
    #[serde(default)]
    description: String,
    /// A directory on the server holding the project's files.
    path: Option<PathBuf>,
}

async fn create_project(ctx: &Ctx<'_>, body: CreateProject) -> Result<Response<Body>, ApiError> {
    let cp = ctx.cp;
    let owner_id = ctx.who.user_id;
    if !valid_name(&body.name) {
        return Err(ApiError::InvalidRequest(
            "name must be 1-64 letters, digits, '-', '_' or '.'".into(),
        ));
    }
    if body.path.is_some() {
        ctx.allow_site(SiteAction::CreateProjectFromPath)?;
    }
    let source = match &body.path {
        Some(p) => {
            if !p.is_absolute() {
                return Err(ApiError::InvalidRequest("path must be absolute".into()));
            }
            let canon = p
                .canonicalize()
                .map_err(|e| ApiError::InvalidRequest(format!("path {}: {e}", p.display())))?;
            if !canon.is_dir() {
                return Err(ApiError::InvalidRequest(format!(
                    "path {} is not a directory",
                    p.display()
                )));
            }
            Some(canon)
        }
        // Files arrive later as an archive (PUT .../files) into a directory modelgate manages.
        None => None,
    };
    let store = cp.store.clone();
    let data_dir = cp.builds.data_dir.clone();
    let project: Project = blocking(move || {
        let project = store.create_project(NewProject {
            name: &body.name,
            description: &body.description,
            source_path: &source.as_deref().unwrap_or(Path::new("")).to_string_lossy(),
            owner_id: Some(owner_id),
        })?;
        if source.is_some() {
            return Ok(project);
        }
        let files = managed_files_dir(&data_dir, project.id);
        std::fs::create_dir_all(&files)
            .map_err(|e| modelgate_control::store::StoreError::Backend(e.to_string()))?;
        store.set_project_source(project.id, &files.to_string_lossy())
    })
    .await?;
    // The owner's admin role reaches the index before the caller can use it.
    cp.publish_auth().await?;
    ok(StatusCode::CREATED, json!(project))
}

/// Where the files of a project created without a server path live.
fn managed_files_dir(data_dir: &Path, project_id: i64) -> PathBuf {
    data_dir
        .join("projects")
        .join(project_id.to_string())
        .join("files")
}

/// `PUT /projects/{id}/files`: replaces a managed project's files with an uploaded tar or tar.gz.
async fn upload_files(
    cp: &Arc<ControlPlane>,
    pid: i64,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let store = cp.store.clone();
    let project = blocking(move || store.project(pid)).await?;
    let files = managed_files_dir(&cp.builds.data_dir, pid);
    let root = files.parent().expect("files dir has a parent").to_owned();
    if std::path::Path::new(&project.source_path) != files {
        return Err(ApiError::Conflict(
            "this project reads its files from a server directory; archives are only accepted by projects created without \"path\"".into(),
        ));
    }
    let limit = cp.builds.max_upload_bytes;
    if req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > limit)
    {
        return Err(ApiError::TooLarge { limit });
    }
    // Stream the upload to disk: an archive can be far larger than anything worth holding in memory.
    let staging = root.join(format!("upload-{}", rand_suffix()));
    std::fs::create_dir_all(&staging).map_err(|_| ApiError::Internal)?;
    let cleanup = StagingDir(staging.clone());
    let archive = staging.join("archive");
    {
        use tokio::io::AsyncWriteExt;
        let mut out = tokio::fs::File::create(&archive)
            .await
            .map_err(|_| ApiError::Internal)?;
        let mut body = Limited::new(
            req.into_body(),
            usize::try_from(limit).unwrap_or(usize::MAX),
        );
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    ApiError::TooLarge { limit }
                } else {
                    ApiError::InvalidRequest(format!("could not read the upload: {e}"))
                }
            })?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data).await.map_err(|_| ApiError::Internal)?;
            }
        }
        out.flush().await.map_err(|_| ApiError::Internal)?;
    }
    let limits = modelgate_control::archive::ArchiveLimits {
        max_total_bytes: cp.builds.max_project_bytes,
        max_file_bytes: cp.builds.max_file_bytes,
        max_entries: 100_000,
    };
    let unpacked = staging.join("files");
    let (a, u) = (archive.clone(), unpacked.clone());
    let entries =
        tokio::task::spawn_blocking(move || modelgate_control::archive::extract(&a, &u, limits))
            .await
            .map_err(|_| ApiError::Internal)?
            .map_err(|e| ApiError::InvalidRequest(format!("archive refused: {e}")))?;
    // Swap the new tree in; builds snapshot their sources, so none depends on the old tree.
    let old = root.join(format!("old-{}", rand_suffix()));
    let _ = std::fs::rename(&files, &old);
    std::fs::rename(&unpacked, &files).map_err(|_| ApiError::Internal)?;
    modelgate_control::builds::remove_tree(old).await;
    drop(cleanup);
    ok(
        StatusCode::OK,
        json!({ "project_id": pid, "entries": entries }),
    )
}

fn rand_suffix() -> String {
    crate::keys::generate_access_key()[..12].to_owned()
}

/// Removes a staging directory however the upload ends: on a blocking thread when a runtime is
/// there (a refused archive may have left many files), else at once.
struct StagingDir(PathBuf);

impl Drop for StagingDir {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.0);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || std::fs::remove_dir_all(path))),
            Err(_) => drop(std::fs::remove_dir_all(path)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateProject {
    /// Replaces the project's environment variables.
    environment: BTreeMap<String, String>,
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for k in env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ApiError::InvalidRequest(format!(
                "invalid environment variable name {k:?}"
            )));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateModel {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default = "yes")]
    enable_authentication: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateModel {
    description: Option<String>,
    enable_authentication: Option<bool>,
}

async fn update_model(
    ctx: &Ctx<'_>,
    model: Model,
    body: UpdateModel,
) -> Result<Response<Body>, ApiError> {
    if body.enable_authentication.is_some() {
        ctx.allow(model.project_id, Action::SetModelAuthentication)?;
    }
    let store = ctx.cp.store.clone();
    let mid = model.id;
    let auth = body.enable_authentication;
    let updated =
        blocking(move || store.update_model(mid, body.description.as_deref(), auth)).await?;
    if let Some(on) = auth {
        // In the snapshot before the answer (even when unchanged: a concurrent PATCH may have
        // published an older view), so the next call is checked, or not, accordingly.
        ctx.cp.publish().await?;
        if on != model.enable_authentication {
            ctx.audit(
                "model.authentication_changed",
                format!("model:{mid}"),
                format!("enable_authentication: {on}"),
            )
            .await?;
        }
    }
    ok(StatusCode::OK, model_json(&updated))
}

fn yes() -> bool {
    true
}

async fn create_model(
    ctx: &Ctx<'_>,
    pid: i64,
    body: CreateModel,
) -> Result<Response<Body>, ApiError> {
    let cp = ctx.cp;
    let owner = ctx.who.username.to_string();
    if !valid_name(&body.name) {
        return Err(ApiError::InvalidRequest(
            "name must be 1-64 letters, digits, '-', '_' or '.'".into(),
        ));
    }
    let key = crate::keys::generate_access_key();
    let store = cp.store.clone();
    let model = blocking(move || {
        store.create_model(NewModel {
            project_id: pid,
            name: &body.name,
            description: &body.description,
            owner: &owner,
            access_key: &key,
            enable_authentication: body.enable_authentication,
        })
    })
    .await?;
    cp.publish().await?;
    ok(StatusCode::CREATED, model_json(&model))
}

async fn delete_model(cp: &Arc<ControlPlane>, model: Model) -> Result<Response<Body>, ApiError> {
    let store = cp.store.clone();
    let mid = model.id;
    let deployments = blocking(move || store.deployments(mid)).await?;
    let active = deployments
        .iter()
        .any(|d| ds::ACTIVE.contains(&d.status.as_str()) || d.status == ds::STOPPING);
    if active || cp.running(model.id).await.is_some() {
        return Err(ApiError::Conflict(
            "the model has an active deployment; stop it before deleting the model".into(),
        ));
    }
    let store = cp.store.clone();
    let builds = blocking(move || {
        let builds = store.builds(mid)?;
        store.delete_model(mid)?;
        Ok(builds)
    })
    .await?;
    cp.publish().await?;
    for b in builds {
        modelgate_control::builds::remove_tree(BuildPaths::new(&cp.builds.data_dir, b.id).root)
            .await;
    }
    Ok(Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(crate::body::full(Bytes::new()))
        .expect("static response"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBuild {
    file_path: String,
    function_name: String,
}

async fn create_build(
    cp: &Arc<ControlPlane>,
    model: &Model,
    body: CreateBuild,
) -> Result<Response<Body>, ApiError> {
    let fp = std::path::Path::new(&body.file_path);
    if body.file_path.is_empty()
        || fp.is_absolute()
        || fp
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(ApiError::InvalidRequest(
            "file_path must be a relative path inside the project".into(),
        ));
    }
    if body.function_name.is_empty()
        || !body
            .function_name
            .chars()
            .all(|c| c == '_' || c.is_ascii_alphanumeric())
        || body.function_name.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(ApiError::InvalidRequest(
            "function_name must be a Python identifier".into(),
        ));
    }
    let store = cp.store.clone();
    let (mid, pid) = (model.id, model.project_id);
    let (project, build) = blocking(move || {
        let project = store.project(pid)?;
        let build = store.create_build(mid, &body.file_path, &body.function_name)?;
        Ok((project, build))
    })
    .await?;
    cp.spawn_build(build.id, PathBuf::from(project.source_path));
    ok(StatusCode::CREATED, json!(build))
}

async fn owned_build(cp: &Arc<ControlPlane>, model: &Model, b: &str) -> Result<Build, ApiError> {
    let bid = id(b, "build")?;
    let store = cp.store.clone();
    let build = blocking(move || store.build(bid)).await?;
    if build.model_id != model.id {
        return Err(ApiError::ResourceNotFound("build"));
    }
    Ok(build)
}

async fn owned_deployment(
    cp: &Arc<ControlPlane>,
    model: &Model,
    d: &str,
) -> Result<Deployment, ApiError> {
    let did = id(d, "deployment")?;
    let store = cp.store.clone();
    let dep = blocking(move || store.deployment(did)).await?;
    if dep.model_id != model.id {
        return Err(ApiError::ResourceNotFound("deployment"));
    }
    Ok(dep)
}

/// The build log from `offset` on, with the build status in headers so a client can follow it.
async fn build_log(
    cp: &Arc<ControlPlane>,
    build: &Build,
    offset: u64,
) -> Result<Response<Body>, ApiError> {
    let path = BuildPaths::new(&cp.builds.data_dir, build.id).log;
    let text = tokio::fs::read(&path).await.unwrap_or_default();
    let start = (offset as usize).min(text.len());
    let chunk = Bytes::copy_from_slice(&text[start..]);
    let finished = matches!(build.status, BuildStatus::Built | BuildStatus::Failed);
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("x-build-status", build.status.as_str())
        .header("x-build-finished", if finished { "true" } else { "false" })
        .header("x-log-next-offset", text.len().to_string())
        .body(crate::body::full(chunk))
        .expect("valid headers"))
}

/// The build log streamed as it is written, from `offset` until the build ends (bounded by
/// twice the build step timeout, and by the client going away).
fn follow_build_log(cp: &Arc<ControlPlane>, build: Build, offset: u64) -> Response<Body> {
    let (tx, body) = crate::body::channel(16);
    let path = BuildPaths::new(&cp.builds.data_dir, build.id).log;
    let store = cp.store.clone();
    let bound = cp.builds.step_timeout * 2;
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + bound;
        let mut offset = offset as usize;
        loop {
            // Status first, then the file: a build that ended has written all of its log.
            let bid = build.id;
            let s2 = store.clone();
            let finished = matches!(
                blocking(move || s2.build(bid)).await.map(|b| b.status),
                Ok(BuildStatus::Built | BuildStatus::Failed) | Err(_)
            );
            let text = tokio::fs::read(&path).await.unwrap_or_default();
            if text.len() > offset {
                if tx
                    .send(Bytes::copy_from_slice(&text[offset..]))
                    .await
                    .is_err()
                {
                    return;
                }
                offset = text.len();
            }
            if finished || tokio::time::Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(body)
        .expect("valid headers")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDeployment {
    build_id: i64,
    #[serde(default = "one")]
    replicas: i64,
    #[serde(default = "one_f")]
    cpu: f64,
    #[serde(default = "default_memory")]
    memory_mb: i64,
    #[serde(default)]
    environment: BTreeMap<String, String>,
}

fn one() -> i64 {
    1
}
fn one_f() -> f64 {
    1.0
}
fn default_memory() -> i64 {
    2048
}

async fn create_deployment(
    cp: &Arc<ControlPlane>,
    model: &Model,
    body: CreateDeployment,
) -> Result<Response<Body>, ApiError> {
    let max = i64::from(cp.deploy.max_replicas);
    if !(1..=max).contains(&body.replicas) {
        return Err(ApiError::InvalidRequest(format!(
            "replicas must be between 1 and {max} (server.max_replicas)"
        )));
    }
    if !(body.cpu.is_finite() && body.cpu > 0.0) || body.memory_mb < 64 {
        return Err(ApiError::InvalidRequest(
            "cpu must be positive and memory_mb at least 64".into(),
        ));
    }
    check_env(&body.environment)?;
    let build = owned_build(cp, model, &body.build_id.to_string()).await?;
    if build.status != BuildStatus::Built {
        return Err(ApiError::Conflict(format!(
            "build {} is {:?}, not built",
            build.build_number,
            build.status.as_str()
        )));
    }
    let store = cp.store.clone();
    let mid = model.id;
    let dep = blocking(move || {
        store.create_deployment(NewDeployment {
            model_id: mid,
            build_id: body.build_id,
            replicas: body.replicas,
            cpu: body.cpu,
            memory_mb: body.memory_mb,
            environment: &body.environment,
        })
    })
    .await?;
    let cp2 = cp.clone();
    let dep2 = dep.clone();
    tokio::spawn(async move { cp2.run_deployment(dep2).await });
    ok(StatusCode::CREATED, json!(dep))
}
