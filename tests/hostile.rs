//! Peers with bad intent against real daemons on loopback: forged roots gossiped into the fabric, and a peer asking
//! for the same large manifest answers over and over. Every wait is on an event (a daemon's log line or counter,
//! the admin API's long-poll `/wait`, a libp2p event).

use std::path::Path;
use std::time::Duration;

use mirrormesh::local_fabric::{LocalFabric, NodeOptions};

const WAIT: Duration = Duration::from_secs(120);
const WAIT_MS: u64 = 120_000;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

fn write(path: &Path, content: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn counter(fabric: &LocalFabric, i: usize, name: &str) -> u64 {
    fabric.status(i).unwrap().counters.get(name).copied().unwrap_or(0)
}

/// A forged root gossiped to one mirror goes no further: gossip is forwarded only after the node checked it.
#[test]
fn a_forged_root_is_not_forwarded_by_the_mirror_that_receives_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = LocalFabric::create(dir.path(), binary(), 3, &vec![NodeOptions::default(); 4]).unwrap();
    // Node 3 is an origin with a key nobody trusts, and it knows only mirror 1.
    let forger = &fabric.nodes[3];
    let config = std::fs::read_to_string(&forger.config).unwrap().replace("role = \"mirror\"", "role = \"origin\"");
    let only_mirror1 = format!(
        "bootstrap = [\"/ip4/127.0.0.1/udp/{}/quic-v1/p2p/{}\"]",
        fabric.nodes[1].p2p_port, fabric.nodes[1].peer_id
    );
    let config: String = config
        .lines()
        .map(|l| if l.starts_with("bootstrap") { only_mirror1.clone() } else { l.to_owned() } + "\n")
        .collect();
    std::fs::write(&forger.config, config).unwrap();
    // Mirror 1 would name mirror 2 to the forger in the peer exchange: mirror 2 lets in only the origin and mirror 1,
    // so whatever reaches it of the forger's must have been forwarded.
    let (origin, mirror1) = (fabric.nodes[0].peer_id.clone(), fabric.nodes[1].peer_id.clone());
    let config = std::fs::read_to_string(&fabric.nodes[2].config).unwrap();
    let config = config.replace("bootstrap = [", &format!("allow = [\"{origin}\", \"{mirror1}\"]\nbootstrap = ["));
    std::fs::write(&fabric.nodes[2].config, config).unwrap();
    write(&forger.tree.join("alpine/evil.apk"), b"not from the origin");
    write(&fabric.nodes[0].tree.join("alpine/good.apk"), b"from the origin");
    for i in 0..3 {
        fabric.start(i).unwrap();
    }
    let first = fabric.publish().unwrap();
    fabric.wait_all_settled(first.seq, WAIT).unwrap();

    let connected = fabric.watch_log(1, &format!("peer={}}}: mirrormesh::daemon: connected", fabric.nodes[3].peer_id));
    fabric.start(3).unwrap();
    connected.recv_timeout(WAIT).expect("the forger connects to mirror 1");
    // Mirror 1 hears the forgery twice (the forger's gossip and its hello push) and refuses it.
    fabric.client(3, WAIT).publish().unwrap();
    fabric.client(1, WAIT).wait_counter("roots_rejected_unknown_publisher", 2, WAIT_MS).unwrap();

    // A genuine root follows the same way; once mirror 2 applied it, a forwarded forgery would have arrived first.
    write(&fabric.nodes[0].tree.join("alpine/good2.apk"), b"from the origin too");
    let second = fabric.publish().unwrap();
    for i in 1..=2 {
        fabric.client(i, WAIT).wait_settled(second.seq, WAIT_MS).unwrap();
    }
    assert_eq!(counter(&fabric, 2, "roots_rejected_unknown_publisher"), 0, "mirror 2 never heard the forgery");
    assert!(!fabric.nodes[2].tree.join("alpine/evil.apk").exists());
}

