//! The labeling web page and its JSON API.
//!
//! | method and path | token | what it does |
//! | --- | --- | --- |
//! | `GET /` or `GET /label` | yes | the page: a prompt, its candidates, ordering by keys or drag |
//! | `GET /api/pending?limit=N` | yes | up to N pending candidate sets, oldest first (default 20, at most 200) |
//! | `POST /api/rankings` | yes | submit `{ranking_id, set_id, order, note}`; returns the receipt |
//! | `GET /progress` | no | set and pair counts as JSON, without texts or ids |
//!
//! The token comes as `Authorization: Bearer TOKEN` or as `?token=TOKEN`;
//! the page reads it from its own URL and sends it as a header. A request
//! without a valid token gets 401, and the labeler id of a submitted ranking
//! is the name the token belongs to, whatever the body says.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use troupe_wire::{Ranking, RankingReceipt};

use crate::intake::Intake;
use crate::record::Source;
use crate::settings::LabelerTokens;

/// The page, with its script and styles inline and no external assets.
const PAGE: &str = include_str!("page.html");

/// Sets listed per `/api/pending` request when `limit` is absent.
const DEFAULT_PENDING_LIMIT: usize = 20;
/// Upper bound on `limit`, which bounds the size of one response.
const MAX_PENDING_LIMIT: usize = 200;

#[derive(Clone)]
struct WebState {
    intake: Intake,
    tokens: Arc<LabelerTokens>,
}

/// Returns the routes of the page, its API and `/progress`.
pub fn router(intake: Intake, tokens: LabelerTokens) -> Router {
    if tokens.is_empty() {
        tracing::warn!("no labeler tokens set, so every labeling page request gets 401");
    }
    let state = WebState { intake, tokens: Arc::new(tokens) };
    Router::new()
        .route("/", get(page))
        .route("/label", get(page))
        .route("/api/pending", get(pending))
        .route("/api/rankings", post(submit))
        .route("/progress", get(progress))
        .with_state(state)
}

/// The body of `POST /api/rankings`.
#[derive(Debug, Deserialize, Serialize)]
pub struct WebRanking {
    pub ranking_id: String,
    pub set_id: String,
    pub order: Vec<Vec<String>>,
    #[serde(default)]
    pub note: Option<String>,
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "missing or invalid labeler token; open the page as /label?token=TOKEN or send Authorization: Bearer TOKEN\n",
    )
        .into_response()
}

/// Returns the labeler id of the request's token; `None` means 401.
fn authorize(state: &WebState, headers: &HeaderMap, query: &HashMap<String, String>) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    let token = bearer.or_else(|| query.get("token").map(String::as_str));
    let labeler = token.and_then(|token| state.tokens.labeler_for(token));
    if labeler.is_none() {
        metrics::counter!("troupe_ranking_intake_web_unauthorized_total").increment(1);
    }
    labeler.map(str::to_string)
}

async fn page(State(state): State<WebState>, headers: HeaderMap, Query(query): Query<HashMap<String, String>>) -> Response {
    if authorize(&state, &headers, &query).is_none() {
        return unauthorized();
    }
    // The token may sit in the URL, so the page must not leak it to other sites.
    ([(header::REFERRER_POLICY, "no-referrer"), (header::CACHE_CONTROL, "no-store")], Html(PAGE)).into_response()
}

fn unavailable(err: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %err, "web request failed on the store or bus");
    (StatusCode::SERVICE_UNAVAILABLE, format!("the store or bus failed: {err}; retry in a moment\n")).into_response()
}

async fn pending(State(state): State<WebState>, headers: HeaderMap, Query(query): Query<HashMap<String, String>>) -> Response {
    if authorize(&state, &headers, &query).is_none() {
        return unauthorized();
    }
    let limit = match query.get("limit").map(|value| value.parse::<usize>()) {
        None => DEFAULT_PENDING_LIMIT,
        Some(Ok(limit)) => limit.clamp(1, MAX_PENDING_LIMIT),
        Some(Err(_)) => {
            return (StatusCode::BAD_REQUEST, format!("invalid limit; use a whole number from 1 to {MAX_PENDING_LIMIT}\n"))
                .into_response()
        }
    };
    match state.intake.pending(limit).await {
        Ok(sets) => Json(sets).into_response(),
        Err(err) => unavailable(err),
    }
}

async fn submit(
    State(state): State<WebState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(labeler) = authorize(&state, &headers, &query) else {
        return unauthorized();
    };
    let submitted: WebRanking = match serde_json::from_slice(&body) {
        Ok(submitted) => submitted,
        Err(err) => {
            let reason = format!("invalid JSON body: {err}; send {{\"ranking_id\", \"set_id\", \"order\"}}");
            state.intake.reject_unparsed(Source::Web, &reason, body.to_vec()).await;
            let receipt = RankingReceipt {
                ranking_id: String::new(),
                set_id: String::new(),
                accepted: false,
                reason: Some(reason),
                pairs: 0,
                duplicate: false,
            };
            return (StatusCode::BAD_REQUEST, Json(receipt)).into_response();
        }
    };
    let ranking = Ranking {
        ranking_id: submitted.ranking_id,
        set_id: submitted.set_id,
        labeler,
        order: submitted.order,
        note: submitted.note.filter(|note| !note.trim().is_empty()),
    };
    match state.intake.submit(ranking, Source::Web).await {
        Ok(receipt) if receipt.accepted => Json(receipt).into_response(),
        Ok(receipt) => (StatusCode::UNPROCESSABLE_ENTITY, Json(receipt)).into_response(),
        Err(err) => unavailable(err),
    }
}

async fn progress(State(state): State<WebState>) -> Response {
    match state.intake.progress().await {
        Ok(progress) => Json(progress).into_response(),
        Err(err) => unavailable(err),
    }
}
