//! The HTTP front: the tower stack (assembled here and only here), the routes, and the listener
//! with its connection settings and graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::{json_response, ApiError, Body};
use crate::predict::{self, PredictLimits};
use crate::routing::Routes;

/// Shared state of the HTTP front.
pub struct App {
    pub routes: Arc<Routes>,
    /// The control plane, whose REST API is served under `/api/v2` when `api_enabled`.
    pub control: Arc<crate::control::ControlPlane>,
    pub api_enabled: bool,
    pub limits: PredictLimits,
    pub metrics: PrometheusHandle,
}

/// Connection-level settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    pub header_read_timeout: Duration,
    pub max_concurrent_streams: u32,
    pub shutdown_grace: Duration,
}

impl App {
    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/model") => predict::handle(&self.routes, self.limits, req).await,
            (_, "/model") => ApiError::MethodNotAllowed { allowed: "POST" }.into_response(),
            (_, path) if path == "/api/v2" || path.starts_with("/api/v2/") => {
                if self.api_enabled {
                    crate::api::handle(&self.control, req).await
                } else {
                    ApiError::NotFound("/api/v2 (the API is served on loopback listeners only until API keys exist)".into()).into_response()
                }
            }
            (&Method::GET, "/metrics") => self.render_metrics(),
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, &br#"{"status":"ok"}"#[..]),
            (&Method::GET, "/readyz") => self.readiness(),
            (_, "/metrics" | "/healthz" | "/readyz") => {
                ApiError::MethodNotAllowed { allowed: "GET" }.into_response()
            }
            (_, path) => ApiError::NotFound(path.chars().take(200).collect()).into_response(),
        }
    }

    fn render_metrics(&self) -> Response<Body> {
        let snapshot = self.routes.load();
        let mut text = self.metrics.render();
        crate::metrics::render_replicas(
            &mut text,
            snapshot
                .models()
                .iter()
                .flat_map(|m| m.slots.iter().map(|s| &**s)),
        );
        let mut resp = Response::new(crate::body::full(text));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }

    fn readiness(&self) -> Response<Body> {
        let snapshot = self.routes.load();
        let not_ready: Vec<&str> = snapshot
            .models()
            .iter()
            // Models with no replicas (stopped, never deployed) are not expected to be ready.
            .filter(|m| m.expected_ready && m.pool.ready_count() == 0)
            .map(|m| &*m.name)
            .collect();
        let ready = not_ready.is_empty();
        let body = serde_json::json!({ "ready": ready, "not_ready": not_ready });
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(status, serde_json::to_vec(&body).unwrap_or_default())
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    tracing::error!("request handler panicked");
    ApiError::Internal.into_response()
}

/// Serves HTTP/1.1 and cleartext HTTP/2 on `listener` until `shutdown` resolves, then stops
/// accepting and gives open connections `shutdown_grace` to finish their requests.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    settings: ConnSettings,
    shutdown: impl Future<Output = ()>,
) {
    let service = ServiceBuilder::new()
        // Outermost: a panic anywhere below fails only its own request, with a JSON 500.
        .layer(CatchPanicLayer::custom(panic_response))
        .service(tower::service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.route(req).await) }
        }));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // The timer is what makes the header-read timeout fire at all.
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams);

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // Usually descriptor exhaustion: back off instead of spinning.
                    tracing::warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            )
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!("connection ended with error: {err}");
            }
        });
    }
    drop(listener);
    tracing::info!(
        "stopped accepting; draining connections for up to {:?}",
        settings.shutdown_grace
    );
    if tokio::time::timeout(settings.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain bound reached with requests still open; closing them");
    }
}
