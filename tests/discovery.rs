//! The fabric finds itself: real daemons on loopback whose mirrors' configs name only the origin (as the shipped
//! `packaging/mirror.toml` does). Mirrors find each other through the peer exchange and share the sync; the members
//! survive restarts (the origin, which has no bootstrap list, redials its mirrors); a mirror added to `network.allow`
//! by SIGHUP joins while a sync runs; the upload cap is lifted by SIGHUP; bad addresses from a peer are counted and
//! never dialled. Every wait is on an event: a daemon's log line or the admin API's long-poll `/wait`.

use std::path::Path;
use std::time::{Duration, Instant};

use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::local_fabric::{LocalFabric, NodeOptions};

const WAIT: Duration = Duration::from_secs(120);
const WAIT_MS: u64 = 120_000;
/// How long mirrors that name only the origin may take to find each other ("within seconds").
const MESH_WAIT_MS: u64 = 20_000;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

/// The fabrics here measure times and ratios: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn generate(tree: &Path, fraction: f64, seed: u64) -> gentree::GenReport {
    gentree::generate(&GenTreeArgs { out: tree.to_owned(), fraction, seed, ..GenTreeArgs::default() }).unwrap()
}

fn update(tree: &Path, packages: usize, seed: u64) {
    gentree::generate(&GenTreeArgs { out: tree.to_owned(), update: Some(packages), seed, ..GenTreeArgs::default() })
        .unwrap();
}

fn counter(status: &mirrormesh::status::Status, name: &str) -> u64 {
    status.counters.get(name).copied().unwrap_or(0)
}

/// Every mirror's config names only the origin.
fn origin_only(nodes: usize) -> Vec<NodeOptions> {
    vec![NodeOptions::origin_only(); nodes]
}

fn signal(fabric: &LocalFabric, i: usize, signal: i32) {
    let pid = fabric.pid(i).expect("running") as i32;
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill -{signal} {pid}");
}

/// Waits until every running mirror of the fabric is connected to every other running node; returns how long that
/// took.
fn wait_full_mesh(fabric: &LocalFabric, since: Instant) -> Duration {
    let running: Vec<usize> = (0..fabric.nodes.len()).filter(|i| fabric.is_running(*i)).collect();
    let nodes = running.len();
    for &i in running.iter().skip(1) {
        let status = fabric
            .client(i, WAIT)
            .wait_connected(nodes - 1, MESH_WAIT_MS)
            .unwrap_or_else(|e| panic!("{} did not connect to every other node: {e:#}", fabric.nodes[i].name));
        let peers: Vec<&str> = status.peers.iter().map(|p| p.id.as_str()).collect();
        for &j in &running {
            let node = &fabric.nodes[j];
            assert!(i == j || peers.contains(&node.peer_id.as_str()), "{} lacks {}", fabric.nodes[i].name, node.name);
        }
    }
    since.elapsed()
}

