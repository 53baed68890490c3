//! What peers can make the engine remember: floods of fake chunk ids (announced or requested) must leave the
//! origin's and a mirror's tables within their caps. Memory is measured with a counting allocator (per thread, so
//! tests running side by side do not see each other's allocations).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use mirrormesh_proto::chunk::ChunkId;
use mirrormesh_proto::control::{HAVE_CHUNKS_MAX, Have, Hello};
use mirrormesh_proto::node_store::NodeSource;
use mirrormesh_proto::root::{RootBody, SignedRoot, publisher_key};
use mirrormesh_proto::sync::scheduler::BanReason;
use mirrormesh_proto::sync::scheduler::SchedulerLimits;
use mirrormesh_proto::sync::seeder::{SeederLimits, ServeDecision};
use mirrormesh_proto::sync::{
    ChunkSet, Engine, EngineConfig, HOLDER_ENTRIES_MAX, HOLDINGS_PENDING_MAX, HOLDINGS_PER_PEER_MAX, IndexNames, Input,
    Output, PeerKey, Role, RootVia, SyncPhase, UNKNOWN_CHUNK_REQUESTS_MAX,
};
use mirrormesh_proto::tree::TreeDir;
use mirrormesh_proto::{Mono, Now, RepoId, Timestamp};
use support::*;

/// The time every test here runs at (nothing in them waits).
const NOW: Now = Now { mono: Mono(1_000_000), wall: Timestamp(1_800_000_000_000) };

/// Hands `input` to `engine`; the outputs stay queued (these tests look at tables, not at what the engine says).
fn call<P: PeerKey>(engine: &mut Engine<P>, now: Now, input: Input<P>, source: &impl NodeSource) {
    engine.handle(now, input, source).unwrap();
}

struct Counting;

thread_local! {
    /// Bytes allocated and not freed by this thread.
    static NET_BYTES: Cell<i64> = const { Cell::new(0) };
}

fn count(delta: i64) {
    let _ = NET_BYTES.try_with(|n| n.set(n.get() + delta));
}

// SAFETY: every call is forwarded unchanged to the system allocator; only a thread-local counter is updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn net_bytes() -> i64 {
    NET_BYTES.with(Cell::get)
}

const MIB: f64 = (1 << 20) as f64;
const SECRET: [u8; 32] = [9; 32];
/// Peers flooding at once.
const FLOODERS: u32 = 8;
/// Fake ids each flooder sends.
const FAKE_IDS_PER_PEER: u64 = 1 << 21;

fn repo() -> RepoId {
    RepoId::new("alpine").unwrap()
}

fn config<P: PeerKey>(role: Role, origin: P) -> EngineConfig<P> {
    EngineConfig {
        repo: repo(),
        role,
        trusted: vec![publisher_key(&SECRET)],
        origins: [origin].into_iter().collect(),
        salt: 1,
        scheduler: SchedulerLimits::default(),
        seeder: SeederLimits::default(),
        have_flush_ms: mirrormesh_proto::sync::HAVE_FLUSH_MS,
        resign_before_expiry_ms: None,
        index_names: IndexNames::exact(&["APKINDEX.tar.gz"]),
    }
}

/// A fake chunk id: the `n`th of peer `peer`'s.
fn fake(peer: u32, n: u64) -> ChunkId {
    let mut id = [0xfa; 32];
    id[..4].copy_from_slice(&peer.to_le_bytes());
    id[4..12].copy_from_slice(&n.to_le_bytes());
    ChunkId(id)
}

