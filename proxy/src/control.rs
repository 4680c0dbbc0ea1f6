//! The live half of the control plane: runs builds and deployments and publishes the routing
//! snapshot that the request path reads.
//!
//! Every change that affects routing (a model created or deleted, an access key regenerated, a
//! deployment swapped in or stopped) ends with [`ControlPlane::publish`], which rebuilds the
//! snapshot from the store and the running deployments and swaps it in atomically. A model with
//! no running deployment still has a route: its pool has no replicas, so callers get 503.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use modelgate_control::builds::{self, BuildLog, BuildPaths, BuildSettings};
use modelgate_control::store::{
    deployment_status as ds, BuildStatus, Deployment, Model, NewDeployment, NewModel, NewProject,
    Project, Store, StoreError,
};
use tokio::sync::{watch, Mutex};

use crate::error::ApiError;
use crate::pool::Pool;
use crate::routing::{ModelMetrics, ModelRoute, RouteEntry, Routes, RoutingSnapshot};
use crate::supervisor::{self, ModelReplicas, ModelSpec, ReplicaSettings};

/// Deployment settings that come from the server configuration.
#[derive(Debug, Clone)]
pub struct DeploySettings {
    /// Queue limits and batching of every model's pool.
    pub queueing: crate::pool::Queueing,
    pub max_replicas: u32,
    /// How long new replicas get to become ready before the deployment fails.
    pub start_timeout: Duration,
    /// How long a replaced or stopped deployment gets to finish its requests.
    pub drain_timeout: Duration,
    /// Environment every replica gets (lowest precedence).
    pub global_env: std::collections::BTreeMap<String, String>,
}

pub struct ControlPlane {
    pub store: Arc<dyn Store>,
    pub builds: BuildSettings,
    pub deploy: DeploySettings,
    pub replicas: Arc<ReplicaSettings>,
    routes: Arc<Routes>,
    pub auth: Arc<crate::auth::Auth>,
    /// Held across read-and-swap, so an older view never replaces a newer one.
    publish_lock: Mutex<()>,
    auth_lock: Mutex<()>,
    /// Models declared in the configuration file: expected to serve, even while building.
    declared: std::sync::Mutex<std::collections::HashSet<i64>>,
    running: Mutex<HashMap<i64, Running>>,
    /// Deploy, stop and restart run one at a time, so two of them never race on one model.
    transitions: Mutex<()>,
}

/// A deployment whose replicas are running.
struct Running {
    deployment_id: i64,
    route: Arc<ModelRoute>,
    replicas: ModelReplicas,
    stop: watch::Sender<bool>,
}

/// Runs `f` on the blocking pool: store calls are synchronous.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, modelgate_control::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(ApiError::from)
}

impl ControlPlane {
    pub fn new(
        store: Arc<dyn Store>,
        builds: BuildSettings,
        deploy: DeploySettings,
        replicas: Arc<ReplicaSettings>,
        routes: Arc<Routes>,
        auth: Arc<crate::auth::Auth>,
    ) -> ControlPlane {
        ControlPlane {
            store,
            builds,
            deploy,
            replicas,
            routes,
            auth,
            publish_lock: Mutex::new(()),
            auth_lock: Mutex::new(()),
            declared: Default::default(),
            running: Mutex::new(HashMap::new()),
            transitions: Mutex::new(()),
        }
    }

    /// Rebuilds the routing snapshot from the store and the running deployments.
    pub async fn publish(&self) -> Result<(), ApiError> {
        let _serial = self.publish_lock.lock().await;
        let store = self.store.clone();
        let (models, active) =
            blocking(move || Ok((store.all_models()?, store.active_deployments()?))).await?;
        let mut expected: std::collections::HashSet<i64> =
            active.iter().map(|d| d.model_id).collect();
        expected.extend(
            self.declared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter(),
        );
        let running = self.running.lock().await;
        let mut entries = Vec::with_capacity(models.len());
        for m in models {
            let route = match running.get(&m.id) {
                Some(r) => r.route.clone(),
                None => idle_route(&m.name, expected.contains(&m.id)),
            };
            let entry = RouteEntry {
                route,
                project_id: m.project_id,
                authenticate: m.enable_authentication,
            };
            entries.push((m.access_key, entry));
        }
        self.routes.publish(RoutingSnapshot::new(entries));
        Ok(())
    }

