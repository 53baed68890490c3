//! Path rules. Every name and path that arrives from a manifest, a delta or a peer is checked here before it is
//! used; a manifest that breaks a rule is rejected as a whole.
//!
//! - An entry name is one path component: not empty, not `.` or `..`, no `/`, no NUL, at most [`NAME_BYTES_MAX`].
//! - A relative path is `/`-separated names: no leading `/` (absolute), no empty component (`a//b`, trailing `/`),
//!   no `.` or `..`, at most [`PATH_BYTES_MAX`] bytes and [`PATH_DEPTH_MAX`] components.
//! - A symlink target must be *normal*: zero or more `..` followed by zero or more names (`../../x/y`, `x`, `..`),
//!   never absolute, never a `..` after a name, never `.`. Its leading `..` may not climb above the tree root from
//!   the directory that holds the link. Because every directory on a manifest path is a real directory and every
//!   other link obeys the same rule, a normal target that stays inside lexically also stays inside physically.

use thiserror::Error;

/// Longest entry name, in bytes (the Linux `NAME_MAX`).
pub const NAME_BYTES_MAX: usize = 255;
/// Longest relative path or symlink target, in bytes (the Linux `PATH_MAX`).
pub const PATH_BYTES_MAX: usize = 4096;
/// Deepest directory nesting a manifest may describe.
pub const PATH_DEPTH_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PathError {
    #[error("path is absolute")]
    Absolute,
    #[error("path has a `..` component")]
    DotDot,
    #[error("path has a `.` component")]
    Dot,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path has an empty component")]
    EmptyComponent,
    #[error("name contains `/`")]
    Separator,
    #[error("path or name is too long ({len} bytes, limit {max})")]
    TooLong { len: usize, max: usize },
    #[error("path is too deep ({depth} components, limit {max})")]
    TooDeep { depth: usize, max: usize },
    #[error("symlink target is not normal (`.` or a `..` after a name)")]
    SymlinkNotNormal,
    #[error("symlink target escapes the tree")]
    SymlinkEscapes,
}

/// Checks one entry name.
pub fn validate_name(name: &str) -> Result<(), PathError> {
    if name.len() > NAME_BYTES_MAX {
        return Err(PathError::TooLong { len: name.len(), max: NAME_BYTES_MAX });
    }
    if name.as_bytes().contains(&0) {
        return Err(PathError::Nul);
    }
    if name.starts_with('/') {
        return Err(PathError::Absolute);
    }
    if name.contains('/') {
        return Err(PathError::Separator);
    }
    match name {
        "" => Err(PathError::EmptyComponent),
        "." => Err(PathError::Dot),
        ".." => Err(PathError::DotDot),
        _ => Ok(()),
    }
}

/// Checks a relative path (`""` is the tree root).
pub fn validate_rel_path(path: &str) -> Result<(), PathError> {
    if path.len() > PATH_BYTES_MAX {
        return Err(PathError::TooLong { len: path.len(), max: PATH_BYTES_MAX });
    }
    if path.is_empty() {
        return Ok(());
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    let mut depth = 0;
    for component in path.split('/') {
        depth += 1;
        if depth > PATH_DEPTH_MAX {
            return Err(PathError::TooDeep { depth, max: PATH_DEPTH_MAX });
        }
        validate_name(component)?;
    }
    Ok(())
}

/// Checks the syntax of a symlink target (what can be checked without knowing where the link sits).
pub fn validate_symlink_target(target: &str) -> Result<(), PathError> {
    symlink_climb(target).map(|_| ())
}

/// Checks that a symlink whose parent directory is `parent_depth` components below the tree root stays inside.
pub fn check_symlink_within(parent_depth: usize, target: &str) -> Result<(), PathError> {
    if symlink_climb(target)? > parent_depth {
        return Err(PathError::SymlinkEscapes);
    }
    Ok(())
}

/// Validates a symlink target's syntax and returns how many leading `..` it has.
fn symlink_climb(target: &str) -> Result<usize, PathError> {
    if target.len() > PATH_BYTES_MAX {
        return Err(PathError::TooLong { len: target.len(), max: PATH_BYTES_MAX });
    }
    if target.as_bytes().contains(&0) {
        return Err(PathError::Nul);
    }
    if target.starts_with('/') {
        return Err(PathError::Absolute);
    }
    if target.is_empty() {
        return Err(PathError::EmptyComponent);
    }
    let mut climb = 0;
    let mut seen_name = false;
    for component in target.split('/') {
        match component {
            "" => return Err(PathError::EmptyComponent),
            "." => return Err(PathError::SymlinkNotNormal),
            ".." if seen_name => return Err(PathError::SymlinkNotNormal),
            ".." => climb += 1,
            name => {
                validate_name(name)?;
                seen_name = true;
            }
        }
    }
    Ok(climb)
}

/// Joins a directory path and an entry name (`""` is the root).
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_owned() } else { format!("{dir}/{name}") }
}

