//! Bans as the engine keeps them (`sync/bans.rs`): protocol offences counted per peer across reconnects, a protocol
//! ban that ends by itself (with `Unban`), snapshot bans lifted when the node moves on.

use std::collections::BTreeMap;

use mirrormesh_proto::root::publisher_key;
use mirrormesh_proto::sync::bans::{Offence, PROTOCOL_BAN_MS};
use mirrormesh_proto::sync::scheduler::{BanReason, SchedulerLimits};
use mirrormesh_proto::sync::seeder::SeederLimits;
use mirrormesh_proto::sync::{Engine, EngineConfig, IndexNames, Input, Output, Role};
use mirrormesh_proto::{Mono, Now, RepoId, Timestamp};

const T0: Now = Now { mono: Mono(1_000_000), wall: Timestamp(1_800_000_000_000) };

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
        resign_before_expiry_ms: None,
        index_names: IndexNames::exact(&["APKINDEX.tar.gz"]),
    };
    Engine::new(cfg, None, None)
}

fn call(engine: &mut Engine<u32>, now: Now, input: Input<u32>) {
    engine.handle(now, input, &BTreeMap::new()).unwrap();
}

fn bans_and_unbans(engine: &mut Engine<u32>) -> Vec<Output<u32>> {
    std::iter::from_fn(|| engine.poll_output())
        .filter(|o| matches!(o, Output::Ban { .. } | Output::Unban { .. }))
        .collect()
}

#[test]
fn malformed_requests_add_up_across_reconnects_and_the_ban_ends_by_itself() {
    let mut engine = mirror();
    // Two malformed requests per connection, then it reconnects: the count is the peer's, not the connection's.
    for round in 0..3u64 {
        let at = T0.plus_ms(round * 1_000);
        call(&mut engine, at, Input::PeerConnected(7));
        call(&mut engine, at, Input::Offence { peer: 7, offence: Offence::MalformedControl });
        call(&mut engine, at, Input::PeerDisconnected(7));
    }
    let until = T0.plus_ms(2_000 + PROTOCOL_BAN_MS);
    assert_eq!(
        bans_and_unbans(&mut engine),
        vec![Output::Ban { peer: 7, reason: BanReason::MalformedControl, until: Some(until.mono) }]
    );
    assert!(engine.is_protocol_banned(&7) && engine.is_banned(&7));
    assert_eq!(engine.poll_timeout(), Some(until.mono), "the engine asks to run when the ban ends");
    call(&mut engine, Now { mono: Mono(until.mono.0 - 1), wall: until.wall }, Input::Timeout);
    assert!(bans_and_unbans(&mut engine).is_empty(), "still banned just before the hour is over");
    call(&mut engine, until, Input::Timeout);
    assert_eq!(bans_and_unbans(&mut engine), vec![Output::Unban { peer: 7 }]);
    assert!(!engine.is_banned(&7));
    assert_eq!(engine.poll_timeout(), None, "an idle engine with no ban waits for events only");
}

#[test]
fn occasional_refusals_never_ban_a_peer_repeated_ones_do() {
    let mut engine = mirror();
    // A refused data request every two minutes for three days (a slow link tripping a timeout now and then).
    for i in 0..3 * 24 * 30u64 {
        let at = T0.plus_ms(i * 120_000);
        call(&mut engine, at, Input::Offence { peer: 3, offence: Offence::RefusedDataRequest });
        call(&mut engine, at, Input::Timeout);
    }
    assert!(bans_and_unbans(&mut engine).is_empty());
    // Sixteen at once is a flood.
    let at = T0.plus_ms(4 * 24 * 3_600_000);
    for i in 0..Offence::RefusedDataRequest.limit() {
        call(&mut engine, at.plus_ms(i), Input::Offence { peer: 4, offence: Offence::RefusedDataRequest });
    }
    let bans = bans_and_unbans(&mut engine);
    assert!(matches!(bans.as_slice(), [Output::Ban { peer: 4, reason: BanReason::BadDataRequests, until: Some(_) }]));
}
