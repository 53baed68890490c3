//! Data-plane frame decoders (chunk requests and replies): arbitrary bytes must be refused cleanly, and anything
//! accepted must re-encode to bytes that decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrormesh_proto::transfer::{ChunkReply, ChunkRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = ChunkRequest::decode(data) {
        let again = ChunkRequest::decode(&request.encode()).expect("a decoded request re-encodes");
        assert_eq!(again, request);
    }
    if let Ok(reply) = ChunkReply::decode(data) {
        let again = ChunkReply::decode(&reply.encode()).expect("a decoded reply re-encodes");
        assert_eq!(again, reply);
    }
});
