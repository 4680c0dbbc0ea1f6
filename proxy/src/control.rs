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
use modelgate_control::store::{deployment_status as ds, BuildStatus, Deployment, Store};
use tokio::sync::{watch, Mutex};

use crate::error::ApiError;
use crate::pool::Pool;
use crate::routing::{ModelMetrics, ModelRoute, Routes, RoutingSnapshot};
use crate::supervisor::{self, ModelReplicas, ModelSpec, ReplicaSettings};

/// Deployment settings that come from the server configuration.
#[derive(Debug, Clone)]
pub struct DeploySettings {
    pub max_queue: usize,
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
    replicas: Arc<ReplicaSettings>,
    routes: Arc<Routes>,
    /// Models declared in the configuration file, routed alongside the stored ones.
    statics: Vec<(String, Arc<ModelRoute>)>,
    running: Mutex<HashMap<i64, Running>>,
    /// Deploy, stop and restart run one at a time, so two of them never race on one model.
    transitions: Mutex<()>,
    starts: std::sync::atomic::AtomicU64,
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
        statics: Vec<(String, Arc<ModelRoute>)>,
    ) -> ControlPlane {
        ControlPlane {
            store,
            builds,
            deploy,
            replicas,
            routes,
            statics,
            running: Mutex::new(HashMap::new()),
            transitions: Mutex::new(()),
            starts: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Rebuilds the routing snapshot from the store and the running deployments.
    pub async fn publish(&self) -> Result<(), ApiError> {
        let store = self.store.clone();
        let models = blocking(move || store.all_models()).await?;
        let running = self.running.lock().await;
        let mut entries = self.statics.clone();
        for m in models {
            let route = match running.get(&m.id) {
                Some(r) => r.route.clone(),
                None => idle_route(&m.name),
            };
            entries.push((m.access_key, route));
        }
        self.routes.publish(RoutingSnapshot::new(entries));
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
        tokio::spawn(async move {
            let store = cp.store.clone();
            let Ok(build) =
                blocking(move || store.set_build_status(build_id, BuildStatus::Building, None))
                    .await
            else {
                return;
            };
            let paths = BuildPaths::new(&cp.builds.data_dir, build_id);
            let outcome = match BuildLog::create(&paths.log) {
                Ok(mut log) => builds::run_build(
                    &cp.builds,
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
            let store = cp.store.clone();
            let (status, digest) = match outcome {
                Ok(d) => (BuildStatus::Built, Some(d)),
                Err(why) => {
                    tracing::warn!(build = build_id, "build failed: {why}");
                    (BuildStatus::Failed, None)
                }
            };
            let _ =
                blocking(move || store.set_build_status(build_id, status, digest.as_deref())).await;
        });
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
        let (model, build) = blocking(move || Ok((store.model(model_id)?, store.build(build_id)?)))
            .await
            .map_err(|e| e.to_string())?;
        let paths = BuildPaths::new(&self.builds.data_dir, build.id);
        let digest = build.sha256.clone().ok_or("build has no digest")?;
        let src = paths.src.clone();
        tokio::task::spawn_blocking(move || builds::verify(&src, &digest))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;

        let start = self
            .starts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut env = self.deploy.global_env.clone();
        env.extend(dep.environment.clone());
        let spec = Arc::new(ModelSpec {
            name: model.name.as_str().into(),
            replica_prefix: format!("{}-{}-{}", model.name, dep.id, start),
            python_path: paths.deps_dir().into_iter().collect(),
            dir: paths.src.clone(),
            file: build.file_path.clone(),
            function: build.function_name.clone(),
            replicas: dep.replicas as usize,
            env,
        });
        let (stop, stop_rx) = watch::channel(false);
        let pool = Arc::new(Pool::new(
            spec.name.clone(),
            spec.replicas,
            self.deploy.max_queue,
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
        if let Some(old) = old {
            if old.deployment_id != dep.id {
                self.set_status(old.deployment_id, ds::STOPPED).await;
            }
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
        let mut newest: HashMap<i64, Deployment> = HashMap::new();
        for dep in active {
            if let Some(older) = newest.insert(dep.model_id, dep) {
                self.set_status(older.id, ds::STOPPED).await;
            }
        }
        for dep in newest.into_values() {
            tracing::info!(deployment = dep.id, "restoring deployment");
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

    /// Every slot of every running deployment, for metrics and replica listings.
    pub async fn deployment_slots(
        &self,
        model_id: i64,
    ) -> Option<(i64, Vec<Arc<crate::replica::Slot>>, Arc<Pool>)> {
        self.running.lock().await.get(&model_id).map(|r| {
            (
                r.deployment_id,
                r.replicas.slots.clone(),
                r.route.pool.clone(),
            )
        })
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

/// The route of a model without running replicas: every call gets 503.
fn idle_route(name: &str) -> Arc<ModelRoute> {
    let name: Arc<str> = name.into();
    Arc::new(ModelRoute {
        pool: Arc::new(Pool::new(name.clone(), 0, 1)),
        metrics: ModelMetrics::new(&name, &[]),
        slots: Vec::new(),
        name,
    })
}
