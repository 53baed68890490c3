//! The operator surface against a running 3-node fabric (an origin and two mirrors, real daemons on loopback):
//! every admin endpoint, the bearer token (401 without it), `/metrics` checked by Prometheus's own `promtool`, the
//! CLI's `status`, `peers` and `repos` (tables and `--json`, and a clear failure when the daemon is unreachable),
//! and the logs (spans per sync and per peer; JSON lines with `--log-format json`); and the API's defences against
//! web pages (cross-origin POSTs, DNS rebinding) and the read-only token.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use mirrormesh::admin_client::AdminClient;
use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::local_fabric::{LocalFabric, NodeOptions};
use mirrormesh::status::{PeerStatus, PublishReply, RepoStatus, Status};

const WAIT: Duration = Duration::from_secs(120);
const TOKEN: &str = "test-token-7f3a91c4d2e8";
const READ_TOKEN: &str = "read-token-0b5e6a7c9d13";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

fn cli(args: &[&str]) -> Output {
    Command::new(binary()).args(args).env("COLUMNS", "100").env_remove("MIRRORMESH_TOKEN").output().unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A raw GET: status code, content type and body.
fn get(addr: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut req = agent.get(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let mut res = req.call().unwrap();
    let ctype = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (res.status().as_u16(), ctype, res.body_mut().read_to_string().unwrap())
}

/// A raw HTTP/1.1 request to `addr` with exactly the given header lines (the test sets `Host` itself, as a browser
/// fooled by DNS rebinding would send it). Returns the status code and the body.
fn raw(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\ncontent-length: 0\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let code = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status: {answer}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (code, body)
}

/// The value of the sample line `name` (exact series, labels included) in a metrics exposition.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed: apt-get install prometheus");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn admin_api_cli_metrics_and_logs_of_a_running_fabric() {
    let dir = tempfile::tempdir().unwrap();
    let opts = vec![
        NodeOptions::default(),
        NodeOptions::default(),
        NodeOptions { admin_token: Some(TOKEN.into()), log_json: true, ..NodeOptions::default() },
    ];
    let mut fabric = LocalFabric::create(dir.path(), binary(), 2, &opts).unwrap();
    gentree::generate(&GenTreeArgs {
        out: fabric.nodes[0].tree.clone(),
        fraction: 0.01,
        seed: 3,
        ..Default::default()
    })
    .unwrap();
    fabric.start_all().unwrap();
    let first = fabric.publish().unwrap();
    fabric.wait_all_settled(first.seq, WAIT).unwrap();
    let origin = fabric.nodes[0].admin.to_string();
    let m1 = fabric.nodes[1].admin.to_string();
    let m2 = fabric.nodes[2].admin.to_string();

    // /status, /peers and /repos of a mirror (once it has heard that its peers hold the snapshot too).
    AdminClient::new(&m1, None, WAIT).wait_peers_at(first.seq, WAIT.as_millis() as u64).unwrap();
    let (code, ctype, body) = get(&m1, "/status", None);
    assert_eq!((code, ctype.as_str()), (200, "application/json"));
    let status: Status = serde_json::from_str(&body).unwrap();
    assert_eq!(status.role, "mirror");
    assert_eq!(status.node_id, fabric.nodes[1].peer_id);
    assert!(status.uptime_ms > 0);
    let (code, _, body) = get(&m1, "/peers", None);
    assert_eq!(code, 200);
    let peers: Vec<PeerStatus> = serde_json::from_str(&body).unwrap();
    let mut ids: Vec<&str> = peers.iter().map(|p| p.id.as_str()).collect();
    ids.sort();
    let mut expected = vec![fabric.nodes[0].peer_id.as_str(), fabric.nodes[2].peer_id.as_str()];
    expected.sort();
    assert_eq!(ids, expected, "mirror1 sees the origin and mirror2");
    for p in &peers {
        assert!(p.connected && !p.banned && p.connected_since_ms > 0, "{p:?}");
        assert!(p.address.contains("/quic-v1"), "{p:?}");
        assert!(p.rtt_ms.is_some_and(|r| r > 0.0 && r < 5_000.0), "RTT measured: {p:?}");
        assert_eq!(p.complete_seq, Some(first.seq), "{p:?}");
    }
    let from_origin = peers.iter().find(|p| p.origin).unwrap();
    assert!(from_origin.bytes_received > 0 && from_origin.chunks_received > 0, "{from_origin:?}");
    assert!(from_origin.score.is_some_and(|s| s > 0.0), "a peer it fetched from has a score: {from_origin:?}");
    let received: u64 = peers.iter().map(|p| p.bytes_received).sum();
    assert_eq!(received, status.bytes_fetched_total);
    let (code, _, body) = get(&m1, "/repos", None);
    assert_eq!(code, 200);
    let repos: Vec<RepoStatus> = serde_json::from_str(&body).unwrap();
    let repo = &repos[0];
    assert_eq!(
        (repo.name.as_str(), repo.seq, repo.root.clone()),
        ("alpine", Some(first.seq), Some(first.root.clone()))
    );
    assert_eq!((repo.state.as_str(), repo.progress, repo.files_missing, repo.bytes_missing), ("idle", 1.0, 0, 0));
    assert_eq!((repo.files, repo.bytes), (first.files, first.bytes));
    assert!(repo.last_apply_ms.is_some());
    assert!(repo.propagation_lag_ms.is_some_and(|l| l < 120_000), "lag measured: {repo:?}");

    // The dashboard page is served to anyone (it holds no data); the data needs the token where one is set.
    let (code, ctype, page) = get(&m2, "/", None);
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/html") && page.contains("id=\"peers\""), "{ctype}");
    for path in ["/status", "/peers", "/repos", "/fabric", "/history", "/metrics", "/wait?seq=1"] {
        assert_eq!(get(&m2, path, None).0, 401, "{path} without a token");
        assert_eq!(get(&m2, path, Some("wrong")).0, 401, "{path} with a wrong token");
        assert_eq!(get(&m2, path, Some(TOKEN)).0, 200, "{path} with the token");
    }

    // An update: the mirrors' repos move on, the metrics follow.
    gentree::generate(&GenTreeArgs {
        out: fabric.nodes[0].tree.clone(),
        update: Some(3),
        seed: 5,
        ..Default::default()
    })
    .unwrap();
    let second = fabric.publish().unwrap();
    fabric.wait_all_settled(second.seq, WAIT).unwrap();
    // The origin has heard from every mirror that it holds the update: the status it shows from then on counts
    // every byte it sent for it (a mirror settles at once when nothing waits for a grace period).
    fabric.wait_origin_heard(second.seq, WAIT).unwrap();
    let repos: Vec<RepoStatus> = AdminClient::new(&m1, None, WAIT).repos().unwrap();
    assert_eq!(repos[0].seq, Some(second.seq));

    // /metrics: valid for Prometheus, named by its conventions, and the values are the node's.
    let (code, _, text) = get(&m1, "/metrics", None);
    assert_eq!(code, 200);
    promtool_check(&text);
    assert_eq!(sample(&text, "mirrormesh_snapshot_seq{repo=\"alpine\"}"), second.seq as f64);
    assert_eq!(sample(&text, "mirrormesh_sync_duration_seconds_count{repo=\"alpine\"}"), 2.0);
    assert_eq!(sample(&text, "mirrormesh_propagation_lag_seconds_count{repo=\"alpine\"}"), 2.0);
    assert_eq!(sample(&text, "mirrormesh_peers_connected"), 2.0);
    assert_eq!(sample(&text, "mirrormesh_peers_banned"), 0.0);
    assert_eq!(sample(&text, "mirrormesh_roots_accepted_total"), 2.0);
    let status = fabric.status(1).unwrap();
    let from_peers = sample(&text, "mirrormesh_received_bytes_total{class=\"peer\"}");
    let from_origin = sample(&text, "mirrormesh_received_bytes_total{class=\"origin\"}");
    assert_eq!(from_origin, status.bytes_fetched_from_origin as f64);
    assert_eq!(from_peers + from_origin, status.bytes_fetched_total as f64);
    assert_eq!(sample(&text, "mirrormesh_chunks_verified_total"), status.counters["chunks_verified"] as f64);
    // Every turn of the event loop is timed: the histogram counts them, the status names the longest.
    assert!(sample(&text, "mirrormesh_loop_turn_seconds_count") > 0.0);
    assert!(sample(&text, "mirrormesh_loop_turn_seconds_sum") > 0.0);
    assert!(status.counters["loop_turn_longest_us"] > 0, "the longest turn is known: {:?}", status.counters);
    for name in ["mirrormesh_chunks_rejected_total", "mirrormesh_sync_missing_bytes{repo=\"alpine\"}"] {
        assert_eq!(sample(&text, name), 0.0, "{name}");
    }
    let (_, _, origin_text) = get(&origin, "/metrics", None);
    promtool_check(&origin_text);
    assert_eq!(sample(&origin_text, "mirrormesh_update_changed_bytes{repo=\"alpine\"}"), second.changed_bytes as f64);
    let sent = sample(&origin_text, "mirrormesh_origin_update_sent_bytes{repo=\"alpine\"}");
    assert!(sent > 0.0 && sent <= 1.10 * second.changed_bytes as f64, "origin sent {sent} for the update");

    // The CLI: readable tables, whole in a pipe (COLUMNS=100 notwithstanding: tests/cli.rs has the terminal), the
    // same data as JSON.
    let text = stdout(&cli(&["status", "--admin", &m1]));
    assert!(text.contains(&fabric.nodes[1].peer_id) && text.contains("(mirror)"), "{text}");
    assert!(text.contains("PEER") && text.contains("REPO") && text.contains("alpine"), "{text}");
    let text = stdout(&cli(&["peers", "--admin", &m1]));
    assert_eq!(text.lines().count(), 3, "a header and two peers:\n{text}");
    assert!(text.contains(&fabric.nodes[0].peer_id) && text.contains(&fabric.nodes[2].peer_id), "whole ids:\n{text}");
    assert!(!text.contains('…'), "nothing cut in a pipe:\n{text}");
    assert!(text.contains("origin") && text.contains(" ok"), "{text}");
    let text = stdout(&cli(&["repos", "--admin", &m1]));
    assert!(!text.contains('…'), "nothing cut in a pipe:\n{text}");
    assert!(text.lines().nth(1).unwrap().starts_with("alpine"), "{text}");
    let peers: Vec<PeerStatus> = serde_json::from_str(&stdout(&cli(&["peers", "--admin", &m1, "--json"]))).unwrap();
    assert_eq!(peers.len(), 2);
    let repos: Vec<RepoStatus> = serde_json::from_str(&stdout(&cli(&["repos", "--admin", &m1, "--json"]))).unwrap();
    assert_eq!(repos[0].seq, Some(second.seq));
    let status: Status = serde_json::from_str(&stdout(&cli(&["status", "--admin", &m1, "--json"]))).unwrap();
    assert_eq!(status.repos[0].seq, Some(second.seq));
    let with_token = stdout(&cli(&["peers", "--admin", &m2, "--token", TOKEN]));
    assert_eq!(with_token.lines().count(), 3, "{with_token}");
    let denied = cli(&["peers", "--admin", &m2]);
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("unauthorized"), "{denied:?}");

    // Unreachable: a clear message and a non-zero exit.
    fabric.kill(2, 15).unwrap();
    for command in ["status", "peers", "repos"] {
        let out = cli(&[command, "--admin", &m2]);
        assert_eq!(out.status.code(), Some(1), "{command}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot reach the mirrormesh daemon at"), "{command}: {err}");
    }

    // Logs: the human format carries the sync and peer spans; --log-format json gives one JSON object per line.
    let human = std::fs::read_to_string(&fabric.nodes[1].log).unwrap();
    let sync_span = format!("sync{{seq={}}}", second.seq);
    assert!(human.lines().any(|l| l.contains(&sync_span) && l.contains("snapshot in place")), "{human}");
    assert!(human.lines().any(|l| l.contains("peer{peer=")), "{human}");
    let json = std::fs::read_to_string(&fabric.nodes[2].log).unwrap();
    let mut spans = 0;
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        spans += usize::from(v["span"]["name"] == "sync");
    }
    assert!(spans > 0, "JSON lines carry the sync span:\n{json}");
}

