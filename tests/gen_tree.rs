//! Tests of `mirrormesh gen-tree` (the test-tree generator): layout, index/file consistency, determinism,
//! regeneration, `--update`, input validation, and the built-in size profile against the real index it came from.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use clap::Parser;
use mirrormesh::gentree::apkindex::{self, Package};
use mirrormesh::gentree::layout::{INDEX_FILE_NAME, find_indexes};
use mirrormesh::gentree::profile::{
    PROFILE_PACKAGE_COUNT, QUANTILE_STEPS, SIZE_QUANTILES, profile_sizes, quantiles_from_sizes,
};
use mirrormesh::gentree::{GenReport, GenTreeArgs, UPDATE_SIZE_JITTER, generate};

const V317: &str = "alpine-v3.17-main-aarch64.APKINDEX.tar.gz";
const V316: &str = "alpine-v3.16-main-x86_64.APKINDEX.tar.gz";
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn data_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data").join(name)
}

fn args(out: &Path, fraction: f64, seed: u64) -> GenTreeArgs {
    GenTreeArgs { out: out.to_path_buf(), fraction, seed, ..GenTreeArgs::default() }
}

fn real_args(out: &Path, index: &str, fraction: f64, seed: u64) -> GenTreeArgs {
    GenTreeArgs { apkindex: Some(data_file(index)), ..args(out, fraction, seed) }
}

fn update_args(out: &Path, count: usize, seed: u64) -> GenTreeArgs {
    GenTreeArgs { update: Some(count), ..args(out, 1.0, seed) }
}

fn error_text(result: anyhow::Result<GenReport>) -> String {
    match result {
        Ok(report) => panic!("expected an error, got {report:?}"),
        Err(err) => format!("{err:#}"),
    }
}

/// Every file of the tree, relative path -> (blake3 of content, mtime in seconds).
fn tree_digest(root: &Path) -> BTreeMap<PathBuf, (blake3::Hash, u64)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (blake3::Hash, u64)>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                walk(root, &path, out);
            } else {
                let mtime = meta.modified().unwrap().duration_since(UNIX_EPOCH).unwrap().as_secs();
                let hash = blake3::hash(&fs::read(&path).unwrap());
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), (hash, mtime));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Checks every repository of the tree: the directory holds exactly the index and the files it lists, each file is
/// exactly `S:` bytes with mtime `t:`, and the index is unsigned. Returns all packages by relative file path.
fn check_consistent(root: &Path) -> BTreeMap<PathBuf, Package> {
    let mut all = BTreeMap::new();
    let locations = find_indexes(root).unwrap();
    assert!(!locations.is_empty(), "no index under {}", root.display());
    for location in locations {
        let dir = location.dir_in(root);
        let index = apkindex::read_index(&location.index_path_in(root)).unwrap();
        assert!(!index.signed);
        let listed: BTreeSet<String> = index.packages.iter().map(Package::file_name).collect();
        let mut on_disk: BTreeSet<String> =
            fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(on_disk.remove(INDEX_FILE_NAME));
        assert_eq!(on_disk, listed, "files in {} differ from its index", dir.display());
        let max_time = index.packages.iter().filter_map(|p| p.build_time).max().unwrap();
        let index_mtime = fs::metadata(location.index_path_in(root)).unwrap().modified().unwrap();
        assert_eq!(index_mtime.duration_since(UNIX_EPOCH).unwrap().as_secs(), max_time);
        for package in index.packages {
            let meta = fs::metadata(dir.join(package.file_name())).unwrap();
            assert_eq!(meta.len(), package.size, "{}", package.file_name());
            let mtime = meta.modified().unwrap().duration_since(UNIX_EPOCH).unwrap().as_secs();
            assert_eq!(Some(mtime), package.build_time, "{}", package.file_name());
            all.insert(location.relative_dir().join(package.file_name()), package);
        }
    }
    all
}

#[test]
fn builtin_tree_matches_its_index() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tree");
    let report = generate(&args(&out, 0.01, 1)).unwrap();
    let packages = check_consistent(&out);
    assert_eq!(report.packages, 50);
    assert_eq!(packages.len(), 50);
    assert!(packages.keys().all(|path| path.starts_with("alpine/edge/main/x86_64")));
    assert_eq!(report.bytes, packages.values().map(|p| p.size).sum::<u64>());
    assert_eq!(report.bytes_written, report.bytes);
    assert_eq!((report.files_written, report.files_unchanged, report.files_removed), (50, 0, 0));
    assert_eq!(report.index_paths, vec![out.join("alpine/edge/main/x86_64").join(INDEX_FILE_NAME)]);
    assert!(packages.values().all(|p| p.version.contains("-r") && p.arch.as_deref() == Some("x86_64")));
}