/// Number of components of a relative path (`""` has none).
pub fn depth(path: &str) -> usize {
    if path.is_empty() { 0 } else { path.split('/').count() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate_name("foo-1.2-r0.apk"), Ok(()));
        assert_eq!(validate_name(""), Err(PathError::EmptyComponent));
        assert_eq!(validate_name("."), Err(PathError::Dot));
        assert_eq!(validate_name(".."), Err(PathError::DotDot));
        assert_eq!(validate_name("a/b"), Err(PathError::Separator));
        assert_eq!(validate_name("/etc"), Err(PathError::Absolute));
        assert_eq!(validate_name("a\0b"), Err(PathError::Nul));
        assert!(matches!(validate_name(&"x".repeat(256)), Err(PathError::TooLong { .. })));
        assert_eq!(validate_name("..."), Ok(()));
    }

    #[test]
    fn paths() {
        assert_eq!(validate_rel_path(""), Ok(()));
        assert_eq!(validate_rel_path("alpine/v3.17/main"), Ok(()));
        assert_eq!(validate_rel_path("/alpine"), Err(PathError::Absolute));
        assert_eq!(validate_rel_path("alpine/../etc"), Err(PathError::DotDot));
        assert_eq!(validate_rel_path("alpine//main"), Err(PathError::EmptyComponent));
        assert_eq!(validate_rel_path("alpine/"), Err(PathError::EmptyComponent));
        assert_eq!(validate_rel_path("alpine/./main"), Err(PathError::Dot));
        assert_eq!(validate_rel_path("a\0"), Err(PathError::Nul));
        let deep = vec!["d"; PATH_DEPTH_MAX + 1].join("/");
        assert!(matches!(validate_rel_path(&deep), Err(PathError::TooDeep { .. })));
    }

    #[test]
    fn symlinks() {
        assert_eq!(check_symlink_within(0, "v3.17"), Ok(()));
        assert_eq!(check_symlink_within(2, "../../x/y"), Ok(()));
        assert_eq!(check_symlink_within(1, ".."), Ok(()));
        assert_eq!(check_symlink_within(0, ".."), Err(PathError::SymlinkEscapes));
        assert_eq!(check_symlink_within(1, "../../etc/passwd"), Err(PathError::SymlinkEscapes));
        assert_eq!(check_symlink_within(3, "/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(check_symlink_within(3, "a/../../b"), Err(PathError::SymlinkNotNormal));
        assert_eq!(check_symlink_within(3, "./a"), Err(PathError::SymlinkNotNormal));
        assert_eq!(check_symlink_within(3, "a//b"), Err(PathError::EmptyComponent));
        assert_eq!(check_symlink_within(3, ""), Err(PathError::EmptyComponent));
        assert_eq!(check_symlink_within(3, "a\0"), Err(PathError::Nul));
    }

    #[test]
    fn joins() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("a/b", "c"), "a/b/c");
        assert_eq!(depth(""), 0);
        assert_eq!(depth("a/b"), 2);
    }
}