/// A small snapshot: its signed root, manifest nodes and chunks.
fn snapshot(now: Now) -> (SignedRoot, Nodes, ChunkSet) {
    let mut tree = TreeDir::default();
    for i in 0..20u64 {
        tree.insert_file(&format!("alpine/edge/main/x86_64/pkg{i}-1.0-r0.apk"), file(300_000 + i, i)).unwrap();
    }
    let (root, nodes) = build(&tree);
    let body = RootBody {
        repo: repo(),
        seq: 1,
        created: now.wall,
        expires: now.wall.plus_ms(86_400_000),
        root,
        files: 20,
        bytes: 0,
        delta: None,
    };
    let chunks = ChunkSet::of_snapshot(&nodes, &root).unwrap();
    (SignedRoot::sign(&SECRET, &body), nodes, chunks)
}

fn drain<P: PeerKey>(engine: &mut Engine<P>) {
    while engine.poll_output().is_some() {}
}

/// Sends every flooder's fake ids to `engine` in `Have`s, a batch from each in turn; fails as soon as the engine
/// keeps more than `allowed` bytes.
fn flood_haves(engine: &mut Engine<u32>, now: Now, seq: u64, per_peer: u64, allowed: f64, what: &str) -> f64 {
    let before = net_bytes();
    let mut sent = 0u64;
    let batch = HAVE_CHUNKS_MAX as u64;
    for start in (0..per_peer).step_by(HAVE_CHUNKS_MAX) {
        for peer in 1..=FLOODERS {
            let chunks = (start..(start + batch).min(per_peer)).map(|n| fake(peer, n)).collect();
            call(
                engine,
                now,
                Input::Have { from: peer, have: Have { repo: repo(), seq, complete_seq: None, chunks } },
                &Nodes::new(),
            );
            drain(engine);
            sent += batch;
        }
        let grown = (net_bytes() - before) as f64;
        assert!(
            grown <= allowed,
            "{what}: after {sent} fake ids from {FLOODERS} peers it keeps {:.1} MiB more",
            grown / MIB
        );
    }
    (net_bytes() - before) as f64
}

#[test]
fn fake_announcements_to_the_origin_are_not_kept() {
    let now = NOW;
    let (signed, _nodes, chunks) = snapshot(now);
    let mut origin = Engine::new(config(Role::Origin, 0), None, None);
    call(&mut origin, now, Input::Published { root: signed, chunks }, &Nodes::new());
    for peer in 1..=FLOODERS {
        call(&mut origin, now, Input::PeerConnected(peer), &Nodes::new());
    }
    drain(&mut origin);
    let grown = flood_haves(&mut origin, now, 1, FAKE_IDS_PER_PEER, MIB, "the origin");
    println!("the origin keeps {:.3} MiB more after {} fake announcements", grown / MIB, FAKE_IDS_PER_PEER * 8);
    assert_eq!(origin.table_sizes().holders, 0);
    assert_eq!(origin.announce_counts().outside_snapshot, FAKE_IDS_PER_PEER * u64::from(FLOODERS));
}

#[test]
fn requests_for_chunks_outside_the_snapshot_leave_no_trace_at_the_origin() {
    let now = NOW;
    let (signed, _nodes, chunks) = snapshot(now);
    let mut origin = Engine::new(config(Role::Origin, 0), None, None);
    call(&mut origin, now, Input::Published { root: signed, chunks }, &Nodes::new());
    for peer in 1..=FLOODERS {
        call(&mut origin, now, Input::PeerConnected(peer), &Nodes::new());
    }
    drain(&mut origin);
    let before = net_bytes();
    let mut asked = 0u64;
    let mut refused = 0u64;
    for n in 0..FAKE_IDS_PER_PEER {
        for peer in 1..=FLOODERS {
            if origin.serve_decision(now.mono, &peer, &fake(peer, n)) == ServeDecision::Refuse {
                refused += 1;
            }
            asked += 1;
        }
        if n % 4096 == 0 {
            let grown = (net_bytes() - before) as f64;
            assert!(
                grown <= MIB,
                "after {asked} requests for unknown chunks the origin keeps {:.1} MiB more",
                grown / MIB
            );
        }
    }
    println!("the origin keeps {:.3} MiB more after {asked} requests", (net_bytes() - before) as f64 / MIB);
    assert_eq!(refused, asked, "every request for an unknown chunk is refused");
    let sizes = origin.table_sizes();
    assert_eq!((sizes.seeder_recipients, sizes.seeder_redirects), (0, 0));
    let counts = origin.seeder_counts();
    assert_eq!(counts.refused_unknown + counts.refused_banned, asked);
    // The abuse is scored: every flooder is banned for the snapshot once over the limit.
    let mut bans = Vec::new();
    while let Some(out) = origin.poll_output() {
        if let Output::Ban { peer, reason, .. } = out {
            bans.push((peer, reason));
        }
    }
    assert_eq!(bans, (1..=FLOODERS).map(|p| (p, BanReason::UnknownChunks)).collect::<Vec<_>>());
    assert_eq!(counts.refused_unknown, u64::from(FLOODERS) * u64::from(UNKNOWN_CHUNK_REQUESTS_MAX + 1));
}