#[test]
fn same_seed_gives_an_identical_tree_and_another_seed_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    generate(&args(&a, 0.01, 7)).unwrap();
    generate(&args(&b, 0.01, 7)).unwrap();
    generate(&args(&c, 0.01, 8)).unwrap();
    let (digest_a, digest_c) = (tree_digest(&a), tree_digest(&c));
    assert_eq!(digest_a.len(), 51);
    assert_eq!(digest_a, tree_digest(&b), "same arguments must give a byte-identical tree");
    let contents_a: HashSet<blake3::Hash> = digest_a.values().map(|(hash, _)| *hash).collect();
    assert!(digest_c.values().all(|(hash, _)| !contents_a.contains(hash)), "another seed must give other content");
}

#[test]
fn package_content_depends_only_on_seed_name_and_version() {
    let tmp = tempfile::tempdir().unwrap();
    let (small, large) = (tmp.path().join("small"), tmp.path().join("large"));
    generate(&real_args(&small, V316, 0.004, 3)).unwrap();
    generate(&real_args(&large, V316, 0.012, 3)).unwrap();
    let (digest_small, digest_large) = (tree_digest(&small), tree_digest(&large));
    let packages = digest_small.keys().filter(|path| path.extension().is_some_and(|e| e == "apk")).count();
    assert_eq!(packages, 20);
    for (path, entry) in &digest_small {
        if !path.ends_with(INDEX_FILE_NAME) {
            assert_eq!(digest_large.get(path), Some(entry), "{} differs between fractions", path.display());
        }
    }
}

#[test]
fn regeneration_is_idempotent_and_repairs_the_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tree");
    let first = generate(&args(&out, 0.01, 2)).unwrap();
    let digest = tree_digest(&out);

    let again = generate(&args(&out, 0.01, 2)).unwrap();
    assert_eq!((again.files_written, again.files_unchanged, again.files_removed), (0, 50, 0));
    assert_eq!(again.bytes_written, 0);
    assert_eq!(tree_digest(&out), digest);

    // A damaged file (same size, other bytes), a wrong mtime and a leftover temporary file are all repaired.
    let packages = check_consistent(&out);
    let (damaged, _) = packages.iter().find(|(_, p)| p.size > 100).unwrap();
    let mut bytes = fs::read(out.join(damaged)).unwrap();
    bytes[50] ^= 0xff;
    fs::write(out.join(damaged), &bytes).unwrap();
    let (touched, _) = packages.iter().find(|(path, _)| *path != damaged).unwrap();
    fs::File::options().write(true).open(out.join(touched)).unwrap().set_modified(UNIX_EPOCH).unwrap();
    let leftover = out.join("alpine/edge/main/x86_64/.pkg0001-1.0.0-r0.apk.gentree-tmp");
    fs::write(&leftover, b"partial").unwrap();
    let repaired = generate(&args(&out, 0.01, 2)).unwrap();
    assert_eq!((repaired.files_written, repaired.files_unchanged), (1, 49));
    assert!(!leftover.exists());
    assert_eq!(tree_digest(&out), digest);

    // A smaller fraction removes the packages it no longer lists, after writing the index.
    let smaller = generate(&args(&out, 0.005, 2)).unwrap();
    assert_eq!((smaller.files_written, smaller.files_unchanged, smaller.files_removed), (0, 25, 25));
    assert_eq!(check_consistent(&out).len(), 25);

    // Another seed rewrites everything it keeps.
    let reseeded = generate(&args(&out, 0.01, 3)).unwrap();
    assert_eq!(reseeded.files_written + reseeded.files_unchanged, 50);
    assert_eq!(reseeded.files_unchanged, 0);
    assert_eq!(check_consistent(&out).len(), 50);
    assert!(first.bytes > 0);
}