/// A peer asks the origin for its newest delta (a few MB, for a 40-byte request) hundreds of times at once: it
/// gets what its budget allows (`ANSWER_BURST_BYTES`, then `ANSWER_BYTES_PER_PEER_PER_SEC`, plus the answers in
/// flight), "not held" for the rest, and the node counts it.
#[test]
fn a_peer_asking_for_a_large_delta_over_and_over_is_held_to_its_budget() {
    use futures::StreamExt;
    use libp2p::request_response::{Event, Message};
    use libp2p::swarm::SwarmEvent;
    use mirrormesh::daemon::{ANSWER_BURST_BYTES, ANSWER_BYTES_PER_PEER_PER_SEC, ANSWERS_IN_FLIGHT_PER_PEER_MAX};
    use mirrormesh::swarm::{BehaviourEvent, WireRequest};
    use mirrormesh_proto::control::{ControlRequest, ControlResponse, Hello};

    const FILES: usize = 25_000;
    const REQUESTS: usize = 240;
    const IN_FLIGHT: usize = 32;

    let dir = tempfile::tempdir().unwrap();
    let mut fabric = LocalFabric::create(dir.path(), binary(), 0, &[NodeOptions::default()]).unwrap();
    let tree = fabric.nodes[0].tree.join("alpine/edge/main/x86_64");
    for i in 0..FILES {
        write(&tree.join(format!("p{i:05}-1.0-r0.apk")), format!("package {i}").as_bytes());
    }
    fabric.start(0).unwrap();
    fabric.publish().unwrap();
    // Every file changes: the delta names all of them.
    for i in 0..FILES {
        write(&tree.join(format!("p{i:05}-1.0-r0.apk")), format!("package {i}, rebuilt").as_bytes());
    }
    let second = fabric.publish().unwrap();
    let delta_bytes = second.delta_bytes.expect("a delta was published") as u64;
    assert!(delta_bytes > 1 << 20, "{delta_bytes}");

    let listen: libp2p::Multiaddr = format!("/ip4/127.0.0.1/udp/{}/quic-v1", fabric.nodes[0].p2p_port).parse().unwrap();
    let origin: libp2p::PeerId = fabric.nodes[0].peer_id.parse().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (answered, held_bytes, elapsed) = runtime.block_on(async move {
        let key = mirrormesh::key::NodeKey::generate().unwrap();
        let mut swarm = mirrormesh::swarm::build(&key, false).unwrap();
        swarm.dial(listen).unwrap();
        let hello = Hello {
            repo: mirrormesh_proto::RepoId::new("alpine").unwrap(),
            root: None,
            complete_seq: None,
            data_addrs: Vec::new(),
        };
        let (mut answered, mut held_bytes, mut started) = (0, 0u64, None);
        let (mut sent, mut done, mut delta_hash) = (0, 0, None);
        loop {
            let event = tokio::time::timeout(WAIT, swarm.select_next_some()).await.expect("the origin answers");
            match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == origin => {
                    let hello = ControlRequest::Hello(hello.clone());
                    swarm.behaviour_mut().control.send_request(&origin, WireRequest::Valid(hello));
                }
                SwarmEvent::Behaviour(BehaviourEvent::Control(Event::Message {
                    message: Message::Response { response, .. },
                    ..
                })) => match response {
                    ControlResponse::Hello(theirs) => {
                        let body = theirs.root.expect("the origin's root").verify_signature().unwrap();
                        let hash = body.delta.expect("the root names its delta").hash;
                        started = Some(std::time::Instant::now());
                        delta_hash = Some(hash);
                        // As many at once as a connection carries streams (the rest as answers come).
                        for _ in 0..IN_FLIGHT {
                            let request = WireRequest::Valid(ControlRequest::GetDelta { hash });
                            swarm.behaviour_mut().control.send_request(&origin, request);
                        }
                        sent = IN_FLIGHT;
                    }
                    ControlResponse::Delta { delta } => {
                        if let Some(delta) = delta {
                            answered += 1;
                            held_bytes += delta.len() as u64;
                        }
                        done += 1;
                        if done == REQUESTS {
                            return (answered, held_bytes, started.unwrap().elapsed());
                        }
                        if sent < REQUESTS {
                            let hash = delta_hash.unwrap();
                            let request = WireRequest::Valid(ControlRequest::GetDelta { hash });
                            swarm.behaviour_mut().control.send_request(&origin, request);
                            sent += 1;
                        }
                    }
                    _ => {}
                },
                SwarmEvent::Behaviour(BehaviourEvent::Control(Event::OutboundFailure { error, .. })) => {
                    panic!("a request failed: {error}")
                }
                _ => {}
            }
        }
    });
    let allowed = ANSWER_BURST_BYTES as f64 + ANSWER_BYTES_PER_PEER_PER_SEC as f64 * elapsed.as_secs_f64();
    println!(
        "{REQUESTS} requests for a {delta_bytes}-byte delta: {answered} answered in {elapsed:?}, {held_bytes} bytes \
         (budget {allowed:.0})"
    );
    assert!(answered > 0, "the budget lets some through");
    let in_flight = (ANSWERS_IN_FLIGHT_PER_PEER_MAX as u64 * delta_bytes) as f64;
    assert!(held_bytes as f64 <= allowed + in_flight, "{held_bytes} bytes, budget {allowed:.0} + {in_flight}");
    assert!(fabric.status(0).unwrap().counters.get("manifest_answers_throttled").copied().unwrap_or(0) > 0);
}

