//! The admin HTTP API (axum), served by the daemon on `admin.listen` (loopback by default; anywhere else only with
//! a bearer token).
//!
//! - `GET /`: the dashboard (a static page that polls `/status`; it carries no data itself, so it is served without
//!   the token; give the token in the page address as `#token=...`).
//! - `GET /status`: the node's [`Status`] as JSON.
//! - `GET /peers`: the peers part of it (a JSON array of [`crate::status::PeerStatus`]).
//! - `GET /repos`: the repositories part of it (a JSON array of [`crate::status::RepoStatus`]).
//! - `GET /metrics`: the metrics (see [`crate::metrics`]), in the OpenMetrics format when the `Accept` header asks
//!   for it, else in the classic Prometheus text format.
//! - `GET /wait?seq=N&settled=true&fetched_bytes=B&counter=C&at_least=K&timeout_ms=T`: answers with the status as
//!   soon as every given condition holds: the applied snapshot reaches sequence `N`; with `settled`, the node is
//!   also idle with no removal pending; the node has fetched at least `B` chunk bytes; counter `C` reached `K`
//!   (default 1); with `peers_at=P`, every connected peer holds snapshot `P` completely; with
//!   `waiting_for_origin=true|false`, the node is (or is not) waiting for chunks only the origin has. 408 after `T` ms (default 30 s, at most
//!   10 min). Tests and scripts synchronise on this instead of sleeping.
//! - `POST /publish` (origin): scan, sign and announce a new snapshot; answers with its sequence number and root.
//!   `?force=true` skips the publish checks (an empty tree, too many removals); a refusal answers 409 with why.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{oneshot, watch};

use crate::daemon::{Handle, LoopEvent};
use crate::status::Status;

/// Longest `/wait`.
pub const WAIT_MAX: Duration = Duration::from_secs(600);

#[derive(Clone)]
struct AppState {
    handle: Handle,
    token: Option<String>,
}

/// Binds the admin listener and serves until the process ends. Returns the bound address.
pub async fn serve(listen: SocketAddr, token: Option<String>, handle: Handle) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("admin.listen {listen}"))?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/status", get(status))
        .route("/peers", get(peers))
        .route("/repos", get(repos))
        .route("/metrics", get(metrics))
        .route("/wait", get(wait))
        .route("/publish", post(publish))
        .with_state(AppState { handle, token });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("admin server stopped: {e}");
        }
    });
    Ok(addr)
}

fn authorized(state: &AppState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &state.token else { return Ok(()) };
    let presented = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if presented == Some(token.as_str()) {
        Ok(())
    } else {
        Err(Box::new((StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response()))
    }
}

async fn status(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorized(&state, &headers) {
        return *denied;
    }
    Json(state.handle.status.borrow().clone()).into_response()
}

/// The dashboard page: HTML, CSS and script in one file, no build step.
const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], DASHBOARD)
        .into_response()
}

async fn peers(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorized(&state, &headers) {
        return *denied;
    }
    Json(state.handle.status.borrow().peers.clone()).into_response()
}

async fn repos(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorized(&state, &headers) {
        return *denied;
    }
    Json(state.handle.status.borrow().repos.clone()).into_response()
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorized(&state, &headers) {
        return *denied;
    }
    // OpenMetrics when the scraper asks for it (Prometheus does), the classic text format otherwise.
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if accept.contains("application/openmetrics-text") {
        let body = state.handle.metrics.encode_openmetrics();
        ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
    } else {
        let body = state.handle.metrics.encode_text();
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
    }
}

#[derive(Deserialize)]
struct WaitQuery {
    seq: Option<u64>,
    #[serde(default)]
    settled: bool,
    fetched_bytes: Option<u64>,
    counter: Option<String>,
    at_least: Option<u64>,
    peers_at: Option<u64>,
    waiting_for_origin: Option<bool>,
    timeout_ms: Option<u64>,
}

impl WaitQuery {
    fn reached(&self, s: &Status) -> bool {
        let repo = s.repos.first();
        let seq_ok = self.seq.is_none_or(|want| repo.and_then(|r| r.seq).is_some_and(|seq| seq >= want));
        let settled_ok = !self.settled || repo.is_some_and(|r| r.phase == "idle" && r.pending_deletions == 0);
        let fetched_ok = self.fetched_bytes.is_none_or(|b| s.bytes_fetched_total >= b);
        let counter_ok =
            self.counter.as_ref().is_none_or(|c| s.counters.get(c).copied().unwrap_or(0) >= self.at_least.unwrap_or(1));
        let peers_ok = self.peers_at.is_none_or(|want| {
            s.peers.iter().filter(|p| p.connected).all(|p| p.complete_seq.is_some_and(|c| c >= want))
        });
        let waiting_ok = self.waiting_for_origin.is_none_or(|w| repo.is_some_and(|r| r.waiting_for_origin == w));
        seq_ok && settled_ok && fetched_ok && counter_ok && peers_ok && waiting_ok
    }
}

async fn wait(State(state): State<AppState>, headers: HeaderMap, Query(q): Query<WaitQuery>) -> Response {
    if let Err(denied) = authorized(&state, &headers) {
        return *denied;
    }
    let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(30_000)).min(WAIT_MAX);
    let mut rx: watch::Receiver<Status> = state.handle.status.clone();
    let outcome = tokio::time::timeout(timeout, rx.wait_for(|s| q.reached(s))).await.map(|r| r.map(|s| s.clone()));
    match outcome {
        Ok(Ok(status)) => Json(status).into_response(),
        Ok(Err(_)) => (StatusCode::SERVICE_UNAVAILABLE, "daemon stopped\n").into_response(),
        Err(_) => (StatusCode::REQUEST_TIMEOUT, Json(rx.borrow().clone())).into_response(),
    }
}

#[derive(Deserialize)]
struct PublishQuery {
    /// Publish whatever the publish checks say (an empty tree, many removals): the operator means it.
    #[serde(default)]
    force: bool,
}

async fn publish(State(state): State<AppState>, headers: HeaderMap, Query(q): Query<PublishQuery>) -> Response {
    if let Err(denied) = authorized(&state, &headers) {
        return *denied;
    }
    let (reply, answer) = oneshot::channel();
    if state.handle.events.send(LoopEvent::Publish { force: q.force, reply }).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "daemon stopped\n").into_response();
    }
    match answer.await {
        Ok(Ok(published)) => Json(published).into_response(),
        Ok(Err(message)) => (StatusCode::CONFLICT, format!("{message}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "daemon stopped\n").into_response(),
    }
}