/// A lone origin on loopback with one file to publish.
fn lone_origin(dir: &Path, options: NodeOptions) -> LocalFabric {
    let mut fabric = LocalFabric::create(dir, binary(), 0, &[options]).unwrap();
    let file = fabric.nodes[0].tree.join("alpine/edge/main/x86_64/a-1.0-r0.apk");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(file, b"package").unwrap();
    fabric.start(0).unwrap();
    fabric
}

/// The applied snapshot of a lone origin's repository.
fn seq(fabric: &LocalFabric) -> Option<u64> {
    fabric.status(0).unwrap().repos[0].seq
}

/// Waits until the lone origin serves the snapshot a publish answered with (`POST /publish`'s JSON).
fn serves(fabric: &LocalFabric, reply: &str) {
    let published: PublishReply = serde_json::from_str(reply).unwrap_or_else(|e| panic!("{e}: {reply}"));
    let status = fabric.client(0, WAIT).wait_for_seq(published.seq, WAIT.as_millis() as u64).unwrap();
    assert_eq!(status.repos[0].seq, Some(published.seq));
}

#[test]
fn a_cross_origin_post_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let origin = lone_origin(dir.path(), NodeOptions::default());
    let addr = origin.nodes[0].admin.to_string();
    let host = ("host", addr.as_str());
    // A cross-origin form POST (a "simple" request: no preflight) from a web page the operator has open.
    let (code, body) =
        raw(&addr, "POST", "/publish", &[host, ("origin", "http://evil.example"), ("content-type", "text/plain")]);
    assert_eq!(code, 403, "cross-origin POST without the header: {body}");
    // With the custom header too (a browser sends it cross-origin only after a preflight, which is not answered):
    // the Origin alone refuses it.
    let (code, body) =
        raw(&addr, "POST", "/publish", &[host, ("origin", "http://evil.example"), ("x-mirrormesh-request", "1")]);
    assert_eq!(code, 403, "cross-origin POST with the header: {body}");
    let (code, body) = raw(&addr, "POST", "/publish", &[host, ("origin", "null"), ("x-mirrormesh-request", "1")]);
    assert_eq!(code, 403, "POST from an opaque origin: {body}");
    let (code, body) =
        raw(&addr, "POST", "/publish", &[host, ("origin", "http://127.0.0.1:1"), ("x-mirrormesh-request", "1")]);
    assert_eq!(code, 403, "POST from another port: {body}");
    assert_eq!(seq(&origin), None, "nothing was published");
    // The daemon's own origin (its dashboard) may.
    let own = format!("http://{addr}");
    let (code, body) = raw(&addr, "POST", "/publish", &[host, ("origin", &own), ("x-mirrormesh-request", "1")]);
    assert_eq!(code, 200, "same-origin POST with the header: {body}");
    serves(&origin, &body);
}

