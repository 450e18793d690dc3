//! The operators' HTTP server, queried over real loopback TCP connections.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use troupe_service::http::{install_metrics_recorder, HttpServer, Readiness};
use troupe_service::shutdown::{Drain, Shutdown};

/// Upper bound on any single step, so a broken server fails the test instead
/// of hanging it.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

struct Response {
    status: u16,
    head: String,
    body: String,
}

/// Sends `GET path` over a new HTTP/1.1 connection and reads the whole
/// response; `Connection: close` makes the server end the stream after it.
async fn get_path(addr: SocketAddr, path: &str) -> Response {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .expect("connect to the HTTP server");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the request");
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .expect("read the response");
        String::from_utf8(raw).expect("the response is UTF-8")
    };
    let raw = tokio::time::timeout(STEP_TIMEOUT, exchange)
        .await
        .expect("response within the timeout");

    let (head, body) = raw
        .split_once("\r\n\r\n")
        .expect("the response has a blank line after its head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    Response {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Starts a server on a free loopback port and returns its address, its
/// readiness flag, the shutdown that stops it and its task.
async fn start(
    extra: Option<Router>,
) -> (
    SocketAddr,
    Readiness,
    Shutdown,
    JoinHandle<std::io::Result<()>>,
) {
    let metrics = install_metrics_recorder().expect("install the Prometheus recorder");
    let readiness = Readiness::new();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut server = HttpServer::bind(loopback, readiness.clone(), metrics)
        .await
        .expect("bind loopback");
    if let Some(routes) = extra {
        server = server.merge(routes);
    }
    let addr = server.local_addr();

    let shutdown = Shutdown::new();
    let task = tokio::spawn(server.run_until_shutdown(shutdown.listener()));
    (addr, readiness, shutdown, task)
}

#[tokio::test]
async fn bind_port_zero_reports_real_port() {
    let (addr, _readiness, _shutdown, _task) = start(None).await;

    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);
}

#[tokio::test]
async fn healthz_answers_ok() {
    let (addr, _readiness, _shutdown, _task) = start(None).await;

    let response = get_path(addr, "/healthz").await;

    assert_eq!(response.status, 200);
    assert_eq!(response.body, "ok\n");
}

#[tokio::test]
async fn readyz_follows_readiness_flag() {
    let (addr, readiness, _shutdown, _task) = start(None).await;

    let before = get_path(addr, "/readyz").await;
    readiness.set_ready(true);
    let ready = get_path(addr, "/readyz").await;
    readiness.set_ready(false);
    let after = get_path(addr, "/readyz").await;

    assert_eq!(before.status, 503);
    assert_eq!(ready.status, 200);
    assert_eq!(ready.body, "ready\n");
    assert_eq!(after.status, 503);
}

#[tokio::test]
async fn metrics_shows_incremented_counter() {
    let (addr, _readiness, _shutdown, _task) = start(None).await;

    metrics::counter!("troupe_service_test_events_total", "kind" => "probe").increment(3);
    let response = get_path(addr, "/metrics").await;

    assert_eq!(response.status, 200);
    assert!(
        response
            .head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        response.head
    );
    assert!(
        response
            .body
            .contains("troupe_service_test_events_total{kind=\"probe\"} 3"),
        "{}",
        response.body
    );
}

#[tokio::test]
async fn metrics_recorder_installs_once() {
    let first = install_metrics_recorder().expect("install the Prometheus recorder");
    let second = install_metrics_recorder().expect("the second call returns the same handle");

    metrics::counter!("troupe_service_test_shared_total").increment(1);

    assert!(first
        .render()
        .contains("troupe_service_test_shared_total 1"));
    assert!(second
        .render()
        .contains("troupe_service_test_shared_total 1"));
}

#[tokio::test]
async fn merged_route_served() {
    let routes = Router::new().route("/ranking", get(|| async { "ranking page" }));
    let (addr, _readiness, _shutdown, _task) = start(Some(routes)).await;

    let page = get_path(addr, "/ranking").await;
    let health = get_path(addr, "/healthz").await;
    let missing = get_path(addr, "/missing").await;

    assert_eq!(page.status, 200);
    assert_eq!(page.body, "ranking page");
    assert_eq!(health.status, 200);
    assert_eq!(missing.status, 404);
}

#[tokio::test]
#[should_panic]
async fn merge_rejects_reserved_path() {
    let routes = Router::new().route("/healthz", get(|| async { "shadowed" }));
    let _ = start(Some(routes)).await;
}

#[tokio::test]
async fn drain_stops_server() {
    let (addr, _readiness, shutdown, task) = start(None).await;
    assert_eq!(get_path(addr, "/healthz").await.status, 200);

    let drain = shutdown.drain(STEP_TIMEOUT).await;
    let result = tokio::time::timeout(STEP_TIMEOUT, task)
        .await
        .expect("the server task ends");

    assert!(matches!(drain, Drain::Complete { .. }), "{drain:?}");
    result
        .expect("the server task did not panic")
        .expect("the server returned no error");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the port still accepts connections"
    );
}

#[tokio::test]
async fn run_stops_on_any_future() {
    let metrics = install_metrics_recorder().expect("install the Prometheus recorder");
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = HttpServer::bind(loopback, Readiness::new(), metrics)
        .await
        .expect("bind loopback");
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    assert_eq!(get_path(addr, "/healthz").await.status, 200);

    stop.send(()).expect("the server is still running");
    let result = tokio::time::timeout(STEP_TIMEOUT, task)
        .await
        .expect("the server task ends");

    result
        .expect("the server task did not panic")
        .expect("the server returned no error");
}

#[tokio::test]
async fn bind_error_names_address() {
    let occupant = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = occupant.local_addr().unwrap();
    let metrics = install_metrics_recorder().expect("install the Prometheus recorder");

    let error = match HttpServer::bind(addr, Readiness::new(), metrics).await {
        Ok(_) => panic!("bound {addr} twice"),
        Err(error) => error,
    };

    assert_eq!(error.addr, addr);
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
}
