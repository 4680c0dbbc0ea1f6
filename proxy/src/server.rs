//! The HTTP front: the tower stack (assembled here and only here), the routes, and the listener
//! with its connection settings and graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::{json_response, ApiError, Body};
use crate::predict::{self, PredictLimits};
use crate::routing::Routes;
use crate::timer::CoarseTimer;

/// Shared state of the HTTP front.
#[derive(Clone)]
pub struct App {
    pub routes: Arc<Routes>,
    pub auth: Arc<crate::auth::Auth>,
    /// The control plane, whose REST API is served under `/api/v2`.
    pub control: Arc<crate::control::ControlPlane>,
    /// What this listener serves.
    pub serves: Serves,
    /// Debug builds only, with `MODELGATE_TEST_FAILPOINTS` set: `GET /__test/panic` panics, so
    /// tests can prove a panic fails one request and not the process.
    pub panic_failpoint: bool,
    pub limits: PredictLimits,
    pub metrics: crate::metrics::Handle,
}

/// Which routes a listener serves: the main one everything (without `/metrics` when a
/// metrics listener exists), the metrics listener only `/metrics` and the probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serves {
    Everything,
    EverythingButMetrics,
    MetricsAndProbes,
}

/// Connection-level settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    pub header_read_timeout: Duration,
    /// Connections served at once; accepting pauses at the limit.
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub shutdown_grace: Duration,
}

/// The future of one request: an answer decided while routing, or the state machine of a
/// prediction or an API call, boxed. Routing happens in the service's `call`, so what hyper keeps
/// per request and moves between the layers is this small enum, not the request and the
/// layers' state around it.
pub enum Routed {
    Ready(Option<Response<Body>>),
    Boxed(Pin<Box<dyn Future<Output = Response<Body>> + Send>>),
}

impl Future for Routed {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Routed::Ready(resp) => Poll::Ready(Ok(resp.take().expect("polled after completion"))),
            Routed::Boxed(fut) => fut.as_mut().poll(cx).map(Ok),
        }
    }
}

/// `GET /metrics`, rendered on a blocking thread, one render at a time
/// ([`crate::metrics::Handle::render_turn`]). Rendered on the runtime's thread, a scrape of 1,000
/// models stalled every prediction that thread served for 30–60 ms (`loadtests/scrape-cost.sh`).
async fn render_metrics(metrics: crate::metrics::Handle, routes: Arc<Routes>) -> Response<Body> {
    let turn = metrics.render_turn().await;
    let render = move || {
        let _turn = turn;
        let snapshot = routes.load();
        let mut text = metrics.render();
        crate::metrics::render_replicas(
            &mut text,
            snapshot
                .models()
                .iter()
                .flat_map(|m| m.slots.iter().map(|s| &**s)),
        );
        text
    };
    let Ok(text) = tokio::task::spawn_blocking(render).await else {
        // The render panicked, or the runtime is shutting down.
        return ApiError::Internal.into_response();
    };
    let mut resp = Response::new(crate::body::full(text));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

impl App {
    fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Routed {
        if cfg!(debug_assertions) && self.panic_failpoint && req.uri().path() == "/__test/panic" {
            panic!("failpoint /__test/panic");
        }
        let ready = |resp| Routed::Ready(Some(resp));
        match (self.serves, req.uri().path()) {
            (Serves::MetricsAndProbes, "/metrics" | "/healthz" | "/readyz") => {}
            (Serves::MetricsAndProbes, path)
            | (Serves::EverythingButMetrics, path @ "/metrics") => {
                return ready(ApiError::NotFound(path.chars().take(200).collect()).into_response())
            }
            _ => {}
        }
        // Both state machines are boxed: hyper keeps, per connection and for the connection's
        // whole life, one slot the size of its service's future.
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/model") => Routed::Boxed(Box::pin(predict::handle(
                self.routes.clone(),
                self.auth.clone(),
                self.limits,
                req,
                peer,
            ))),
            (_, "/model") => ready(ApiError::MethodNotAllowed { allowed: "POST" }.into_response()),
            (_, path) if path == "/api/v2" || path.starts_with("/api/v2/") => {
                let control = self.control.clone();
                Routed::Boxed(Box::pin(async move {
                    crate::api::handle(&control, req, peer).await
                }))
            }
            (&Method::GET, "/metrics") => Routed::Boxed(Box::pin(render_metrics(
                self.metrics.clone(),
                self.routes.clone(),
            ))),
            (&Method::GET, "/healthz") => {
                ready(json_response(StatusCode::OK, &br#"{"status":"ok"}"#[..]))
            }
            (&Method::GET, "/readyz") => ready(self.readiness()),
            (_, "/metrics" | "/healthz" | "/readyz") => {
                ready(ApiError::MethodNotAllowed { allowed: "GET" }.into_response())
            }
            (_, path) => {
                ready(ApiError::NotFound(path.chars().take(200).collect()).into_response())
            }
        }
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

/// Serves HTTP/1.1 and HTTP/2 on `listener` until `shutdown` resolves, then stops accepting and
/// gives open connections `shutdown_grace` to finish their requests. With `tls`, every
/// connection is TLS (HTTP/2 or HTTP/1.1 chosen by ALPN); without it, cleartext (h2c by prior
/// knowledge, or HTTP/1.1).
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    settings: ConnSettings,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    // The timer is what makes the header-read timeout fire at all; hyper sets and cancels it once
    // per request, which the coarse timer makes cheap (crate::timer). Its ticker ends when the
    // builders and the last connection are gone.
    let (header_timer, ticker) =
        CoarseTimer::new(CoarseTimer::resolution_for(settings.header_read_timeout));
    tokio::spawn(ticker);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(header_timer)
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams);

    let drain = crate::drain::Drain::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    tokio::pin!(shutdown);
    loop {
        // At the connection limit, stop accepting: new connections wait in the kernel's
        // backlog (and time out there) instead of costing memory here.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
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
        let app = app.clone();
        let service = ServiceBuilder::new()
            // Outermost: a panic anywhere below fails only its own request, with a JSON 500.
            .layer(CatchPanicLayer::custom(panic_response))
            .service(tower::service_fn(move |req: Request<Incoming>| {
                app.route(req, peer)
            }));
        let service = TowerToHyperService::new(service);
        let entered = drain.enter();
        match &tls {
            None => {
                let conn = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let conn = entered.watch(conn, |c| c.graceful_shutdown());
                tokio::spawn(async move {
                    if let Err(err) = conn.await {
                        tracing::debug!("connection ended with error: {err}");
                    }
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let handshake_timeout = settings.header_read_timeout;
                tokio::spawn(async move {
                    // The handshake gets the same bound as reading a request head.
                    let stream = match tokio::time::timeout(
                        handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, "TLS handshake failed: {err}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(err) = entered.watch(conn, |c| c.graceful_shutdown()).await {
                        tracing::debug!("connection ended with error: {err}");
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    tracing::info!(
        "stopped accepting; draining connections for up to {:?}",
        settings.shutdown_grace
    );
    if tokio::time::timeout(settings.shutdown_grace, drain.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain bound reached with requests still open; closing them");
    }
}

/// Loads a PEM certificate chain and private key into a TLS acceptor offering HTTP/2 and
/// HTTP/1.1 by ALPN.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("tls_cert {}: no certificate in the file", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("tls_key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("TLS certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
