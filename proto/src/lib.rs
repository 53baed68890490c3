//! mirrormesh-proto: the protocol core of mirrormesh.
//!
//! Everything a mirror node decides lives here; everything it *does* (sockets, disks, clocks) lives in the daemon.
//! The daemon and the simulator drive the same code.
//!
//! Architecture invariant: no I/O. This crate opens no socket or file, reads no clock and draws no randomness; time
//! is passed in as a [`Timestamp`], and collections whose order reaches an output are ordered. This crate's
//! `tests/purity.rs` fails if a dependency or an API that could break this appears.
//!
//! Architecture invariant: nothing from a peer is trusted before it is verified. Nodes and deltas are checked
//! against their hash ([`node::verify_node`], [`delta::DeltaHash`]), roots against a pinned key, a sequence number
//! and an expiry ([`root::RootTracker`]), and every decoder has a named size or count limit ([`wire`]).
//!
//! # Layout
//! - [`chunk`]: the content model: fixed 1 MiB chunks named by blake3.
//! - [`path`]: rules for names, paths and symlink targets.
//! - [`entry`]: a manifest entry (file, symlink, directory).
//! - [`node`]: content-addressed manifest nodes (leaves and interior pages of a directory).
//! - [`builder`]: content-defined paging of a directory into nodes.
//! - [`tree`]: an in-memory directory tree (the publisher's scan result, the tests' model).
//! - [`diff`]: the changes between two manifests, loading only differing nodes.
//! - [`lookup`]: one entry of a manifest by path.
//! - [`delta`]: a snapshot-to-snapshot delta, applied and verified against the signed root.
//! - [`root`]: signed roots, the publisher trust store and rollback protection.
//! - [`wire`]: the versioned, bounded encoding every message and object uses.
//! - [`node_store`]: the traits through which the core reads and writes nodes.
//! - [`control`]: control-plane messages (hello, have, node and delta fetches) and the gossip topic.
//! - [`transfer`]: data-plane messages (chunk requests and replies).
//! - [`membership`]: the fabric's members, the address checks and the mesh rule (which peers to keep).
//! - [`links`]: what a control timeout means for its connection, which connections a peer's new one replaces.
//! - [`sync`]: the sync engine: manifest fetch, chunk scheduler, the origin's super-seeding, apply ordering.
//! - [`timestamp`]: time, as passed in.
//!
//! The protocol itself (every message, object and limit) is specified in `PROTOCOL.md` beside this crate.

#![forbid(unsafe_code)]

mod hash_id;

pub mod builder;
pub mod chunk;
pub mod control;
pub mod delta;
pub mod diff;
pub mod entry;
pub mod links;
pub mod lookup;
pub mod membership;
pub mod node;
pub mod node_store;
pub mod path;
pub mod root;
pub mod sync;
pub mod timestamp;
pub mod transfer;
pub mod tree;
pub mod wire;

pub use chunk::{CHUNK_SIZE, ChunkId};
pub use delta::{DeltaHash, ManifestDelta};
pub use diff::{Change, diff};
pub use entry::{Entry, EntryKind, FileMeta};
pub use node::{Node, NodeHash};
pub use root::{PublisherKey, RepoId, RootBody, RootError, RootTracker, SignedRoot, VerifiedRoot};
pub use timestamp::{Mono, Now, Timestamp};
pub use tree::TreeDir;
