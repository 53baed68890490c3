//! The dashboard in a real headless browser (Debian's chromium, driven over the DevTools protocol): the page a
//! mirror serves at `/` loads, lists the peers of a running 3-node fabric, and shows a new snapshot after a publish
//! without being reloaded. Every wait is on an event: the daemons' `/wait`, and in the page a promise that resolves
//! when a DOM mutation makes the condition true.
//!
//! A second test runs a 4-mirror fabric with one mirror stopped while two updates are published, and checks the
//! fabric view (every member, the snapshot each serves, the stopped one marked behind), the history charts and the
//! origin's headline (copies of each update it sent).
//!
//! `DASHBOARD_SCREENSHOTS=docs cargo test --test dashboard` also saves the screenshots the README shows
//! (`docs/dashboard.png`, `docs/dashboard-fabric.png`, `docs/dashboard-origin.png`).

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::local_fabric::{LocalFabric, NodeOptions};
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

const WAIT: Duration = Duration::from_secs(120);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

/// A headless chromium, killed when dropped.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1280,960",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium (Debian package chromium) must be installed: apt-get install chromium");
        // Chromium says where its DevTools endpoint listens once it is ready.
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let port = loop {
            let line = lines.next().expect("chromium exited before its DevTools endpoint listened").unwrap();
            if let Some(url) = line.strip_prefix("DevTools listening on ws://127.0.0.1:") {
                break url.split('/').next().unwrap().parse().unwrap();
            }
        };
        // Keep draining stderr so chromium never blocks on it.
        std::thread::spawn(move || lines.for_each(drop));
        Browser { child, _profile: profile, port }
    }

    /// A DevTools session on the browser's first page.
    fn page(&self) -> Page {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let list: Value = serde_json::from_str(
            &agent
                .get(format!("http://127.0.0.1:{}/json/list", self.port))
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap(),
        )
        .unwrap();
        let url = list
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_owned();
        let (socket, _) = tungstenite::connect(url).unwrap();
        if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream.set_read_timeout(Some(WAIT)).unwrap();
        }
        Page { socket, next_id: 0, events: Vec::new() }
    }
}

struct Page {
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Names of the events received so far.
    events: Vec<String>,
}

impl Page {
    /// The next DevTools message (an answer or an event; events are recorded).
    fn read(&mut self) -> Value {
        loop {
            let message = self.socket.read().expect("DevTools message (timed out?)");
            let Message::Text(text) = message else { continue };
            let value: Value = serde_json::from_str(text.as_str()).unwrap();
            if let Some(event) = value["method"].as_str() {
                self.events.push(event.to_owned());
            }
            return value;
        }
    }

    /// Sends a DevTools command and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let text = json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket.send(Message::Text(text.into())).unwrap();
        loop {
            let value = self.read();
            if value["id"] == id {
                assert!(value.get("error").is_none(), "{method}: {value}");
                return value["result"].clone();
            }
        }
    }

    /// Waits for event `name` (or finds it among those already received), and forgets the events before it.
    fn wait_event(&mut self, name: &str) {
        loop {
            if let Some(at) = self.events.iter().position(|e| e == name) {
                self.events.drain(..=at);
                return;
            }
            self.read();
        }
    }

    /// Evaluates `expr` in the page and returns its value, awaiting it if it is a promise.
    fn eval(&mut self, expr: &str) -> Value {
        let result =
            self.call("Runtime.evaluate", json!({ "expression": expr, "awaitPromise": true, "returnByValue": true }));
        assert!(result.get("exceptionDetails").is_none(), "{expr}: {result}");
        result["result"]["value"].clone()
    }

    /// With `DASHBOARD_SCREENSHOTS=DIR` (relative to the workspace root, where the command is typed), saves the
    /// top of the page (at most 1,400 pixels: the counters below are long) as `DIR/NAME`.
    fn screenshot(&mut self, name: &str) {
        let Ok(dir) = std::env::var("DASHBOARD_SCREENSHOTS") else { return };
        let height = self.eval("Math.min(document.documentElement.scrollHeight, 1400)").as_f64().unwrap();
        let clip = json!({ "x": 0, "y": 0, "width": 1280, "height": height, "scale": 1 });
        let params = json!({ "format": "png", "captureBeyondViewport": true, "clip": clip });
        let shot = self.call("Page.captureScreenshot", params);
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot written to {}", path.display());
    }

    /// Waits (on DOM mutations, inside the page) until `condition` is true, then evaluates `value`.
    fn wait_for(&mut self, condition: &str, value: &str) -> Value {
        let expr = format!(
            "new Promise((resolve) => {{
                const check = () => {{ if ({condition}) {{ resolve({value}); return true; }} return false; }};
                if (!check()) {{
                    const o = new MutationObserver(() => {{ if (check()) o.disconnect(); }});
                    o.observe(document.documentElement,
                              {{ subtree: true, childList: true, attributes: true, characterData: true }});
                }}
            }})"
        );
        self.eval(&expr)
    }
}