/// Mirrors that name only the origin find each other within seconds, and the origin sends about one copy of the
/// tree and of an update, as with full bootstrap lists; a mirror that joins late (also naming only the origin)
/// takes what it needs from the others. Then the origin is restarted (SIGTERM) and publishes: every mirror serves
/// the new snapshot within seconds. Prints the numbers.
fn origin_only_fabric(mirrors: usize, fraction: f64) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // The last one joins late.
    let mut fabric = LocalFabric::create(dir.path(), binary(), mirrors + 1, &origin_only(mirrors + 2)).unwrap();
    let text = std::fs::read_to_string(&fabric.nodes[1].config).unwrap();
    let bootstrap = text.lines().find(|l| l.starts_with("bootstrap")).unwrap();
    assert_eq!(bootstrap.matches("/p2p/").count(), 1, "the origin only: {bootstrap}");
    generate(&fabric.nodes[0].tree, fraction, 21);
    for i in 0..=mirrors {
        fabric.start(i).unwrap();
    }
    let started = Instant::now();
    let mesh = wait_full_mesh(&fabric, started);
    let status = fabric.status(1).unwrap();
    assert_eq!(status.members, mirrors as u64 + 1, "every node of the fabric is a member");
    let origin_id = &fabric.nodes[0].peer_id;
    for peer in &status.peers {
        let learned = peer.learned.as_deref();
        match &peer.id == origin_id {
            true => assert_eq!(learned, Some("bootstrap")),
            false => assert!(matches!(learned, Some("exchange" | "inbound")), "{}: {learned:?}", peer.id),
        }
    }

    let first = fabric.publish().unwrap();
    let t = Instant::now();
    fabric.wait_all_settled(first.seq, WAIT).unwrap();
    let initial_time = t.elapsed();
    for i in 1..=mirrors {
        fabric.check_identical(i).unwrap();
    }
    let sent_initial = fabric.wait_origin_heard(first.seq, WAIT).unwrap().bytes_served_total;
    let initial = sent_initial as f64 / first.changed_bytes as f64;

    update(&fabric.nodes[0].tree, 10, 22);
    let second = fabric.publish().unwrap();
    let t = Instant::now();
    fabric.wait_all_settled(second.seq, WAIT).unwrap();
    let update_time = t.elapsed();
    for i in 1..=mirrors {
        fabric.check_identical(i).unwrap();
    }
    let sent_update = fabric.wait_origin_heard(second.seq, WAIT).unwrap().bytes_served_total - sent_initial;
    let update_ratio = sent_update as f64 / second.changed_bytes as f64;

    let late = mirrors + 1;
    fabric.start(late).unwrap();
    let joined = fabric.client(late, WAIT).wait_settled(second.seq, WAIT_MS).unwrap();
    fabric.check_identical(late).unwrap();
    let late_from_origin = joined.bytes_fetched_from_origin;

    wait_full_mesh(&fabric, Instant::now());

    // SIGTERM, as systemd stops it; it starts again and publishes at once.
    fabric.kill(0, 15).unwrap();
    update(&fabric.nodes[0].tree, 1, 23);
    fabric.start(0).unwrap();
    let restarted = Instant::now();
    let third = fabric.publish().unwrap();
    fabric.wait_all_settled(third.seq, WAIT).unwrap();
    let restart_to_served = restarted.elapsed();
    for i in 1..=late {
        fabric.check_identical(i).unwrap();
    }
    println!(
        "{mirrors} mirrors, configs naming only the origin: full mesh {mesh:.2?} after the last start; initial sync \
         {} bytes in {initial_time:.2?}, origin sent {initial:.3} x; update {} bytes in {update_time:.2?}, origin \
         sent {update_ratio:.3} x; a late joiner took {late_from_origin} of {} bytes from the origin; origin restart \
         (SIGTERM, start, publish) to every mirror serving the new snapshot {restart_to_served:.2?}",
        first.changed_bytes, second.changed_bytes, joined.bytes_fetched_total
    );
    assert!(initial <= 1.10, "the origin sent {initial:.3} x the tree");
    assert!(update_ratio <= 1.10, "the origin sent {update_ratio:.3} x the update");
    assert!(restart_to_served < Duration::from_secs(15), "{restart_to_served:?}");
    // Until it has met the others (one round trip after the origin), a joiner's only peer is the origin, which
    // serves chunks it has not handed out in this snapshot: about its window (1 MiB) or two.
    assert!(late_from_origin < joined.bytes_fetched_total / 4, "{late_from_origin} of {}", joined.bytes_fetched_total);
}

#[test]
fn four_mirrors_naming_only_the_origin_find_each_other_and_share_the_sync() {
    origin_only_fabric(4, 0.02);
}

#[test]
fn eight_mirrors_naming_only_the_origin_find_each_other_and_share_the_sync() {
    origin_only_fabric(8, 0.02);
}

/// Members are persisted: a mirror restarted while the origin is down finds the other mirrors, and the origin (no
/// bootstrap list) redials its mirrors as it starts.
#[test]
fn members_survive_restarts_and_are_redialed_origin_included() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = LocalFabric::create(dir.path(), binary(), 3, &origin_only(4)).unwrap();
    std::fs::create_dir_all(fabric.nodes[0].tree.join("alpine")).unwrap();
    std::fs::write(fabric.nodes[0].tree.join("alpine/p.apk"), "package").unwrap();
    fabric.start_all().unwrap();
    wait_full_mesh(&fabric, Instant::now());

    // The origin goes away; mirror 1 restarts: only what it remembers can bring it back to mirrors 2 and 3.
    fabric.kill(0, 15).unwrap();
    fabric.kill(1, 15).unwrap();
    fabric.start(1).unwrap();
    let t = Instant::now();
    let status = fabric.client(1, WAIT).wait_connected(2, MESH_WAIT_MS).expect("mirror 1 redials mirrors 2 and 3");
    let mirror_back = t.elapsed();
    assert_eq!(status.members, 4, "origin, three mirrors");
    assert!(counter(&status, "member_dials") >= 2, "{:?}", status.counters);

    // The origin starts with no bootstrap list: it dials the mirrors it remembers at once.
    let remembered = fabric.watch_log(0, "members of the fabric known from the last run");
    fabric.start(0).unwrap();
    let t = Instant::now();
    let line = remembered.recv_timeout(WAIT).expect("the origin loads its members");
    assert!(line.contains("members=3"), "{line}");
    let status = fabric.client(0, WAIT).wait_connected(3, MESH_WAIT_MS).expect("the origin reaches its mirrors");
    let origin_back = t.elapsed();
    assert!(counter(&status, "member_dials") >= 3, "the origin dialed its mirrors: {:?}", status.counters);
    println!(
        "mirror restarted with the origin down: both other mirrors after {mirror_back:.2?}; origin restarted: all \
              3 mirrors after {origin_back:.2?}"
    );
    let published = fabric.publish().unwrap();
    fabric.wait_all_settled(published.seq, WAIT).unwrap();
}

