//! The admin HTTP API (axum), served by the daemon on `admin.listen` (loopback by default; anywhere else only with
//! a bearer token).
//!
//! - `GET /`: the dashboard (a static page that polls `/status`; it carries no data itself, so it is served without
//!   the token; give the token in the page address as `#token=...`, the read-only one is enough).
//! - `GET /status`: the node's [`Status`] as JSON.
//! - `GET /peers`: the peers part of it (a JSON array of [`crate::status::PeerStatus`]).
//! - `GET /repos`: the repositories part of it (a JSON array of [`crate::status::RepoStatus`]).
//! - `GET /fabric`: the fabric view ([`crate::status::FabricView`]): every member this node knows, the snapshot
//!   each serves, how far behind the newest it is, its link rate; rebuilt once a second (`history.rs`).
//! - `GET /history`: this node's samples of the last hour and its record of the last snapshots
//!   ([`crate::status::HistoryReport`]): bytes per second from peers and the origin, propagation lags, and on the
//!   origin the copies of each update it sent.
//! - `GET /metrics`: the metrics (see [`crate::metrics`]), in the OpenMetrics format when the `Accept` header asks
//!   for it, else in the classic Prometheus text format.
//! - `GET /wait?seq=N&settled=true&fetched_bytes=B&counter=C&at_least=K&timeout_ms=T`: answers with the status as
//!   soon as every given condition holds: the applied snapshot reaches sequence `N`; with `settled`, the node is
//!   also idle with no removal pending; the node has fetched at least `B` chunk bytes; counter `C` reached `K`
//!   (default 1); with `peers_at=P`, every connected peer holds snapshot `P` completely; with
//!   `waiting_for_origin=true|false`, the node is (or is not) waiting for chunks only the origin has; with
//!   `connected=K`, at least `K` peers are connected; with `members=M`, the node knows at least `M` nodes of the
//!   fabric (itself included). 408 after `T` ms (default 30 s, at most
//!   10 min). Tests and scripts synchronise on this instead of sleeping.
//! - `POST /publish` (origin): scan, sign and announce a new snapshot; answers with its sequence number and root.
//!   `?force=true` skips the publish checks (an empty tree, too many removals); a refusal answers 409 with why. A
//!   JSON body `{"paths": [...]}` names what changed (relative to the tree): only those paths' directories (a
//!   directory named: all of it) and their ancestors are read; a path that is not a clean relative path is refused.
//!
//! # Who may do what
//!
//! A web page open in the operator's browser can send requests to `127.0.0.1:7480` too: a cross-origin form POST
//! needs no permission, and DNS rebinding (a name of the attacker's that first resolves to the attacker's server,
//! then to 127.0.0.1) makes the browser treat the API as the attacker's own origin. So, before any route:
//!
//! 1. **Host.** Every request must name this API in its `Host` header: its listen address, `localhost` or a
//!    loopback address (an SSH tunnel, on any port), any IP address when it listens on all of them, or a name
//!    in `admin.hosts`. Anything else is 421, a missing `Host` 400. A rebound name never matches, so a page
//!    never reads or drives the API through DNS rebinding. Ports are not compared (tunnels and proxies change them).
//! 2. **Mutating requests** (any method but GET and HEAD, i.e. `POST /publish`): an `Origin` header, when there
//!    is one, must be this API's own (`http://` or `https://` and the request's `Host`), else 403. Then, with
//!    `admin.token` set, the request needs `Authorization: Bearer <admin.token>` (401; 403 for the read-only
//!    token); without one (loopback only), it needs the header [`REQUEST_HEADER`]`: 1` (403), which a browser
//!    sends cross-origin only after a CORS preflight that this API never grants. The CLI always sends it.
//! 3. **Reads** (every route but the dashboard page): with `admin.token` set, `Authorization: Bearer` with either
//!    `admin.token` or `admin.read_token` (401 otherwise).
//!
//! Tokens are compared as blake3 hashes of the presented and the configured token: [`blake3::Hash`] compares in
//! constant time, and hashing first makes the time independent of the configured token's length too.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{oneshot, watch};

use crate::config::Config;
use crate::daemon::{Handle, LoopEvent};
use crate::status::Status;

/// Longest `/wait`.
pub const WAIT_MAX: Duration = Duration::from_secs(600);

/// The header a mutating request carries when the API has no token (`X-Mirrormesh-Request: 1`). Not one a
/// browser may send cross-origin without a CORS preflight, and this API answers no preflight.
pub const REQUEST_HEADER: &str = "x-mirrormesh-request";