#[test]
fn the_dashboard_shows_the_fabric_and_follows_a_publish() {
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = LocalFabric::create(dir.path(), binary(), 2, &vec![NodeOptions::default(); 3]).unwrap();
    gentree::generate(&GenTreeArgs {
        out: fabric.nodes[0].tree.clone(),
        fraction: 0.01,
        seed: 9,
        ..Default::default()
    })
    .unwrap();
    fabric.start_all().unwrap();
    let first = fabric.publish().unwrap();
    fabric.wait_all_settled(first.seq, WAIT).unwrap();

    let browser = Browser::launch();
    let mut page = browser.page();
    page.call("Page.enable", json!({}));
    page.call("Page.navigate", json!({ "url": format!("http://{}/", fabric.nodes[1].admin) }));
    page.wait_event("Page.loadEventFired");

    // The page lists mirror1's two peers (the origin first) and its snapshot.
    let seq_shown = format!("document.getElementById('repo-seq')?.textContent === '{}'", first.seq);
    let rows = page.wait_for(
        &format!("document.querySelectorAll('#peers tr[data-peer-id]').length === 2 && {seq_shown}"),
        "[...document.querySelectorAll('#peers tr[data-peer-id]')].map(r => r.dataset.peerId)",
    );
    let rows: Vec<String> = serde_json::from_value(rows).unwrap();
    assert_eq!(rows, vec![fabric.nodes[0].peer_id.clone(), fabric.nodes[2].peer_id.clone()]);
    assert_eq!(page.eval("document.getElementById('peer-count').textContent"), json!("2"));
    assert_eq!(page.eval("document.body.dataset.state"), json!("ok"));
    let refreshes: u64 = page.eval("Number(document.body.dataset.updated)").as_u64().unwrap();
    assert!(refreshes >= 1);

    // A publish: the open page shows the new snapshot by itself.
    gentree::generate(&GenTreeArgs {
        out: fabric.nodes[0].tree.clone(),
        update: Some(2),
        seed: 10,
        ..Default::default()
    })
    .unwrap();
    let second = fabric.publish().unwrap();
    fabric.wait_all_settled(second.seq, WAIT).unwrap();
    let after = page.wait_for(
        &format!("document.getElementById('repo-seq')?.textContent === '{}'", second.seq),
        "Number(document.body.dataset.updated)",
    );
    assert!(after.as_u64().unwrap() > refreshes, "refreshed in place, no reload");
    assert_eq!(page.eval("document.querySelectorAll('#peers tr[data-peer-id]').length"), json!(2));

    page.screenshot("dashboard.png");
}