/// A mirror that allows only the origin refuses the other mirror; the operator adds it to `network.allow` and sends
/// SIGHUP while the mirror syncs from the (slow) origin: the other mirror joins without a restart, serves the rest,
/// and the sync goes on without dropping the origin's connection.
#[test]
fn a_mirror_added_to_allow_by_sighup_joins_while_a_sync_runs() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = origin_only(3);
    opts[0].upload_bytes_per_sec = Some(2_000_000);
    let mut fabric = LocalFabric::create(dir.path(), binary(), 2, &opts).unwrap();
    let generated = generate(&fabric.nodes[0].tree, 0.02, 31);
    assert!(generated.bytes > 10_000_000, "the sync must take seconds at 2 MB/s: {} bytes", generated.bytes);
    let (origin, other) = (fabric.nodes[0].peer_id.clone(), fabric.nodes[2].peer_id.clone());
    // Mirror 2 holds the snapshot first.
    fabric.start(0).unwrap();
    fabric.start(2).unwrap();
    let published = fabric.publish().unwrap();
    fabric.client(2, WAIT).wait_settled(published.seq, WAIT_MS).unwrap();

    // Mirror 1 allows only the origin.
    let config = std::fs::read_to_string(&fabric.nodes[1].config).unwrap();
    let only_origin = config.replace("bootstrap = [", &format!("allow = [\"{origin}\"]\nbootstrap = ["));
    std::fs::write(&fabric.nodes[1].config, &only_origin).unwrap();
    fabric.start(1).unwrap();
    fabric.client(1, WAIT).wait_fetched(2_000_000, WAIT_MS).unwrap();
    let before = fabric.status(1).unwrap();
    assert_eq!(before.repos[0].state, "syncing");
    assert!(before.peers.iter().all(|p| p.id != other), "mirror 2 is refused: {:?}", before.peers);
    let origin_since = before.peers.iter().find(|p| p.id == origin).unwrap().connected_since_ms;

    // The operator adds mirror 2 to the list and reloads.
    let joined = fabric.watch_log(1, &format!("peer={other}}}: mirrormesh::daemon: connected"));
    let reloaded = fabric.watch_log(1, "configuration reloaded");
    let both = config.replace("bootstrap = [", &format!("allow = [\"{origin}\", \"{other}\"]\nbootstrap = ["));
    std::fs::write(&fabric.nodes[1].config, &both).unwrap();
    let t = Instant::now();
    signal(&fabric, 1, libc::SIGHUP);
    reloaded.recv_timeout(WAIT).expect("the reload is logged");
    joined.recv_timeout(Duration::from_millis(MESH_WAIT_MS)).expect("mirror 2 connects once allowed");
    let joined_after = t.elapsed();
    let done = fabric.client(1, WAIT).wait_settled(published.seq, WAIT_MS).unwrap();
    fabric.check_identical(1).unwrap();
    let from_other = done.peers.iter().find(|p| p.id == other).map_or(0, |p| p.bytes_received);
    let origin_now = done.peers.iter().find(|p| p.id == origin).expect("still connected to the origin");
    println!(
        "mirror 2 joined {joined_after:.2?} after SIGHUP; mirror 1 fetched {} bytes before, {from_other} from mirror 2 \
         after",
        before.bytes_fetched_total
    );
    assert!(from_other > 0, "mirror 2 served part of the sync");
    assert_eq!(origin_now.connected_since_ms, origin_since, "the origin's connection was kept");
    assert_eq!(counter(&done, "syncs_completed"), 1);
    assert_eq!(counter(&done, "reloads"), 1);
}

