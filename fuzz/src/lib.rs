//! What several fuzz targets check the same way.

use std::fmt::Debug;

/// A decoder that accepted `data` must accept its own re-encoding and give the same value back.
pub fn check_round_trip<T: PartialEq + Debug, E>(
    data: &[u8],
    decode: fn(&[u8]) -> Result<T, E>,
    encode: fn(&T) -> Vec<u8>,
) {
    if let Ok(value) = decode(data) {
        let again = decode(&encode(&value)).unwrap_or_else(|_| panic!("{value:?} does not decode after re-encoding"));
        assert_eq!(again, value);
    }
}