/// Who may use the admin API and the names it answers to (the `[admin]` section of the config).
#[derive(Clone, Debug)]
pub struct Access {
    pub listen: SocketAddr,
    /// May do everything.
    pub token: Option<String>,
    /// May read only; set only beside `token`.
    pub read_token: Option<String>,
    /// Further host names (lowercase, no port) accepted in the `Host` header.
    pub hosts: Vec<String>,
}

impl Access {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            listen: cfg.admin_listen,
            token: cfg.admin_token.clone(),
            read_token: cfg.admin_read_token.clone(),
            hosts: cfg.admin_hosts.clone(),
        }
    }
}

/// Why a request was refused before reaching its route.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("a request needs a Host header")]
    NoHost,
    #[error(
        "this admin API does not answer to host {0:?}: use its listen address, localhost, or a name listed in \
         admin.hosts"
    )]
    Host(String),
    #[error("cross-origin request refused: origin {0:?} is not this admin API")]
    Origin(String),
    #[error("a POST needs the header `X-Mirrormesh-Request: 1` (the mirrormesh CLI sends it) or the admin token")]
    NoRequestHeader,
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("the read-only token (admin.read_token) cannot do this; it needs admin.token")]
    ReadOnly,
}

impl Refusal {
    fn code(&self) -> StatusCode {
        match self {
            Refusal::NoHost => StatusCode::BAD_REQUEST,
            Refusal::Host(_) => StatusCode::MISDIRECTED_REQUEST,
            Refusal::Origin(_) | Refusal::NoRequestHeader | Refusal::ReadOnly => StatusCode::FORBIDDEN,
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.code(), format!("{self}\n")).into_response()
    }
}

/// What a bearer token grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grant {
    Everything,
    Read,
    Nothing,
}

/// [`Access`] as the request checks use it: tokens kept only as hashes.
struct Guard {
    listen: IpAddr,
    token: Option<blake3::Hash>,
    read_token: Option<blake3::Hash>,
    hosts: Vec<String>,
    /// Requests refused so far; the 1st, 2nd, 4th, 8th... refusal is logged as a warning, the others at debug
    /// level (a web page can send thousands a second).
    refused: AtomicU64,
}

impl Guard {
    fn new(access: &Access) -> Self {
        let hash = |t: &Option<String>| t.as_ref().map(|t| blake3::hash(t.as_bytes()));
        Self {
            listen: access.listen.ip(),
            token: hash(&access.token),
            read_token: hash(&access.read_token),
            hosts: access.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            refused: AtomicU64::new(0),
        }
    }

    /// Whether a `Host` header's host part names this API.
    fn host_allowed(&self, host: &str) -> bool {
        if host.eq_ignore_ascii_case("localhost") {
            return true;
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return ip.is_loopback() || ip == self.listen || self.listen.is_unspecified();
        }
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    /// What the request's bearer token grants.
    fn grant(&self, headers: &HeaderMap) -> Grant {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| blake3::hash(token.trim().as_bytes()));
        match presented {
            Some(p) if self.token == Some(p) => Grant::Everything,
            Some(p) if self.read_token == Some(p) => Grant::Read,
            _ => Grant::Nothing,
        }
    }

    /// Checks 1 and 2 of the module doc: every request's `Host`; a mutating request's `Origin` and authority.
    fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers.get(header::HOST).ok_or(Refusal::NoHost)?;
        let host = host.to_str().map_err(|_| Refusal::Host(String::from_utf8_lossy(host.as_bytes()).into()))?;
        if !host_part(host).is_some_and(|h| self.host_allowed(h)) {
            return Err(Refusal::Host(host.to_owned()));
        }
        if method == Method::GET || method == Method::HEAD {
            return Ok(());
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = String::from_utf8_lossy(origin.as_bytes());
            let own = ["http://", "https://"]
                .iter()
                .any(|scheme| origin.strip_prefix(scheme).is_some_and(|rest| rest.eq_ignore_ascii_case(host)));
            if !own {
                return Err(Refusal::Origin(origin.into_owned()));
            }
        }
        if self.token.is_some() {
            return match self.grant(headers) {
                Grant::Everything => Ok(()),
                Grant::Read => Err(Refusal::ReadOnly),
                Grant::Nothing => Err(Refusal::Unauthorized),
            };
        }
        match headers.get(REQUEST_HEADER) {
            Some(v) if v.as_bytes() == b"1" => Ok(()),
            _ => Err(Refusal::NoRequestHeader),
        }
    }

    /// Check 3 of the module doc: a read needs one of the tokens, if there are tokens.
    fn check_read(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        match (self.token.is_some(), self.grant(headers)) {
            (false, _) | (true, Grant::Everything | Grant::Read) => Ok(()),
            (true, Grant::Nothing) => Err(Refusal::Unauthorized),
        }
    }

    fn refuse(&self, request: &Request, refusal: Refusal) -> Response {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let (method, path) = (request.method(), request.uri().path());
        if n.is_power_of_two() {
            tracing::warn!("admin API refused {method} {path:?}: {refusal} ({n} refused since start)");
        } else {
            tracing::debug!("admin API refused {method} {path:?}: {refusal} ({n} refused since start)");
        }
        refusal.into_response()
    }
}