#[test]
fn announcements_before_the_transfer_are_capped_over_all_peers() {
    let now = NOW;
    let (signed, _nodes, _) = snapshot(now);
    let mut mirror = Engine::new(config(Role::Mirror, 0), None, None);
    let empty = Nodes::new();
    for peer in 0..=FLOODERS {
        call(&mut mirror, now, Input::PeerConnected(peer), &Nodes::new());
        let hello = Hello { repo: repo(), root: None, complete_seq: None, data_addrs: Vec::new() };
        call(&mut mirror, now, Input::Hello { from: peer, hello }, &empty);
    }
    // The root is accepted; its manifest is not here yet, so the mirror is fetching it.
    call(&mut mirror, now, Input::Root { via: RootVia::Gossip(0), root: signed }, &empty);
    assert_eq!(mirror.status().phase, SyncPhase::FetchingManifest);
    drain(&mut mirror);
    // What the cap allows: ~48 bytes per id in a B-tree set (measured below).
    let allowed = (HOLDINGS_PENDING_MAX * 64) as f64;
    let grown = flood_haves(&mut mirror, now, 1, 1 << 22, allowed, "the mirror");
    println!("the mirror keeps {:.1} MiB more after {} fake announcements", grown / MIB, (1u64 << 22) * 8);
    let pending = mirror.table_sizes().pending_holdings;
    assert_eq!(pending, HOLDINGS_PENDING_MAX);
    assert!(HOLDINGS_PER_PEER_MAX * FLOODERS as usize > HOLDINGS_PENDING_MAX, "the flood reaches the global cap");
}

/// A peer id the size of a libp2p `PeerId` (80 bytes), for realistic bytes per entry.
type WidePeer = [u64; 10];

fn wide(n: u32) -> WidePeer {
    let mut p = [0u64; 10];
    p[0] = u64::from(n);
    p
}

/// The `n`th chunk of a large snapshot.
fn real(n: u64) -> ChunkId {
    let mut id = [0x5e; 32];
    id[..8].copy_from_slice(&n.to_le_bytes());
    ChunkId(id)
}

