//! The simulated repository: real file names and sizes, stand-in bytes.
//!
//! Files keep their real sizes (from an APKINDEX or the built-in profile), so the number, size and split of chunks
//! are the real ones. A chunk's bytes are replaced by a 16-byte **token** (the file's content key and the chunk's
//! index) and its [`ChunkId`] is the blake3 of that token: a receiver verifies what it got exactly as the daemon
//! does, and a corrupt peer's bytes fail the check. Transfer sizes are charged at the chunk's real length.

use std::collections::{BTreeSet, HashMap};

use anyhow::{Context, Result};
use mirrormesh_proto::chunk::{ChunkId, chunk_count, chunk_range};
use mirrormesh_proto::entry::FileMeta;
use mirrormesh_proto::tree::TreeDir;
use rand::seq::SliceRandom;
use rand::{Rng, RngExt};

use crate::scenario::Scenario;

/// What stands in for a chunk's bytes.
pub type Token = [u8; 16];

/// Directory of the packages in the simulated tree.
pub const PACKAGE_DIR: &str = "alpine/v3.17/main/aarch64";
/// Size of the index file when the tree comes from the profile (the real v3.17 aarch64 index is ~700 KB).
pub const PROFILE_INDEX_BYTES: u64 = 700_000;

#[derive(Clone, Debug)]
struct Package {
    name: String,
    version: String,
    size: u64,
    /// Identifies the file's content (a rebuild gets a new key).
    key: u64,
}

/// One chunk known to the run, by number.
#[derive(Clone, Debug)]
pub struct ChunkInfo {
    pub id: ChunkId,
    pub token: Token,
    pub size: u32,
}

/// The repository as the origin publishes it, and every chunk any snapshot had.
pub struct Content {
    packages: Vec<Package>,
    index_bytes: u64,
    index_key: u64,
    next_key: u64,
    pub chunks: Vec<ChunkInfo>,
    pub numbers: HashMap<ChunkId, u32>,
    /// Chunk numbers of the newest snapshot.
    pub current: BTreeSet<u32>,
}

/// What one update changed.
#[derive(Clone, Debug, Default)]
pub struct UpdateSize {
    pub files: u64,
    /// Bytes of chunks the new snapshot has and the previous did not.
    pub bytes: u64,
    pub chunks: u64,
}

fn token(key: u64, index: u64) -> Token {
    let mut t = [0; 16];
    t[..8].copy_from_slice(&key.to_le_bytes());
    t[8..].copy_from_slice(&index.to_le_bytes());
    t
}

impl Content {
    /// The initial tree of a scenario.
    pub fn load(scenario: &Scenario, rng: &mut impl Rng) -> Result<Self> {
        let (mut packages, index_bytes) = match scenario.apkindex_path() {
            Some(path) => {
                let index = mirrormesh_alpine::apkindex::read_index(&path)?;
                let index_bytes = std::fs::metadata(&path).with_context(|| path.display().to_string())?.len();
                let packages: Vec<Package> = index
                    .packages
                    .into_iter()
                    .map(|p| Package { name: p.name, version: p.version, size: p.size, key: 0 })
                    .collect();
                (packages, index_bytes)
            }
            None => {
                let count = scenario.tree.profile.unwrap_or(mirrormesh_alpine::profile::PROFILE_PACKAGE_COUNT);
                let sizes = mirrormesh_alpine::profile::profile_sizes(count);
                let packages = sizes
                    .into_iter()
                    .enumerate()
                    .map(|(i, size)| Package { name: format!("pkg{i:06}"), version: "1.0-r0".into(), size, key: 0 })
                    .collect();
                (packages, PROFILE_INDEX_BYTES)
            }
        };
        if scenario.tree.fraction < 1.0 {
            packages.shuffle(rng);
            let keep = ((packages.len() as f64 * scenario.tree.fraction).ceil() as usize).max(1);
            packages.truncate(keep);
            packages.sort_by(|a, b| a.name.cmp(&b.name).then(a.version.cmp(&b.version)));
        }
        let mut content = Content {
            packages,
            index_bytes,
            index_key: 0,
            next_key: 1,
            chunks: Vec::new(),
            numbers: HashMap::new(),
            current: BTreeSet::new(),
        };
        for i in 0..content.packages.len() {
            content.packages[i].key = content.fresh_key();
        }
        content.index_key = content.fresh_key();
        Ok(content)
    }

