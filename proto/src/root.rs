//! Signed roots: the publisher's statement "snapshot `seq` of repository `repo` is the tree at `root`".
//!
//! A [`SignedRoot`] carries the publisher's ed25519 public key, the encoded [`RootBody`] and a signature over a
//! domain-separated copy of those bytes. [`RootTracker`] holds the pinned publisher keys and the newest root accepted
//! per repository, and is the only way a root from the network becomes trusted: it rejects an unknown key, a bad
//! signature, a root for a repository it does not follow, an expired root, a root created absurdly in the future,
//! a sequence number below the accepted one (rollback), and a different root under the accepted sequence number
//! (equivocation). The same root again is reported as [`RootError::Replay`] so callers can ignore it quietly.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::delta::DeltaHash;
use crate::hash_id::hash_id;
use crate::node::NodeHash;
use crate::timestamp::Timestamp;
use crate::wire::{self, DecodeError};

/// Largest encoded signed root.
pub const SIGNED_ROOT_BYTES_MAX: usize = 1024;
/// Longest repository name.
pub const REPO_NAME_BYTES_MAX: usize = 64;
/// How far in the future a root's creation time may lie before it is refused (clock skew between hosts).
pub const CLOCK_SKEW_MAX_MS: u64 = 5 * 60 * 1000;

const SIGNING_CONTEXT: &[u8] = b"mirrormesh signed root v1\0";

/// An ed25519 public key that may sign roots.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublisherKey(pub [u8; 32]);

