//! Generating (or regenerating) one repository directory: choose the packages, check the target, write the
//! package files, then the index, then delete stale package files.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::apkindex::{Package, read_index, write_index};
use super::content::{FileJob, content_key, place_files, progress_bar};
use super::layout::{
    DEFAULT_BRANCH, DEFAULT_REPO, INDEX_FILE_NAME, PACKAGE_EXTENSION, RepoLocation, find_indexes, is_empty_dir,
    is_temp_file_name,
};
use super::seeded::{fraction_count, select_ranked};
use super::synthetic::{SYNTHETIC_ARCH, fallback_build_time, synthetic_description, synthetic_packages};
use super::{GenReport, GenTreeArgs};

/// The packages to generate and where.
struct Source {
    location: RepoLocation,
    description: String,
    packages: Vec<Package>,
}

/// Generates the tree described by `opts` (not an update).
pub(super) fn build_tree(opts: &GenTreeArgs, show_progress: bool) -> Result<GenReport> {
    let source = load_source(opts)?;
    let ids: Vec<Vec<&str>> = source.packages.iter().map(|p| vec![p.name.as_str(), p.version.as_str()]).collect();
    let count = fraction_count(source.packages.len(), opts.fraction);
    let selected: Vec<Package> =
        select_ranked(&ids, count, opts.seed, "select").into_iter().map(|i| source.packages[i].clone()).collect();

    let out = &opts.out;
    let location = &source.location;
    let existing = check_target(out, location)?;
    let dir = location.dir_in(out);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let fallback_time = fallback_build_time(opts.seed);
    let jobs: Vec<FileJob> = selected
        .iter()
        .map(|p| FileJob {
            path: dir.join(p.file_name()),
            key: content_key(opts.seed, &p.name, &p.version),
            size: p.size,
            mtime: p.build_time.unwrap_or(fallback_time),
        })
        .collect();
    let bytes: u64 = jobs.iter().map(|job| job.size).sum();
    let progress = progress_bar(show_progress, bytes);
    let stats = place_files(&jobs, &progress);
    progress.finish_and_clear();
    let stats = stats?;

    let index_path = location.index_path_in(out);
    let index_time = jobs.iter().map(|job| job.mtime).max().unwrap_or(fallback_time);
    write_index(&index_path, &source.description, &selected, index_time)?;

    let listed: HashSet<String> = selected.iter().map(Package::file_name).collect();
    let mut files_removed = 0;
    for stale in existing.iter().filter(|name| !listed.contains(*name)) {
        let path = dir.join(stale);
        fs::remove_file(&path).with_context(|| format!("cannot delete stale package file {}", path.display()))?;
        files_removed += 1;
    }

    Ok(GenReport {
        packages: selected.len(),
        bytes,
        files_written: stats.written,
        files_unchanged: stats.unchanged,
        files_removed,
        bytes_written: stats.bytes_written,
        index_paths: vec![index_path],
        ..GenReport::default()
    })
}

/// Loads the packages from `--apkindex` or the built-in profile.
fn load_source(opts: &GenTreeArgs) -> Result<Source> {
    let Some(path) = &opts.apkindex else {
        return Ok(Source {
            location: RepoLocation::new(DEFAULT_BRANCH, DEFAULT_REPO, SYNTHETIC_ARCH)?,
            description: synthetic_description(opts.seed),
            packages: synthetic_packages(opts.seed)?,
        });
    };
    let index = read_index(path)?;
    if index.packages.is_empty() {
        bail!("index {} lists no packages", path.display());
    }
    let from_name = path.file_name().and_then(|name| name.to_str()).and_then(RepoLocation::from_index_file_name);
    let location = match from_name {
        Some(location) => location,
        None => {
            location_from_arch(&index.packages).with_context(|| format!("cannot place index {}", path.display()))?
        }
    };
    Ok(Source { location, description: index.description, packages: index.packages })
}

/// `edge/main/<arch>` where `<arch>` is the one architecture the stanzas' `A:` fields name.
fn location_from_arch(packages: &[Package]) -> Result<RepoLocation> {
    let arches: BTreeSet<&str> = packages.iter().filter_map(|p| p.arch.as_deref()).collect();
    let mut iter = arches.iter();
    match (iter.next(), iter.next()) {
        (Some(arch), None) => RepoLocation::new(DEFAULT_BRANCH, DEFAULT_REPO, arch),
        _ => bail!(
            "the file name is not alpine-<branch>-<repo>-<arch>.APKINDEX.tar.gz and the stanzas' A: fields do not \
             name exactly one architecture (found {arches:?})"
        ),
    }
}

/// Checks that the tree may be written into (see the module docs of `gentree`) and returns the names of the
/// `.apk` files already in the target directory. Leftover temporary files of an interrupted run are deleted.
fn check_target(out: &Path, location: &RepoLocation) -> Result<Vec<String>> {
    match fs::metadata(out) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => bail!("{} exists and is not a directory", out.display()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("cannot inspect {}", out.display())),
    }
    if is_empty_dir(out)? {
        return Ok(Vec::new());
    }
    let dir = location.dir_in(out);
    let index_path = location.index_path_in(out);
    match fs::symlink_metadata(&index_path) {
        Ok(meta) if meta.is_file() => {
            let index = read_index(&index_path).context("refusing to regenerate over an unreadable index")?;
            if index.signed {
                bail!(
                    "{} is signed: this looks like a real mirror, not a tree generated by gen-tree; refusing to \
                     touch it",
                    index_path.display()
                );
            }
            return scan_generated_dir(&dir);
        }
        Ok(_) => bail!("{} is not a regular file; refusing to touch it", index_path.display()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("cannot inspect {}", index_path.display())),
    }
    if find_indexes(out)?.is_empty() {
        bail!(
            "{} is not empty and is not a tree generated by gen-tree (no alpine/*/*/*/{INDEX_FILE_NAME}); refusing \
             to write into it",
            out.display()
        );
    }
    match fs::symlink_metadata(&dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Ok(meta) if meta.is_dir() && is_empty_dir(&dir)? => Ok(Vec::new()),
        Ok(_) => bail!("{} exists but has no {INDEX_FILE_NAME}; refusing to write into it", dir.display()),
        Err(err) => Err(err).with_context(|| format!("cannot inspect {}", dir.display())),
    }
}

/// Lists a previously generated repository directory: the names of its `.apk` files. Deletes leftover temporary
/// files; refuses (before anything is touched) if it holds anything else than `.apk` files, the index and
/// temporary files.
fn scan_generated_dir(dir: &Path) -> Result<Vec<String>> {
    let context = || format!("cannot list {}", dir.display());
    let mut packages = Vec::new();
    let mut temps = Vec::new();
    for entry in fs::read_dir(dir).with_context(context)? {
        let entry = entry.with_context(context)?;
        let path = entry.path();
        let file_type = entry.file_type().with_context(|| format!("cannot inspect {}", path.display()))?;
        let name = entry.file_name().into_string().ok();
        match name {
            Some(name) if file_type.is_file() && name == INDEX_FILE_NAME => {}
            Some(name) if file_type.is_file() && is_temp_file_name(&name) => temps.push(path),
            Some(name) if file_type.is_file() && name.ends_with(PACKAGE_EXTENSION) => packages.push(name),
            _ => bail!(
                "unexpected entry {} in a generated repository directory (only .apk files and {INDEX_FILE_NAME} \
                 belong there); refusing to touch it",
                path.display()
            ),
        }
    }
    for temp in temps {
        fs::remove_file(&temp).with_context(|| format!("cannot delete leftover temporary file {}", temp.display()))?;
    }
    packages.sort();
    Ok(packages)
}
