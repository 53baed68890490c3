//! The `mirrormesh` command line. Output to a pipe whose reader went away ends a command quietly with status 0
//! ([`mirrormesh::cli_output`]).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::HumanBytes;
use mirrormesh::admin::Access;
use mirrormesh::admin_client::AdminClient;
use mirrormesh::cli_output::out;
use mirrormesh::config::{Config, DEFAULT_ADMIN};
use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::key::NodeKey;
use mirrormesh::publish::{DEFAULT_REMOVAL_LIMIT_PERCENT, DEFAULT_VALIDITY, PublishGuard, PublishOptions, publish};
use mirrormesh::store::StateStore;
use mirrormesh::table;
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
    /// Run the node: origin or mirror, as its config file says.
    Daemon {
        /// The node's configuration file (TOML; every key is described in the README).
        #[arg(long)]
        config: PathBuf,
    },
    /// Sign a new snapshot: through a running origin daemon (--admin), or offline (--tree --key --state).
    Publish(PublishArgs),
    /// Show a running node's snapshot, sync state and peers.
    Status(StatusArgs),
    /// Show a running node's peers: address, RTT, traffic, failures, bans, score.
    Peers(StatusArgs),
    /// Show a running node's repositories: snapshot, sync progress, last apply, propagation lag.
    Repos(StatusArgs),
    /// Generate an Alpine-like repository tree (or update one) for tests, benchmarks and demos.
    GenTree(GenTreeArgs),
    /// Run a whole fabric on loopback (an origin and 4 mirrors, real daemons), sync, update, verify, report.
    Demo(mirrormesh::demo::DemoArgs),
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The daemon's admin address (its `admin.listen`).
    #[arg(long, default_value = DEFAULT_ADMIN)]
    admin: String,
    /// Bearer token for an admin API that is not on loopback.
    #[arg(long, env = "MIRRORMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Print the daemon's JSON (as its admin API gives it) instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct PublishArgs {
    /// Ask the running origin daemon at this admin address to publish (it scans its own tree).
    #[arg(long, conflicts_with_all = ["tree", "key", "state"])]
    admin: Option<String>,
    /// Bearer token for an admin API that is not on loopback.
    #[arg(long, env = "MIRRORMESH_TOKEN", hide_env_values = true, requires = "admin")]
    token: Option<String>,
    /// Offline: the tree to publish (the directory nginx/rsyncd serve).
    #[arg(long, requires_all = ["key", "state"])]
    tree: Option<PathBuf>,
    /// Offline: the publisher's key file.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Offline: state directory (manifest nodes, roots, scan cache). Not while a daemon uses it.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Repository name carried in the signed root.
    #[arg(long, default_value = "alpine")]
    repo: String,
    /// How long the signed root stays valid, in hours.
    #[arg(long, default_value_t = DEFAULT_VALIDITY.as_secs() / 3600)]
    valid_hours: u64,
    /// Offline: refuse a snapshot removing more than this share (percent) of the previous one's files or bytes.
    #[arg(long, default_value_t = DEFAULT_REMOVAL_LIMIT_PERCENT, value_parser = clap::value_parser!(u32).range(0..=100))]
    removal_limit_percent: u32,
    /// Publish even if the snapshot is empty or removes more than the limit (the operator means it).
    #[arg(long)]
    force: bool,
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    mirrormesh::cli_output::run_main(|| run(cli.command));
}

