//! Logging: human-readable lines or JSON on stderr (journald takes either), with a level filter that the daemon can
//! change while it runs (`node.log` in the config, re-read on SIGHUP). When stderr is the journal, each line starts
//! with its syslog priority and carries no timestamp of its own (the journal stamps it): see `service.rs`.
//!
//! The filter is `RUST_LOG` when set, else `node.log`, else `info`; directives as `tracing-subscriber`'s `EnvFilter`
//! reads them (`info,mirrormesh=debug`).

use std::sync::OnceLock;

use anyhow::{Result, anyhow};

use crate::service::JournalPriority;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The filter used when neither `RUST_LOG` nor `node.log` says otherwise.
pub const DEFAULT_FILTER: &str = "info";

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber (once per process).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    let journal = crate::service::stderr_is_journal();
    let installed = match (json, journal) {
        (false, false) => registry.with(fmt).try_init(),
        (true, false) => registry.with(fmt.json()).try_init(),
        (false, true) => registry.with(fmt.without_time().map_event_format(JournalPriority)).try_init(),
        (true, true) => registry.with(fmt.json().without_time().map_event_format(JournalPriority)).try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// Checks a filter (`node.log`) without applying it.
pub fn check(directives: &str) -> Result<()> {
    EnvFilter::try_new(directives).map(|_| ()).map_err(|e| anyhow!("{directives:?} is not a log filter: {e}"))
}

/// Applies the configured filter (`None`: back to the default), unless `RUST_LOG` is set, which wins. Returns the
/// filter in effect.
pub fn apply(configured: Option<&str>) -> Result<String> {
    let wanted = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => env,
        _ => configured.unwrap_or(DEFAULT_FILTER).to_owned(),
    };
    let filter = EnvFilter::try_new(&wanted).map_err(|e| anyhow!("{wanted:?} is not a log filter: {e}"))?;
    if let Some(handle) = FILTER.get() {
        handle.reload(filter).map_err(|e| anyhow!("changing the log filter: {e}"))?;
    }
    Ok(wanted)
}
