//! The `mirrormesh` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::key::NodeKey;
use mirrormesh::publish::{DEFAULT_VALIDITY, PublishOptions, human_bytes, publish};
use mirrormesh::store::StateStore;
use mirrormesh_proto::RepoId;

#[derive(Parser)]
#[command(name = "mirrormesh", version, about = "P2P-assisted mirror fabric for Linux distribution mirrors")]
struct Cli {
    /// Log output format (levels are set with RUST_LOG, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create a node key (ed25519, PKCS#8 PEM) and print the node id (libp2p PeerId) and public key.
    Keygen {
        /// Where to write the key; must not exist yet.
        #[arg(long)]
        out: PathBuf,
    },
    /// Scan a tree, sign a new snapshot of it and record it in the state directory.
    Publish(PublishArgs),
    /// Generate an Alpine-like repository tree (or update one) for tests, benchmarks and demos.
    GenTree(GenTreeArgs),
}

#[derive(clap::Args)]
struct PublishArgs {
    /// The tree to publish (the directory nginx/rsyncd serve).
    #[arg(long)]
    tree: PathBuf,
    /// The publisher's key file.
    #[arg(long)]
    key: PathBuf,
    /// State directory (manifest nodes, roots, scan cache).
    #[arg(long)]
    state: PathBuf,
    /// Repository name carried in the signed root.
    #[arg(long, default_value = "alpine")]
    repo: String,
    /// How long the signed root stays valid, in hours.
    #[arg(long, default_value_t = DEFAULT_VALIDITY.as_secs() / 3600)]
    valid_hours: u64,
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Err(error) = run(cli.command) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Keygen { out } => {
            let key = NodeKey::generate()?;
            key.save(&out)?;
            let public: String = key.publisher_key().0.iter().map(|b| format!("{b:02x}")).collect();
            println!("key file   {}", out.display());
            println!("node id    {}", key.peer_id());
            println!("public key {public}");
            Ok(())
        }
        Command::Publish(args) => {
            let key = NodeKey::load(&args.key)?;
            let store = StateStore::open(&args.state)?;
            let repo = RepoId::new(&args.repo).with_context(|| format!("--repo {:?}", args.repo))?;
            let opts = PublishOptions {
                tree: &args.tree,
                repo,
                validity: Duration::from_secs(args.valid_hours.saturating_mul(3600)),
                progress: true,
            };
            let r = publish(&store, &key, &opts)?;
            let s = &r.scan;
            let rate = s.hashed_bytes as f64 / s.hash_elapsed.as_secs_f64().max(1e-9);
            println!("published {} seq {}", r.body.repo, r.body.seq);
            println!("  root      {}", r.body.root.to_hex());
            println!("  files     {} ({}, {} bytes)", r.body.files, human_bytes(r.body.bytes), r.body.bytes);
            println!("  entries   {} dirs, {} symlinks, {} skipped", s.dirs, s.symlinks, s.skipped);
            println!(
                "  scan      {:.2} s: hashed {} files ({}, {}/s), {} unchanged from cache",
                s.elapsed.as_secs_f64(),
                s.hashed_files,
                human_bytes(s.hashed_bytes),
                human_bytes(rate as u64),
                s.cached_files
            );
            println!(
                "  manifest  {} new nodes ({}), built in {:.2} s",
                r.new_nodes,
                human_bytes(r.new_node_bytes as u64),
                r.build_elapsed.as_secs_f64()
            );
            match (r.previous_seq, r.delta_bytes) {
                (Some(prev), Some(delta)) => {
                    println!("  changes   {} since seq {prev}, delta {}", r.changes, human_bytes(delta as u64))
                }
                (Some(prev), None) => println!("  changes   {} since seq {prev}", r.changes),
                (None, _) => println!("  changes   first snapshot"),
            }
            Ok(())
        }
        Command::GenTree(args) => gentree::run(&args),
    }
}