#[test]
fn a_post_without_token_or_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let origin = lone_origin(dir.path(), NodeOptions::default());
    let addr = origin.nodes[0].admin.to_string();
    // No Origin (not a browser, or one that leaves it out), but neither the header nor a token.
    let (code, body) = raw(&addr, "POST", "/publish", &[("host", &addr)]);
    assert_eq!(code, 403, "POST without the header: {body}");
    assert!(body.to_ascii_lowercase().contains("x-mirrormesh-request: 1"), "the refusal names the header: {body}");
    let (code, body) = raw(&addr, "POST", "/publish", &[("host", &addr), ("x-mirrormesh-request", "yes")]);
    assert_eq!(code, 403, "POST with another value: {body}");
    assert_eq!(seq(&origin), None, "nothing was published");
    // The CLI sends the header.
    let out =
        Command::new(binary()).args(["publish", "--admin", &addr]).env_remove("MIRRORMESH_TOKEN").output().unwrap();
    assert!(out.status.success(), "the CLI publishes: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    let published = printed.split_whitespace().nth(3).and_then(|s| s.parse::<u64>().ok());
    let published = published.unwrap_or_else(|| panic!("no seq in {printed}"));
    let status = origin.client(0, WAIT).wait_for_seq(published, WAIT.as_millis() as u64).unwrap();
    assert_eq!(status.repos[0].seq, Some(published));
}