/// The host part of a `Host` header (`name`, `name:port`, `[v6]`, `[v6]:port`), brackets removed; `None` if it
/// is none of these.
fn host_part(value: &str) -> Option<&str> {
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = value.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        return (after.is_empty() || after.strip_prefix(':').is_some_and(digits)).then_some(inside);
    }
    match value.split_once(':') {
        None => Some(value),
        Some((name, port)) => digits(port).then_some(name),
    }
}

async fn check_request(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    match guard.check(request.method(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => guard.refuse(&request, refusal),
    }
}

async fn check_read(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    match guard.check_read(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => guard.refuse(&request, refusal),
    }
}

#[derive(Clone)]
struct AppState {
    handle: Handle,
}

/// Binds the admin listener and serves until the process ends. Returns the bound address.
pub async fn serve(access: Access, handle: Handle) -> Result<SocketAddr> {
    let listen = access.listen;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("admin.listen {listen}"))?;
    let addr = listener.local_addr()?;
    let guard = Arc::new(Guard::new(&access));
    let reads = Router::new()
        .route("/status", get(status))
        .route("/peers", get(peers))
        .route("/repos", get(repos))
        .route("/fabric", get(fabric))
        .route("/history", get(history))
        .route("/metrics", get(metrics))
        .route("/wait", get(wait))
        .route_layer(middleware::from_fn_with_state(guard.clone(), check_read));
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/publish", post(publish))
        .merge(reads)
        .layer(middleware::from_fn_with_state(guard, check_request))
        .with_state(AppState { handle });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("admin server stopped: {e}");
        }
    });
    Ok(addr)
}

async fn status(State(state): State<AppState>) -> Response {
    Json(state.handle.status.borrow().clone()).into_response()
}

/// The dashboard page: HTML, CSS and script in one file, no build step.
const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], DASHBOARD)
        .into_response()
}

async fn peers(State(state): State<AppState>) -> Response {
    Json(state.handle.status.borrow().peers.clone()).into_response()
}

async fn repos(State(state): State<AppState>) -> Response {
    Json(state.handle.status.borrow().repos.clone()).into_response()
}

/// JSON of a value the daemon shares through a watch channel (serialized from the shared copy, not cloned).
fn shared_json<T: serde::Serialize>(value: &watch::Receiver<Arc<T>>) -> Response {
    match serde_json::to_vec(&**value.borrow()) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn fabric(State(state): State<AppState>) -> Response {
    shared_json(&state.handle.feeds.fabric)
}

async fn history(State(state): State<AppState>) -> Response {
    shared_json(&state.handle.feeds.history)
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
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
    connected: Option<usize>,
    members: Option<u64>,
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
        let connected_ok = self.connected.is_none_or(|k| s.peers.iter().filter(|p| p.connected).count() >= k);
        let members_ok = self.members.is_none_or(|m| s.members >= m);
        seq_ok && settled_ok && fetched_ok && counter_ok && peers_ok && waiting_ok && connected_ok && members_ok
    }
}

async fn wait(State(state): State<AppState>, Query(q): Query<WaitQuery>) -> Response {
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

/// The body of `POST /publish`, when there is one: the paths (relative to the tree) that changed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    paths: Vec<String>,
}

