//! A whole Alpine mirror's shape for the full-size benchmarks: `mirrormesh-lab gen-mirror`.
//!
//! `OUT/alpine/<branch>/<repo>/<arch>/` for [`BRANCHES`] (edge and v3.0 to v3.22) x main and community x
//! [`ARCHES`]: 432 directories, each with one `APKINDEX.tar.gz` naming exactly its `.apk` files. The tree holds a
//! chosen number of files in all (indexes included, up to [`FILES_MAX`]) and about a chosen number of bytes:
//! package sizes follow the real v3.17 main aarch64 profile (`mirrormesh_alpine::profile`), scaled so the packages
//! add up to the budget (at least 1 byte each), then dealt to directories by the seed. A community directory holds
//! three times the packages of main, and a newer branch more than an older one (edge twice v3.0), as on the real
//! mirror. Contents come from the product's generator (`mirrormesh::gentree::content`): the same seed gives the same
//! tree.
//!
//! `--update K` does what builders do to a live mirror: K packages across the tree, chosen by the seed, each rebuilt
//! (release bumped, new content, size within 10%), written under a hidden name and renamed in, then its directory's
//! index rewritten, then the old file removed: the order Alpine's upload keeps. `--changed-out FILE` writes the paths
//! that changed, one per line, as `mirrormesh publish --paths-from` reads them.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mirrormesh::gentree::apkindex::{Package, Stanza, read_index, write_index};
use mirrormesh::gentree::content::{content_key, synthetic_checksum, write_content};
use mirrormesh::gentree::profile::profile_sizes;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Branches, oldest first.
pub const BRANCHES: [&str; 24] = [
    "v3.0", "v3.1", "v3.2", "v3.3", "v3.4", "v3.5", "v3.6", "v3.7", "v3.8", "v3.9", "v3.10", "v3.11", "v3.12", "v3.13",
    "v3.14", "v3.15", "v3.16", "v3.17", "v3.18", "v3.19", "v3.20", "v3.21", "v3.22", "edge",
];
/// Repositories of every branch, with their share of packages.
pub const REPOS: [(&str, u64); 2] = [("main", 1), ("community", 3)];
/// Architectures of every repository.
pub const ARCHES: [&str; 9] =
    ["x86_64", "x86", "aarch64", "armhf", "armv7", "ppc64le", "s390x", "riscv64", "loongarch64"];
/// Most files a generated tree may hold.
pub const FILES_MAX: u64 = 2_000_000;
/// Build time of every generated package (2026-01-01); an update's builds come after it.
const BUILD_TIME: u64 = 1_767_225_600;

#[derive(clap::Args, Debug, Clone)]
pub struct GenMirrorArgs {
    /// Output directory (absent or empty; with --update, a tree this command generated).
    #[arg(value_name = "OUT")]
    pub out: PathBuf,
    /// Files in the whole tree, indexes included (at least 2 per directory).
    #[arg(long, default_value_t = 100_000)]
    pub files: u64,
    /// Bytes of all packages together, in MiB.
    #[arg(long, default_value_t = 200)]
    pub mib: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rebuild K packages of the existing tree OUT instead of generating one.
    #[arg(long, value_name = "K")]
    pub update: Option<usize>,
    /// With --update: write the changed paths (relative to OUT), one per line, to this file.
    #[arg(long, value_name = "FILE", requires = "update")]
    pub changed_out: Option<PathBuf>,
}

/// What a run wrote.
#[derive(Debug, Default)]
pub struct GenMirrorReport {
    pub dirs: usize,
    pub files: u64,
    pub bytes: u64,
    /// Paths changed by an update, relative to OUT.
    pub changed: Vec<String>,
    pub secs: f64,
}

pub fn run(args: &GenMirrorArgs) -> Result<()> {
    let report = match args.update {
        Some(k) => update(&args.out, k, args.seed)?,
        None => generate(&args.out, args.files, args.mib << 20, args.seed)?,
    };
    if let Some(path) = &args.changed_out {
        let text: String = report.changed.iter().map(|p| format!("{p}\n")).collect();
        fs::write(path, text).with_context(|| format!("--changed-out {}", path.display()))?;
    }
    println!(
        "{} {} files ({} MiB) in {} directories under {} in {:.1} s",
        if args.update.is_some() { "changed" } else { "wrote" },
        report.files,
        report.bytes >> 20,
        report.dirs,
        args.out.display(),
        report.secs
    );
    Ok(())
}

