//! modelgate's data plane: the HTTP proxy, the per-model queues and the replica supervisor.
//!
//! [`run`] wires them together from a validated [`config::Config`]. The binary in `main.rs` is a
//! thin CLI over it.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod pool;
pub mod predict;
pub mod replica;
pub mod routing;
pub mod server;
pub mod supervisor;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::pool::Pool;
use crate::predict::PredictLimits;
use crate::routing::{ModelMetrics, ModelRoute, Routes, RoutingSnapshot};
use crate::server::{App, ConnSettings};
use crate::supervisor::{ModelSpec, ReplicaSettings};

/// A model as it will be served, with its access key settled.
pub struct ServedModel {
    pub spec: ModelSpec,
    pub access_key: String,
    /// True when the key was generated at start-up (and so must be shown to the operator).
    pub generated_key: bool,
}

/// Settles access keys: the configured one, or a fresh random one.
pub fn served_models(config: &Config) -> Vec<ServedModel> {
    config
        .models
        .iter()
        .map(|m| ServedModel {
            spec: ModelSpec {
                name: m.name.as_str().into(),
                dir: m.path.clone(),
                file: m.file.clone(),
                function: m.function.clone(),
                replicas: m.replicas as usize,
                env: m.env.clone(),
            },
            generated_key: m.access_key.is_none(),
            access_key: m
                .access_key
                .clone()
                .unwrap_or_else(keys::generate_access_key),
        })
        .collect()
}

/// Runs the server on `listener` until `shutdown` resolves, then drains requests and stops every
/// replica process before returning.
pub async fn run(
    config: Config,
    models: Vec<ServedModel>,
    listener: TcpListener,
    runtime: PathBuf,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let server = &config.server;
    let socket_dir = keys::private_runtime_dir()?;
    let settings = Arc::new(ReplicaSettings::new(
        runtime,
        socket_dir.clone(),
        server.replica_start_timeout(),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let mut running = Vec::new();
    let mut entries = Vec::new();
    for model in models {
        let spec = Arc::new(model.spec);
        let pool = Arc::new(Pool::new(
            spec.name.clone(),
            spec.replicas,
            server.max_queue,
        ));
        let replicas = supervisor::start_model(
            spec.clone(),
            pool.clone(),
            settings.clone(),
            stop_rx.clone(),
        );
        let route = Arc::new(ModelRoute {
            name: spec.name.clone(),
            pool,
            metrics: ModelMetrics::new(&spec.name, &replicas.slots),
            slots: replicas.slots.clone(),
        });
        entries.push((model.access_key, route));
        running.push(replicas);
    }
    let routes = Arc::new(Routes::default());
    routes.publish(RoutingSnapshot::new(entries));

    let app = Arc::new(App {
        routes: routes.clone(),
        limits: PredictLimits {
            max_request_bytes: server.max_request_bytes,
            request_timeout: server.request_timeout(),
            queue_timeout: server.queue_timeout(),
        },
        metrics,
    });
    let conn = ConnSettings {
        header_read_timeout: server.header_read_timeout(),
        max_concurrent_streams: server.max_concurrent_streams,
        shutdown_grace: server.shutdown_grace(),
    };
    server::serve(app, listener, conn, shutdown).await;

    tracing::info!("stopping replicas");
    let _ = stop_tx.send(true);
    for replicas in running {
        replicas.join().await;
    }
    let _ = std::fs::remove_dir_all(&socket_dir);
    tracing::info!("stopped");
    Ok(())
}