fn init_logging(format: LogFormat) {
    mirrormesh::logging::init(matches!(format, LogFormat::Json));
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Keygen { out: path } => {
            let key = NodeKey::generate()?;
            key.save(&path)?;
            let public: String = key.publisher_key().0.iter().map(|b| format!("{b:02x}")).collect();
            out(&format!("key file   {}\nnode id    {}\npublic key {public}\n", path.display(), key.peer_id()))
        }
        Command::Daemon { config } => run_daemon(&config),
        Command::Status(args) => {
            let status = client(&args.admin).status()?;
            show(&status, args.json, |s| table::status_text(s, now_ms(), table::terminal_width()))
        }
        Command::Peers(args) => {
            let peers = client(&args.admin).peers()?;
            show(&peers, args.json, |p| table::peers_table(p, now_ms(), table::terminal_width()))
        }
        Command::Repos(args) => {
            let repos = client(&args.admin).repos()?;
            show(&repos, args.json, |r| table::repos_table(r, now_ms(), table::terminal_width()))
        }
        Command::Publish(PublishArgs { admin: Some(admin), token, force, .. }) => {
            let client = AdminClient::new(&admin, token, Duration::from_secs(3600));
            let r = if force { client.publish_forced()? } else { client.publish()? };
            let mut text = String::new();
            writeln!(text, "published {} seq {}", r.repo, r.seq)?;
            writeln!(text, "  root      {}", r.root)?;
            writeln!(text, "  files     {} ({}, {} bytes)", r.files, HumanBytes(r.bytes), r.bytes)?;
            match r.delta_bytes {
                Some(d) => writeln!(text, "  changes   {}, delta {}", r.changes, HumanBytes(d as u64))?,
                None => writeln!(text, "  changes   {}", r.changes)?,
            }
            out(&text)
        }
        Command::Publish(args) => {
            let (Some(tree), Some(key), Some(state)) = (args.tree, args.key, args.state) else {
                anyhow::bail!("publish needs --admin ADDR (a running origin) or all of --tree, --key and --state");
            };
            if args.valid_hours == 0 {
                anyhow::bail!("--valid-hours must be at least 1");
            }
            let key = NodeKey::load_publisher(&key)?;
            let store = StateStore::open(&state)?;
            let repo = RepoId::new(&args.repo).with_context(|| format!("--repo {:?}", args.repo))?;
            let opts = PublishOptions {
                tree: &tree,
                repo,
                validity: Duration::from_secs(args.valid_hours.saturating_mul(3600)),
                progress: true,
                guard: PublishGuard {
                    removal_limit_percent: args.removal_limit_percent,
                    force: args.force,
                    ..PublishGuard::default()
                },
                exclude: Vec::new(),
            };
            let r = publish(&store, &key, &opts)?;
            let s = &r.scan;
            let rate = s.hashed_bytes as f64 / s.hash_elapsed.as_secs_f64().max(1e-9);
            let mut text = String::new();
            writeln!(text, "published {} seq {}", r.body.repo, r.body.seq)?;
            writeln!(text, "  root      {}", r.body.root.to_hex())?;
            writeln!(text, "  files     {} ({}, {} bytes)", r.body.files, HumanBytes(r.body.bytes), r.body.bytes)?;
            writeln!(text, "  entries   {} dirs, {} symlinks, {} skipped", s.dirs, s.symlinks, s.skipped)?;
            writeln!(
                text,
                "  scan      {:.2} s: hashed {} files ({}, {}/s), {} unchanged from cache",
                s.elapsed.as_secs_f64(),
                s.hashed_files,
                HumanBytes(s.hashed_bytes),
                HumanBytes(rate as u64),
                s.cached_files
            )?;
            writeln!(
                text,
                "  manifest  {} new nodes ({}), built in {:.2} s",
                r.new_nodes,
                HumanBytes(r.new_node_bytes as u64),
                r.build_elapsed.as_secs_f64()
            )?;
            match (r.previous_seq, r.delta_bytes) {
                (Some(prev), Some(delta)) => {
                    writeln!(text, "  changes   {} since seq {prev}, delta {}", r.changes, HumanBytes(delta as u64))?
                }
                (Some(prev), None) => writeln!(text, "  changes   {} since seq {prev}", r.changes)?,
                (None, _) => writeln!(text, "  changes   first snapshot")?,
            }
            out(&text)
        }
        Command::GenTree(args) => gentree::run(&args),
        Command::Demo(args) => mirrormesh::demo::run(&args),
    }
}

fn run_daemon(config: &std::path::Path) -> Result<()> {
    let cfg = Config::load(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let access = Access::from_config(&cfg);
        if cfg.log.is_some() {
            mirrormesh::logging::apply(cfg.log.as_deref())?;
        }
        let (daemon, handle) = mirrormesh::daemon::Daemon::start(cfg).await?;
        // SIGHUP (`systemctl reload`) re-reads the config; without a handler it would end the process.
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let events = handle.events.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                if events.send(mirrormesh::daemon::LoopEvent::Reload).await.is_err() {
                    break;
                }
            }
        });
        let admin = mirrormesh::admin::serve(access, handle.clone()).await?;
        tracing::info!(%admin, data = %handle.data_addr, listen = ?handle.listen_addrs, "admin API listening");
        daemon.run(shutdown_signal()).await
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

fn client(args: &AdminArgs) -> AdminClient {
    AdminClient::new(&args.admin, args.token.clone(), Duration::from_secs(10))
}

fn now_ms() -> u64 {
    mirrormesh::publish::now().0
}

/// Prints `value` as pretty JSON or as the text `render` makes of it.
fn show<T: serde::Serialize>(value: &T, json: bool, render: impl Fn(&T) -> String) -> Result<()> {
    if json { out(&(serde_json::to_string_pretty(value)? + "\n")) } else { out(&render(value)) }
}
