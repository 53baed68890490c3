//! Manifest benchmark: a synthetic 1,000,000-entry Alpine-like tree whose manifest is held in memory.
//!
//! Entries are generated directory by directory, as the publisher's scanner produces them, and each directory's
//! nodes are built as soon as it is complete; all nodes stay in an in-memory map. Measured: build time, encoded
//! size, peak memory (whole process), and what a 1,000-file change costs a mirror in metadata, both as a delta
//! (what mirrormesh sends) and as new nodes (what a mirror without the previous snapshot fetches). The receiver
//! side is run too: the delta is applied to the old nodes and must reproduce the new root.
//!
//! Baseline, in the same process on the same entries: a flat file list (every path with its size, mtime, mode and
//! chunk ids, encoded and hashed as one object), which is what an unpaged manifest or an rsync file list re-sends
//! on every change.
//!
//! Run: `cargo bench -p mirrormesh-proto --bench manifest` (add `-- --entries N --changes K` to vary the sizes).

use std::collections::HashMap;
use std::time::Instant;

use mirrormesh_proto::builder::build_dir;
use mirrormesh_proto::chunk::{ChunkId, chunk_count};
use mirrormesh_proto::delta::ManifestDelta;
use mirrormesh_proto::diff::diff;
use mirrormesh_proto::entry::{Entry, EntryKind, FileMeta};
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::node_store::{NodeSink, Overlay};
use mirrormesh_proto::root::{RootBody, SignedRoot};
use mirrormesh_proto::{RepoId, Timestamp};

const BRANCHES: [&str; 4] = ["edge", "v3.20", "v3.21", "v3.22"];
const ARCHES: [&str; 9] = ["aarch64", "armhf", "armv7", "loongarch64", "ppc64le", "riscv64", "s390x", "x86", "x86_64"];
/// Repositories of one branch/arch, sorted by name, with their relative sizes (community is the ~20,000-entry
/// directory of the real mirror).
const REPOS: [(&str, u64); 3] = [("community", 20), ("main", 5), ("testing", 3)];

/// Deterministic 64-bit mixing (splitmix64), so the synthetic tree is the same on every run.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A package size following the shape of the real Alpine distribution (median ~24 KiB, p90 ~640 KiB, p99 ~15 MiB,
/// max ~124 MiB), piecewise log-uniform.
fn package_size(seed: u64) -> u64 {
    let u = (mix(seed) >> 11) as f64 / (1u64 << 53) as f64;
    let log2 = if u < 0.5 {
        10.0 + u / 0.5 * 4.6
    } else if u < 0.9 {
        14.6 + (u - 0.5) / 0.4 * 4.7
    } else if u < 0.99 {
        19.3 + (u - 0.9) / 0.09 * 4.6
    } else {
        23.9 + (u - 0.99) / 0.01 * 3.0
    };
    2f64.powf(log2) as u64
}

fn file_meta(seed: u64) -> FileMeta {
    let size = package_size(seed);
    let chunks =
        (0..chunk_count(size)).map(|i| ChunkId(*blake3::hash(&(seed ^ (i << 48)).to_le_bytes()).as_bytes())).collect();
    FileMeta { mode: 0o644, size, mtime: 1_700_000_000 + (seed % 10_000_000) as i64, chunks }
}

/// One leaf directory of the synthetic tree.
struct LeafDir {
    path: String,
    count: u64,
    /// Seed of its first entry; entry `i` has seed `first_seed + i`.
    first_seed: u64,
}

struct Synthetic {
    leaves: Vec<LeafDir>,
    /// Files whose content changed: (leaf index, entry index) -> new seed.
    changed: HashMap<(usize, u64), u64>,
}

impl Synthetic {
    fn new(entries: u64) -> Self {
        let parents = (BRANCHES.len() * ARCHES.len()) as u64;
        let parts: u64 = REPOS.iter().map(|r| r.1).sum();
        let mut leaves = Vec::new();
        let mut made = 0;
        for branch in BRANCHES {
            for (repo, weight) in REPOS {
                for arch in ARCHES {
                    let count = entries * weight / (parents * parts);
                    leaves.push(LeafDir { path: format!("alpine/{branch}/{repo}/{arch}"), count, first_seed: made });
                    made += count;
                }
            }
        }
        if let Some(last) = leaves.last_mut() {
            last.count += entries - made;
        }
        Self { leaves, changed: HashMap::new() }
    }