#[test]
fn refuses_directories_it_did_not_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let foreign = tmp.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("notes.txt"), b"keep me").unwrap();
    let err = error_text(generate(&args(&foreign, 0.01, 1)));
    assert!(err.contains("not a tree generated by gen-tree"), "{err}");
    assert!(!foreign.join("alpine").exists());

    let out = tmp.path().join("tree");
    generate(&args(&out, 0.002, 1)).unwrap();
    let stranger = out.join("alpine/edge/main/x86_64/README");
    fs::write(&stranger, b"not ours").unwrap();
    let before = tree_digest(&out);
    let err = error_text(generate(&args(&out, 0.001, 1)));
    assert!(err.contains("unexpected entry") && err.contains("README"), "{err}");
    assert_eq!(tree_digest(&out), before, "a refused run must not touch the tree");
    fs::remove_file(&stranger).unwrap();

    // A second repository can be added to a generated tree.
    let report = generate(&real_args(&out, V317, 0.001, 1)).unwrap();
    assert_eq!(report.files_written, 5);
    assert_eq!(find_indexes(&out).unwrap().len(), 2);
    check_consistent(&out);

    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    assert!(error_text(generate(&args(&file, 0.01, 1))).contains("not a directory"));
}

#[test]
fn update_replaces_exactly_k_packages() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tree");
    generate(&args(&out, 0.01, 1)).unwrap();
    let before_packages = check_consistent(&out);
    let before = tree_digest(&out);
    let latest_before = before_packages.values().filter_map(|p| p.build_time).max().unwrap();

    let report = generate(&update_args(&out, 3, 5)).unwrap();
    assert_eq!((report.packages, report.files_written, report.files_removed), (3, 3, 3));
    assert_eq!(report.updated.len(), 3);
    assert_eq!(report.index_paths, vec![out.join("alpine/edge/main/x86_64").join(INDEX_FILE_NAME)]);

    let after_packages = check_consistent(&out);
    let after = tree_digest(&out);
    let removed: Vec<&PathBuf> = before.keys().filter(|path| !after.contains_key(*path)).collect();
    let added: Vec<&PathBuf> = after.keys().filter(|path| !before.contains_key(*path)).collect();
    assert_eq!((removed.len(), added.len()), (3, 3));
    let index = Path::new("alpine/edge/main/x86_64").join(INDEX_FILE_NAME);
    assert_ne!(before[&index], after[&index], "the index must be rewritten");
    let unchanged = before.iter().filter(|(path, entry)| after.get(*path) == Some(entry)).count();
    assert_eq!(unchanged, before.len() - 4, "only the 3 packages and the index may change");

    for update in &report.updated {
        let old = before_packages.values().find(|p| p.name == update.name).unwrap();
        let new = after_packages.values().find(|p| p.name == update.name).unwrap();
        assert_eq!(update.old_version, old.version);
        assert_eq!(new.version, update.new_version);
        let (base, release) = old.version.rsplit_once("-r").unwrap();
        assert_eq!(new.version, format!("{base}-r{}", release.parse::<u64>().unwrap() + 1));
        assert_eq!(new.size, update.new_size);
        let jitter = (old.size as f64 * UPDATE_SIZE_JITTER).ceil() as u64 + 1;
        assert!(new.size >= 1 && new.size.abs_diff(old.size) <= jitter, "{} -> {}", old.size, new.size);
        assert!(new.build_time.unwrap() > latest_before);
        assert_ne!(new.stanza.get("C"), old.stanza.get("C"));
        assert!(added.iter().any(|path| path.ends_with(new.file_name())));
        assert!(removed.iter().any(|path| path.ends_with(old.file_name())));
    }

    // Repeated updates with other seeds keep the tree consistent.
    for seed in [6, 7, 8] {
        let report = generate(&update_args(&out, 4, seed)).unwrap();
        assert_eq!((report.files_written, report.files_removed), (4, 4));
        assert_eq!(check_consistent(&out).len(), 50);
    }
}

#[test]
fn update_spans_repositories_and_checks_its_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tree");
    generate(&real_args(&out, V317, 0.002, 1)).unwrap();
    generate(&real_args(&out, V316, 0.002, 1)).unwrap();
    assert_eq!(check_consistent(&out).len(), 20);

    let report = generate(&update_args(&out, 20, 9)).unwrap();
    assert_eq!((report.files_written, report.files_removed, report.index_paths.len()), (20, 20, 2));
    assert_eq!(check_consistent(&out).len(), 20);

    assert!(error_text(generate(&update_args(&out, 21, 9))).contains("only 20 packages"));
    assert!(error_text(generate(&update_args(&out, 0, 9))).contains("at least 1"));
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert!(error_text(generate(&update_args(&empty, 1, 9))).contains("not a tree generated by gen-tree"));
    let with_index = GenTreeArgs { apkindex: Some(data_file(V317)), ..update_args(&out, 1, 9) };
    assert!(error_text(generate(&with_index)).contains("--apkindex"));
}