    fn fresh_key(&mut self) -> u64 {
        self.next_key += 1;
        self.next_key
    }

    /// Rebuilds `count` distinct random packages (new version, new content, a size within 10% of the old one) and
    /// the index.
    pub fn rebuild(&mut self, count: usize, rng: &mut impl Rng) {
        let mut picks: Vec<usize> = (0..self.packages.len()).collect();
        picks.shuffle(rng);
        picks.truncate(count.min(self.packages.len()));
        picks.sort_unstable();
        for i in picks {
            let factor = 0.9 + 0.2 * rng.random::<f64>();
            let key = self.fresh_key();
            let p = &mut self.packages[i];
            p.version = bump_release(&p.version);
            p.size = ((p.size as f64 * factor) as u64).max(1);
            p.key = key;
        }
        self.index_key = self.fresh_key();
    }

    /// The tree of the current state, registering its chunks; returns what changed since the previous snapshot.
    pub fn snapshot(&mut self) -> Result<(TreeDir, UpdateSize)> {
        let mut tree = TreeDir::default();
        let mut current = BTreeSet::new();
        let mut size = UpdateSize::default();
        let files: Vec<(String, u64, u64)> = self
            .packages
            .iter()
            .map(|p| (format!("{PACKAGE_DIR}/{}-{}.apk", p.name, p.version), p.size, p.key))
            .chain([(format!("{PACKAGE_DIR}/APKINDEX.tar.gz"), self.index_bytes, self.index_key)])
            .collect();
        for (path, bytes, key) in files {
            let mut ids = Vec::with_capacity(chunk_count(bytes) as usize);
            let mut new_file = false;
            for index in 0..chunk_count(bytes) {
                let (_, len) = chunk_range(bytes, index).expect("index within the file");
                let token = token(key, index);
                let id = ChunkId::of(&token);
                let number = match self.numbers.get(&id) {
                    Some(n) => *n,
                    None => {
                        let n = self.chunks.len() as u32;
                        self.chunks.push(ChunkInfo { id, token, size: len as u32 });
                        self.numbers.insert(id, n);
                        n
                    }
                };
                if !self.current.contains(&number) && current.insert(number) {
                    size.bytes += len;
                    size.chunks += 1;
                    new_file = true;
                } else {
                    current.insert(number);
                }
                ids.push(id);
            }
            size.files += u64::from(new_file);
            let meta =
                FileMeta { mode: 0o644, size: bytes, mtime: 1_700_000_000 + (key % 1_000_000) as i64, chunks: ids };
            tree.insert_file(&path, meta).with_context(|| format!("cannot add {path} to the simulated tree"))?;
        }
        self.current = current;
        Ok((tree, size))
    }
}

/// `1.2-r3` becomes `1.2-r4`; a version without a release suffix gets `-r1`.
fn bump_release(version: &str) -> String {
    if let Some((base, rel)) = version.rsplit_once("-r")
        && let Ok(n) = rel.parse::<u64>()
    {
        return format!("{base}-r{}", n + 1);
    }
    format!("{version}-r1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn updates_change_what_they_say() {
        let scenario = Scenario::parse(
            r#"
            name = "t"
            mirrors = 2
            degree = 1
            origin_up_mbit = 100
            origin_down_mbit = 100
            mirror_up_mbit = 100
            mirror_down_mbit = 100
            [tree]
            profile = 300
            [[updates]]
            kind = "initial"
        "#,
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut content = Content::load(&scenario, &mut rng).unwrap();
        let (tree, first) = content.snapshot().unwrap();
        assert_eq!(first.files, 301);
        assert_eq!(first.bytes, tree.totals().bytes);
        content.rebuild(5, &mut rng);
        let (_, second) = content.snapshot().unwrap();
        assert_eq!(second.files, 6, "five packages and the index");
        assert!(second.bytes > 0 && second.bytes < first.bytes / 2);
        for c in &content.chunks {
            assert_eq!(ChunkId::of(&c.token), c.id);
        }
        assert_eq!(bump_release("1.2-r3"), "1.2-r4");
        assert_eq!(bump_release("7"), "7-r1");
    }
}
