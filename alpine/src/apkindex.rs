//! Reading and encoding `APKINDEX.tar.gz` (the test-tree generator, `gentree::apkindex` in the daemon crate,
//! writes the encoded files into its trees).
//!
//! A real index is two concatenated gzip members: a tar holding the signature (`.SIGN.RSA.<key>.rsa.pub`), then a
//! tar holding `DESCRIPTION` and `APKINDEX`. The reader decodes all members as one stream, so it accepts both that
//! and the unsigned form the generator writes: one gzip member holding a tar with `DESCRIPTION` and `APKINDEX`
//! (the generator cannot sign with Alpine's key). `APKINDEX` is text: stanzas separated by blank lines, each line
//! `X:value`. The fields interpreted here are `P:` (name), `V:` (version), `S:` (size of the `.apk` file in bytes),
//! `A:` (architecture) and `t:` (build time, unix seconds); every field is kept verbatim so a stanza is written
//! back exactly as it was read.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

/// Extension of package files (`<name>-<version>.apk`).
pub const PACKAGE_EXTENSION: &str = ".apk";

/// Largest compressed index file read (real ones are ~650 KiB).
pub const MAX_INDEX_FILE_BYTES: u64 = 64 << 20;

/// Largest decompressed index stream read (tar headers and all entries; real ones are ~2 MiB), so that a
/// decompression bomb is rejected instead of exhausting memory or time.
pub const MAX_DECOMPRESSED_BYTES: u64 = 256 << 20;

/// Largest `S:` accepted (the largest real package is ~124 MiB); bounds the disk space one stanza can claim.
pub const MAX_PACKAGE_BYTES: u64 = 4 << 30;

/// Largest `t:` accepted: 9999-12-31T23:59:59Z, so every build time is a valid file modification time.
pub const MAX_BUILD_TIME: u64 = 253_402_300_799;

/// Name of the stanza list inside the index tar.
pub const APKINDEX_ENTRY: &str = "APKINDEX";

/// Name of the description inside the index tar.
pub const DESCRIPTION_ENTRY: &str = "DESCRIPTION";

/// Prefix of signature entries in a signed index.
const SIGNATURE_ENTRY_PREFIX: &str = ".SIGN.";

/// One stanza of `APKINDEX`: its fields in order, keys and values verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stanza {
    fields: Vec<(String, String)>,
}

impl Stanza {
    /// A stanza from `(key, value)` pairs, in order.
    pub fn new(fields: Vec<(String, String)>) -> Self {
        Self { fields }
    }

    /// The fields, in order.
    pub fn fields(&self) -> &[(String, String)] {
        &self.fields
    }

    /// The value of the first field named `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Replaces the value of the first field named `key`, or appends the field if there is none.
    pub fn set(&mut self, key: &str, value: String) {
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some(field) => field.1 = value,
            None => self.fields.push((key.to_owned(), value)),
        }
    }
}

/// A package: the interpreted fields of a stanza, validated, plus the stanza itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// `P:`, a valid file-name component.
    pub name: String,
    /// `V:`, a valid file-name component.
    pub version: String,
    /// `S:`, size of the `.apk` file in bytes, at most [`MAX_PACKAGE_BYTES`].
    pub size: u64,
    /// `A:`, if present.
    pub arch: Option<String>,
    /// `t:`, build time in unix seconds, if present.
    pub build_time: Option<u64>,
    /// The stanza, verbatim.
    pub stanza: Stanza,
}

impl Package {
    /// Interprets and validates a stanza. The error does not name the stanza's position; callers add that.
    pub fn from_stanza(stanza: Stanza) -> Result<Self> {
        for key in ["P", "V", "S", "A", "t"] {
            if stanza.fields.iter().filter(|(k, _)| k == key).count() > 1 {
                bail!("field {key}: appears more than once");
            }
        }
        let name = stanza.get("P").ok_or_else(|| anyhow!("missing P: (package name) field"))?.to_owned();
        check_file_name("package name (P:)", &name)?;
        let version = stanza.get("V").ok_or_else(|| anyhow!("package {name}: missing V: (version) field"))?;
        check_file_name("version (V:)", version).with_context(|| format!("package {name}"))?;
        let version = version.to_owned();
        let size_text = stanza.get("S").ok_or_else(|| anyhow!("package {name}: missing S: (size) field"))?;
        let size: u64 =
            size_text.parse().map_err(|_| anyhow!("package {name}: S: value {size_text:?} is not a byte count"))?;
        if size > MAX_PACKAGE_BYTES {
            bail!("package {name}: S: {size} exceeds the limit of {MAX_PACKAGE_BYTES} bytes");
        }
        let build_time = match stanza.get("t") {
            Some(text) => match text.parse::<u64>() {
                Ok(time) if time <= MAX_BUILD_TIME => Some(time),
                _ => bail!("package {name}: t: value {text:?} is not a unix time up to {MAX_BUILD_TIME}"),
            },
            None => None,
        };
        let arch = stanza.get("A").map(str::to_owned);
        Ok(Self { name, version, size, arch, build_time, stanza })
    }

