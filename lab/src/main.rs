//! `mirrormesh-lab`: the lab's command line (benchmarks on real hosts, against rsync and raw quinn). The daemons it
//! runs are the product's `mirrormesh` binary ([`mirrormesh_lab::daemon_binary`]).

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mirrormesh-lab", version, about = "mirrormesh's lab: benchmarks on real hosts, rsync side by side")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks on real hosts (network namespaces, shaped links), rsync side by side (needs root and rsync).
    Testbed(mirrormesh_lab::testbed::TestbedArgs),
    /// Writes a tree of a whole Alpine mirror's shape (432 directories, a chosen number of files and bytes), or
    /// rebuilds packages across one, for the full-size benchmarks.
    GenMirror(mirrormesh_lab::fullsize::GenMirrorArgs),
}

fn main() {
    let cli = Cli::parse();
    mirrormesh::logging::init(false);
    mirrormesh::cli_output::run_main(|| run(cli.command));
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Testbed(args) => mirrormesh_lab::testbed::run(&args),
        Command::GenMirror(args) => mirrormesh_lab::fullsize::run(&args),
    }
}