/// Fills each capped table with entries for real chunks, with 80-byte peer ids, and measures its bytes per entry.
/// Prints the numbers behind the caps' memory bounds.
#[test]
fn tables_stay_within_their_caps_and_each_entry_costs_what_the_caps_assume() {
    let now = NOW;
    let (signed, _nodes, _) = snapshot(now);
    let snapshot_chunks = 1u64 << 20;
    let origin_peer = wide(0);
    let mut origin = Engine::new(config(Role::Origin, wide(u32::MAX)), None, None);
    call(
        &mut origin,
        now,
        Input::Published { root: signed.clone(), chunks: ChunkSet::new((0..snapshot_chunks).map(real)) },
        &Nodes::new(),
    );
    let peers: Vec<WidePeer> = (1..=FLOODERS).map(wide).collect();
    for p in &peers {
        call(&mut origin, now, Input::PeerConnected(*p), &Nodes::new());
    }
    let _ = origin_peer;
    drain(&mut origin);

    // Holders: the peers announce the snapshot's chunks, each chunk by one peer (the most bytes per entry).
    let before = net_bytes();
    for (i, start) in (0..snapshot_chunks).step_by(HAVE_CHUNKS_MAX).enumerate() {
        let chunks: Vec<ChunkId> = (start..start + HAVE_CHUNKS_MAX as u64).map(real).collect();
        let p = peers[i % peers.len()];
        call(
            &mut origin,
            now,
            Input::Have { from: p, have: Have { repo: repo(), seq: 1, complete_seq: None, chunks } },
            &Nodes::new(),
        );
    }
    drain(&mut origin);
    let holders = origin.table_sizes().holders;
    let per_holder = (net_bytes() - before) as f64 / holders as f64;
    assert_eq!(holders, HOLDER_ENTRIES_MAX, "the holders table fills to its cap and stops");
    assert!(origin.announce_counts().over_cap > 0);

    // Recipients: one asker gets every chunk once; asking again adds nothing.
    let seeder = SeederLimits::default();
    let first = peers[0];
    let before = net_bytes();
    let recipients_wanted = seeder.recipients_max as u64 + 1000;
    for n in 0..recipients_wanted.min(snapshot_chunks) {
        let _ = origin.serve_decision(now.mono, &first, &real(n));
    }
    let recipients = origin.table_sizes().seeder_recipients;
    let per_recipient = (net_bytes() - before) as f64 / recipients as f64;
    for n in 0..1000 {
        let _ = origin.serve_decision(now.mono, &first, &real(n));
    }
    assert_eq!(origin.table_sizes().seeder_recipients, recipients, "a recipient is remembered once per chunk");
    assert!(recipients <= seeder.recipients_max);

    // Redirects: a second asker is pointed at the first for every chunk still on its way there.
    let before = net_bytes();
    for n in 0..(seeder.redirects_max as u64 + 1000) {
        let _ = origin.serve_decision(now.mono, &peers[1], &real(n));
    }
    let redirects = origin.table_sizes().seeder_redirects;
    let per_redirect =
        (net_bytes() - before - (origin.table_sizes().seeder_recipients - recipients) as i64 * per_recipient as i64)
            as f64
            / redirects as f64;
    assert_eq!(redirects, seeder.redirects_max, "the redirect table fills to its cap and stops");

    // Pending holdings at a mirror (chunk ids only: the peer id is not repeated per entry).
    let mut mirror = Engine::new(config(Role::Mirror, wide(u32::MAX)), None, None);
    let empty = Nodes::new();
    call(&mut mirror, now, Input::PeerConnected(peers[0]), &Nodes::new());
    call(&mut mirror, now, Input::Root { via: RootVia::Gossip(peers[0]), root: signed }, &empty);
    drain(&mut mirror);
    let before = net_bytes();
    for start in (0..HOLDINGS_PER_PEER_MAX as u64).step_by(HAVE_CHUNKS_MAX) {
        let chunks: Vec<ChunkId> = (start..start + HAVE_CHUNKS_MAX as u64).map(real).collect();
        call(
            &mut mirror,
            now,
            Input::Have { from: peers[0], have: Have { repo: repo(), seq: 1, complete_seq: None, chunks } },
            &Nodes::new(),
        );
        drain(&mut mirror);
    }
    let pending = mirror.table_sizes().pending_holdings;
    let per_pending = (net_bytes() - before) as f64 / pending as f64;
    assert_eq!(pending, HOLDINGS_PER_PEER_MAX);

    println!("bytes per entry (80-byte peer ids) and at the cap:");
    for (what, per, cap) in [
        ("origin holders (chunk, peer)", per_holder, HOLDER_ENTRIES_MAX),
        ("seeder recipients (chunk, peer)", per_recipient, seeder.recipients_max),
        ("seeder redirects (peer, chunk)", per_redirect, seeder.redirects_max),
        ("mirror pending holdings (chunk)", per_pending, HOLDINGS_PENDING_MAX),
    ] {
        println!("  {what}: {per:.1} B x {cap} = {:.1} MiB", per * cap as f64 / MIB);
    }
    // The bounds the caps' documentation states.
    for (what, per, cap, budget_mib) in [
        ("holders", per_holder, HOLDER_ENTRIES_MAX, 32.0),
        ("redirects", per_redirect, seeder.redirects_max, 32.0),
        ("pending holdings", per_pending, HOLDINGS_PENDING_MAX, 32.0),
        ("recipients", per_recipient, seeder.recipients_max, 384.0),
    ] {
        let at_cap = per * cap as f64 / MIB;
        assert!(at_cap <= budget_mib, "{what}: {at_cap:.1} MiB at the cap, more than {budget_mib} MiB");
    }
}