#[test]
fn a_request_for_another_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let origin = lone_origin(dir.path(), NodeOptions::default());
    let addr = origin.nodes[0].admin.to_string();
    let port = origin.nodes[0].admin.port();
    // DNS rebinding: evil.example now resolves to 127.0.0.1, so the browser sends that name as Host.
    for path in ["/", "/status", "/peers", "/repos", "/fabric", "/history", "/metrics", "/wait?seq=0", "/nonexistent"] {
        let (code, body) = raw(&addr, "GET", path, &[("host", &format!("evil.example:{port}"))]);
        assert_eq!(code, 421, "GET {path} for Host evil.example: {body}");
    }
    let (code, body) = raw(&addr, "POST", "/publish", &[("host", "evil.example"), ("x-mirrormesh-request", "1")]);
    assert_eq!(code, 421, "POST for Host evil.example: {body}");
    assert_eq!(raw(&addr, "GET", "/status", &[]).0, 400, "no Host at all");
    assert_eq!(seq(&origin), None, "nothing was published");
    // The daemon's own address and localhost (an SSH tunnel may use another port) are served.
    for h in [addr.clone(), format!("localhost:{port}"), "localhost:8080".into(), "LocalHost".into()] {
        assert_eq!(raw(&addr, "GET", "/status", &[("host", &h)]).0, 200, "Host {h}");
    }
}