    /// The package's file name, `<name>-<version>.apk`.
    pub fn file_name(&self) -> String {
        format!("{}-{}{PACKAGE_EXTENSION}", self.name, self.version)
    }

    /// This package with a new version, size, build time and checksum (`C:`), stanza updated to match.
    pub fn updated(&self, version: String, size: u64, build_time: u64, checksum: String) -> Result<Self> {
        let mut stanza = self.stanza.clone();
        stanza.set("V", version);
        stanza.set("S", size.to_string());
        stanza.set("t", build_time.to_string());
        stanza.set("C", checksum);
        Self::from_stanza(stanza)
    }
}

/// A decoded index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApkIndex {
    /// Contents of `DESCRIPTION` (empty if absent).
    pub description: String,
    /// Packages in index order; their file names are distinct.
    pub packages: Vec<Package>,
    /// Whether the index carried a signature entry (a real, signed index).
    pub signed: bool,
}

/// Reads and decodes an index file. Errors name the file and what is wrong with it.
pub fn read_index(path: &Path) -> Result<ApkIndex> {
    let context = || format!("cannot read index {}", path.display());
    let file = fs::File::open(path).with_context(context)?;
    let len = file.metadata().with_context(context)?.len();
    if len > MAX_INDEX_FILE_BYTES {
        bail!("index {} is {len} bytes, more than the limit of {MAX_INDEX_FILE_BYTES}", path.display());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(MAX_INDEX_FILE_BYTES).read_to_end(&mut bytes).with_context(context)?;
    decode_index(&bytes).with_context(|| format!("invalid index {}", path.display()))
}

/// Decodes the bytes of an `APKINDEX.tar.gz` (signed or unsigned).
pub fn decode_index(bytes: &[u8]) -> Result<ApkIndex> {
    if bytes.is_empty() {
        bail!("the file is empty");
    }
    let mut limited = MultiGzDecoder::new(bytes).take(MAX_DECOMPRESSED_BYTES);
    let mut archive = tar::Archive::new(&mut limited);
    archive.set_ignore_zeros(true);
    let mut text = None;
    let mut description = None;
    let mut signed = false;
    for entry in archive.entries().context("not a gzip-compressed tar archive")? {
        let mut entry = entry.context("corrupt gzip or tar data")?;
        let path = entry.path().context("tar entry with an unreadable name")?.to_string_lossy().into_owned();
        let name = path.strip_prefix("./").unwrap_or(&path);
        if name.starts_with(SIGNATURE_ENTRY_PREFIX) {
            signed = true;
        } else if name == APKINDEX_ENTRY {
            text = Some(read_text_entry(&mut entry).context("cannot read the APKINDEX entry")?);
        } else if name == DESCRIPTION_ENTRY {
            description = Some(read_text_entry(&mut entry).context("cannot read the DESCRIPTION entry")?);
        }
    }
    if limited.limit() == 0 {
        bail!("decompressed index is larger than the limit of {MAX_DECOMPRESSED_BYTES} bytes");
    }
    let text = text.ok_or_else(|| anyhow!("the archive has no {APKINDEX_ENTRY} entry"))?;
    let packages = parse_apkindex_text(&text)?;
    Ok(ApkIndex { description: description.unwrap_or_default(), packages, signed })
}

/// Reads one tar entry as UTF-8 text.
fn read_text_entry<R: Read>(entry: &mut tar::Entry<R>) -> Result<String> {
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes)?;
    String::from_utf8(bytes).map_err(|err| anyhow!("not UTF-8 text (byte {})", err.utf8_error().valid_up_to()))
}