#[test]
fn the_dashboard_shows_a_refused_publish_until_it_clears() {
    let dir = tempfile::tempdir().unwrap();
    let origin = NodeOptions { removal_limit_percent: Some(10), ..NodeOptions::default() };
    let mut fabric = LocalFabric::create(dir.path(), binary(), 0, &[origin]).unwrap();
    let package = fabric.nodes[0].tree.join("alpine/edge/main/x86_64/a-1.0-r0.apk");
    std::fs::create_dir_all(package.parent().unwrap()).unwrap();
    std::fs::write(&package, b"package").unwrap();
    fabric.start(0).unwrap();
    fabric.publish().unwrap();

    let browser = Browser::launch();
    let mut page = browser.page();
    page.call("Page.enable", json!({}));
    page.call("Page.navigate", json!({ "url": format!("http://{}/", fabric.nodes[0].admin) }));
    page.wait_event("Page.loadEventFired");

    // The tree is emptied: the publish is refused, and the page says so.
    std::fs::remove_file(&package).unwrap();
    let refused = fabric.publish().unwrap_err().to_string();
    assert!(refused.contains("publish refused"), "{refused}");
    let shown = page.wait_for(
        "document.querySelector('#last-error li[data-kind=\"publish_refused\"]') !== null",
        "document.getElementById('last-error').textContent",
    );
    assert!(shown.as_str().is_some_and(|t| t.contains("empty")), "{shown}");

    // The tree is back: the next publish clears it.
    std::fs::write(&package, b"package").unwrap();
    fabric.publish().unwrap();
    page.wait_for("document.getElementById('last-error').hidden === true", "true");
}

/// Publishes a `packages`-package update of the origin's tree and waits until every running mirror serves it.
fn update(fabric: &LocalFabric, packages: usize, seed: u64) -> u64 {
    gentree::generate(&GenTreeArgs {
        out: fabric.nodes[0].tree.clone(),
        update: Some(packages),
        seed,
        ..Default::default()
    })
    .unwrap();
    let published = fabric.publish().unwrap();
    fabric.wait_all_settled(published.seq, WAIT).unwrap();
    published.seq
}

