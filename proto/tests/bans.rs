//! Bans as the engine keeps them (`sync/bans.rs`): protocol offences counted per peer across reconnects, a protocol
//! ban that ends by itself (with `Unban`), snapshot bans lifted when the node moves on.

use mirrormesh_proto::root::publisher_key;
use mirrormesh_proto::sync::bans::{Offence, PROTOCOL_BAN_MS};
use mirrormesh_proto::sync::scheduler::{BanReason, SchedulerLimits};
use mirrormesh_proto::sync::seeder::SeederLimits;
use mirrormesh_proto::sync::{Engine, EngineConfig, Output, Role};
use mirrormesh_proto::{RepoId, Timestamp};

const T0: Timestamp = Timestamp(1_000_000);

fn mirror() -> Engine<u32> {
    let cfg = EngineConfig {
        repo: RepoId::new("alpine").unwrap(),
        role: Role::Mirror,
        trusted: vec![publisher_key(&[5; 32])],
        origins: [0].into_iter().collect(),
        salt: 1,
        scheduler: SchedulerLimits::default(),
        seeder: SeederLimits::default(),
        have_flush_ms: mirrormesh_proto::sync::HAVE_FLUSH_MS,
    };
    Engine::new(cfg, None, None)
}

fn bans_and_unbans(engine: &mut Engine<u32>) -> Vec<Output<u32>> {
    std::iter::from_fn(|| engine.poll_output())
        .filter(|o| matches!(o, Output::Ban { .. } | Output::Unban { .. }))
        .collect()
}

#[test]
fn malformed_requests_add_up_across_reconnects_and_the_ban_ends_by_itself() {
    let mut engine = mirror();
    let source = std::collections::BTreeMap::new();
    // Two malformed requests per connection, then it reconnects: the count is the peer's, not the connection's.
    for round in 0..3u64 {
        let at = T0.plus_ms(round * 1_000);
        engine.handle_peer_connected(at, 7);
        engine.handle_offence(at, 7, Offence::MalformedControl);
        engine.handle_peer_disconnected(at, &7);
    }
    let until = T0.plus_ms(2_000 + PROTOCOL_BAN_MS);
    assert_eq!(
        bans_and_unbans(&mut engine),
        vec![Output::Ban { peer: 7, reason: BanReason::MalformedControl, until: Some(until) }]
    );
    assert!(engine.is_protocol_banned(&7) && engine.is_banned(&7));
    engine.handle_tick(Timestamp(until.0 - 1), &source).unwrap();
    assert!(bans_and_unbans(&mut engine).is_empty(), "still banned just before the hour is over");
    engine.handle_tick(until, &source).unwrap();
    assert_eq!(bans_and_unbans(&mut engine), vec![Output::Unban { peer: 7 }]);
    assert!(!engine.is_banned(&7));
}

#[test]
fn occasional_refusals_never_ban_a_peer_repeated_ones_do() {
    let mut engine = mirror();
    let source = std::collections::BTreeMap::new();
    // A refused data request every two minutes for three days (a slow link tripping a timeout now and then).
    for i in 0..3 * 24 * 30u64 {
        let at = T0.plus_ms(i * 120_000);
        engine.handle_offence(at, 3, Offence::RefusedDataRequest);
        engine.handle_tick(at, &source).unwrap();
    }
    assert!(bans_and_unbans(&mut engine).is_empty());
    // Sixteen at once is a flood.
    let at = T0.plus_ms(4 * 24 * 3_600_000);
    for i in 0..Offence::RefusedDataRequest.limit() {
        engine.handle_offence(at.plus_ms(i), 4, Offence::RefusedDataRequest);
    }
    let bans = bans_and_unbans(&mut engine);
    assert!(matches!(bans.as_slice(), [Output::Ban { peer: 4, reason: BanReason::BadDataRequests, until: Some(_) }]));
}
