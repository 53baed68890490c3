//! The `mirrormesh` command line. Output to a pipe whose reader went away ends a command quietly with status 0
//! ([`mirrormesh::cli_output`]).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::HumanBytes;
use mirrormesh::admin::Access;
use mirrormesh::admin_client::AdminClient;
use mirrormesh::cli_output::{Exit, out};
use mirrormesh::config::{Config, DEFAULT_ADMIN};
use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::key::NodeKey;
use mirrormesh::publish::{DEFAULT_REMOVAL_LIMIT_PERCENT, DEFAULT_VALIDITY, PublishGuard, PublishOptions, publish};
use mirrormesh::scan::Changed;
use mirrormesh::store::StateStore;
use mirrormesh::table;
use mirrormesh_proto::RepoId;

#[derive(Parser)]
#[command(name = "mirrormesh", version = VERSION, about = "P2P-assisted mirror fabric for Linux distribution mirrors")]
struct Cli {
    /// Log output format (levels are set with RUST_LOG, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `mirrormesh --version`: the package version and the commit the binary was built from (`build.rs`), as
/// `mirrormesh_build_info{version,commit}` reports them.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("MIRRORMESH_COMMIT"), ")");

/// Exit status of `mirrormesh wait` when its `--timeout` passed first (as `timeout(1)`'s).
const EXIT_TIMED_OUT: i32 = 124;

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
    /// Show an existing key file's node id (libp2p PeerId) and public key.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Check a configuration file as the daemon does at start (like `nginx -t`).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
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
    /// Wait until a node (with --all: and every peer of the fabric it knows) serves a snapshot; exit status 0 once
    /// it does, 124 when --timeout passed first, 1 on an error.
    Wait(WaitArgs),
    /// Generate an Alpine-like repository tree (or update one) for tests, benchmarks and demos.
    GenTree(GenTreeArgs),
    /// Run a whole fabric on loopback (an origin and 4 mirrors, real daemons), sync, update, verify, report.
    Demo(mirrormesh::demo::DemoArgs),
    /// Write the man pages and shell completions generated from this command line (for packages).
    #[command(hide = true)]
    Generate {
        /// Directory to write `man1/*.1` and `completions/{mirrormesh.bash,_mirrormesh,mirrormesh.fish}` into.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print the node id (libp2p PeerId) and public key of an existing key file.
    Show {
        /// The key file (ed25519, PKCS#8 PEM, as `mirrormesh keygen` writes it).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Parse and validate a config file and load the node key it names, as the daemon does before it starts;
    /// print OK, or every problem found with its key (exit status 1).
    Check {
        /// The configuration file (TOML).
        file: PathBuf,
    },
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
struct WaitArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// The snapshot (sequence number) to wait for. Default: the newest the node knows of (asked of the origin,
    /// the origin's newest).
    #[arg(long)]
    seq: Option<u64>,
    /// Wait for the node's peers too: every member of the fabric it knows is connected and holds the snapshot
    /// completely (ask the origin to wait for the whole fabric).
    #[arg(long)]
    all: bool,
    /// Give up after this many seconds (exit status 124); 0 checks once.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
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
    /// Read only these paths (relative to the tree) and the directories holding them, keeping everything else as
    /// the previous snapshot has it: for a master that knows what it changed. A directory named is read whole.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    paths: Vec<String>,
    /// As --paths, one path per line, from this file (`-`: standard input).
    #[arg(long, value_name = "FILE", conflicts_with = "paths")]
    paths_from: Option<PathBuf>,
}

/// The paths `publish --paths` or `--paths-from` names, if either does.
fn changed_paths(args: &PublishArgs) -> Result<Option<Vec<String>>> {
    if let Some(file) = &args.paths_from {
        let text = if file == Path::new("-") {
            std::io::read_to_string(std::io::stdin()).context("--paths-from -: reading standard input")?
        } else {
            std::fs::read_to_string(file).with_context(|| format!("--paths-from {}", file.display()))?
        };
        return Ok(Some(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()));
    }
    Ok((!args.paths.is_empty()).then(|| args.paths.clone()))
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
            out(&key_text(&path, &key))
        }
        Command::Key { command: KeyCommand::Show { file } } => out(&key_text(&file, &NodeKey::load(&file)?)),
        Command::Config { command: ConfigCommand::Check { file } } => match mirrormesh::config::check(&file) {
            Ok((config, key)) => {
                let role = format!("{:?}", config.role).to_lowercase();
                out(&format!(
                    "{}: OK: {role} {}, repository {}, tree {}\n",
                    file.display(),
                    key.peer_id(),
                    config.repo,
                    config.tree.display()
                ))
            }
            Err(problems) => {
                let mut stderr = std::io::stderr().lock();
                for problem in &problems {
                    let _ = writeln!(stderr, "{}: error: {problem}", file.display());
                }
                let _ = writeln!(stderr, "{}: test failed ({} problem(s))", file.display(), problems.len());
                Err(Exit(1).into())
            }
        },
        Command::Generate { out: dir } => generate(&dir),
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
        Command::Wait(args) => wait(&args),
        Command::Publish(args @ PublishArgs { admin: Some(_), .. }) => {
            let paths = changed_paths(&args)?;
            let (Some(admin), force) = (args.admin, args.force) else { unreachable!() };
            let client = AdminClient::new(&admin, args.token, Duration::from_secs(3600));
            let r = match paths {
                Some(paths) => client.publish_paths(&paths, force)?,
                None if force => client.publish_forced()?,
                None => client.publish()?,
            };
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
            let paths = changed_paths(&args)?;
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
                changed: paths.map(|p| Changed::from_paths(&tree, &p)).transpose()?,
                only_if_changed: false,
            };
            let r = publish(&store, &key, &opts)?;
            let s = &r.scan;
            let rate = s.hashed_bytes as f64 / s.hash_elapsed.as_secs_f64().max(1e-9);
            let mut text = String::new();
            writeln!(text, "published {} seq {}", r.body.repo, r.body.seq)?;
            writeln!(text, "  root      {}", r.body.root.to_hex())?;
            writeln!(text, "  files     {} ({}, {} bytes)", r.body.files, HumanBytes(r.body.bytes), r.body.bytes)?;
            writeln!(
                text,
                "  entries   {} dirs read, {} kept unread, {} symlinks, {} skipped, {} dirs read again (changed while read), {} kept as before (changed during every read)",
                s.dirs, s.dirs_kept, s.symlinks, s.skipped, s.dirs_reread, s.dirs_kept_busy
            )?;
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

/// `mirrormesh wait`: long-polls the node's `/wait` (again and again past the API's `WAIT_MAX`) until the
/// node serves the snapshot (with `--all`: and each of the other members it knows is connected and holds it
/// completely), or the timeout passes.
fn wait(args: &WaitArgs) -> Result<()> {
    use mirrormesh::admin_client::Waited;
    let deadline = std::time::Instant::now() + Duration::from_secs(args.timeout);
    let poll_max = mirrormesh::admin::WAIT_MAX;
    let client = AdminClient::new(&args.admin.admin, args.admin.token.clone(), poll_max + Duration::from_secs(30));
    let status = client.status()?;
    let repo = status.repos.first().context("the node serves no repository")?;
    let seq = match args.seq {
        Some(seq) => seq,
        None => [repo.seq, repo.target_seq, repo.staged_seq]
            .into_iter()
            .flatten()
            .max()
            .context("the node knows of no snapshot yet; give --seq N")?,
    };
    // The other members the node knows (it counts itself).
    let others = status.members.saturating_sub(1);
    let query = if args.all { format!("seq={seq}&peers_at={seq}&connected={others}") } else { format!("seq={seq}") };
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now()).min(poll_max);
        match client.wait_until(&query, left.as_millis() as u64)? {
            Waited::Reached(s) => {
                let served = s.repos.first().and_then(|r| r.seq).unwrap_or(seq);
                let mut text = format!("{} ({}) serves {} seq {served}", s.node_id, s.role, repo.name);
                if args.all {
                    let peers = s.peers.iter().filter(|p| p.connected).count();
                    text.push_str(&format!(", and so do its {peers} connected peers"));
                }
                return out(&(text + "\n"));
            }
            Waited::TimedOut(s) if std::time::Instant::now() >= deadline => {
                let mut text = String::new();
                let own = s.repos.first();
                writeln!(
                    text,
                    "timed out after {} s waiting for seq {seq}: {} ({}) serves seq {} ({})",
                    args.timeout,
                    s.node_id,
                    s.role,
                    own.and_then(|r| r.seq).map_or("none".into(), |q| q.to_string()),
                    own.map_or("-", |r| r.phase.as_str())
                )?;
                if args.all {
                    let connected: Vec<_> = s.peers.iter().filter(|p| p.connected).collect();
                    for p in connected.iter().filter(|p| p.complete_seq.is_none_or(|c| c < seq)) {
                        let held = p.complete_seq.map_or("none".into(), |c| c.to_string());
                        writeln!(text, "  behind: {} holds seq {held}", p.id)?;
                    }
                    if (connected.len() as u64) < others {
                        writeln!(text, "  {} of the {others} other members known are connected", connected.len())?;
                    }
                }
                let _ = std::io::stderr().write_all(text.as_bytes());
                return Err(Exit(EXIT_TIMED_OUT).into());
            }
            Waited::TimedOut(_) => {}
        }
    }
}

/// What `keygen` and `key show` print of a key.
fn key_text(path: &std::path::Path, key: &NodeKey) -> String {
    let public: String = key.publisher_key().0.iter().map(|b| format!("{b:02x}")).collect();
    format!("key file   {}\nnode id    {}\npublic key {public}\n", path.display(), key.peer_id())
}

/// `mirrormesh generate --out DIR`: man pages (one for the command, one per subcommand, as `git` has) and the
/// completions of bash, zsh and fish, generated from the clap definition above. A subcommand of the binary rather
/// than `build.rs`: the definition uses the library's argument types (gen-tree's, the testbed's, the demo's),
/// which a build script of the same package cannot link; the packages run the binary they ship.
fn generate(dir: &std::path::Path) -> Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let man = dir.join("man1");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for (shell, name) in
        [(Shell::Bash, "mirrormesh.bash"), (Shell::Zsh, "_mirrormesh"), (Shell::Fish, "mirrormesh.fish")]
    {
        let path = completions.join(name);
        let mut file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        clap_complete::generate(shell, &mut Cli::command(), "mirrormesh", &mut file);
        file.flush()?;
    }
    Ok(())
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