#[test]
fn fraction_must_be_in_zero_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tree");
    for fraction in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        let err = error_text(generate(&args(&out, fraction, 1)));
        assert!(err.contains("--fraction must be in (0, 1]"), "{fraction}: {err}");
    }
    assert!(!out.exists(), "a rejected run must not create anything");
}

#[test]
fn real_indexes_parse() {
    let v317 = apkindex::read_index(&data_file(V317)).unwrap();
    assert_eq!(v317.packages.len(), 5004);
    assert!(v317.signed);
    assert_eq!(v317.description, "v3.17.3-216-g54a39ace82a");
    assert_eq!(v317.packages.iter().map(|p| p.size).sum::<u64>(), 3_872_279_122);
    assert!(v317.packages.iter().all(|p| p.arch.as_deref() == Some("aarch64") && p.build_time.is_some()));
    let v316 = apkindex::read_index(&data_file(V316)).unwrap();
    assert_eq!(v316.packages.len(), 4929);
}

#[test]
fn real_index_subset_keeps_real_stanzas_in_the_right_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tree");
    let report = generate(&real_args(&out, V317, 0.01, 1)).unwrap();
    assert_eq!(report.packages, 50);
    let packages = check_consistent(&out);
    assert!(packages.keys().all(|path| path.starts_with("alpine/v3.17/main/aarch64")));
    let real = apkindex::read_index(&data_file(V317)).unwrap();
    let written = apkindex::read_index(&out.join("alpine/v3.17/main/aarch64").join(INDEX_FILE_NAME)).unwrap();
    assert_eq!(written.description, real.description);
    let real_by_name: BTreeMap<&str, &Package> = real.packages.iter().map(|p| (p.name.as_str(), p)).collect();
    for package in &written.packages {
        assert_eq!(real_by_name[package.name.as_str()], package, "stanzas must be kept verbatim");
    }
    // Index order is the real index's order.
    let positions: Vec<usize> =
        written.packages.iter().map(|p| real.packages.iter().position(|r| r.name == p.name).unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn index_file_name_falls_back_to_edge_main_and_the_arch_field() {
    let tmp = tempfile::tempdir().unwrap();
    let renamed = tmp.path().join("APKINDEX.tar.gz");
    fs::copy(data_file(V316), &renamed).unwrap();
    let out = tmp.path().join("tree");
    let opts = GenTreeArgs { apkindex: Some(renamed), ..args(&out, 0.001, 1) };
    generate(&opts).unwrap();
    let packages = check_consistent(&out);
    assert_eq!(packages.len(), 5);
    assert!(packages.keys().all(|path| path.starts_with("alpine/edge/main/x86_64")));
}

#[test]
fn malformed_indexes_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tree");
    let gzip_tar = |text: &str| {
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "APKINDEX", text.as_bytes()).unwrap();
        tar.into_inner().unwrap().finish().unwrap()
    };
    let gzip_bytes = |data: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    };
    let truncated = {
        let bytes = fs::read(data_file(V317)).unwrap();
        bytes[..bytes.len() / 2].to_vec()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage.APKINDEX.tar.gz", b"this is not gzip".to_vec(), "gzip"),
        ("empty.APKINDEX.tar.gz", Vec::new(), "the file is empty"),
        ("notar.APKINDEX.tar.gz", gzip_bytes(b"plain text, not a tar archive"), "tar"),
        ("truncated.APKINDEX.tar.gz", truncated, "incomplete deflate stream"),
        ("nosize.APKINDEX.tar.gz", gzip_tar("P:foo\nV:1.0-r0\nA:x86_64\n\n"), "missing S:"),
        ("badline.APKINDEX.tar.gz", gzip_tar("P:foo\nV:1.0-r0\nS:1\n\nwhat\n"), "line 5"),
        ("escape.APKINDEX.tar.gz", gzip_tar("P:../../etc\nV:1\nS:1\n\n"), "starts with '.'"),
        ("none.APKINDEX.tar.gz", gzip_tar("\n\n"), "lists no packages"),
    ];
    for (name, bytes, expected) in cases {
        let path = tmp.path().join(name);
        fs::File::create(&path).unwrap().write_all(&bytes).unwrap();
        let err = error_text(generate(&GenTreeArgs { apkindex: Some(path.clone()), ..args(&out, 1.0, 1) }));
        assert!(err.contains(&path.display().to_string()) && err.contains(expected), "{name}: {err}");
    }
    let missing = tmp.path().join("missing.APKINDEX.tar.gz");
    let err = error_text(generate(&GenTreeArgs { apkindex: Some(missing.clone()), ..args(&out, 1.0, 1) }));
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(!out.exists());
}

