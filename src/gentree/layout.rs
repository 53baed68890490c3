//! Where things live in a generated tree: `OUT/alpine/<branch>/<repo>/<arch>/{APKINDEX.tar.gz,*.apk}`, the
//! `alpine-<branch>-<repo>-<arch>.APKINDEX.tar.gz` naming convention of downloaded indexes, temporary file names,
//! and the checks that keep names read from an index from escaping the repository directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Top-level directory of the tree, as on every Alpine mirror.
pub const TREE_ROOT_DIR: &str = "alpine";

/// Name of the index file in every repository directory.
pub const INDEX_FILE_NAME: &str = "APKINDEX.tar.gz";

pub use mirrormesh_alpine::apkindex::{PACKAGE_EXTENSION, check_file_name};

/// Branch used when a location cannot be derived from an index file name.
pub const DEFAULT_BRANCH: &str = "edge";

/// Repository used when a location cannot be derived from an index file name.
pub const DEFAULT_REPO: &str = "main";

/// Prefix of downloaded index file names (`alpine-<branch>-<repo>-<arch>.APKINDEX.tar.gz`).
const DOWNLOADED_INDEX_PREFIX: &str = "alpine-";

/// Suffix of downloaded index file names.
const DOWNLOADED_INDEX_SUFFIX: &str = ".APKINDEX.tar.gz";

/// Suffix of the temporary files the generator writes before renaming them into place. Temporary files are hidden
/// (leading `.`), so no package name (which may not start with `.`) can collide with one.
const TEMP_SUFFIX: &str = ".gentree-tmp";

/// One repository directory of the tree: `alpine/<branch>/<repo>/<arch>/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RepoLocation {
    /// Branch, e.g. `edge` or `v3.17`.
    pub branch: String,
    /// Repository, e.g. `main`, `community`, `testing`.
    pub repo: String,
    /// Architecture, e.g. `x86_64`, `aarch64`.
    pub arch: String,
}

impl RepoLocation {
    /// A location from its three components; each must be a plain file name (see [`check_file_name`]).
    pub fn new(branch: &str, repo: &str, arch: &str) -> Result<Self> {
        check_file_name("branch", branch)?;
        check_file_name("repository", repo)?;
        check_file_name("architecture", arch)?;
        Ok(Self { branch: branch.to_owned(), repo: repo.to_owned(), arch: arch.to_owned() })
    }

    /// Parses `alpine-<branch>-<repo>-<arch>.APKINDEX.tar.gz` (e.g. `alpine-v3.17-main-aarch64.APKINDEX.tar.gz`).
    /// Returns `None` when the name does not have that form.
    pub fn from_index_file_name(file_name: &str) -> Option<Self> {
        let stem = file_name.strip_prefix(DOWNLOADED_INDEX_PREFIX)?.strip_suffix(DOWNLOADED_INDEX_SUFFIX)?;
        let mut parts = stem.split('-');
        let (branch, repo, arch) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Self::new(branch, repo, arch).ok()
    }

    /// `alpine/<branch>/<repo>/<arch>`, relative to the tree root.
    pub fn relative_dir(&self) -> PathBuf {
        [TREE_ROOT_DIR, &self.branch, &self.repo, &self.arch].iter().collect()
    }

    /// The repository directory under `out`.
    pub fn dir_in(&self, out: &Path) -> PathBuf {
        out.join(self.relative_dir())
    }

    /// The index file of this repository under `out`.
    pub fn index_path_in(&self, out: &Path) -> PathBuf {
        self.dir_in(out).join(INDEX_FILE_NAME)
    }
}

impl std::fmt::Display for RepoLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}/{}", TREE_ROOT_DIR, self.branch, self.repo, self.arch)
    }
}

/// All repository indexes of a tree: every `OUT/alpine/*/*/*/APKINDEX.tar.gz` that is a regular file, sorted by
/// location. Directories whose names are not valid location components are skipped.
pub fn find_indexes(out: &Path) -> Result<Vec<RepoLocation>> {
    let root = out.join(TREE_ROOT_DIR);
    let mut found = Vec::new();
    for branch in subdirectories(&root)? {
        for repo in subdirectories(&root.join(&branch))? {
            for arch in subdirectories(&root.join(&branch).join(&repo))? {
                let Ok(location) = RepoLocation::new(&branch, &repo, &arch) else { continue };
                let index = location.index_path_in(out);
                match fs::symlink_metadata(&index) {
                    Ok(meta) if meta.is_file() => found.push(location),
                    Ok(_) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(err).with_context(|| format!("cannot inspect {}", index.display())),
                }
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Names of the subdirectories of `dir` (not following symlinks); empty if `dir` does not exist.
fn subdirectories(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let file_type = entry.file_type().with_context(|| format!("cannot inspect {}", entry.path().display()))?;
        if let (true, Some(name)) = (file_type.is_dir(), entry.file_name().to_str()) {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Whether `dir` exists and has no entries. Errors if it exists but is not a readable directory.
pub fn is_empty_dir(dir: &Path) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err).with_context(|| format!("cannot list {}", dir.display())),
    }
}

/// The temporary path a file is written to before being renamed to `path` (same directory, hidden name).
pub fn temp_path_for(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}{TEMP_SUFFIX}"))
}

/// Whether `file_name` is one of the generator's temporary files (left behind by an interrupted run).
pub fn is_temp_file_name(file_name: &str) -> bool {
    file_name.starts_with('.') && file_name.ends_with(TEMP_SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_downloaded_index_names() {
        let loc = RepoLocation::from_index_file_name("alpine-v3.17-main-aarch64.APKINDEX.tar.gz");
        assert_eq!(loc, Some(RepoLocation::new("v3.17", "main", "aarch64").unwrap()));
        assert_eq!(loc.unwrap().relative_dir(), PathBuf::from("alpine/v3.17/main/aarch64"));
        assert_eq!(RepoLocation::from_index_file_name("APKINDEX.tar.gz"), None);
        assert_eq!(RepoLocation::from_index_file_name("alpine-v3.17-main.APKINDEX.tar.gz"), None);
        assert_eq!(RepoLocation::from_index_file_name("alpine-a-b-c-d.APKINDEX.tar.gz"), None);
        assert_eq!(RepoLocation::from_index_file_name("alpine-..-main-x86.APKINDEX.tar.gz"), None);
    }

    #[test]
    fn rejects_unsafe_components() {
        assert!(check_file_name("name", "libstdc++").is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "a\\b", "a\nb", "a\0b"] {
            assert!(check_file_name("name", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn temp_names_are_recognised() {
        let temp = temp_path_for(Path::new("/x/foo-1.0-r0.apk"));
        assert_eq!(temp, PathBuf::from("/x/.foo-1.0-r0.apk.gentree-tmp"));
        assert!(is_temp_file_name(".foo-1.0-r0.apk.gentree-tmp"));
        assert!(!is_temp_file_name("foo-1.0-r0.apk"));
    }
}
