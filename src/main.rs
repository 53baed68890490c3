//! The `mirrormesh` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mirrormesh::admin::Access;
use mirrormesh::admin_client::AdminClient;
use mirrormesh::config::{Config, DEFAULT_ADMIN};
use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::key::NodeKey;
use mirrormesh::publish::{DEFAULT_VALIDITY, PublishOptions, human_bytes, publish};
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
    /// Benchmarks on real hosts (network namespaces, shaped links), rsync side by side (needs root and rsync).
    Testbed(mirrormesh::testbed::TestbedArgs),
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
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
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
        Command::Publish(PublishArgs { admin: Some(admin), token, .. }) => {
            let client = AdminClient::new(&admin, token, Duration::from_secs(3600));
            let r = client.publish()?;
            println!("published {} seq {}", r.repo, r.seq);
            println!("  root      {}", r.root);
            println!("  files     {} ({}, {} bytes)", r.files, human_bytes(r.bytes), r.bytes);
            match r.delta_bytes {
                Some(d) => println!("  changes   {}, delta {}", r.changes, human_bytes(d as u64)),
                None => println!("  changes   {}", r.changes),
            }
            Ok(())
        }
        Command::Publish(args) => {
            let (Some(tree), Some(key), Some(state)) = (args.tree, args.key, args.state) else {
                anyhow::bail!("publish needs --admin ADDR (a running origin) or all of --tree, --key and --state");
            };
            let key = NodeKey::load(&key)?;
            let store = StateStore::open(&state)?;
            let repo = RepoId::new(&args.repo).with_context(|| format!("--repo {:?}", args.repo))?;
            let opts = PublishOptions {
                tree: &tree,
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
        Command::Demo(args) => mirrormesh::demo::run(&args),
        Command::Testbed(args) => mirrormesh::testbed::run(&args),
    }
}

fn run_daemon(config: &std::path::Path) -> Result<()> {
    let cfg = Config::load(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let access = Access::from_config(&cfg);
        let (daemon, handle) = mirrormesh::daemon::Daemon::start(cfg).await?;
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
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", render(value));
    }
    Ok(())
}