    /// Entries of leaf `l`, sorted: the index, then the packages.
    fn leaf_entries(&self, l: usize) -> Vec<Entry> {
        let leaf = &self.leaves[l];
        let mut entries = Vec::with_capacity(leaf.count as usize);
        entries.push(Entry::file("APKINDEX.tar.gz", file_meta(leaf.first_seed)));
        for i in 1..leaf.count {
            let seed = leaf.first_seed + i;
            let h = mix(seed);
            let name = format!("pkg{i:06}-{}.{}.{}-r{}.apk", h % 9, (h >> 8) % 30, (h >> 16) % 12, (h >> 24) % 5);
            let seed = self.changed.get(&(l, i)).copied().unwrap_or(seed);
            entries.push(Entry::file(name, file_meta(seed)));
        }
        entries
    }

    /// Builds the whole tree, one directory at a time, and returns its root.
    fn build(&self, sink: &mut impl NodeSink) -> NodeHash {
        let dir = |name: &str, root| Entry { name: name.to_owned(), kind: EntryKind::Dir { mode: 0o755, root } };
        let mut branches = Vec::new();
        let mut leaf = 0;
        for branch in BRANCHES {
            let mut repos = Vec::new();
            for (repo, _) in REPOS {
                let mut arches = Vec::new();
                for arch in ARCHES {
                    arches.push(dir(arch, build_dir(&self.leaf_entries(leaf), sink).expect("valid leaf")));
                    leaf += 1;
                }
                repos.push(dir(repo, build_dir(&arches, sink).expect("valid dir")));
            }
            branches.push(dir(branch, build_dir(&repos, sink).expect("valid dir")));
        }
        let alpine = build_dir(&branches, sink).expect("valid dir");
        build_dir(&[dir("alpine", alpine)], sink).expect("valid dir")
    }

    /// The baseline: every path and entry appended to one flat encoded list.
    fn flat_list(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (l, leaf) in self.leaves.iter().enumerate() {
            for entry in self.leaf_entries(l) {
                let item = (format!("{}/{}", leaf.path, entry.name), entry);
                out = postcard::to_extend(&item, out).expect("encoding into a Vec cannot fail");
            }
        }
        out
    }
}

