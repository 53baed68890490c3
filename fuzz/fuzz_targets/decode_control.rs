//! Control-plane decoders (libp2p request-response frames): arbitrary bytes must be refused cleanly, and anything
//! accepted must re-encode to bytes that decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrormesh_fuzz::check_round_trip;
use mirrormesh_proto::control::{ControlRequest, ControlResponse};

fuzz_target!(|data: &[u8]| {
    check_round_trip(data, ControlRequest::decode, ControlRequest::encode);
    check_round_trip(data, ControlResponse::decode, ControlResponse::encode);
});