#[test]
fn the_fabric_view_shows_every_member_who_is_behind_the_history_and_the_origins_copies() {
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = LocalFabric::create(dir.path(), binary(), 4, &vec![NodeOptions::default(); 5]).unwrap();
    gentree::generate(&GenTreeArgs {
        out: fabric.nodes[0].tree.clone(),
        fraction: 0.01,
        seed: 21,
        ..Default::default()
    })
    .unwrap();
    fabric.start_all().unwrap();
    let first = fabric.publish().unwrap().seq;
    fabric.wait_all_settled(first, WAIT).unwrap();
    // mirror1 has heard from every peer that it holds the first snapshot (a settled mirror's announcement may still
    // be on its way), then mirror4 stops (SIGTERM) and misses the next two updates.
    fabric.client(1, WAIT).wait_peers_at(first, WAIT.as_millis() as u64).unwrap();
    fabric.kill(4, 15).unwrap();
    let second = update(&fabric, 6, 22);
    let third = update(&fabric, 4, 23);
    assert!(first < second && second < third);

    let browser = Browser::launch();
    let mut page = browser.page();
    page.call("Page.enable", json!({}));
    page.call("Page.navigate", json!({ "url": format!("http://{}/", fabric.nodes[1].admin) }));
    page.wait_event("Page.loadEventFired");

    // mirror1's fabric view: all five nodes, each with the snapshot it serves; mirror4 behind by two snapshots.
    let rows = page.wait_for(
        &format!(
            "document.querySelectorAll('#fabric tr[data-member-id]').length === 5 && \
             document.querySelectorAll('#fabric tr[data-member-id][data-seq=\"{third}\"]').length === 4"
        ),
        "[...document.querySelectorAll('#fabric tr[data-member-id]')].map(r => ({ id: r.dataset.memberId, \
         seq: Number(r.dataset.seq), behind: r.classList.contains('behind'), text: r.textContent }))",
    );
    let rows = rows.as_array().unwrap().clone();
    let row = |i: usize| {
        rows.iter()
            .find(|r| r["id"] == fabric.nodes[i].peer_id)
            .unwrap_or_else(|| panic!("{} is not in the fabric view: {rows:?}", fabric.nodes[i].name))
    };
    for i in 0..4 {
        assert_eq!(row(i)["seq"], json!(third), "{}: {rows:?}", fabric.nodes[i].name);
        assert_eq!(row(i)["behind"], json!(false), "{}: {rows:?}", fabric.nodes[i].name);
    }
    assert_eq!(row(4)["seq"], json!(first), "the stopped mirror serves the first snapshot: {rows:?}");
    assert_eq!(row(4)["behind"], json!(true), "{rows:?}");
    let stopped = row(4)["text"].as_str().unwrap();
    assert!(stopped.contains("2 snapshots"), "lag in snapshots shown: {stopped}");
    assert_eq!(page.eval("document.getElementById('fabric-behind').textContent"), json!("1"));

    // The history charts have points: bytes per second from this node's samples (one per 10 s: the first one
    // that covers the initial sync), and the propagation lag of each of the three snapshots it applied.
    let points = page.wait_for(
        "document.querySelectorAll('#chart-rate [data-point]').length >= 1 && \
         [...document.querySelectorAll('#chart-rate [data-point]')].some(p => Number(p.dataset.received) > 0) && \
         document.querySelectorAll('#chart-lag [data-point]').length >= 3",
        "({ rate: document.querySelectorAll('#chart-rate [data-point]').length, \
            lag: [...document.querySelectorAll('#chart-lag [data-point]')].map(p => Number(p.dataset.seq)) })",
    );
    let lags: Vec<u64> = serde_json::from_value(points["lag"].clone()).unwrap();
    for seq in [first, second, third] {
        assert!(lags.contains(&seq), "lag of snapshot {seq} charted: {points}");
    }
    // The same data as JSON, from the admin API.
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let get = |path: &str| -> Value {
        let url = format!("http://{}{path}", fabric.nodes[1].admin);
        serde_json::from_str(&agent.get(url).call().unwrap().body_mut().read_to_string().unwrap()).unwrap()
    };
    let history = get("/history");
    assert_eq!(history["interval_ms"], json!(10_000));
    assert!(!history["samples"].as_array().unwrap().is_empty(), "{history}");
    let fabric_json = get("/fabric");
    assert_eq!(fabric_json["newest_seq"], json!(third));
    assert_eq!(fabric_json["members"].as_array().unwrap().len(), 5, "{fabric_json}");
    page.screenshot("dashboard-fabric.png");

    // The origin's page: its headline is the copies of each update it sent (origin bytes / update size), about one.
    page.call("Page.navigate", json!({ "url": format!("http://{}/", fabric.nodes[0].admin) }));
    page.wait_event("Page.loadEventFired");
    let headline = page.wait_for(
        &format!(
            "document.querySelector('#headline [data-copies-seq=\"{third}\"]') !== null && \
             document.querySelectorAll('#chart-copies [data-point]').length >= 3"
        ),
        "({ copies: document.getElementById('headline-copies').textContent, \
            rows: [...document.querySelectorAll('#headline [data-copies-seq]')].map(r => \
                ({ seq: Number(r.dataset.copiesSeq), copies: Number(r.dataset.copies) })) })",
    );
    let copies: Vec<Value> = serde_json::from_value(headline["rows"].clone()).unwrap();
    eprintln!("the origin's copies per update (newest first): {}", headline["rows"]);
    for seq in [second, third] {
        let c = copies.iter().find(|r| r["seq"] == seq).unwrap_or_else(|| panic!("update {seq}: {headline}"));
        let c = c["copies"].as_f64().unwrap();
        assert!((0.95..=1.5).contains(&c), "the origin sent {c} copies of update {seq}: {headline}");
    }
    let shown = headline["copies"].as_str().unwrap();
    let big: f64 = shown.trim_end_matches('×').parse().unwrap_or_else(|_| panic!("headline {shown:?}"));
    assert!((0.95..=1.5).contains(&big), "headline {shown:?}");
    // On the origin the lag chart shows each mirror's announce of each snapshot.
    let announced =
        page.eval("[...document.querySelectorAll('#chart-lag [data-point]')].map(p => Number(p.dataset.announced))");
    assert!(announced.as_array().unwrap().iter().any(|n| n.as_u64() >= Some(3)), "{announced}");
    page.screenshot("dashboard-origin.png");
}