/// Parses the text of `APKINDEX` into packages. Errors name the stanza (1-based) and its first line.
pub fn parse_apkindex_text(text: &str) -> Result<Vec<Package>> {
    let mut packages: Vec<Package> = Vec::new();
    let mut by_file_name: HashMap<String, usize> = HashMap::new();
    let mut fields = Vec::new();
    let mut first_line = 0;
    let lines = text.split('\n').enumerate().map(|(i, line)| (i + 1, line));
    // A final empty line closes the last stanza even if the text lacks the trailing blank line.
    for (line_no, line) in lines.chain(std::iter::once((0, ""))) {
        if line.is_empty() {
            if fields.is_empty() {
                continue;
            }
            let stanza_no = packages.len() + 1;
            let package = Package::from_stanza(Stanza::new(std::mem::take(&mut fields)))
                .with_context(|| format!("stanza {stanza_no} (line {first_line})"))?;
            let file_name = package.file_name();
            if let Some(previous) = by_file_name.insert(file_name.clone(), stanza_no) {
                bail!("stanza {stanza_no} (line {first_line}): {file_name} is also named by stanza {previous}");
            }
            packages.push(package);
            continue;
        }
        let (key, value) = line
            .split_once(':')
            .filter(|(key, _)| !key.is_empty())
            .ok_or_else(|| anyhow!("line {line_no}: expected `X:value`, found {:?}", truncate(line)))?;
        if fields.is_empty() {
            first_line = line_no;
        }
        fields.push((key.to_owned(), value.to_owned()));
    }
    Ok(packages)
}

/// A short prefix of `line` for error messages.
fn truncate(line: &str) -> String {
    const SHOWN_CHARS: usize = 60;
    line.chars().take(SHOWN_CHARS).collect()
}

/// Checks that `value` can be used as one path component: non-empty, no `/`, `\\` or control characters, and not
/// starting with `.` (which also excludes `.`, `..` and hidden temporary files).
pub fn check_file_name(what: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        bail!("{what} is empty");
    }
    if value.starts_with('.') {
        bail!("{what} {value:?} starts with '.'");
    }
    if let Some(bad) = value.chars().find(|c| *c == '/' || *c == '\\' || c.is_control()) {
        bail!("{what} {value:?} contains the forbidden character {bad:?}");
    }
    Ok(())
}

// Writing (the test-tree generator's side).

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_missing_trailing_blank_line() {
        assert_eq!(parse_apkindex_text("P:a\nV:1\nS:2").unwrap().len(), 1);
        assert!(parse_apkindex_text("").unwrap().is_empty());
    }

    #[test]
    fn malformed_text_is_an_error() {
        let cases = [
            ("P:a\nV:1\n\n", "S:"),
            ("P:a\nV:1\nS:x\n\n", "byte count"),
            ("P:a\nV:1\nS:1\nt:soon\n\n", "unix time"),
            ("P:a\nV:1\nS:1\nt:99999999999999\n\n", "unix time"),
            ("P:a\nno colon\n\n", "line 2"),
            ("P:a/x\nV:1\nS:1\n\n", "forbidden"),
            ("P:..\nV:1\nS:1\n\n", "starts with"),
            ("P:a\nV:1\nS:1\n\nP:a\nV:1\nS:2\n\n", "also named by stanza 1"),
            ("P:a\nP:b\nV:1\nS:1\n\n", "more than once"),
            ("P:a\nV:1\nS:99999999999999\n\n", "limit"),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", parse_apkindex_text(text).unwrap_err());
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn garbage_archive_is_an_error() {
        assert!(decode_index(b"not gzip at all").is_err());
        assert!(decode_index(&[]).is_err());
    }

    const WRITER_SAMPLE: &str =
        "C:Q1abc=\nP:foo\nV:1.2.3-r0\nA:x86_64\nS:1234\nt:1666619671\n\nP:foo-doc\nV:1.2.3-r0\nS:7\n\n";

    #[test]
    fn round_trips_text_and_archive() {
        let packages = parse_apkindex_text(WRITER_SAMPLE).unwrap();
        assert_eq!(packages.len(), 2);
        assert_eq!(packages[0].file_name(), "foo-1.2.3-r0.apk");
        assert_eq!(packages[0].size, 1234);
        assert_eq!(packages[0].build_time, Some(1_666_619_671));
        assert_eq!(packages[1].arch, None);
        assert_eq!(render_apkindex_text(&packages), WRITER_SAMPLE);
        let bytes = encode_index("desc", &packages, 5).unwrap();
        let index = decode_index(&bytes).unwrap();
        assert_eq!(index.packages, packages);
        assert_eq!(index.description, "desc");
        assert!(!index.signed);
        assert_eq!(encode_index("desc", &packages, 5).unwrap(), bytes);
    }
}
