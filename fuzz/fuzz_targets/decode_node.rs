//! Manifest node decoder: arbitrary bytes must decode to a valid node or fail cleanly; a node that decodes
//! re-encodes to the same bytes (the encoding is canonical, so the hash names exactly one node).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrormesh_proto::node::{Node, NodeHash, verify_node};

fuzz_target!(|data: &[u8]| {
    if let Ok(node) = Node::decode(data) {
        assert_eq!(node.encode(), data, "decoded node must re-encode to its bytes");
        assert!(verify_node(&NodeHash::of(data), data).is_ok());
    }
});
