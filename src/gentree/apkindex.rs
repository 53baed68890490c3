//! Writing `APKINDEX.tar.gz` files into generated trees; reading and encoding are [`mirrormesh_alpine::apkindex`],
//! re-exported here.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

pub use mirrormesh_alpine::apkindex::*;

/// Encodes an index and writes it to `path` atomically: to a temporary file in the same directory, modification
/// time set to `mtime`, then renamed into place.
pub fn write_index(path: &Path, description: &str, packages: &[Package], mtime: u64) -> Result<()> {
    let bytes = encode_index(description, packages, mtime)?;
    let time = super::content::unix_time(mtime).with_context(|| format!("bad mtime for {}", path.display()))?;
    let temp = super::layout::temp_path_for(path);
    let context = || format!("cannot write index {}", temp.display());
    let mut file = fs::File::create(&temp).with_context(context)?;
    file.write_all(&bytes).with_context(context)?;
    file.set_modified(time).with_context(context)?;
    drop(file);
    fs::rename(&temp, path).with_context(|| format!("cannot rename {} to {}", temp.display(), path.display()))
}
