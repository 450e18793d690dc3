//! The labeling page in headless Chromium: with a token a person orders
//! the candidates by keyboard, marks a tie and submits, and the pairs land
//! in the store; without a token the page and its API answer 401.
//!
//! The test serves the intake's routes plus a harness page on the same
//! origin. The harness loads the real page in an iframe, sends it key
//! presses, waits for the saved receipt and writes the outcome into its own
//! DOM, which `chromium --dump-dom` prints. Skipped loudly when Chromium is
//! absent, except under `CI=true`, where it fails.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use axum::response::Html;
use axum::routing::get;
use common::{candidate_set, memory_bus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use troupe_ranking_intake::{read_preference_records, web, DatasetNames, Intake, LabelerTokens};
use troupe_store::Store;

const TOKEN: &str = "test-token-0123456789";

fn find_chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
        })
    });
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("chromium is not installed under CI=true; apt-get install -y chromium");
        }
        eprintln!("SKIPPED browser test: chromium is not on PATH; apt-get update && apt-get install -y chromium");
    }
    found
}

/// The harness: keys 4, 3, 1 put candidates D, C, A first (B stays last),
/// `t` ties the focused A with C above it, Enter submits: D > C = A > B.
const HARNESS: &str = r#"<!doctype html>
<html><body>
<iframe id="frame" src="/label?token=TOKEN" width="900" height="700"></iframe>
<pre id="out">waiting</pre>
<script>
const out = document.getElementById("out");
const frame = document.getElementById("frame");
function later(check, then, tries) {
  if (tries <= 0) { out.textContent = "timeout: " + frame.contentDocument.body.innerText; return; }
  if (check()) { then(); return; }
  setTimeout(() => later(check, then, tries - 1), 100);
}
frame.addEventListener("load", () => {
  const doc = frame.contentDocument;
  const win = frame.contentWindow;
  later(() => doc.querySelectorAll("li.candidate").length === 4, () => {
    for (const key of ["4", "3", "1", "t", "Enter"]) {
      doc.dispatchEvent(new win.KeyboardEvent("keydown", { key: key, bubbles: true }));
    }
    const result = doc.getElementById("result");
    later(() => result.dataset.state === "saved" || result.dataset.state === "error", () => {
      out.textContent = "RESULT " + result.dataset.state + " pairs=" + result.dataset.pairs + " " + result.textContent;
    }, 100);
  }, 100);
});
</script>
</body></html>"#;

async fn serve(intake: Intake) -> SocketAddr {
    let mut tokens = LabelerTokens::default();
    tokens.insert("ann", TOKEN).unwrap();
    let harness = HARNESS.replace("TOKEN", TOKEN);
    let router = web::router(intake, tokens).route("/harness", get(move || async move { Html(harness) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// Loads `url` in headless Chromium with a fresh profile and returns the DOM
/// after the page's scripts ran.
async fn dump_dom(chromium: &PathBuf, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let child = tokio::process::Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        .args(["--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=20000", "--dump-dom", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("chromium did not finish within 120 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "chromium failed: {}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Sends one HTTP/1.1 request and returns the status code and body.
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_ranks_by_keyboard() {
    let Some(chromium) = find_chromium() else { return };
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = Intake::open(bus, store.clone(), DatasetNames::default()).await.unwrap();
    intake.add_candidate_set(candidate_set("web-1", &["A", "B", "C", "D"], None)).await.unwrap();
    let addr = serve(intake.clone()).await;

    let dom = dump_dom(&chromium, &format!("http://{addr}/harness")).await;
    let out = dom.split("<pre id=\"out\">").nth(1).and_then(|rest| rest.split("</pre>").next()).unwrap_or("");
    assert!(out.starts_with("RESULT saved pairs=5"), "the page did not save the ranking: {out:?}");

    let records = read_preference_records(&store, "preferences").await.unwrap();
    assert_eq!(records.len(), 1, "the store holds {} records", records.len());
    let record = &records[0];
    let expected: Vec<Vec<String>> =
        [&["D"][..], &["C", "A"], &["B"]].iter().map(|group| group.iter().map(|id| id.to_string()).collect()).collect();
    assert_eq!(record.order, expected);
    assert_eq!(record.pairs.len(), 5);
    assert_eq!(record.labeler, "ann", "the labeler id must come from the token");
    assert_eq!(intake.progress().await.unwrap().sets_pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_without_token_is_refused() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = Intake::open(bus, store.clone(), DatasetNames::default()).await.unwrap();
    intake.add_candidate_set(candidate_set("web-1", &["A", "B"], None)).await.unwrap();
    let addr = serve(intake).await;
    let ranking = r#"{"ranking_id": "x1", "set_id": "web-1", "order": [["A"], ["B"]]}"#;
    let json = "Content-Type: application/json\r\n";

    for (method, path, headers, body) in [
        ("GET", "/label", "", ""),
        ("GET", "/label?token=wrong-token-000", "", ""),
        ("GET", "/api/pending", "", ""),
        ("GET", "/api/pending", "Authorization: Bearer wrong-token-000\r\n", ""),
        ("POST", "/api/rankings", json, ranking),
    ] {
        let (status, _) = http(addr, method, path, headers, body).await;
        assert_eq!(status, 401, "{method} {path} {headers:?}");
    }
    assert!(read_preference_records(&store, "preferences").await.unwrap().is_empty(), "a refused request stored a ranking");

    let bearer = format!("Authorization: Bearer {TOKEN}\r\n{json}");
    let (status, body) = http(addr, "POST", "/api/rankings", &bearer, ranking).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(addr, "POST", "/api/rankings", &bearer, r#"{"ranking_id": "x2", "set_id": "web-1", "order": [["A"], ["Z"]]}"#).await;
    assert_eq!(status, 422);
    assert!(body.contains("is not in set"), "{body}");
    let (status, body) = http(addr, "GET", "/progress", "", "").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"records\":1"), "{body}");

    // The page itself, as a browser shows it without a token.
    if let Some(chromium) = find_chromium() {
        let dom = dump_dom(&chromium, &format!("http://{addr}/label")).await;
        assert!(dom.contains("missing or invalid labeler token"), "{dom}");
        assert!(!dom.contains("Rank the candidates"), "the page was shown without a token");
    }
}