    /// Rebuilds the authentication index from the store and swaps it in. Every change to users,
    /// keys or collaborators calls this before answering, so it holds from the next request.
    pub async fn publish_auth(&self) -> Result<(), ApiError> {
        let _serial = self.auth_lock.lock().await;
        let store = self.store.clone();
        let state = blocking(move || store.auth_state()).await?;
        self.auth
            .publish(crate::auth::AuthIndex::from_state(&state));
        Ok(())
    }

    /// The running deployment of a model, if any: (deployment id, route).
    pub async fn running(&self, model_id: i64) -> Option<(i64, Arc<ModelRoute>)> {
        self.running
            .lock()
            .await
            .get(&model_id)
            .map(|r| (r.deployment_id, r.route.clone()))
    }

    /// Runs a build in the background.
    pub fn spawn_build(self: &Arc<Self>, build_id: i64, source: PathBuf) {
        let cp = self.clone();
        tokio::spawn(async move { cp.execute_build(build_id, source).await });
    }

    /// Runs a build to its end; returns true when it built.
    pub async fn execute_build(&self, build_id: i64, source: PathBuf) -> bool {
        let store = self.store.clone();
        let Ok(build) =
            blocking(move || store.set_build_status(build_id, BuildStatus::Building, None)).await
        else {
            return false;
        };
        let paths = BuildPaths::new(&self.builds.data_dir, build_id);
        let outcome = match BuildLog::create(&paths.log) {
            Ok(mut log) => builds::run_build(
                &self.builds,
                &source,
                &paths,
                &build.file_path,
                &build.function_name,
                &mut log,
            )
            .await
            .map_err(|e| e.to_string()),
            Err(e) => Err(format!("cannot write the build log: {e}")),
        };
        let (status, digest) = match outcome {
            Ok(d) => (BuildStatus::Built, Some(d)),
            Err(why) => {
                // The log's tail goes to the server log too: operators look there first.
                let log = std::fs::read_to_string(&paths.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                tracing::warn!(build = build_id, "build failed: {why}\n{tail}");
                (BuildStatus::Failed, None)
            }
        };
        let store = self.store.clone();
        let _ = blocking(move || store.set_build_status(build_id, status, digest.as_deref())).await;
        status == BuildStatus::Built
    }

    /// Makes the models of the configuration file ordinary projects, models, builds and
    /// deployments: each is rebuilt from its directory and deployed in the background.
    /// Returns, per model, the access key to show (None when the configuration sets it).
    pub async fn declare(
        self: &Arc<Self>,
        models: &[crate::config::ModelConfig],
        owner_id: i64,
    ) -> Result<Vec<(String, Option<String>)>, ApiError> {
        let mut shown = Vec::new();
        for cfg in models {
            let store = self.store.clone();
            let c = cfg.clone();
            let (project, model) =
                blocking(move || upsert_declared(&*store, &c, Some(owner_id))).await?;
            self.declared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(model.id);
            let key = cfg.access_key.is_none().then(|| model.access_key.clone());
            shown.push((cfg.name.clone(), key));
            let cp = self.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move {
                cp.build_and_deploy(&cfg, model.id, PathBuf::from(project.source_path))
                    .await
            });
        }
        self.publish().await?;
        Ok(shown)
    }