/// Peak resident set size of this process so far, in bytes (Linux `VmHWM`).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let entries = arg("--entries", 1_000_000);
    let changes = arg("--changes", 1_000);
    let mut tree = Synthetic::new(entries);

    // The paged manifest, all nodes in memory.
    let mut nodes: HashMap<NodeHash, Vec<u8>> = HashMap::new();
    let t = Instant::now();
    let root = tree.build(&mut nodes);
    let build_s = t.elapsed().as_secs_f64();
    let encoded: usize = nodes.values().map(Vec::len).sum();
    let node_count = nodes.len();

    // A 1,000-file change: that many package files, spread over the whole tree, get new content.
    let mut i = 0;
    while (tree.changed.len() as u64) < changes {
        i += 1;
        let l = (mix(1 << 62 | i) % tree.leaves.len() as u64) as usize;
        let e = 1 + mix(1 << 61 | i) % (tree.leaves[l].count - 1);
        tree.changed.insert((l, e), 1 << 40 | i);
    }
    let (count_before, bytes_before) = (nodes.len(), encoded);
    let t = Instant::now();
    let new_root = tree.build(&mut nodes);
    let rebuild_s = t.elapsed().as_secs_f64();
    let new_node_count = nodes.len() - count_before;
    let new_node_bytes = nodes.values().map(Vec::len).sum::<usize>() - bytes_before;

    let t = Instant::now();
    let (diff_changes, stats) = diff(&nodes, Some(&root), &new_root).expect("diff");
    let delta = ManifestDelta::from_changes(root, new_root, &diff_changes).encode();
    let diff_s = t.elapsed().as_secs_f64();
    let now = Timestamp(1_800_000_000_000);
    let body = RootBody {
        repo: RepoId::new("alpine").expect("valid name"),
        seq: 2,
        created: now,
        expires: now.plus_ms(7 * 86_400_000),
        root: new_root,
        files: entries,
        bytes: 0,
        delta: None,
    };
    let signed_root_bytes = SignedRoot::sign(&[1; 32], &body).encode().len();

    // The receiver holds the old snapshot only: it applies the delta and must reproduce the signed root.
    let t = Instant::now();
    let decoded = ManifestDelta::decode(&delta).expect("delta decodes");
    // New nodes go to an overlay on the old ones, as a mirror's store keeps only what it did not hold.
    let mut overlay = Overlay::new(&nodes);
    let applied = decoded.apply(&root, &nodes, &mut overlay).expect("delta applies");
    let apply_s = t.elapsed().as_secs_f64();
    assert_eq!(applied, new_root, "the delta must reproduce the new root");
    assert_eq!(diff_changes.len() as u64, changes, "every changed file is one change");
    let peak = peak_rss();

    // Baseline, measured last so its memory does not count against the manifest's.
    let t = Instant::now();
    let flat = tree.flat_list();
    let flat_hash = blake3::hash(&flat);
    let flat_s = t.elapsed().as_secs_f64();
    let gen_t = Instant::now();
    let mut generated = 0;
    for l in 0..tree.leaves.len() {
        generated += tree.leaf_entries(l).len();
    }
    let generate_s = gen_t.elapsed().as_secs_f64();

    let mb = |b: u64| b as f64 / 1e6;
    let metadata = delta.len() + signed_root_bytes;
    let target = 64 * 1024 + 200 * changes as usize;
    let dirs = 2 + BRANCHES.len() * (1 + REPOS.len() * (1 + ARCHES.len()));
    println!("manifest benchmark: {entries} entries in {dirs} directories, {changes}-file change");
    println!("(generating the {generated} synthetic entries alone takes {generate_s:.2} s; it is part of both builds)");
    println!();
    println!("{:<48} {:>14} {:>14} {:>8}", "measure", "value", "target", "ratio");
    println!("{:<48} {:>12.2} s {:>12.2} s {:>8.2}", "build the paged manifest", build_s, 5.0, build_s / 5.0);
    println!("{:<48} {:>12.2} s {:>14} {:>8.2}", "  baseline: flat list, encode + hash", flat_s, "", build_s / flat_s);
    println!("{:<48} {:>11.1} MB {:>14} {:>8}", "encoded manifest", mb(encoded as u64), "", "");
    println!("{:<48} {:>14} {:>14} {:>8}", "  nodes", node_count, "", "");
    println!(
        "{:<48} {:>11.1} MB {:>14} {:>8.2}",
        "  baseline: flat list",
        mb(flat.len() as u64),
        "",
        encoded as f64 / flat.len() as f64
    );
    println!(
        "{:<48} {:>11.1} MB {:>11.1} MB {:>8.2}",
        "peak memory (process VmHWM, before baseline)",
        mb(peak),
        300.0,
        mb(peak) / 300.0
    );
    println!();
    println!(
        "{:<48} {:>12} B {:>12} B {:>8.2}",
        "change metadata: delta + signed root",
        metadata,
        target,
        metadata as f64 / target as f64
    );
    println!("{:<48} {:>12.0} B {:>14} {:>8}", "  per changed file", metadata as f64 / changes as f64, "", "");
    println!(
        "{:<48} {:>12} B {:>14} {:>8.4}",
        "  baseline: flat list re-sent",
        flat.len(),
        "",
        metadata as f64 / flat.len() as f64
    );
    println!(
        "{:<48} {:>12} B {:>12} B {:>8.2}",
        "change metadata as new nodes (no delta)",
        new_node_bytes,
        target,
        new_node_bytes as f64 / target as f64
    );
    println!("{:<48} {:>14} {:>14} {:>8}", "  new nodes", new_node_count, "", "");
    println!("{:<48} {:>12.2} s {:>14} {:>8}", "publisher: rebuild after the change", rebuild_s, "", "");
    println!(
        "{:<48} {:>12.3} s {:>14} {:>8}",
        format!("publisher: diff ({} nodes loaded) + delta", stats.nodes_loaded),
        diff_s,
        "",
        ""
    );
    println!("{:<48} {:>12.2} s {:>14} {:>8}", "mirror: apply + verify the delta", apply_s, "", "");
    println!();
    println!("flat list hash {} (keeps the baseline from being optimised away)", &flat_hash.to_hex()[..12]);
}