/// The origin's upload cap is lifted by SIGHUP while a mirror syncs from it: the rest arrives at once, on the same
/// connection.
#[test]
fn sighup_lifts_the_upload_cap_while_a_sync_runs() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let capped = NodeOptions { upload_bytes_per_sec: Some(200_000), ..NodeOptions::default() };
    let mut fabric = LocalFabric::create(dir.path(), binary(), 1, &[capped, NodeOptions::default()]).unwrap();
    let generated = generate(&fabric.nodes[0].tree, 0.01, 41);
    assert!(generated.bytes > 6_000_000, "30 s at the cap: {} bytes", generated.bytes);
    fabric.start_all().unwrap();
    let published = fabric.publish().unwrap();
    let before = fabric.client(1, WAIT).wait_fetched(200_000, WAIT_MS).unwrap();
    let since = before.peers[0].connected_since_ms;

    let reloaded = fabric.watch_log(0, "configuration reloaded");
    fabric.write_config(0, &NodeOptions::default()).unwrap();
    let t = Instant::now();
    signal(&fabric, 0, libc::SIGHUP);
    let line = reloaded.recv_timeout(WAIT).expect("the reload is logged");
    assert!(line.contains("upload_bytes_per_sec=unlimited"), "{line}");
    // At the old cap the rest would take over 25 s.
    let done = fabric.client(1, WAIT).wait_settled(published.seq, 15_000).expect("the rest arrives uncapped");
    println!("{} bytes at 200 kB/s, then the cap lifted: done {:.2?} after SIGHUP", generated.bytes, t.elapsed());
    fabric.check_identical(1).unwrap();
    assert_eq!(done.peers[0].connected_since_ms, since, "the same connection");
}

/// A peer hands a mirror link-local, multicast, unspecified and too many addresses, for itself, for its data plane
/// and for made-up members: each is refused and counted, and nothing it named is dialled.
#[test]
fn bad_addresses_from_a_peer_are_counted_and_not_dialled() {
    use futures::StreamExt;
    use libp2p::request_response::{Event, Message};
    use libp2p::swarm::SwarmEvent;
    use mirrormesh::swarm::{BehaviourEvent, WireRequest};
    use mirrormesh_proto::control::{ControlRequest, ControlResponse, Hello, MemberEntry, Members};

    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = LocalFabric::create(dir.path(), binary(), 1, &origin_only(2)).unwrap();
    fabric.start_all().unwrap();
    fabric.client(1, WAIT).wait_connected(1, WAIT_MS).unwrap();
    let before = fabric.status(1).unwrap();

    let listen: libp2p::Multiaddr = format!("/ip4/127.0.0.1/udp/{}/quic-v1", fabric.nodes[1].p2p_port).parse().unwrap();
    let mirror: libp2p::PeerId = fabric.nodes[1].peer_id.parse().unwrap();
    let repo = mirrormesh_proto::RepoId::new("alpine").unwrap();
    let addr = |text: &str| -> std::net::SocketAddr { text.parse().unwrap() };
    let bogus = |seed: u8| -> libp2p::PeerId {
        let key = libp2p::identity::Keypair::ed25519_from_bytes([seed; 32]).unwrap();
        key.public().to_peer_id()
    };
    // Only bad addresses: never a member, never dialled.
    let unreachable = bogus(1);
    // Eight good (loopback, in this lab) addresses: four kept.
    let crowded = bogus(2);
    let members = Members {
        repo: repo.clone(),
        listen: vec![addr("169.254.9.9:4001")],
        members: vec![
            MemberEntry {
                id: unreachable.to_bytes().into(),
                addrs: ["169.254.7.7:4001", "[fe80::1]:4001", "0.0.0.0:4001", "224.0.0.5:4001"].map(addr).to_vec(),
                seen_ago_ms: 0,
            },
            MemberEntry {
                id: crowded.to_bytes().into(),
                addrs: (1..=8).map(|i| addr(&format!("127.0.0.{i}:4001"))).collect(),
                seen_ago_ms: 0,
            },
        ],
    };
    let hello = Hello {
        repo,
        root: None,
        complete_seq: None,
        data_addrs: vec!["169.254.1.1:4002".into(), "224.0.0.1:4002".into(), "[::]:0".into()],
    };
    let client = fabric.client(1, WAIT);
    let me = mirrormesh::key::NodeKey::generate().unwrap();
    let my_id = me.peer_id().to_string();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (answers, status) = runtime.block_on(async move {
        let mut swarm = mirrormesh::swarm::build(&me, false).unwrap();
        swarm.dial(listen).unwrap();
        let mut answers = Vec::new();
        loop {
            let event = tokio::time::timeout(WAIT, swarm.select_next_some()).await.expect("the mirror answers");
            match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == mirror => {
                    let control = &mut swarm.behaviour_mut().control;
                    control.send_request(&mirror, WireRequest::Valid(ControlRequest::Hello(hello.clone())));
                    control.send_request(&mirror, WireRequest::Valid(ControlRequest::Members(members.clone())));
                }
                SwarmEvent::Behaviour(BehaviourEvent::Control(Event::Message {
                    message: Message::Response { response, .. },
                    ..
                })) => {
                    answers.push(response);
                    if answers.len() == 2 {
                        // Read while still connected: the mirror lists connected peers only. Its own advertisement
                        // and data address, and the made-up member's two, are link-local.
                        let status = client.wait_counter("addrs_rejected_link_local", 4, WAIT_MS).unwrap();
                        return (answers, status);
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Control(Event::OutboundFailure { error, .. })) => {
                    panic!("a request failed: {error}")
                }
                _ => {}
            }
        }
    });

    // Every data-plane address it gave was refused: none is shown, none will be dialled.
    let shown = status.peers.iter().find(|p| p.id == my_id).expect("the test peer is listed");
    assert_eq!(shown.data_address, None);
    assert!(answers.iter().any(|a| matches!(a, ControlResponse::Members(_))), "{answers:?}");
    let rejected = |why: &str| counter(&status, &format!("addrs_rejected_{why}"));
    assert!(rejected("multicast") >= 2, "{:?}", status.counters);
    assert!(rejected("unspecified") >= 1, "{:?}", status.counters);
    assert!(rejected("port_zero") >= 1, "{:?}", status.counters);
    assert_eq!(rejected("over_cap"), 4, "{:?}", status.counters);
    // The peer's own advertisement and the unreachable member named nothing this node may dial.
    assert_eq!(counter(&status, "members_without_addrs"), 2, "{:?}", status.counters);
    // The crowded member and the test peer itself joined; the unreachable one did not.
    assert_eq!(status.members, before.members + 2);
    // The made-up members are no node: the crowded one is dialled at its (loopback) addresses and fails; the
    // unreachable one is never dialled, so the mirror dialled at most the crowded one besides what it knew.
    let dials = counter(&status, "member_dials") - counter(&before, "member_dials");
    assert!(dials <= 1, "dialled {dials}: {:?}", status.counters);
}