    async fn build_and_deploy(
        self: &Arc<Self>,
        cfg: &crate::config::ModelConfig,
        model_id: i64,
        source: PathBuf,
    ) {
        // An unchanged model is not rebuilt at every start: the newest intact build that started
        // from the same inputs is deployed again.
        let extra = format!("{}:{}:{:?}", cfg.file, cfg.function, self.builds.python);
        let (src, data_dir) = (source.clone(), self.builds.data_dir.clone());
        let fingerprint =
            tokio::task::spawn_blocking(move || builds::fingerprint(&src, &data_dir, &extra))
                .await
                .ok()
                .and_then(Result::ok);
        if let Some(build) = self.reusable_build(model_id, fingerprint.as_deref()).await {
            tracing::info!(model = %cfg.name, build = build.build_number, "unchanged since this build; deploying it again");
            self.deploy_declared(cfg, model_id, build.id).await;
            return;
        }
        let store = self.store.clone();
        let (file, function) = (cfg.file.clone(), cfg.function.clone());
        let Ok(build) = blocking(move || store.create_build(model_id, &file, &function)).await
        else {
            return;
        };
        tracing::info!(model = %cfg.name, build = build.build_number, "building declared model");
        if let Some(fp) = fingerprint {
            let store = self.store.clone();
            let _ = blocking(move || store.set_build_source(build.id, &fp)).await;
        }
        if !self.execute_build(build.id, source).await {
            // Keep serving what served before (say the package index is unreachable at start):
            // the newest deployment that was active when modelgate last stopped.
            let store = self.store.clone();
            let previous = blocking(move || store.active_deployments()).await;
            if let Some(dep) = previous
                .ok()
                .and_then(|all| all.into_iter().rev().find(|d| d.model_id == model_id))
            {
                tracing::warn!(model = %cfg.name, deployment = dep.id, "build failed; restoring the previous deployment");
                self.run_deployment(dep).await;
            }
            return;
        }
        self.deploy_declared(cfg, model_id, build.id).await;
    }

    /// The newest built build of a model that started from `fingerprint` and whose artifact is
    /// intact.
    async fn reusable_build(
        &self,
        model_id: i64,
        fingerprint: Option<&str>,
    ) -> Option<modelgate_control::store::Build> {
        let fingerprint = fingerprint?.to_owned();
        let store = self.store.clone();
        let candidate = blocking(move || store.builds(model_id))
            .await
            .ok()?
            .into_iter()
            .rev()
            .find(|b| {
                b.status == BuildStatus::Built
                    && b.source_sha256.as_deref() == Some(fingerprint.as_str())
            })?;
        let src = BuildPaths::new(&self.builds.data_dir, candidate.id).src;
        let digest = candidate.sha256.clone()?;
        tokio::task::spawn_blocking(move || builds::verify(&src, &digest))
            .await
            .ok()?
            .ok()?;
        Some(candidate)
    }

    async fn deploy_declared(
        self: &Arc<Self>,
        cfg: &crate::config::ModelConfig,
        model_id: i64,
        build_id: i64,
    ) {
        let store = self.store.clone();
        let (env, replicas) = (cfg.env.clone(), i64::from(cfg.replicas));
        let created = blocking(move || {
            store.create_deployment(NewDeployment {
                model_id,
                build_id,
                replicas,
                cpu: 1.0,
                memory_mb: 2048,
                environment: &env,
            })
        })
        .await;
        if let Ok(dep) = created {
            self.run_deployment(dep).await;
        }
    }

    /// Starts a deployment's replicas and, once all are ready, swaps it in for the model's current
    /// one, which then drains and stops. On failure the current one keeps serving.
    pub async fn run_deployment(self: &Arc<Self>, dep: Deployment) {
        let _transition = self.transitions.lock().await;
        if let Err(why) = self.start_and_swap(&dep).await {
            tracing::warn!(deployment = dep.id, "deployment failed: {why}");
            self.set_status(dep.id, ds::FAILED).await;
        }
    }

    async fn set_status(&self, id: i64, status: &'static str) {
        let store = self.store.clone();
        let _ = blocking(move || store.set_deployment_status(id, status)).await;
    }