#[test]
fn the_read_token_reads_but_cannot_publish() {
    let dir = tempfile::tempdir().unwrap();
    let origin = lone_origin(
        dir.path(),
        NodeOptions {
            admin_token: Some(TOKEN.into()),
            extra_config: format!("read_token = \"{READ_TOKEN}\"\n"),
            ..NodeOptions::default()
        },
    );
    let addr = origin.nodes[0].admin.to_string();
    let host = ("host", addr.as_str());
    let bearer = |t: &str| format!("Bearer {t}");
    // (`/wait` with no condition answers at once.)
    for path in ["/status", "/peers", "/repos", "/fabric", "/history", "/metrics", "/wait?timeout_ms=5000"] {
        assert_eq!(raw(&addr, "GET", path, &[host]).0, 401, "{path} without a token");
        assert_eq!(raw(&addr, "GET", path, &[host, ("authorization", &bearer("wrong"))]).0, 401, "{path}");
        assert_eq!(raw(&addr, "GET", path, &[host, ("authorization", &bearer(READ_TOKEN))]).0, 200, "{path}");
        assert_eq!(raw(&addr, "GET", path, &[host, ("authorization", &bearer(TOKEN))]).0, 200, "{path}");
    }
    let read = bearer(READ_TOKEN);
    let (code, body) = raw(&addr, "POST", "/publish", &[host, ("authorization", &read), ("x-mirrormesh-request", "1")]);
    assert_eq!(code, 403, "the read token cannot publish: {body}");
    let (code, _) = raw(&addr, "POST", "/publish", &[host, ("x-mirrormesh-request", "1")]);
    assert_eq!(code, 401, "with a token configured, the header alone is not enough");
    let full = bearer(TOKEN);
    let (code, _) =
        raw(&addr, "POST", "/publish", &[host, ("authorization", &full), ("origin", "http://evil.example")]);
    assert_eq!(code, 403, "not even the admin token from another origin");
    let (code, _) = raw(&addr, "POST", "/publish", &[("host", "evil.example"), ("authorization", &full)]);
    assert_eq!(code, 421, "nor for another host");
    assert_eq!(seq(&origin), None, "nothing was published");
    let out = Command::new(binary())
        .args(["publish", "--admin", &addr, "--token", READ_TOKEN])
        .env_remove("MIRRORMESH_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the CLI with the read token cannot publish: {err}");
    assert!(err.contains("read-only"), "{err}");
    assert!(stdout(&cli(&["status", "--admin", &addr, "--token", READ_TOKEN])).contains("(origin)"), "it reads");
    let (code, body) = raw(&addr, "POST", "/publish", &[host, ("authorization", &full)]);
    assert_eq!(code, 200, "the admin token publishes: {body}");
    serves(&origin, &body);
}
