//! `hash_id!`: the one definition of a 32-byte content identifier newtype (chunk ids, manifest node hashes, delta
//! hashes). Each kind is its own type so a node hash can never be passed where a chunk id is expected.

/// Defines a 32-byte identifier newtype with hex parsing, a short `Display` (12 hex digits, enough to tell ids
/// apart in logs and tables) and a full-length `Debug`/`to_hex`.
macro_rules! hash_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The full identifier as 64 lowercase hex digits.
            pub fn to_hex(&self) -> String {
                let mut s = String::with_capacity(64);
                for b in self.0 {
                    s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
                    s.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
                }
                s
            }

            /// Parses 64 hex digits.
            pub fn from_hex(s: &str) -> Option<Self> {
                let bytes = s.as_bytes();
                if bytes.len() != 64 {
                    return None;
                }
                let mut out = [0u8; 32];
                for (i, pair) in bytes.chunks_exact(2).enumerate() {
                    let hi = (pair[0] as char).to_digit(16)?;
                    let lo = (pair[1] as char).to_digit(16)?;
                    out[i] = (hi * 16 + lo) as u8;
                }
                Some(Self(out))
            }

            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.to_hex()[..12])
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl std::str::FromStr for $name {
            type Err = crate::wire::DecodeError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::from_hex(s).ok_or(crate::wire::DecodeError::Invalid("expected 64 hex digits"))
            }
        }
    };
}

pub(crate) use hash_id;
