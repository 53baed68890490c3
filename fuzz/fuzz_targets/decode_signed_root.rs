//! Signed root decoder and verifier: arbitrary bytes must be refused cleanly by decode or by the tracker.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrormesh_proto::root::{RootTracker, SignedRoot, publisher_key};
use mirrormesh_proto::{RepoId, Timestamp};

fuzz_target!(|data: &[u8]| {
    let Ok(root) = SignedRoot::decode(data) else { return };
    let _ = root.verify_signature();
    let Ok(repo) = RepoId::new("alpine") else { return };
    let tracker = RootTracker::new([publisher_key(&[7; 32]), root.publisher], [repo]);
    let _ = tracker.check(Timestamp(1_800_000_000_000), &root);
});
