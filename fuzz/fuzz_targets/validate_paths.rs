//! Path validators: never panic; what they accept obeys the rules they promise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrormesh_proto::path::{check_symlink_within, validate_name, validate_rel_path};

fuzz_target!(|data: &[u8]| {
    let Some((&depth, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    if validate_name(text).is_ok() {
        assert!(!text.is_empty() && !text.contains('/') && !text.contains('\0') && text != "." && text != "..");
    }
    if validate_rel_path(text).is_ok() {
        assert!(!text.starts_with('/') && !text.split('/').any(|c| c == ".." || c == "."));
    }
    if check_symlink_within(depth as usize, text).is_ok() {
        // Resolve lexically from a directory `depth` deep: it must never climb above the root.
        let mut level = depth as i64;
        for component in text.split('/') {
            level += if component == ".." { -1 } else { 1 };
            assert!(level >= 0, "accepted target {text:?} escapes from depth {depth}");
        }
    }
});