    async fn start_and_swap(self: &Arc<Self>, dep: &Deployment) -> Result<(), String> {
        self.set_status(dep.id, ds::DEPLOYING).await;
        let store = self.store.clone();
        let (model_id, build_id) = (dep.model_id, dep.build_id);
        let (model, build, project) = blocking(move || {
            let model = store.model(model_id)?;
            let project = store.project(model.project_id)?;
            Ok((model, store.build(build_id)?, project))
        })
        .await
        .map_err(|e| e.to_string())?;
        let paths = BuildPaths::new(&self.builds.data_dir, build.id);
        let digest = build.sha256.clone().ok_or("build has no digest")?;
        let src = paths.src.clone();
        tokio::task::spawn_blocking(move || builds::verify(&src, &digest))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;

        // Precedence: deployment > project > global.
        let mut env = self.deploy.global_env.clone();
        env.extend(project.environment);
        env.extend(dep.environment.clone());
        let spec = Arc::new(ModelSpec {
            name: model.name.as_str().into(),
            python_path: paths.deps_dir().into_iter().collect(),
            dir: paths.src.clone(),
            file: build.file_path.clone(),
            function: build.function_name.clone(),
            replicas: dep.replicas as usize,
            env,
            memory_limit_bytes: Some(dep.memory_mb as u64 * 1024 * 1024),
            cpu: Some(dep.cpu),
        });
        let (stop, stop_rx) = watch::channel(false);
        let pool = Arc::new(Pool::new(
            spec.name.clone(),
            spec.replicas,
            self.deploy.queueing,
        ));
        let replicas =
            supervisor::start_model(spec.clone(), pool.clone(), self.replicas.clone(), stop_rx);
        let deadline = tokio::time::Instant::now() + self.deploy.start_timeout;
        let outcome = loop {
            if pool.ready_count() == spec.replicas {
                break Ok(());
            }
            if pool.any_failed() {
                break Err("a replica failed to start (see the replica log)".to_string());
            }
            if tokio::time::Instant::now() >= deadline {
                break Err(format!(
                    "replicas not ready within {:?}",
                    self.deploy.start_timeout
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if let Err(why) = outcome {
            let _ = stop.send(true);
            replicas.join().await;
            return Err(why);
        }
        let route = Arc::new(ModelRoute {
            name: spec.name.clone(),
            pool,
            metrics: ModelMetrics::new(&spec.name, &replicas.slots),
            slots: replicas.slots.clone(),
            expected_ready: true,
        });
        let old = self.running.lock().await.insert(
            model.id,
            Running {
                deployment_id: dep.id,
                route,
                replicas,
                stop,
            },
        );
        self.publish().await.map_err(|e| e.to_string())?;
        self.set_status(dep.id, ds::DEPLOYED).await;
        tracing::info!(deployment = dep.id, model = %model.name, "deployment serving");
        // Exactly one active deployment per model: every other one is now stopped.
        let store = self.store.clone();
        let (mid, did) = (model.id, dep.id);
        let _ = blocking(move || {
            for other in store.deployments(mid)? {
                if other.id != did && other.status != ds::STOPPED && other.status != ds::FAILED {
                    store.set_deployment_status(other.id, ds::STOPPED)?;
                }
            }
            Ok(())
        })
        .await;
        if let Some(old) = old {
            tokio::spawn(drain_and_stop(old, self.deploy.drain_timeout));
        }
        Ok(())
    }

    /// Stops a deployment: it stops taking requests, finishes those it has, and its replicas end.
    pub async fn stop_deployment(&self, dep: &Deployment) -> Result<(), ApiError> {
        let _transition = self.transitions.lock().await;
        self.set_status(dep.id, ds::STOPPING).await;
        let removed = {
            let mut running = self.running.lock().await;
            match running.get(&dep.model_id) {
                Some(r) if r.deployment_id == dep.id => running.remove(&dep.model_id),
                _ => None,
            }
        };
        self.publish().await?;
        if let Some(old) = removed {
            drain_and_stop(old, self.deploy.drain_timeout).await;
        }
        self.set_status(dep.id, ds::STOPPED).await;
        Ok(())
    }

    /// Restores, at start-up, every deployment that was active when modelgate stopped. Only the
    /// newest active deployment of a model is restored; older ones are marked stopped.
    pub async fn restore(self: &Arc<Self>) -> Result<(), ApiError> {
        let store = self.store.clone();
        let active = blocking(move || store.active_deployments()).await?;
        let declared = self
            .declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut newest: HashMap<i64, Deployment> = HashMap::new();
        // Declared models are rebuilt and redeployed from the configuration instead.
        for dep in active
            .into_iter()
            .filter(|d| !declared.contains(&d.model_id))
        {
            if let Some(older) = newest.insert(dep.model_id, dep) {
                self.set_status(older.id, ds::STOPPED).await;
            }
        }
        for dep in newest.into_values() {
            tracing::info!(deployment = dep.id, "restoring deployment");
            // Before the API answers: a restored deployment has no replica yet, so it must not
            // read "deployed" until they are ready again.
            self.set_status(dep.id, ds::DEPLOYING).await;
            let cp = self.clone();
            tokio::spawn(async move { cp.run_deployment(dep).await });
        }
        Ok(())
    }

    /// Stops every running deployment (shutdown); statuses stay as they are so they are restored.
    pub async fn shutdown(&self) {
        let all: Vec<Running> = self.running.lock().await.drain().map(|(_, r)| r).collect();
        for r in &all {
            let _ = r.stop.send(true);
        }
        for r in all {
            r.replicas.join().await;
        }
    }
}

/// Waits (bounded) until a replaced deployment has no request queued or in flight, then stops it.
async fn drain_and_stop(old: Running, bound: Duration) {
    // Requests that loaded the previous snapshot just before the swap may still be on their way
    // to this pool; give them a moment to join its queue.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let deadline = tokio::time::Instant::now() + bound;
    while !old.route.pool.drained() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = old.stop.send(true);
    old.replicas.join().await;
}

/// The route of a model without running replicas: every call gets 503. `expected_ready` says
/// whether it should be serving (declared, or a deployment is on its way), for `/readyz`.
fn idle_route(name: &str, expected_ready: bool) -> Arc<ModelRoute> {
    let name: Arc<str> = name.into();
    Arc::new(ModelRoute {
        pool: Arc::new(Pool::new(name.clone(), 0, Default::default())),
        metrics: ModelMetrics::new(&name, &[]),
        slots: Vec::new(),
        expected_ready,
        name,
    })
}

/// Finds or creates the project and model of a model declared in the configuration.
fn upsert_declared(
    store: &dyn Store,
    cfg: &crate::config::ModelConfig,
    owner_id: Option<i64>,
) -> Result<(Project, Model), StoreError> {
    let dir = cfg.path.canonicalize().unwrap_or_else(|_| cfg.path.clone());
    let dir = dir.to_string_lossy();
    let project = match store.projects()?.into_iter().find(|p| p.name == cfg.name) {
        Some(p) if p.source_path == dir => p,
        Some(p) => store.set_project_source(p.id, &dir)?,
        None => store.create_project(NewProject {
            name: &cfg.name,
            description: "declared in the configuration file",
            source_path: &dir,
            owner_id,
        })?,
    };
    let model = match store
        .models(project.id)?
        .into_iter()
        .find(|m| m.name == cfg.name)
    {
        Some(m) => m,
        None => {
            let key = cfg
                .access_key
                .clone()
                .unwrap_or_else(crate::keys::generate_access_key);
            store.create_model(NewModel {
                project_id: project.id,
                name: &cfg.name,
                description: "",
                owner: "config",
                access_key: &key,
                enable_authentication: cfg.enable_authentication,
            })?
        }
    };
    let model = match &cfg.access_key {
        Some(k) if *k != model.access_key => store.set_access_key(model.id, k)?,
        _ => model,
    };
    // The configuration stays the source of truth for what it declares.
    let model = if model.enable_authentication != cfg.enable_authentication {
        store.update_model(model.id, None, Some(cfg.enable_authentication))?
    } else {
        model
    };
    Ok((project, model))
}