impl std::fmt::Display for PublisherKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for PublisherKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublisherKey(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// A repository name: 1 to 64 bytes of `[A-Za-z0-9._-]` (checked when decoded, too).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoId(String);

impl TryFrom<String> for RepoId {
    type Error = DecodeError;
    fn try_from(name: String) -> Result<Self, DecodeError> {
        RepoId::new(&name)
    }
}

impl From<RepoId> for String {
    fn from(repo: RepoId) -> String {
        repo.0
    }
}

impl RepoId {
    pub fn new(name: &str) -> Result<Self, DecodeError> {
        let ok = !name.is_empty()
            && name.len() <= REPO_NAME_BYTES_MAX
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(DecodeError::Invalid("repository name must be 1-64 of [A-Za-z0-9._-]"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoId({})", self.0)
    }
}

/// Where a snapshot's delta against an earlier one can be fetched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaRef {
    /// Sequence number of the snapshot the delta applies to.
    pub base_seq: u64,
    /// Root of that snapshot.
    pub base_root: NodeHash,
    pub hash: DeltaHash,
    /// Encoded size, so a receiver can decide between the delta and fetching nodes.
    pub len: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootBody {
    pub repo: RepoId,
    /// Strictly increasing per repository.
    pub seq: u64,
    pub created: Timestamp,
    /// The root is refused at and after this instant.
    pub expires: Timestamp,
    /// Top node of the tree's root directory.
    pub root: NodeHash,
    /// Regular files and their total bytes in the snapshot (for progress and status; the tree is authoritative).
    pub files: u64,
    pub bytes: u64,
    pub delta: Option<DeltaRef>,
}

/// How the root of a served snapshot stands at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Created longer ago than the node's limit: the origin has published nothing newer (a frozen fabric).
    Stale,
    /// At or past its expiry: no peer would accept it any more; the origin has not re-signed it.
    Expired,
}

/// How `body` stands at `now` (wall-clock time): expired at and after its expiry; stale once it was created more
/// than `stale_after_ms` ago (`None`: only expiry counts).
pub fn freshness(body: &RootBody, now: Timestamp, stale_after_ms: Option<u64>) -> Freshness {
    if now >= body.expires {
        Freshness::Expired
    } else if stale_after_ms.is_some_and(|limit| now.millis_since(body.created) > limit) {
        Freshness::Stale
    } else {
        Freshness::Fresh
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRoot {
    pub publisher: PublisherKey,
    /// The encoded [`RootBody`]: the exact bytes that were signed.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for SignedRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedRoot").field("publisher", &self.publisher).field("body_len", &self.body.len()).finish()
    }
}

/// Why a root was not accepted. Each reason is counted separately by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RootError {
    #[error("malformed root: {0}")]
    Malformed(#[from] DecodeError),
    #[error("root signed by {0}, which is not a trusted publisher")]
    UnknownPublisher(PublisherKey),
    #[error("root signature does not verify")]
    BadSignature,
    #[error("root for repository {0}, which this node does not follow")]
    UnknownRepo(RepoId),
    #[error("root expired at {expires} (now {now})")]
    Expired { expires: Timestamp, now: Timestamp },
    #[error("root created at {created}, more than the allowed skew after now ({now})")]
    FromFuture { created: Timestamp, now: Timestamp },
    #[error("root sequence {seq} is older than the accepted {accepted}")]
    Rollback { seq: u64, accepted: u64 },
    #[error("root sequence {seq} is already accepted")]
    Replay { seq: u64 },
    #[error("a different root was already accepted under sequence {seq}")]
    Equivocation { seq: u64 },
}

impl RootError {
    /// A stable short name for metrics labels and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            RootError::Malformed(_) => "malformed",
            RootError::UnknownPublisher(_) => "unknown_publisher",
            RootError::BadSignature => "bad_signature",
            RootError::UnknownRepo(_) => "unknown_repo",
            RootError::Expired { .. } => "expired",
            RootError::FromFuture { .. } => "future",
            RootError::Rollback { .. } => "rollback",
            RootError::Replay { .. } => "replay",
            RootError::Equivocation { .. } => "equivocation",
        }
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    msg.extend_from_slice(SIGNING_CONTEXT);
    msg.extend_from_slice(body);
    msg
}

/// The public key of an ed25519 secret key (32-byte seed).
pub fn publisher_key(secret: &[u8; 32]) -> PublisherKey {
    PublisherKey(SigningKey::from_bytes(secret).verifying_key().to_bytes())
}

impl SignedRoot {
    /// Signs `body` with the ed25519 secret key `secret` (32-byte seed).
    pub fn sign(secret: &[u8; 32], body: &RootBody) -> SignedRoot {
        let key = SigningKey::from_bytes(secret);
        let body = wire::encode(body);
        let signature = key.sign(&signed_message(&body)).to_bytes().to_vec();
        SignedRoot { publisher: PublisherKey(key.verifying_key().to_bytes()), body, signature }
    }

    pub fn encode(&self) -> Vec<u8> {
        wire::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<SignedRoot, DecodeError> {
        wire::decode(bytes, SIGNED_ROOT_BYTES_MAX)
    }

    /// Checks the signature (whoever the publisher is) and decodes the body.
    pub fn verify_signature(&self) -> Result<RootBody, RootError> {
        let key = VerifyingKey::from_bytes(&self.publisher.0).map_err(|_| RootError::BadSignature)?;
        let signature = Signature::from_slice(&self.signature).map_err(|_| RootError::BadSignature)?;
        key.verify(&signed_message(&self.body), &signature).map_err(|_| RootError::BadSignature)?;
        let body: RootBody = wire::decode(&self.body, SIGNED_ROOT_BYTES_MAX)?;
        if body.expires <= body.created {
            return Err(RootError::Malformed(DecodeError::Invalid("root expires before it is created")));
        }
        Ok(body)
    }

    /// A short identifier of this exact signed root (hash of its encoding), for logs and deduplication.
    pub fn id(&self) -> RootId {
        RootId(*blake3::hash(&self.encode()).as_bytes())
    }
}

hash_id!(
    /// blake3 of an encoded signed root.
    RootId
);

/// A root that passed every check, with its decoded body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedRoot {
    pub signed: SignedRoot,
    pub body: RootBody,
}

/// Pinned publisher keys, followed repositories and the newest accepted root of each.
#[derive(Clone, Debug, Default)]
pub struct RootTracker {
    trusted: BTreeSet<PublisherKey>,
    repos: BTreeMap<RepoId, Option<VerifiedRoot>>,
}

impl RootTracker {
    pub fn new(trusted: impl IntoIterator<Item = PublisherKey>, repos: impl IntoIterator<Item = RepoId>) -> Self {
        Self { trusted: trusted.into_iter().collect(), repos: repos.into_iter().map(|r| (r, None)).collect() }
    }

    /// Runs every check against the current state without changing it.
    pub fn check(&self, now: Timestamp, root: &SignedRoot) -> Result<VerifiedRoot, RootError> {
        // The accepted root again, byte for byte (the common case: every hello and gossip copy carries it): its
        // signature was verified when it was accepted.
        if let Some(accepted) = self.repos.values().flatten().find(|a| a.signed == *root) {
            if now >= accepted.body.expires {
                return Err(RootError::Expired { expires: accepted.body.expires, now });
            }
            return Err(RootError::Replay { seq: accepted.body.seq });
        }
        if !self.trusted.contains(&root.publisher) {
            return Err(RootError::UnknownPublisher(root.publisher));
        }
        let body = root.verify_signature()?;
        let accepted = self.repos.get(&body.repo).ok_or_else(|| RootError::UnknownRepo(body.repo.clone()))?;
        if now >= body.expires {
            return Err(RootError::Expired { expires: body.expires, now });
        }
        if body.created.0 > now.0.saturating_add(CLOCK_SKEW_MAX_MS) {
            return Err(RootError::FromFuture { created: body.created, now });
        }
        if let Some(accepted) = accepted {
            let seq = body.seq;
            if seq < accepted.body.seq {
                return Err(RootError::Rollback { seq, accepted: accepted.body.seq });
            }
            if seq == accepted.body.seq {
                return Err(if body == accepted.body {
                    RootError::Replay { seq }
                } else {
                    RootError::Equivocation { seq }
                });
            }
        }
        Ok(VerifiedRoot { signed: root.clone(), body })
    }

    /// Checks `root` and, if it passes, makes it the accepted root of its repository.
    pub fn accept(&mut self, now: Timestamp, root: &SignedRoot) -> Result<VerifiedRoot, RootError> {
        let verified = self.check(now, root)?;
        self.repos.insert(verified.body.repo.clone(), Some(verified.clone()));
        Ok(verified)
    }

    /// Restores an accepted root from local state (it was checked when first accepted; expiry is not rechecked, so a
    /// node restarted after a long outage still knows what it serves and still refuses rollbacks).
    pub fn restore(&mut self, root: VerifiedRoot) {
        self.repos.insert(root.body.repo.clone(), Some(root));
    }

    pub fn latest(&self, repo: &RepoId) -> Option<&VerifiedRoot> {
        self.repos.get(repo).and_then(Option::as_ref)
    }

    pub fn repos(&self) -> impl Iterator<Item = &RepoId> {
        self.repos.keys()
    }

    pub fn is_trusted(&self, key: &PublisherKey) -> bool {
        self.trusted.contains(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_is_stale_after_the_limit_and_expired_at_its_expiry() {
        let body = RootBody {
            repo: RepoId::new("alpine").unwrap(),
            seq: 1,
            created: Timestamp(1_000),
            expires: Timestamp(10_000),
            root: NodeHash([0; 32]),
            files: 0,
            bytes: 0,
            delta: None,
        };
        assert_eq!(freshness(&body, Timestamp(5_000), None), Freshness::Fresh);
        assert_eq!(freshness(&body, Timestamp(5_000), Some(4_000)), Freshness::Fresh);
        assert_eq!(freshness(&body, Timestamp(5_001), Some(4_000)), Freshness::Stale);
        assert_eq!(freshness(&body, Timestamp(10_000), None), Freshness::Expired);
        assert_eq!(freshness(&body, Timestamp(20_000), Some(4_000)), Freshness::Expired);
    }
}
