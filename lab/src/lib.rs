//! mirrormesh-lab: the harness that measures the product and is not part of it.
//!
//! # Layout
//! - [`testbed`]: real daemons on hosts in network namespaces, shaped links, WAN emulation, the rsync recipe side by
//!   side (`mirrormesh-lab testbed ...`).
//! - [`fullsize`]: trees of a whole Alpine mirror's shape, and builders' updates across them (`mirrormesh-lab gen-mirror`).
//! - [`raw`]: the raw quinn baseline that data-plane benchmarks compare against.
//!
//! The daemons the testbed runs are the product's own binary, `mirrormesh`, found by [`daemon_binary`].

use std::path::PathBuf;

use anyhow::{Result, bail};

pub mod fullsize;
pub mod raw;
pub mod testbed;

/// The environment variable naming the `mirrormesh` binary the lab runs as its daemons (default: `mirrormesh` in
/// the lab binary's own directory, where `cargo build [--release] --workspace` puts both).
pub const DAEMON_BINARY_ENV: &str = "MIRRORMESH_BIN";

/// The product binary the lab starts its daemons from: [`DAEMON_BINARY_ENV`], or `mirrormesh` beside this
/// executable.
pub fn daemon_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(DAEMON_BINARY_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{DAEMON_BINARY_ENV}={}: no such file", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    let beside = exe.with_file_name("mirrormesh");
    if !beside.is_file() {
        bail!(
            "the daemon binary {} is missing: build it first (`cargo build --release --workspace`) or name it in \
             {DAEMON_BINARY_ENV}",
            beside.display()
        );
    }
    Ok(beside)
}
