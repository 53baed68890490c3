//! The wire encoding shared by every message and content-addressed object: one format-version byte, then the
//! value in postcard (varint integers, length-prefixed sequences, no field names).
//!
//! Decoding is defensive. The input length is checked against the caller's limit before anything is parsed;
//! sequences whose length a peer chooses are read through [`bounded_vec`], which refuses a declared length above
//! the field's limit before allocating; trailing bytes are an error; and every decoded type is validated before it
//! is returned. A decoder returns a [`DecodeError`], never panics, and never allocates more than a small constant
//! times its (already bounded) input.

use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserializer, Serialize};
use thiserror::Error;

/// Version byte that opens every encoded message and object. A decoder refuses any other value.
pub const WIRE_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("input is {len} bytes, limit {max}")]
    TooLarge { len: usize, max: usize },
    #[error("empty input")]
    Empty,
    #[error("unsupported format version {0} (this build speaks {WIRE_VERSION})")]
    Version(u8),
    #[error("malformed encoding: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
    #[error("not the canonical encoding of its value")]
    NonCanonical,
    #[error("invalid value: {0}")]
    Invalid(&'static str),
    #[error("bad path: {0}")]
    Path(#[from] crate::path::PathError),
}

/// Encodes `value` with the version byte in front.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard fails only on a writer error or a value serde cannot express; neither exists for our types and an
    // in-memory Vec. Should it ever happen, the bare version byte fails to decode at the receiver: a clear error
    // there, not a panic here.
    postcard::to_extend(value, vec![WIRE_VERSION]).unwrap_or_else(|_| vec![WIRE_VERSION])
}

/// Decodes a value written by [`encode`], refusing inputs longer than `max_len`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<T, DecodeError> {
    if bytes.len() > max_len {
        return Err(DecodeError::TooLarge { len: bytes.len(), max: max_len });
    }
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != WIRE_VERSION {
        return Err(DecodeError::Version(version));
    }
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

/// [`decode`], and also refuses input that is not exactly what [`encode`] produces for the decoded value (postcard
/// accepts overlong varints). Content-addressed objects use this, so one value has one encoding and one hash.
pub fn decode_canonical<T: DeserializeOwned + Serialize>(bytes: &[u8], max_len: usize) -> Result<T, DecodeError> {
    let value = decode(bytes, max_len)?;
    if encode(&value) != bytes {
        return Err(DecodeError::NonCanonical);
    }
    Ok(value)
}

/// `#[serde(deserialize_with = "bounded_vec::<_, _, MAX>")]`: reads a sequence, refusing more than `MAX` elements
/// before allocating for them.
pub fn bounded_vec<'de, D, T, const MAX: usize>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    struct BoundedVisitor<T, const MAX: usize>(std::marker::PhantomData<T>);

    impl<'de, T: serde::Deserialize<'de>, const MAX: usize> Visitor<'de> for BoundedVisitor<T, MAX> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a sequence of at most {MAX} elements")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let declared = seq.size_hint().unwrap_or(0);
            if declared > MAX {
                return Err(serde::de::Error::invalid_length(declared, &self));
            }
            let mut out = Vec::with_capacity(declared);
            while let Some(item) = seq.next_element()? {
                if out.len() == MAX {
                    return Err(serde::de::Error::invalid_length(MAX + 1, &self));
                }
                out.push(item);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_seq(BoundedVisitor::<T, MAX>(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Small {
        #[serde(deserialize_with = "bounded_vec::<_, _, 3>")]
        items: Vec<u32>,
    }

    #[test]
    fn round_trip_and_limits() {
        let v = Small { items: vec![1, 2, 3] };
        let bytes = encode(&v);
        assert_eq!(bytes[0], WIRE_VERSION);
        assert_eq!(decode::<Small>(&bytes, 100), Ok(v));
        assert_eq!(decode::<Small>(&bytes, 2), Err(DecodeError::TooLarge { len: bytes.len(), max: 2 }));
        assert_eq!(decode::<Small>(&[], 100), Err(DecodeError::Empty));
        let mut wrong = bytes.clone();
        wrong[0] = 9;
        assert_eq!(decode::<Small>(&wrong, 100), Err(DecodeError::Version(9)));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(decode::<Small>(&trailing, 100), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn declared_length_over_limit_is_refused_before_allocation() {
        // A peer declares 2^32 elements in five bytes: refused by the bound, nothing is reserved.
        let bytes = [WIRE_VERSION, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(matches!(decode::<Small>(&bytes, 100), Err(DecodeError::Malformed(_))));
        let four = encode(&Small { items: vec![1, 2, 3, 4] });
        assert!(matches!(decode::<Small>(&four, 100), Err(DecodeError::Malformed(_))));
    }
}
