//! The command lines' output (the product's `mirrormesh` and the lab's `mirrormesh-lab`).
//!
//! Output goes to a reader that may stop early (`mirrormesh peers --json | head -1`, `mirrormesh status | true`):
//! a write that finds the pipe closed ends the command quietly with status 0, as a reader that has read what it
//! wanted is no failure (and `set -o pipefail` scripts do not fail for it). A command's own output goes through
//! [`out`]; `println!` in longer-running code (gen-tree, demo, testbed) is covered by [`run_main`]'s panic hook.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

/// Runs a command line's `main` body: an error is printed as `error: ...` with exit status 1, an [`Exit`] ends it
/// with its status; a closed standard output ([`StdoutClosed`], or a `print!` that panicked on it) ends it quietly
/// with status 0.
pub fn run_main(body: impl FnOnce() -> Result<()>) {
    quiet_when_output_closes();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(())) => {}
        Ok(Err(error)) if error.downcast_ref::<StdoutClosed>().is_some() => {}
        Ok(Err(error)) if error.downcast_ref::<Exit>().is_some() => {
            std::process::exit(error.downcast_ref::<Exit>().map_or(1, |Exit(code)| *code))
        }
        Ok(Err(error)) => {
            // Not eprintln!: it would panic if stderr is a closed pipe too.
            let _ = writeln!(std::io::stderr(), "error: {error:#}");
            std::process::exit(1);
        }
        Err(_) if OUTPUT_CLOSED.load(Ordering::Relaxed) => {}
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Standard output's reader went away: the command stops, quietly and successfully.
#[derive(Debug, thiserror::Error)]
#[error("standard output closed by its reader")]
pub struct StdoutClosed;

/// The command reported its outcome itself and ends with this exit status.
#[derive(Debug, thiserror::Error)]
#[error("exit status {0}")]
pub struct Exit(pub i32);

/// Writes `text` to standard output; [`StdoutClosed`] if its reader went away.
pub fn out(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// Set when `print!`/`eprint!` panicked on a closed pipe.
static OUTPUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// `print!` and `println!` panic when their pipe is closed ("failed printing to stdout: Broken pipe"). For that
/// panic only, the message is left out and [`OUTPUT_CLOSED`] set: unwinding still runs every drop (gen-tree's,
/// the demo's child daemons, the testbed's namespaces), then `main` exits quietly with status 0.
fn quiet_when_output_closes() {
    let default = std::panic::take_hook();
    let broken_pipe = format!("(os error {})", libc::EPIPE);
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload.downcast_ref::<String>().map(String::as_str).or(payload.downcast_ref::<&str>().copied());
        let closed =
            message.is_some_and(|m| m.starts_with("failed printing to std") && m.ends_with(broken_pipe.as_str()));
        if closed {
            OUTPUT_CLOSED.store(true, Ordering::Relaxed);
        } else {
            default(info);
        }
    }));
}