#[test]
fn once_the_sync_is_planned_only_announcements_of_needed_chunks_are_kept() {
    let now = NOW;
    let (signed, nodes, _) = snapshot(now);
    let mut mirror = Engine::new(config(Role::Mirror, 0), None, None);
    for peer in 0..=FLOODERS {
        call(&mut mirror, now, Input::PeerConnected(peer), &Nodes::new());
        let hello = Hello { repo: repo(), root: None, complete_seq: None, data_addrs: Vec::new() };
        call(&mut mirror, now, Input::Hello { from: peer, hello }, &nodes);
    }
    // The manifest is here: the caller runs the plan's job, the sync is planned and the caller asked to stage (and
    // has not answered yet).
    call(&mut mirror, now, Input::Root { via: RootVia::Gossip(0), root: signed }, &nodes);
    assert_eq!(mirror.status().phase, SyncPhase::Planning);
    let job = std::iter::from_fn(|| mirror.poll_output())
        .find_map(|out| match out {
            Output::Plan(job) => Some(job),
            _ => None,
        })
        .expect("a complete manifest is handed out to plan");
    drain(&mut mirror);
    call(&mut mirror, now, Input::Planned(job.run(&nodes)), &nodes);
    assert_eq!(mirror.status().phase, SyncPhase::Staging);
    drain(&mut mirror);
    let grown = flood_haves(&mut mirror, now, 1, 1 << 20, MIB, "the staging mirror");
    println!("the staging mirror keeps {:.3} MiB more after {} fake announcements", grown / MIB, (1u64 << 20) * 8);
}

#[test]
fn a_restarted_origin_filters_announcements_once_it_is_given_its_snapshot_chunks() {
    let now = NOW;
    let (signed, _nodes, chunks) = snapshot(now);
    let body = signed.verify_signature().unwrap();
    let current = mirrormesh_proto::VerifiedRoot { signed, body };
    let mut origin = Engine::new(config(Role::Origin, 0), Some(current.clone()), Some(current));
    call(&mut origin, now, Input::PeerConnected(1), &Nodes::new());
    let fakes = |from: u64| Have {
        repo: repo(),
        seq: 1,
        complete_seq: None,
        chunks: (from..from + 10).map(|n| fake(1, n)).collect(),
    };
    // Not told its chunks yet: only the cap bounds what it keeps.
    call(&mut origin, now, Input::Have { from: 1, have: fakes(0) }, &Nodes::new());
    assert_eq!(origin.table_sizes().holders, 10);
    // Told: the old snapshot's holders are forgotten, and fake ids are dropped.
    call(&mut origin, now, Input::SnapshotChunks { seq: 1, chunks }, &Nodes::new());
    call(&mut origin, now, Input::Have { from: 1, have: fakes(10) }, &Nodes::new());
    assert_eq!(origin.table_sizes().holders, 0);
    assert_eq!(origin.announce_counts().outside_snapshot, 10);
    assert_eq!(origin.serve_decision(now.mono, &1, &fake(1, 0)), ServeDecision::Refuse);
}
