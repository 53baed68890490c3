//! Writing `APKINDEX.tar.gz` for generated trees; the reader is [`mirrormesh_alpine::apkindex`], re-exported here.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use flate2::Compression;
use flate2::write::GzEncoder;

pub use mirrormesh_alpine::apkindex::*;

/// Mode, owner and group of the entries of a written index (as in real indexes).
const ENTRY_MODE: u32 = 0o644;
const ENTRY_OWNER: &str = "root";

/// Renders packages as `APKINDEX` text: each stanza's lines, then a blank line.
pub fn render_apkindex_text(packages: &[Package]) -> String {
    let mut text = String::new();
    for package in packages {
        for (key, value) in package.stanza.fields() {
            text.push_str(key);
            text.push(':');
            text.push_str(value);
            text.push('\n');
        }
        text.push('\n');
    }
    text
}

/// Encodes an unsigned index: one gzip member holding a tar with `DESCRIPTION` and `APKINDEX`, both entries with
/// modification time `mtime`. The output depends only on the arguments (gzip header time is 0).
pub fn encode_index(description: &str, packages: &[Package], mtime: u64) -> Result<Vec<u8>> {
    let text = render_apkindex_text(packages);
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    for (name, data) in [(DESCRIPTION_ENTRY, description.as_bytes()), (APKINDEX_ENTRY, text.as_bytes())] {
        let mut header = tar::Header::new_gnu();
        header.set_path(name).with_context(|| format!("cannot name tar entry {name}"))?;
        header.set_size(data.len() as u64);
        header.set_mode(ENTRY_MODE);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        header.set_username(ENTRY_OWNER).context("cannot set tar owner")?;
        header.set_groupname(ENTRY_OWNER).context("cannot set tar group")?;
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, data).with_context(|| format!("cannot write tar entry {name}"))?;
    }
    let encoder = builder.into_inner().context("cannot finish the index tar")?;
    encoder.finish().context("cannot finish the index gzip stream")
}

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

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str =
        "C:Q1abc=\nP:foo\nV:1.2.3-r0\nA:x86_64\nS:1234\nt:1666619671\n\nP:foo-doc\nV:1.2.3-r0\nS:7\n\n";

    #[test]
    fn round_trips_text_and_archive() {
        let packages = parse_apkindex_text(SAMPLE).unwrap();
        assert_eq!(packages.len(), 2);
        assert_eq!(packages[0].file_name(), "foo-1.2.3-r0.apk");
        assert_eq!(packages[0].size, 1234);
        assert_eq!(packages[0].build_time, Some(1_666_619_671));
        assert_eq!(packages[1].arch, None);
        assert_eq!(render_apkindex_text(&packages), SAMPLE);
        let bytes = encode_index("desc", &packages, 5).unwrap();
        let index = decode_index(&bytes).unwrap();
        assert_eq!(index.packages, packages);
        assert_eq!(index.description, "desc");
        assert!(!index.signed);
        assert_eq!(encode_index("desc", &packages, 5).unwrap(), bytes);
    }
}
