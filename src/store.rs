//! The node's state on disk: one redb database, `state.redb`, in the state directory. redb commits are atomic and
//! durable (copy-on-write B-trees, fsync on commit), so a crash at any instant leaves either the old or the new
//! state, never a mix.
//!
//! Tables:
//! - `nodes`: manifest node hash -> encoded node (verified before it is stored).
//! - `deltas`: delta hash -> encoded delta.
//! - `roots`: repository name -> the newest signed root this node published or accepted.
//! - `scan_cache`: path -> what the publisher last learned of a file (size, times, inode, chunk ids), so a rescan
//!   of an unchanged tree only stats files.
//! - `applied`: repository name -> the signed root of the snapshot the served tree holds (a mirror's `roots` entry
//!   may be newer while it syncs).
//! - `pending_deletions`: path -> when (unix ms) a file or directory that a new snapshot removed may be deleted.
//! - `members`: node id (libp2p peer id bytes) -> what this node knows of that member of the fabric (its
//!   control-plane addresses, when it was last seen, how it was learned), so a restarted node redials the fabric.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mirrormesh_proto::delta::DeltaHash;
use mirrormesh_proto::membership::Member;
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::node_store::{NodeSink, NodeSource, SourceError};
use mirrormesh_proto::{RepoId, SignedRoot};
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};

const NODES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("nodes");
const DELTAS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("deltas");
const ROOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("roots");
const SCAN_CACHE: TableDefinition<&str, &[u8]> = TableDefinition::new("scan_cache");
const APPLIED: TableDefinition<&str, &[u8]> = TableDefinition::new("applied");
const PENDING_DELETIONS: TableDefinition<&str, u64> = TableDefinition::new("pending_deletions");
const MEMBERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("members");
/// Largest stored member record (a few addresses: about 100 bytes).
const MEMBER_BYTES_MAX: usize = 4096;

/// File name of the database inside the state directory.
pub const STATE_DB: &str = "state.redb";
/// The database's own page cache. redb's default is 1 GiB, which a daemon at 10^6 files filled (manifest nodes,
/// scan cache): it was most of its resident memory. Pages it does not keep are read again from the kernel's page
/// cache.
pub const STATE_DB_CACHE_BYTES: usize = 64 << 20;

pub struct StateStore {
    db: Database,
    dir: PathBuf,
}

