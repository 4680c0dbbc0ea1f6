//! modelgate's data plane: the HTTP proxy, the per-model queues and the replica supervisor.
//!
//! [`run`] wires them together from a validated [`config::Config`]. The binary in `main.rs` is a
//! thin CLI over it.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod body;
pub mod cgroup;
pub mod config;
pub mod control;
pub mod dispatch;
pub mod drain;
pub mod early;
pub mod envelope;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod keys;
pub mod metrics;
pub mod pool;
pub mod predict;
pub mod replica;
pub mod routing;
pub mod server;
pub mod supervisor;
pub mod timer;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use modelgate_control::builds::BuildSettings;
use modelgate_control::store::{SqliteStore, Store};

use crate::config::Config;
use crate::control::{ControlPlane, DeploySettings};
use crate::predict::PredictLimits;
use crate::routing::Routes;
use crate::server::{App, ConnSettings};
use crate::supervisor::ReplicaSettings;

/// Entries of `parent` named `modelgate-<pid>` or `modelgate-<pid>-…` whose process no longer
/// exists: what a modelgate killed with SIGKILL left behind (socket directories, cgroups).
pub(crate) fn left_by_dead_modelgates(parent: &std::path::Path) -> Vec<std::fs::DirEntry> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix("modelgate-"))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect()
}

/// Now, as an RFC 3339 timestamp (UTC).
pub fn now_rfc3339() -> String {
    modelgate_control::store::now()
}

/// Runs the server on `listener` until `shutdown` resolves, then drains requests and stops every
/// replica process before returning.
pub async fn run(
    config: Config,
    listener: TcpListener,
    runtime: PathBuf,
    metrics: crate::metrics::Handle,
    admin_key: Option<String>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let server = &config.server;
    let data_dir = server.data_dir();
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let store: Arc<dyn Store> = {
        let path = data_dir.join("modelgate.db");
        Arc::new(tokio::task::spawn_blocking(move || SqliteStore::open(&path)).await??)
    };
    tracing::info!(data_dir = %data_dir.display(), "store open");

    let socket_dir = keys::private_runtime_dir()?;
    let limits = cgroup::Limits::detect(server.replica_limits)?;
    let settings = Arc::new(ReplicaSettings::new(
        runtime.clone(),
        socket_dir.clone(),
        server.replica_start_timeout(),
        limits,
        server.max_request_bytes,
    ));

    let admin_id = {
        let store = store.clone();
        let dir = data_dir.clone();
        let provided = admin_key;
        tokio::task::spawn_blocking(move || {
            auth::bootstrap_admin(&*store, &dir, provided.as_deref())
        })
        .await??
    };
    let (auth, audit_rx) = auth::Auth::new();
    tokio::spawn(auth::run_audit_writer(store.clone(), audit_rx));

    let routes = Arc::new(Routes::default());
    let control = Arc::new(ControlPlane::new(
        store,
        BuildSettings {
            data_dir: data_dir.clone(),
            python: config.builds.python.clone(),
            replica_runtime: runtime,
            max_file_bytes: config.builds.max_file_bytes,
            step_timeout: std::time::Duration::from_secs_f64(config.builds.timeout_secs),
            max_upload_bytes: config.builds.max_upload_bytes,
            max_project_bytes: config.builds.max_project_bytes,
        },
        DeploySettings {
            queueing: pool::Queueing {
                max_queue: server.max_queue,
                timeout: server.queue_timeout(),
                batching: pool::Batching {
                    max: server.max_batch,
                    budget: std::time::Duration::from_micros(server.batch_budget_us),
                },
            },
            max_replicas: server.max_replicas,
            start_timeout: server.replica_start_timeout(),
            drain_timeout: server.shutdown_grace(),
            global_env: server.env.clone(),
        },
        settings.clone(),
        routes.clone(),
        auth.clone(),
    ));
    control
        .publish_auth()
        .await
        .map_err(|e| anyhow::anyhow!("loading users and keys: {e}"))?;
    {
        let cp = control.clone();
        tokio::spawn(auth::run_sweeper(
            cp.store.clone(),
            auth.clone(),
            move |changed| {
                let cp = cp.clone();
                async move {
                    if changed {
                        tracing::info!(
                            "the store was changed by another process; reloading users and keys"
                        );
                    } else {
                        tracing::debug!("periodic reload of users and keys");
                    }
                    if let Err(e) = cp.publish_auth().await {
                        tracing::error!("reloading users and keys: {e}");
                    }
                }
            },
        ));
    }
    // Declared models first, so that restoring skips them: they are rebuilt from their directory.
    let shown = control
        .declare(&config.models, admin_id)
        .await
        .map_err(|e| anyhow::anyhow!("declaring the configured models: {e}"))?;
    control
        .restore()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (name, key) in shown {
        match key {
            Some(key) => println!(
                "model {name:?}: access key {key} (set access_key in the config to choose it)"
            ),
            None => println!("model {name:?}: access key from the configuration"),
        }
    }
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("modelgate listening on {scheme}://{addr}");
    tracing::info!(%addr, scheme, "listening");

    let metrics_listener = match &server.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (metrics_listen): {e}"))?,
        ),
        None => None,
    };
    if let Some(l) = &metrics_listener {
        println!("modelgate metrics on {scheme}://{}", l.local_addr()?);
    }
    let app = Arc::new(App {
        routes: routes.clone(),
        auth: auth.clone(),
        control: control.clone(),
        serves: if metrics_listener.is_some() {
            server::Serves::EverythingButMetrics
        } else {
            server::Serves::Everything
        },
        panic_failpoint: cfg!(debug_assertions)
            && std::env::var_os("MODELGATE_TEST_FAILPOINTS").is_some(),
        limits: PredictLimits {
            max_request_bytes: server.max_request_bytes,
            request_timeout: server.request_timeout(),
            body_timeout: server.body_read_timeout(),
        },
        metrics,
    });
    let conn = ConnSettings {
        header_read_timeout: server.header_read_timeout(),
        max_connections: server.max_connections,
        max_concurrent_streams: server.max_concurrent_streams,
        shutdown_grace: server.shutdown_grace(),
    };
    // One shutdown signal for every listener.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let metrics_server = metrics_listener.map(|listener| {
        let app = Arc::new(App {
            serves: server::Serves::MetricsAndProbes,
            ..(*app).clone()
        });
        tokio::spawn(server::serve(
            app,
            listener,
            conn,
            tls.clone(),
            stopped(stop_rx.clone()),
        ))
    });
    let main_server = server::serve(app, listener, conn, tls, stopped(stop_rx));
    tokio::pin!(main_server);
    tokio::select! {
        _ = &mut main_server => {}
        _ = shutdown => {
            let _ = stop_tx.send(true);
            main_server.await;
        }
    }
    let _ = stop_tx.send(true);
    if let Some(m) = metrics_server {
        let _ = m.await;
    }

    tracing::info!("stopping replicas");
    control.shutdown().await;
    settings.limits.remove();
    auth.flush().await;
    let _ = std::fs::remove_dir_all(&socket_dir);
    tracing::info!("stopped");
    Ok(())
}