fn rss(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Eight peers announce made-up chunk ids to an origin and a mirror as fast as the control plane carries them, while
/// the mirror syncs an update: neither node's peak memory grows by more than 64 MiB over what it used with the eight
/// peers connected and synced.
#[test]
fn a_flood_of_fake_announcements_from_eight_peers_costs_bounded_memory() {
    const FLOODERS: usize = 8;
    const BOUND: u64 = 64 << 20;
    // Made-up ids announced to the origin while memory is watched: about 225 MiB at the 113 bytes per id the origin
    // used to keep for each.
    const FAKES: u64 = 2_000_000;
    let dir = tempfile::tempdir().unwrap();
    let flooder =
        NodeOptions { extra_config: "\n[faults]\nannounce_fake_chunks = true\n".into(), ..NodeOptions::default() };
    let mut opts = vec![NodeOptions::default(); 2];
    opts.extend(std::iter::repeat_n(flooder, FLOODERS));
    let mut fabric = LocalFabric::create(dir.path(), binary(), 1 + FLOODERS, &opts).unwrap();
    let tree = fabric.nodes[0].tree.join("alpine/edge/main/x86_64");
    for i in 0..200 {
        write(&tree.join(format!("p{i:03}-1.0-r0.apk")), &vec![i as u8; 50_000]);
    }
    fabric.start_all().unwrap();
    let first = fabric.publish().unwrap();
    fabric.wait_all_settled(first.seq, WAIT).unwrap();
    let flooding = fabric.client(0, WAIT).wait_counter("announced_outside_snapshot", 1, WAIT_MS).unwrap();
    let (origin, mirror) = (fabric.pid(0).unwrap(), fabric.pid(1).unwrap());
    let before = [rss(origin, "VmRSS:"), rss(mirror, "VmRSS:")];
    for pid in [origin, mirror] {
        // Resets the peak (VmHWM) to the current resident size.
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    }

    // An update the mirror syncs under the flood, and the flood goes on until the origin heard FAKES more ids.
    for i in 0..50 {
        write(&tree.join(format!("q{i:03}-1.0-r0.apk")), &vec![i as u8 ^ 0x55; 60_000]);
    }
    let second = fabric.publish().unwrap();
    fabric.client(1, WAIT).wait_settled(second.seq, WAIT_MS).unwrap();
    let already = flooding.counters["announced_outside_snapshot"];
    let status = fabric.client(0, WAIT).wait_counter("announced_outside_snapshot", already + FAKES, WAIT_MS).unwrap();
    let peak = [rss(origin, "VmHWM:"), rss(mirror, "VmHWM:")];
    let heard = |i: usize| -> u64 {
        ["announced_outside_snapshot", "announced_over_cap"].iter().map(|c| counter(&fabric, i, c)).sum()
    };
    println!(
        "origin: {} MiB before, peak {} MiB while {} more made-up ids arrived; mirror: {} MiB before, peak {} MiB \
         through an update under the flood ({} made-up ids dropped in all)",
        before[0] >> 20,
        peak[0] >> 20,
        status.counters["announced_outside_snapshot"] - already,
        before[1] >> 20,
        peak[1] >> 20,
        heard(1),
    );
    for (name, (b, p)) in ["origin", "mirror"].iter().zip(before.iter().zip(peak)) {
        assert!(p <= b + BOUND, "{name}: {} MiB before, peak {} MiB", b >> 20, p >> 20);
    }
}
