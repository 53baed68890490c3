//! Data-plane frame decoders (chunk requests and replies): arbitrary bytes must be refused cleanly, and anything
//! accepted must re-encode to bytes that decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrormesh_fuzz::check_round_trip;
use mirrormesh_proto::transfer::{ChunkReply, ChunkRequest};

fuzz_target!(|data: &[u8]| {
    check_round_trip(data, ChunkRequest::decode, ChunkRequest::encode);
    check_round_trip(data, ChunkReply::decode, ChunkReply::encode);
});
