//! The HTTP server each service runs for its operators: liveness, readiness
//! and Prometheus metrics, plus any routes the service adds.
//!
//! | path       | status                                                    |
//! | ---------- | --------------------------------------------------------- |
//! | `/healthz` | 200 while the process serves HTTP at all (liveness)       |
//! | `/readyz`  | 200 once the service calls [`Readiness::set_ready`], else 503 |
//! | `/metrics` | 200 with every `metrics` value in Prometheus text format  |
//!
//! Not for the bus: work arrives over NATS, never over this server.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use clap::Args;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::settings::{Setting, SettingsErrors};
use crate::shutdown::ShutdownListener;

/// How often histogram samples are folded into their summaries between
/// scrapes, which bounds their memory when no scraper reads them. The
/// exporter's own `install` uses the same 5 s interval.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Content type of the Prometheus text exposition format, version 0.0.4.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Command-line flags for the HTTP server, to `#[command(flatten)]` into a
/// service's settings.
#[derive(Args, Clone, Debug)]
pub struct HttpArgs {
    /// Address (IP:PORT) to serve /healthz, /readyz and /metrics on. Port 0
    /// picks a free port, which the service logs.
    #[arg(
        long = HttpArgs::ADDR.long,
        env = HttpArgs::ADDR.env,
        value_name = "IP:PORT",
        default_value = "0.0.0.0:8080"
    )]
    pub http_addr: String,
}

impl HttpArgs {
    pub const ADDR: Setting = Setting {
        long: "http-addr",
        env: "TROUPE_HTTP_ADDR",
    };

    /// Checks the address, recording an error in `errors` when it is invalid.
    pub fn validate(&self, errors: &mut SettingsErrors) -> Option<HttpSettings> {
        let addr = errors.parse(
            HttpArgs::ADDR,
            &self.http_addr,
            "set it to an IP address and port such as 0.0.0.0:8080 (host names are not resolved)",
            str::parse::<SocketAddr>,
        );
        Some(HttpSettings { addr: addr? })
    }
}

/// Checked HTTP settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpSettings {
    pub addr: SocketAddr,
}

/// Readiness flag shared between a service and its `/readyz` route.
///
/// A new flag is not ready. The service sets it once it can do work (connected
/// to the bus, model loaded) and may clear it again, for example while it
/// reconnects or drains.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness::default()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// Error from [`install_metrics_recorder`].
#[derive(Debug, thiserror::Error)]
#[error("failed to install the Prometheus metrics recorder")]
pub struct MetricsError(#[source] metrics_exporter_prometheus::BuildError);

/// Installs the Prometheus recorder as the process's global `metrics`
/// recorder and returns a handle that renders it.
///
/// Calling it again returns the same handle, so tests in one binary can each
/// call it. It fails when a different global recorder was installed first.
pub fn install_metrics_recorder() -> Result<PrometheusHandle, MetricsError> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

    // A panic while holding the lock cannot leave the Option half written.
    let mut handle = HANDLE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(handle) = handle.as_ref() {
        return Ok(handle.clone());
    }
    let installed = PrometheusBuilder::new()
        .install_recorder()
        .map_err(MetricsError)?;
    *handle = Some(installed.clone());
    Ok(installed)
}

/// Error from [`HttpServer::bind`].
#[derive(Debug, thiserror::Error)]
#[error("failed to bind the HTTP server to {addr}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// A bound HTTP server with the health, readiness and metrics routes.
///
/// Binding and serving are separate steps so a service can log the bound
/// address, which differs from the requested one when the port is 0.
pub struct HttpServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
    metrics: PrometheusHandle,
}

impl HttpServer {
    /// Binds `addr` and prepares the three routes in this module's table.
    pub async fn bind(
        addr: SocketAddr,
        readiness: Readiness,
        metrics: PrometheusHandle,
    ) -> Result<HttpServer, BindError> {
        let bind_error = |source| BindError { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;

        let router = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz).with_state(readiness))
            .route("/metrics", get(render_metrics).with_state(metrics.clone()));

        Ok(HttpServer {
            listener,
            local_addr,
            router,
            metrics,
        })
    }

    /// Adds a service's own routes, such as a web page.
    ///
    /// # Panics
    ///
    /// Panics, as `Router::merge` does, when `routes` has a path that is
    /// already served, including `/healthz`, `/readyz` and `/metrics`.
    pub fn merge(mut self, routes: Router) -> HttpServer {
        self.router = self.router.merge(routes);
        self
    }

    /// Returns the address the server listens on, with the real port when
    /// port 0 was requested.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves requests until `shutdown` resolves, then lets requests in flight
    /// finish and returns once every connection is closed.
    ///
    /// While it serves it also runs the metrics upkeep every
    /// [`METRICS_UPKEEP_INTERVAL`].
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let HttpServer {
            listener,
            router,
            metrics,
            ..
        } = self;

        let upkeep = async move {
            let mut interval = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
            loop {
                interval.tick().await;
                metrics.run_upkeep();
            }
        };
        let serve = axum::serve(listener, router).with_graceful_shutdown(shutdown);

        tokio::select! {
            result = serve => result,
            () = upkeep => unreachable!("the metrics upkeep loop has no exit"),
        }
    }

    /// Serves requests until `listener` receives the shutdown notice, as
    /// [`run`](HttpServer::run) does, and keeps the listener until the last
    /// connection is closed, so [`Shutdown::drain`](crate::shutdown::Shutdown::drain)
    /// waits for the server.
    pub async fn run_until_shutdown(self, listener: ShutdownListener) -> io::Result<()> {
        let notice = listener.clone();
        let result = self.run(notice.into_recv()).await;
        drop(listener);
        result
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(readiness): State<Readiness>) -> impl IntoResponse {
    if readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn render_metrics(State(metrics): State<PrometheusHandle>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        metrics.render(),
    )
}