async fn publish(State(state): State<AppState>, Query(q): Query<PublishQuery>, body: axum::body::Bytes) -> Response {
    let paths = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<PublishBody>(&body) {
            Ok(b) => Some(b.paths),
            Err(e) => {
                return (StatusCode::BAD_REQUEST, format!("publish: the body is not {{\"paths\": [...]}}: {e}\n"))
                    .into_response();
            }
        }
    };
    let (reply, answer) = oneshot::channel();
    if state.handle.events.send(LoopEvent::Publish { force: q.force, paths, reply }).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "daemon stopped\n").into_response();
    }
    match answer.await {
        Ok(Ok(published)) => Json(published).into_response(),
        Ok(Err(message)) => (StatusCode::CONFLICT, format!("{message}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "daemon stopped\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(listen: &str, token: Option<&str>, read_token: Option<&str>, hosts: &[&str]) -> Guard {
        Guard::new(&Access {
            listen: listen.parse().unwrap(),
            token: token.map(Into::into),
            read_token: read_token.map(Into::into),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        })
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn host_part_strips_ports_and_brackets() {
        assert_eq!(host_part("localhost"), Some("localhost"));
        assert_eq!(host_part("127.0.0.1:7480"), Some("127.0.0.1"));
        assert_eq!(host_part("[::1]:7480"), Some("::1"));
        assert_eq!(host_part("[::1]"), Some("::1"));
        assert_eq!(host_part("::1"), None, "IPv6 only in brackets");
        assert_eq!(host_part("evil.example:80x"), None);
        assert_eq!(host_part("[::1]x"), None);
    }

    #[test]
    fn hosts_answered_to() {
        let g = guard("127.0.0.1:7480", None, None, &[]);
        for ok in ["localhost", "LOCALHOST", "127.0.0.1", "127.0.0.2", "::1"] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in ["evil.example", "localhost.evil.example", "10.0.0.5", "0.0.0.0", ""] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
        let g = guard("10.0.0.5:7480", Some("0123456789abcdef"), None, &["mirror1.example.org"]);
        for ok in ["10.0.0.5", "localhost", "Mirror1.Example.org"] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in ["10.0.0.6", "mirror2.example.org", "example.org"] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
        let any = guard("0.0.0.0:7480", Some("0123456789abcdef"), None, &[]);
        assert!(any.host_allowed("192.0.2.7") && any.host_allowed("localhost") && !any.host_allowed("evil.example"));
    }

    #[test]
    fn tokens_grant_what_they_should() {
        let g = guard("127.0.0.1:7480", Some("admin-token-0123456789"), Some("read-token-0123456789"), &[]);
        assert_eq!(g.grant(&headers(&[("authorization", "Bearer admin-token-0123456789")])), Grant::Everything);
        assert_eq!(g.grant(&headers(&[("authorization", "bearer  read-token-0123456789")])), Grant::Read);
        for wrong in ["Bearer admin-token-012345678", "Bearer admin-token-01234567890", "Basic admin-token-0123456789"]
        {
            assert_eq!(g.grant(&headers(&[("authorization", wrong)])), Grant::Nothing, "{wrong}");
        }
        assert_eq!(g.grant(&headers(&[])), Grant::Nothing);
        let open = guard("127.0.0.1:7480", None, None, &[]);
        assert_eq!(open.grant(&headers(&[("authorization", "Bearer ")])), Grant::Nothing);
        assert!(open.check_read(&headers(&[])).is_ok());
    }

    #[test]
    fn mutating_requests_need_the_own_origin_and_the_header_or_token() {
        let open = guard("127.0.0.1:7480", None, None, &[]);
        let host = ("host", "127.0.0.1:7480");
        let post = |g: &Guard, h: &[(&'static str, &str)]| g.check(&Method::POST, &headers(h)).map_err(|r| r.code());
        assert_eq!(post(&open, &[host, (REQUEST_HEADER, "1")]), Ok(()));
        assert_eq!(post(&open, &[host, (REQUEST_HEADER, "1"), ("origin", "http://127.0.0.1:7480")]), Ok(()));
        assert_eq!(post(&open, &[host]), Err(StatusCode::FORBIDDEN));
        assert_eq!(
            post(&open, &[host, (REQUEST_HEADER, "1"), ("origin", "http://evil.example")]),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            post(&open, &[host, (REQUEST_HEADER, "1"), ("origin", "http://127.0.0.1:7480.evil.example")]),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            post(&open, &[("host", "evil.example"), (REQUEST_HEADER, "1")]),
            Err(StatusCode::MISDIRECTED_REQUEST)
        );
        assert_eq!(post(&open, &[(REQUEST_HEADER, "1")]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(open.check(&Method::GET, &headers(&[host])).map_err(|r| r.code()), Ok(()));

        let tokens = guard("127.0.0.1:7480", Some("admin-token-0123456789"), Some("read-token-0123456789"), &[]);
        let full = ("authorization", "Bearer admin-token-0123456789");
        let read = ("authorization", "Bearer read-token-0123456789");
        assert_eq!(post(&tokens, &[host, full]), Ok(()));
        assert_eq!(post(&tokens, &[host, read, (REQUEST_HEADER, "1")]), Err(StatusCode::FORBIDDEN));
        assert_eq!(post(&tokens, &[host, (REQUEST_HEADER, "1")]), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(post(&tokens, &[host, full, ("origin", "http://evil.example")]), Err(StatusCode::FORBIDDEN));
        assert!(tokens.check_read(&headers(&[read])).is_ok() && tokens.check_read(&headers(&[full])).is_ok());
        assert!(tokens.check_read(&headers(&[])).is_err());
    }
}
