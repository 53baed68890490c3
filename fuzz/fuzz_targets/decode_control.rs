//! Control-plane decoders (libp2p request-response frames): arbitrary bytes must be refused cleanly, and anything
//! accepted must re-encode to bytes that decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrormesh_proto::control::{ControlRequest, ControlResponse};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = ControlRequest::decode(data) {
        let again = ControlRequest::decode(&request.encode()).expect("a decoded request re-encodes");
        assert_eq!(again, request);
    }
    if let Ok(response) = ControlResponse::decode(data) {
        let again = ControlResponse::decode(&response.encode()).expect("a decoded response re-encodes");
        assert_eq!(again, response);
    }
});
