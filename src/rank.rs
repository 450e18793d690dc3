//! `troupe rank`: rank pending candidate sets in a terminal, through the
//! same HTTP API the labeling page uses, so a terminal ranking is stored,
//! validated and de-duplicated exactly like one from the page.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use troupe_ranking_intake::parse_order_text;
use troupe_wire::{CandidateSet, RankingReceipt};

/// Flags of `troupe rank`.
#[derive(Args, Debug)]
pub struct RankCommand {
    /// Base URL of the ranking intake's page, as `troupe up --human` or the
    /// service prints it (plain http).
    #[arg(long, env = "TROUPE_RANK_INTAKE", default_value = "http://127.0.0.1:8090")]
    pub intake: String,

    /// Labeler token; the intake records rankings under the labeler id it
    /// belongs to.
    #[arg(long, env = "TROUPE_RANK_TOKEN", hide_env_values = true)]
    pub token: String,

    /// Pending sets fetched per request.
    #[arg(long, env = "TROUPE_RANK_LIMIT", default_value_t = 20)]
    pub limit: usize,
}

/// Time allowed for one request to the intake.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response accepted from the intake, in bytes.
const MAX_RESPONSE_BYTES: usize = 16 << 20;

pub async fn rank(command: RankCommand) -> Result<()> {
    let endpoint = Endpoint::parse(&command.intake)?;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut ranked = 0;
    let mut skipped = std::collections::BTreeSet::new();
    println!("Order candidates best first: `B > A = C > D` (= marks a tie; numbers work too).");
    println!("Enter `s` to skip a set, `q` to quit.");
    loop {
        let path = format!("/api/pending?limit={}", command.limit.clamp(1, 200));
        let pending: Vec<CandidateSet> = endpoint.request("GET", &path, &command.token, None).await?;
        let Some(set) = pending.into_iter().find(|set| !skipped.contains(&set.set_id)) else {
            println!("No pending candidate sets. {ranked} ranked in this session.");
            return Ok(());
        };
        println!("\nPrompt: {}", set.prompt);
        for (position, candidate) in set.candidates.iter().enumerate() {
            let end = if candidate.finish_reason == troupe_wire::FinishReason::Eos { "" } else { " [cut at the length limit]" };
            println!("  {} ({}) {:?}{end}", candidate.candidate_id, position + 1, candidate.text);
        }

        let order = loop {
            print!("order> ");
            std::io::stdout().flush().ok();
            let Some(line) = lines.next() else {
                println!();
                return Ok(());
            };
            let line = line.context("cannot read the terminal")?;
            match line.trim() {
                "q" => return Ok(()),
                "s" => break None,
                text => match parse_order_text(text, &set) {
                    Ok(order) => break Some(order),
                    Err(reason) => println!("  {reason}"),
                },
            }
        };
        let Some(order) = order else {
            skipped.insert(set.set_id.clone());
            continue;
        };

        let body = serde_json::json!({
            "ranking_id": format!("terminal-{}", uuid::Uuid::now_v7()),
            "set_id": set.set_id,
            "order": order,
        });
        let receipt: RankingReceipt = endpoint.request("POST", "/api/rankings", &command.token, Some(body.to_string())).await?;
        if receipt.accepted {
            ranked += 1;
            println!("  saved: {} preference pairs", receipt.pairs);
        } else {
            println!("  rejected: {}", receipt.reason.unwrap_or_default());
        }
    }
}

/// Sends one GET request to the ranking intake at `url`, with a token when
/// one is given, and decodes the JSON response.
pub async fn get_json<T: DeserializeOwned>(url: &str, path: &str, token: Option<&str>) -> Result<T> {
    Endpoint::parse(url)?.request("GET", path, token.unwrap_or(""), None).await
}

/// A plain-HTTP endpoint of the ranking intake.
struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Endpoint> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("--intake {url:?} must start with http://; put TLS in front of the intake with a proxy");
        };
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') {
            bail!("--intake {url:?} must be the page's base URL, such as http://127.0.0.1:8090");
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().with_context(|| format!("invalid port in --intake {url:?}"))?),
            None => (authority, 80),
        };
        Ok(Endpoint { host: host.to_string(), port })
    }

    /// Sends one request with the token and decodes the JSON response.
    async fn request<T: DeserializeOwned>(&self, method: &str, path: &str, token: &str, body: Option<String>) -> Result<T> {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .with_context(|| format!("cannot reach the ranking intake at {}:{}", self.host, self.port))?;
            let body = body.unwrap_or_default();
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}:{}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                self.host,
                self.port,
                body.len()
            );
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.take(MAX_RESPONSE_BYTES as u64).read_to_end(&mut response).await?;
            anyhow::Ok(response)
        };
        let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .with_context(|| format!("the ranking intake did not answer {method} {path} within {REQUEST_TIMEOUT:?}"))??;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP response from the ranking intake")?;
        let status: u16 = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
        if status == 401 {
            bail!("the ranking intake rejected the token; use one from TROUPE_LABELER_TOKENS");
        }
        if !(200..300).contains(&status) && status != 400 && status != 409 && status != 422 {
            bail!("{method} {path} returned HTTP {status}: {}", body.trim());
        }
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body)? } else { body.to_string() };
        serde_json::from_str(&body).with_context(|| format!("unexpected response to {method} {path}: {}", body.trim()))
    }
}

/// Joins the chunks of a chunked HTTP body.
fn dechunk(body: &str) -> Result<String> {
    let mut rest = body;
    let mut joined = String::new();
    loop {
        let (size_line, after) = rest.split_once("\r\n").context("truncated chunked response")?;
        let size = usize::from_str_radix(size_line.trim(), 16).context("invalid chunk size in the response")?;
        if size == 0 {
            return Ok(joined);
        }
        let chunk = after.get(..size).context("truncated chunk in the response")?;
        joined.push_str(chunk);
        rest = after.get(size + 2..).unwrap_or("");
    }
}
