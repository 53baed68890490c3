//! mirrormesh: the daemon and command-line shell around the protocol core (`mirrormesh-proto`).
//!
//! # Layout
//! - [`key`]: node keys (PKCS#8 PEM files) and the identities derived from them.
//! - [`store`]: the node's crash-safe state database (manifest nodes, deltas, roots, scan cache).
//! - [`scan`]: scanning a served tree into a manifest, with a stat cache.
//! - [`publish`]: signing and recording a snapshot.
//! - [`gentree`]: Alpine-like test trees for tests, benchmarks and the demo.

pub mod admin;
pub mod admin_client;
pub mod apply;
pub mod chunk_index;
pub mod cli_output;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod demo;
pub mod downstream;
pub mod gentree;
pub mod history;
pub mod key;
pub mod local_fabric;
pub mod logging;
pub mod metrics;
pub mod publish;
pub mod removals;
pub mod scan;
pub mod service;
pub mod staging;
pub mod status;
pub mod store;
pub mod swarm;
pub mod table;