#[test]
fn embedded_profile_matches_the_real_index() {
    let real = apkindex::read_index(&data_file(V317)).unwrap();
    let mut sizes: Vec<u64> = real.packages.iter().map(|p| p.size).collect();
    sizes.sort_unstable();
    assert_eq!(PROFILE_PACKAGE_COUNT, sizes.len());
    assert_eq!(
        quantiles_from_sizes(&sizes, QUANTILE_STEPS),
        SIZE_QUANTILES.to_vec(),
        "alpine/src/profile.rs SIZE_QUANTILES no longer matches {V317}"
    );

    // The generated sizes reproduce the facts the design relies on.
    let generated = profile_sizes(PROFILE_PACKAGE_COUNT);
    let stats = |s: &[u64]| {
        let n = s.len();
        let total: u64 = s.iter().sum();
        let top_share = |fraction: usize| s[n - n / fraction..].iter().sum::<u64>() as f64 / total as f64;
        let under_16k = s.iter().filter(|&&x| x < 16 * KIB).count() as f64 / n as f64;
        (s[n / 2], under_16k, s[n * 9 / 10], s[n * 99 / 100], s[n - 1], top_share(100), top_share(10), total)
    };
    let (median, under_16k, p90, p99, max, top1, top10, total) = stats(&generated);
    let real_stats = stats(&sizes);
    assert!((23 * KIB..26 * KIB).contains(&median), "median {median}");
    assert!((0.41..0.43).contains(&under_16k), "under 16 KiB {under_16k}");
    assert!((600 * KIB..700 * KIB).contains(&p90), "p90 {p90}");
    assert!((14 * MIB..18 * MIB).contains(&p99), "p99 {p99}");
    assert_eq!(max, real_stats.4);
    assert!((124 * MIB..125 * MIB).contains(&max), "max {max}");
    assert!((top1 - real_stats.5).abs() < 0.005 && (0.50..0.53).contains(&top1), "top 1% share {top1}");
    assert!((top10 - real_stats.6).abs() < 0.005, "top 10% share {top10}");
    assert!(total.abs_diff(real_stats.7) < real_stats.7 / 100, "total {total}");
}

#[test]
fn run_generates_and_updates() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tree");
    mirrormesh::gentree::run(&args(&out, 0.001, 4)).unwrap();
    mirrormesh::gentree::run(&update_args(&out, 2, 4)).unwrap();
    assert_eq!(check_consistent(&out).len(), 5);
    assert!(mirrormesh::gentree::run(&update_args(&out, 6, 4)).is_err());
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: GenTreeArgs,
}

#[test]
fn command_line_parses() {
    let cli = Cli::try_parse_from(["gen-tree", "out", "--fraction", "0.25", "--seed", "9"]).unwrap();
    assert_eq!((cli.args.out, cli.args.fraction, cli.args.seed, cli.args.update), ("out".into(), 0.25, 9, None));
    let cli = Cli::try_parse_from(["gen-tree", "out", "--update", "3", "--seed", "2"]).unwrap();
    assert_eq!((cli.args.update, cli.args.fraction, cli.args.apkindex), (Some(3), 1.0, None));
    assert!(Cli::try_parse_from(["gen-tree", "out", "--update", "3", "--apkindex", "x"]).is_err());
    assert!(Cli::try_parse_from(["gen-tree", "out", "--update", "3", "--fraction", "0.5"]).is_err());
    assert!(Cli::try_parse_from(["gen-tree", "out", "--fraction", "half"]).is_err());
    assert!(Cli::try_parse_from(["gen-tree"]).is_err());
    let help = format!("{}", <Cli as clap::CommandFactory>::command().render_long_help());
    for expected in ["--apkindex", "--fraction", "--seed", "--update", "OUT"] {
        assert!(help.contains(expected), "help lacks {expected}: {help}");
    }
}
