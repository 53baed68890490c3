//! Writes seed inputs for the fuzz targets (real encoded nodes, roots and deltas) into `fuzz/seeds/<target>/`.
//! Run: `cargo run -p mirrormesh-proto --example fuzz_seeds` from the workspace root.

use std::collections::HashMap;
use std::path::Path;

use mirrormesh_proto::chunk::ChunkId;
use mirrormesh_proto::delta::ManifestDelta;
use mirrormesh_proto::diff::diff;
use mirrormesh_proto::entry::{EntryKind, FileMeta};
use mirrormesh_proto::root::{RootBody, SignedRoot};
use mirrormesh_proto::tree::TreeDir;
use mirrormesh_proto::{RepoId, Timestamp};

fn main() -> std::io::Result<()> {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let mut tree = TreeDir::default();
    for i in 0..60u64 {
        let size = i * 40_000;
        let chunks = (0..size.div_ceil(1 << 20)).map(|c| ChunkId([(i + c) as u8; 32])).collect();
        let meta = FileMeta { mode: 0o644, size, mtime: i as i64, chunks };
        tree.insert_file(&format!("alpine/edge/main/x86_64/pkg{i}-1.0-r0.apk"), meta).expect("valid path");
    }
    tree.insert("alpine/latest-stable", EntryKind::Symlink { target: "edge".into() }).expect("valid path");
    let mut nodes = HashMap::new();
    let root = tree.build(&mut nodes).expect("valid tree");
    let mut changed = tree.clone();
    changed
        .insert_file(
            "alpine/edge/main/x86_64/new-2.0-r0.apk",
            FileMeta { mode: 0o644, size: 0, mtime: 0, chunks: vec![] },
        )
        .expect("valid path");
    let new_root = changed.build(&mut nodes).expect("valid tree");

    std::fs::create_dir_all(out.join("decode_node"))?;
    std::fs::create_dir_all(out.join("walk_manifest"))?;
    for (i, bytes) in nodes.values().enumerate() {
        std::fs::write(out.join(format!("decode_node/node{i}")), bytes)?;
    }
    let mut chain = nodes[&root].clone();
    for bytes in nodes.values().take(8) {
        chain.push(0xff);
        chain.extend_from_slice(bytes);
    }
    std::fs::write(out.join("walk_manifest/chain"), chain)?;

    let (changes, _) = diff(&nodes, Some(&root), &new_root).expect("diff");
    std::fs::create_dir_all(out.join("decode_delta"))?;
    std::fs::write(out.join("decode_delta/delta"), ManifestDelta::from_changes(root, new_root, &changes).encode())?;

    let now = Timestamp(1_800_000_000_000);
    let body = RootBody {
        repo: RepoId::new("alpine").expect("valid name"),
        seq: 1,
        created: now,
        expires: now.plus_ms(1000),
        root,
        files: 60,
        bytes: 1,
        delta: None,
    };
    std::fs::create_dir_all(out.join("decode_signed_root"))?;
    std::fs::write(out.join("decode_signed_root/root"), SignedRoot::sign(&[7; 32], &body).encode())?;

    std::fs::create_dir_all(out.join("validate_paths"))?;
    for (i, p) in ["\u{2}../../x", "\u{0}alpine/edge", "\u{1}a/../b", "\u{3}x//y"].iter().enumerate() {
        std::fs::write(out.join(format!("validate_paths/p{i}")), p)?;
    }
    println!("seeds written to {}", out.display());
    Ok(())
}