/// The alert for a mirror that reaches only the origin although it knows other members fires after 10 minutes, and
/// neither for the origin (no origin among its peers) nor for a mirror with a mirror peer (`promtool test rules`).
#[test]
fn the_only_origin_alert_fires_after_ten_minutes_for_a_mirror_that_reaches_no_other_mirror() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/mirrormesh-alerts.yml");
    let dir = tempfile::tempdir().unwrap();
    let test = dir.path().join("only-origin.test.yml");
    let series = |instance: &str, peers: u32, origins: u32, members: u32| {
        format!(
            "      - series: 'mirrormesh_peers_connected{{instance=\"{instance}\"}}'\n        values: '{peers}x20'\n\
             \x20     - series: 'mirrormesh_origins_connected{{instance=\"{instance}\"}}'\n        values: '{origins}x20'\n\
             \x20     - series: 'mirrormesh_members{{instance=\"{instance}\"}}'\n        values: '{members}x20'\n"
        )
    };
    let text = format!(
        "rule_files:\n  - {rules}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{}{}{}{}\
         \x20   alert_rule_test:\n\
         \x20     - eval_time: 9m\n        alertname: MirrormeshOnlyOrigin\n        exp_alerts: []\n\
         \x20     - eval_time: 11m\n        alertname: MirrormeshOnlyOrigin\n        exp_alerts:\n\
         \x20         - exp_labels: {{severity: warn, instance: lonely}}\n\
         \x20           exp_annotations:\n\
         \x20             summary: \"lonely knows other mirrors but reaches none of them, only the origin: the origin \
         serves it alone\"\n",
        series("lonely", 1, 1, 5),
        series("meshed", 4, 1, 5),
        series("origin", 4, 0, 5),
        series("alone-in-fabric", 1, 1, 2),
        rules = rules.display()
    );
    std::fs::write(&test, text).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(&test)
        .output()
        .expect("promtool (Debian package prometheus) must be installed: apt-get install prometheus");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