/// Every repository directory, relative to the tree, with its weight.
fn directories() -> Vec<(String, String, u64)> {
    let mut dirs = Vec::new();
    for (age, branch) in BRANCHES.iter().enumerate() {
        for (repo, share) in REPOS {
            for arch in ARCHES {
                // Newer branches hold more: edge (the last) twice v3.0.
                let weight = share * (BRANCHES.len() + age) as u64;
                dirs.push((format!("alpine/{branch}/{repo}/{arch}"), arch.to_owned(), weight));
            }
        }
    }
    dirs
}

/// One package of a generated directory.
fn package(seed: u64, name: &str, version: &str, arch: &str, size: u64, build_time: u64) -> Result<Package> {
    let key = content_key(seed, name, version);
    let fields = [
        ("C", synthetic_checksum(&key)),
        ("P", name.to_owned()),
        ("V", version.to_owned()),
        ("A", arch.to_owned()),
        ("S", size.to_string()),
        ("T", format!("{name}, generated for mirrormesh's full-size benchmarks")),
        ("t", build_time.to_string()),
    ];
    Package::from_stanza(Stanza::new(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

/// Writes a package's file under a hidden name and renames it into place.
fn write_package(dir: &Path, seed: u64, p: &Package) -> Result<()> {
    let path = dir.join(p.file_name());
    let temp = dir.join(format!(".{}.tmp", p.file_name()));
    let mut out = BufWriter::new(fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?);
    write_content(&content_key(seed, &p.name, &p.version), p.size, &mut out)
        .and_then(|()| out.flush())
        .with_context(|| format!("writing {}", temp.display()))?;
    drop(out);
    fs::rename(&temp, &path).with_context(|| format!("renaming {} into place", path.display()))
}

/// Generates the tree (see the module doc).
pub fn generate(out: &Path, files: u64, bytes: u64, seed: u64) -> Result<GenMirrorReport> {
    let started = Instant::now();
    let dirs = directories();
    if files < 2 * dirs.len() as u64 || files > FILES_MAX {
        bail!("--files {files}: between {} (an index and a package per directory) and {FILES_MAX}", 2 * dirs.len());
    }
    if out.exists() && fs::read_dir(out)?.next().is_some() {
        bail!("{} is not empty", out.display());
    }
    // Files per directory by weight (one of them the index), the rounding left to the last directory.
    let total_weight: u64 = dirs.iter().map(|d| d.2).sum();
    let mut counts: Vec<u64> = dirs.iter().map(|d| (files * d.2 / total_weight).max(2)).collect();
    let assigned: u64 = counts.iter().sum();
    let last = counts.len() - 1;
    counts[last] = (counts[last] + files).saturating_sub(assigned).max(2);
    let packages: u64 = counts.iter().map(|c| c - 1).sum();

    // Sizes from the profile, scaled to the budget, dealt out by the seed.
    let mut sizes = profile_sizes(packages as usize);
    let sum: u128 = sizes.iter().map(|&s| u128::from(s)).sum::<u128>().max(1);
    for s in &mut sizes {
        *s = ((u128::from(*s) * u128::from(bytes) / sum) as u64).max(1);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    sizes.shuffle(&mut rng);

    let mut plan = Vec::with_capacity(dirs.len());
    let mut next = 0usize;
    for ((dir, arch, _), count) in dirs.iter().zip(&counts) {
        let n = (*count - 1) as usize;
        plan.push((dir.clone(), arch.clone(), sizes[next..next + n].to_vec()));
        next += n;
    }
    let written: Vec<u64> = plan
        .par_iter()
        .map(|(dir, arch, sizes)| -> Result<u64> {
            let abs = out.join(dir);
            fs::create_dir_all(&abs).with_context(|| format!("creating {}", abs.display()))?;
            let mut pkgs = Vec::with_capacity(sizes.len());
            for (i, &size) in sizes.iter().enumerate() {
                let p = package(seed, &format!("pkg{i:05}"), "1.0-r0", arch, size, BUILD_TIME)?;
                write_package(&abs, seed, &p)?;
                pkgs.push(p);
            }
            write_index(&abs.join("APKINDEX.tar.gz"), dir, &pkgs, BUILD_TIME)?;
            Ok(sizes.iter().sum())
        })
        .collect::<Result<_>>()?;
    Ok(GenMirrorReport {
        dirs: dirs.len(),
        files: counts.iter().sum(),
        bytes: written.iter().sum(),
        changed: Vec::new(),
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Rebuilds `k` packages of a generated tree (see the module doc).
pub fn update(out: &Path, k: usize, seed: u64) -> Result<GenMirrorReport> {
    let started = Instant::now();
    let dirs = directories();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7570_6461_7465);
    // Which directories, and how many packages in each.
    let mut picks: BTreeMap<usize, usize> = BTreeMap::new();
    for _ in 0..k {
        *picks.entry(rng.random_range(0..dirs.len())).or_default() += 1;
    }
    let mut report = GenMirrorReport { dirs: picks.len(), ..GenMirrorReport::default() };
    for (d, n) in picks {
        let (dir, _, _) = &dirs[d];
        let abs = out.join(dir);
        let index_path = abs.join("APKINDEX.tar.gz");
        let mut index = read_index(&index_path)?;
        if index.packages.is_empty() {
            continue;
        }
        let build_time = index.packages.iter().filter_map(|p| p.build_time).max().unwrap_or(BUILD_TIME) + 1;
        let mut removed = Vec::new();
        // Distinct packages: each rebuilt once.
        let chosen = rand::seq::index::sample(&mut rng, index.packages.len(), n.min(index.packages.len()));
        for i in chosen {
            let old = index.packages[i].clone();
            let (base, release) = old.version.rsplit_once("-r").context("a version without -r")?;
            let release: u64 = release.parse().context("a release that is not a number")?;
            let version = format!("{base}-r{}", release + 1);
            let size = (old.size as f64 * rng.random_range(0.9..1.1)).round().max(1.0) as u64;
            let key = content_key(seed, &old.name, &version);
            let new = old.updated(version, size, build_time, synthetic_checksum(&key))?;
            write_package(&abs, seed, &new)?;
            report.changed.push(format!("{dir}/{}", new.file_name()));
            report.files += 1;
            report.bytes += size;
            removed.push(old.file_name());
            index.packages[i] = new;
        }
        write_index(&index_path, &index.description, &index.packages, build_time)?;
        report.changed.push(format!("{dir}/APKINDEX.tar.gz"));
        for name in removed {
            fs::remove_file(abs.join(&name)).with_context(|| format!("removing {dir}/{name}"))?;
            report.changed.push(format!("{dir}/{name}"));
        }
    }
    report.secs = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_mirror_has_alpines_layout_the_file_count_and_indexes_naming_exactly_its_packages() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("mirror");
        let report = generate(&out, 2_000, 4 << 20, 3).unwrap();
        assert_eq!(report.dirs, 432);
        assert_eq!(report.files, 2_000);
        let mut files = 0;
        for (d, _, _) in directories() {
            let index = read_index(&out.join(&d).join("APKINDEX.tar.gz")).unwrap();
            let mut named: Vec<String> = index.packages.iter().map(Package::file_name).collect();
            named.push("APKINDEX.tar.gz".into());
            named.sort();
            let mut present: Vec<String> =
                fs::read_dir(out.join(&d)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            present.sort();
            assert_eq!(named, present, "{d}");
            files += present.len();
        }
        assert_eq!(files, 2_000);
        // The byte budget, within rounding (every package at least 1 byte).
        assert!(report.bytes.abs_diff(4 << 20) < 4 << 10, "{} bytes", report.bytes);

        let changed = update(&out, 5, 9).unwrap();
        // Each rebuilt package: its new file and its old one; each directory touched: its index.
        assert_eq!(changed.changed.len(), 2 * 5 + changed.dirs, "{:?}", changed.changed);
        for path in &changed.changed {
            let exists = out.join(path).exists();
            assert_eq!(exists, path.ends_with("-r1.apk") || path.ends_with("APKINDEX.tar.gz"), "{path}");
        }
    }
}
