//! Every way a signed root can be refused, each a distinct error.

use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::root::{CLOCK_SKEW_MAX_MS, RootBody, RootError, RootTracker, SignedRoot, publisher_key};
use mirrormesh_proto::wire::DecodeError;
use mirrormesh_proto::{RepoId, Timestamp};

const SECRET: [u8; 32] = [7; 32];
const OTHER_SECRET: [u8; 32] = [9; 32];
const NOW: Timestamp = Timestamp(1_800_000_000_000);
const DAY_MS: u64 = 86_400_000;

fn body(seq: u64, root_byte: u8) -> RootBody {
    RootBody {
        repo: RepoId::new("alpine").unwrap(),
        seq,
        created: NOW,
        expires: NOW.plus_ms(7 * DAY_MS),
        root: NodeHash([root_byte; 32]),
        files: 10,
        bytes: 1000,
        delta: None,
    }
}

fn tracker() -> RootTracker {
    RootTracker::new([publisher_key(&SECRET)], [RepoId::new("alpine").unwrap()])
}

#[test]
fn a_good_root_is_accepted_and_round_trips() {
    let signed = SignedRoot::sign(&SECRET, &body(5, 1));
    let decoded = SignedRoot::decode(&signed.encode()).unwrap();
    assert_eq!(decoded, signed);
    let mut t = tracker();
    let verified = t.accept(NOW, &decoded).unwrap();
    assert_eq!(verified.body, body(5, 1));
    assert_eq!(t.latest(&RepoId::new("alpine").unwrap()).unwrap().body.seq, 5);
    // A newer one replaces it.
    t.accept(NOW, &SignedRoot::sign(&SECRET, &body(6, 2))).unwrap();
    assert_eq!(t.latest(&RepoId::new("alpine").unwrap()).unwrap().body.seq, 6);
}

#[test]
fn wrong_key() {
    let signed = SignedRoot::sign(&OTHER_SECRET, &body(1, 1));
    assert!(matches!(tracker().check(NOW, &signed), Err(RootError::UnknownPublisher(_))));
}

#[test]
fn bad_signature() {
    let mut signed = SignedRoot::sign(&SECRET, &body(1, 1));
    let last = signed.body.len() - 1;
    signed.body[last] ^= 1; // tampered body
    assert_eq!(tracker().check(NOW, &signed), Err(RootError::BadSignature));

    let mut signed = SignedRoot::sign(&SECRET, &body(1, 1));
    signed.signature[0] ^= 1; // tampered signature
    assert_eq!(tracker().check(NOW, &signed), Err(RootError::BadSignature));

    let mut signed = SignedRoot::sign(&SECRET, &body(1, 1));
    signed.signature.truncate(10); // truncated
    assert_eq!(tracker().check(NOW, &signed), Err(RootError::BadSignature));

    let mut signed = SignedRoot::sign(&SECRET, &body(1, 1));
    signed.signature.clear(); // unsigned
    assert_eq!(tracker().check(NOW, &signed), Err(RootError::BadSignature));
    let mut signed = SignedRoot::sign(&SECRET, &body(1, 1));
    signed.signature.iter_mut().for_each(|b| *b = 0); // an all-zero signature
    assert_eq!(tracker().check(NOW, &signed), Err(RootError::BadSignature));

    // A trusted key's identity claimed, another key's signature.
    let mut signed = SignedRoot::sign(&OTHER_SECRET, &body(1, 1));
    signed.publisher = publisher_key(&SECRET);
    assert_eq!(tracker().check(NOW, &signed), Err(RootError::BadSignature));
}

#[test]
fn rollback() {
    let mut t = tracker();
    t.accept(NOW, &SignedRoot::sign(&SECRET, &body(10, 1))).unwrap();
    assert_eq!(
        t.check(NOW, &SignedRoot::sign(&SECRET, &body(9, 2))),
        Err(RootError::Rollback { seq: 9, accepted: 10 })
    );
}

#[test]
fn replay_and_equivocation() {
    let mut t = tracker();
    let first = SignedRoot::sign(&SECRET, &body(10, 1));
    t.accept(NOW, &first).unwrap();
    assert_eq!(t.check(NOW, &first), Err(RootError::Replay { seq: 10 }));
    assert_eq!(t.check(NOW, &SignedRoot::sign(&SECRET, &body(10, 2))), Err(RootError::Equivocation { seq: 10 }));
}

#[test]
fn expired() {
    let signed = SignedRoot::sign(&SECRET, &body(1, 1));
    let later = NOW.plus_ms(7 * DAY_MS);
    assert_eq!(tracker().check(later, &signed), Err(RootError::Expired { expires: later, now: later }));
}

#[test]
fn created_in_the_future() {
    let mut b = body(1, 1);
    b.created = NOW.plus_ms(CLOCK_SKEW_MAX_MS + 1);
    let signed = SignedRoot::sign(&SECRET, &b);
    assert!(matches!(tracker().check(NOW, &signed), Err(RootError::FromFuture { .. })));
    // Within the allowed skew is fine.
    let mut b = body(1, 1);
    b.created = NOW.plus_ms(CLOCK_SKEW_MAX_MS);
    assert!(tracker().check(NOW, &SignedRoot::sign(&SECRET, &b)).is_ok());
}

#[test]
fn repository_not_followed() {
    let mut b = body(1, 1);
    b.repo = RepoId::new("debian").unwrap();
    assert!(matches!(tracker().check(NOW, &SignedRoot::sign(&SECRET, &b)), Err(RootError::UnknownRepo(_))));
}

#[test]
fn malformed_bodies() {
    // Expiry before creation.
    let mut b = body(1, 1);
    b.expires = b.created;
    assert!(matches!(tracker().check(NOW, &SignedRoot::sign(&SECRET, &b)), Err(RootError::Malformed(_))));
    // An invalid repository name inside a validly signed body is refused at decode.
    assert!(RepoId::new("../etc").is_err());
    assert!(RepoId::new("").is_err());
    assert!(RepoId::new(&"a".repeat(65)).is_err());
    // Oversized and garbage envelopes.
    assert!(matches!(SignedRoot::decode(&vec![1u8; 5000]), Err(DecodeError::TooLarge { .. })));
    assert!(matches!(SignedRoot::decode(&[1, 0xff, 0xff]), Err(DecodeError::Malformed(_))));
}

#[test]
fn distinct_reasons() {
    let reasons = [
        RootError::Malformed(DecodeError::Empty).reason(),
        RootError::UnknownPublisher(publisher_key(&SECRET)).reason(),
        RootError::BadSignature.reason(),
        RootError::UnknownRepo(RepoId::new("x").unwrap()).reason(),
        RootError::Expired { expires: NOW, now: NOW }.reason(),
        RootError::FromFuture { created: NOW, now: NOW }.reason(),
        RootError::Rollback { seq: 1, accepted: 2 }.reason(),
        RootError::Replay { seq: 1 }.reason(),
        RootError::Equivocation { seq: 1 }.reason(),
    ];
    let unique: std::collections::BTreeSet<_> = reasons.iter().collect();
    assert_eq!(unique.len(), reasons.len());
}