impl StateStore {
    /// Opens (creating if needed) the state database in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating state directory {}", dir.display()))?;
        let path = dir.join(STATE_DB);
        let db = Database::builder().set_cache_size(STATE_DB_CACHE_BYTES).create(&path).with_context(|| {
            format!("opening state database {} (is another mirrormesh process using it?)", path.display())
        })?;
        let txn = db.begin_write()?;
        txn.open_table(NODES)?;
        txn.open_table(DELTAS)?;
        txn.open_table(ROOTS)?;
        txn.open_table(SCAN_CACHE)?;
        txn.open_table(APPLIED)?;
        txn.open_table(PENDING_DELETIONS)?;
        txn.open_table(MEMBERS)?;
        txn.commit()?;
        Ok(Self { db, dir: dir.to_owned() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A consistent read-only view.
    pub fn reader(&self) -> Result<StoreReader> {
        Ok(StoreReader { txn: self.db.begin_read()? })
    }

    /// A write transaction; nothing is visible to readers or survives a crash until [`StoreWriter::commit`].
    pub fn writer(&self) -> Result<StoreWriter> {
        Ok(StoreWriter { txn: self.db.begin_write()?, error: None, new_nodes: 0, new_node_bytes: 0 })
    }
}

pub struct StoreReader {
    txn: ReadTransaction,
}

impl StoreReader {
    pub fn root(&self, repo: &RepoId) -> Result<Option<SignedRoot>> {
        decode_root(repo, self.txn.open_table(ROOTS)?.get(repo.as_str())?.map(|v| v.value().to_vec()))
    }

    /// The snapshot the served tree holds.
    pub fn applied(&self, repo: &RepoId) -> Result<Option<SignedRoot>> {
        decode_root(repo, self.txn.open_table(APPLIED)?.get(repo.as_str())?.map(|v| v.value().to_vec()))
    }

    /// Deletions waiting for their grace period: (path, due unix ms), in path order.
    pub fn pending_deletions(&self) -> Result<Vec<(String, u64)>> {
        let table = self.txn.open_table(PENDING_DELETIONS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            out.push((k.value().to_owned(), v.value()));
        }
        Ok(out)
    }

    /// How many deletions wait for their grace period.
    pub fn pending_deletion_count(&self) -> Result<u64> {
        Ok(self.txn.open_table(PENDING_DELETIONS)?.len()?)
    }

    pub fn delta(&self, hash: &DeltaHash) -> Result<Option<Vec<u8>>> {
        Ok(self.txn.open_table(DELTAS)?.get(&hash.0)?.map(|v| v.value().to_vec()))
    }

    pub fn node_count(&self) -> Result<u64> {
        Ok(self.txn.open_table(NODES)?.len()?)
    }

    /// The members of the fabric this node knew, in id order. A record that does not decode is skipped and
    /// counted (the database is damaged, or was written by another version).
    pub fn members(&self) -> Result<StoredMembers> {
        let table = self.txn.open_table(MEMBERS)?;
        let (mut out, mut unreadable) = (Vec::new(), 0);
        for item in table.iter()? {
            let (k, v) = item?;
            match mirrormesh_proto::wire::decode::<Member>(v.value(), MEMBER_BYTES_MAX) {
                Ok(member) => out.push((k.value().to_vec(), member)),
                Err(_) => unreadable += 1,
            }
        }
        Ok(StoredMembers { members: out, unreadable })
    }
}

/// What [`StoreReader::members`] read.
#[derive(Debug, PartialEq, Eq)]
pub struct StoredMembers {
    /// Node id (libp2p peer id bytes) and record.
    pub members: Vec<(Vec<u8>, Member)>,
    /// Records that did not decode.
    pub unreadable: usize,
}

impl NodeSource for StoreReader {
    fn node_bytes(&self, hash: &NodeHash) -> Result<Option<Vec<u8>>, SourceError> {
        let read =
            || -> Result<Option<Vec<u8>>> { Ok(self.txn.open_table(NODES)?.get(&hash.0)?.map(|v| v.value().to_vec())) };
        read().map_err(|e| SourceError(format!("{e:#}")))
    }

    fn has_node(&self, hash: &NodeHash) -> Result<bool, SourceError> {
        let read = || -> Result<bool> { Ok(self.txn.open_table(NODES)?.get(&hash.0)?.is_some()) };
        read().map_err(|e| SourceError(format!("{e:#}")))
    }
}

/// A write transaction. It reads what it has written, so the publisher builds, diffs and records a snapshot
/// through one writer and commits once.
pub struct StoreWriter {
    txn: WriteTransaction,
    /// The first error of a `put_node` (whose signature, shared with the core, cannot return one); reported by
    /// `commit`, which then refuses to commit.
    error: Option<anyhow::Error>,
    /// Nodes this transaction added that the store did not hold before, and their bytes.
    pub new_nodes: usize,
    pub new_node_bytes: usize,
}

impl StoreWriter {
    pub fn root(&self, repo: &RepoId) -> Result<Option<SignedRoot>> {
        decode_root(repo, self.txn.open_table(ROOTS)?.get(repo.as_str())?.map(|v| v.value().to_vec()))
    }

    pub fn scan_entry(&self, path: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.txn.open_table(SCAN_CACHE)?.get(path)?.map(|v| v.value().to_vec()))
    }

    pub fn put_delta(&mut self, hash: &DeltaHash, bytes: &[u8]) -> Result<()> {
        self.txn.open_table(DELTAS)?.insert(&hash.0, bytes)?;
        Ok(())
    }

    pub fn set_root(&mut self, root: &SignedRoot, repo: &RepoId) -> Result<()> {
        self.txn.open_table(ROOTS)?.insert(repo.as_str(), root.encode().as_slice())?;
        Ok(())
    }

    pub fn set_applied(&mut self, root: &SignedRoot, repo: &RepoId) -> Result<()> {
        self.txn.open_table(APPLIED)?.insert(repo.as_str(), root.encode().as_slice())?;
        Ok(())
    }

    pub fn add_pending_deletion(&mut self, path: &str, due_ms: u64) -> Result<()> {
        self.txn.open_table(PENDING_DELETIONS)?.insert(path, due_ms)?;
        Ok(())
    }

    pub fn remove_pending_deletion(&mut self, path: &str) -> Result<()> {
        self.txn.open_table(PENDING_DELETIONS)?.remove(path)?;
        Ok(())
    }

    pub fn put_scan_entry(&mut self, path: &str, bytes: &[u8]) -> Result<()> {
        self.txn.open_table(SCAN_CACHE)?.insert(path, bytes)?;
        Ok(())
    }

    /// Records what this node knows of member `id` (peer id bytes), or forgets it (`None`).
    pub fn set_member(&mut self, id: &[u8], member: Option<&Member>) -> Result<()> {
        let mut table = self.txn.open_table(MEMBERS)?;
        match member {
            Some(member) => {
                table.insert(id, mirrormesh_proto::wire::encode(member).as_slice())?;
            }
            None => {
                table.remove(id)?;
            }
        }
        Ok(())
    }

    pub fn remove_scan_entry(&mut self, path: &str) -> Result<()> {
        self.txn.open_table(SCAN_CACHE)?.remove(path)?;
        Ok(())
    }

    /// Makes everything written durable, atomically.
    pub fn commit(self) -> Result<()> {
        if let Some(error) = self.error {
            return Err(error.context("not committing the state database after a failed write"));
        }
        self.txn.commit().context("committing the state database")
    }

    /// Makes everything written visible to readers at once, atomically, without waiting for the disk: it becomes
    /// durable with the next [`StoreWriter::commit`]; a crash before that loses it (and only it). For what can be
    /// fetched again, written on the event loop: manifest nodes as they arrive (one flush per answer stalled the
    /// loop 65-450 ms per answer in a 10^5-file first sync, several seconds on a busy disk).
    pub fn commit_unflushed(mut self) -> Result<()> {
        if let Some(error) = self.error {
            return Err(error.context("not committing the state database after a failed write"));
        }
        self.txn.set_durability(redb::Durability::None).context("committing the state database")?;
        self.txn.commit().context("committing the state database")
    }
}

impl NodeSink for StoreWriter {
    fn put_node(&mut self, hash: NodeHash, bytes: Vec<u8>) {
        if self.error.is_some() {
            return;
        }
        let write = || -> Result<bool> {
            let mut table = self.txn.open_table(NODES)?;
            if table.get(&hash.0)?.is_some() {
                return Ok(false);
            }
            table.insert(&hash.0, bytes.as_slice())?;
            Ok(true)
        };
        match write() {
            Ok(true) => {
                self.new_nodes += 1;
                self.new_node_bytes += bytes.len();
            }
            Ok(false) => {}
            Err(e) => self.error = Some(e),
        }
    }
}

impl NodeSource for StoreWriter {
    fn node_bytes(&self, hash: &NodeHash) -> Result<Option<Vec<u8>>, SourceError> {
        let read =
            || -> Result<Option<Vec<u8>>> { Ok(self.txn.open_table(NODES)?.get(&hash.0)?.map(|v| v.value().to_vec())) };
        read().map_err(|e| SourceError(format!("{e:#}")))
    }
}

fn decode_root(repo: &RepoId, bytes: Option<Vec<u8>>) -> Result<Option<SignedRoot>> {
    let Some(bytes) = bytes else { return Ok(None) };
    let root = SignedRoot::decode(&bytes)
        .with_context(|| format!("stored root of {repo} is unreadable; the state database is damaged"))?;
    Ok(Some(root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_commit_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let hash = NodeHash::of(b"x");
        let mut w = store.writer().unwrap();
        w.put_node(hash, b"x".to_vec());
        // Not visible before commit.
        assert!(!store.reader().unwrap().has_node(&hash).unwrap());
        w.commit().unwrap();
        assert_eq!(store.reader().unwrap().node_bytes(&hash).unwrap(), Some(b"x".to_vec()));
        // A writer dropped without commit leaves nothing behind.
        let other = NodeHash::of(b"y");
        let mut w = store.writer().unwrap();
        w.put_node(other, b"y".to_vec());
        drop(w);
        assert!(!store.reader().unwrap().has_node(&other).unwrap());
        drop(store);
        let reopened = StateStore::open(dir.path()).unwrap();
        assert!(reopened.reader().unwrap().has_node(&hash).unwrap());
    }

    #[test]
    fn nodes_committed_unflushed_are_readable_at_once_and_kept_by_the_next_durable_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let hashes: Vec<NodeHash> = (0..3u8).map(|i| NodeHash::of(&[i])).collect();
        for (i, hash) in hashes.iter().enumerate() {
            let mut w = store.writer().unwrap();
            w.put_node(*hash, vec![i as u8]);
            w.commit_unflushed().unwrap();
            assert_eq!(store.reader().unwrap().node_bytes(hash).unwrap(), Some(vec![i as u8]));
        }
        // An empty durable commit flushes them all.
        store.writer().unwrap().commit().unwrap();
        drop(store);
        let reopened = StateStore::open(dir.path()).unwrap();
        for hash in &hashes {
            assert!(reopened.reader().unwrap().has_node(hash).unwrap());
        }
    }

    #[test]
    fn members_survive_a_reopen_and_can_be_forgotten() {
        use mirrormesh_proto::Timestamp;
        use mirrormesh_proto::membership::Learned;
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let member = Member {
            addrs: vec!["192.0.2.1:4001".parse().unwrap()],
            last_seen: Timestamp(7),
            learned: Learned::Exchange,
        };
        let mut w = store.writer().unwrap();
        w.set_member(b"a", Some(&member)).unwrap();
        w.set_member(b"b", Some(&member)).unwrap();
        w.commit().unwrap();
        let mut w = store.writer().unwrap();
        w.set_member(b"b", None).unwrap();
        w.commit().unwrap();
        drop(store);
        let reopened = StateStore::open(dir.path()).unwrap();
        let stored = reopened.reader().unwrap().members().unwrap();
        assert_eq!(stored, StoredMembers { members: vec![(b"a".to_vec(), member)], unreadable: 0 });
    }
}
