//! The daemon's configuration file (TOML). Every key is documented in the README ("Configuration"); unknown keys
//! are errors, and every error names the key and the problem.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use libp2p::{Multiaddr, PeerId};
use mirrormesh_proto::{PublisherKey, RepoId};
use serde::Deserialize;

use crate::key::parse_publisher;
use crate::publish::PublishGuard;

/// Default data-plane port; the control plane's default is one below.
pub const DEFAULT_DATA_PORT: u16 = 4002;
/// Default admin HTTP address: loopback only.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7480";
/// Shortest admin token (`admin.token`, `admin.read_token`) accepted: 16 characters of a random hex string are
/// 64 bits, beyond guessing over HTTP; `mirrormesh-lab testbed` generates tokens of exactly this length.
pub const ADMIN_TOKEN_LEN_MIN: usize = 16;
/// Longest name in `admin.hosts` (a DNS name's limit).
const ADMIN_HOST_LEN_MAX: usize = 253;
/// Default deletion grace period: files a new snapshot removes stay this long (clients mid-download finish).
pub const DEFAULT_DELETE_GRACE_SECS: u64 = 300;
/// Default validity of a signed root, in hours (re-signed at half of it).
pub const DEFAULT_VALIDITY_HOURS: u64 = 168;
/// How long a watched directory must have been quiet before it is published, by default (`origin.quiet_secs`).
pub const DEFAULT_QUIET: Duration = Duration::from_secs(30);
/// Shortest `origin.quiet_ms`: the watcher's events come through the event loop's 50 ms tick; below a few ticks a
/// builder's package and index, written a moment apart, would be published separately more often (each
/// directory's read is consistent regardless: the scan reads a directory again if it changed meanwhile).
pub const QUIET_MS_MIN: u64 = 100;
/// Longest validity of a signed root, in hours: a stolen or stale root must not stay acceptable for years.
pub const VALIDITY_HOURS_MAX: u64 = 24 * 366;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    Origin,
    Mirror,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    node: NodeSection,
    repo: RepoSection,
    #[serde(default)]
    network: NetworkSection,
    #[serde(default)]
    trust: TrustSection,
    #[serde(default)]
    admin: AdminSection,
    #[serde(default)]
    origin: OriginSection,
    #[serde(default)]
    downstream: crate::downstream::DownstreamSection,
    #[serde(default)]
    faults: Faults,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    key: PathBuf,
    role: RoleName,
    state_dir: PathBuf,
    log: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepoSection {
    #[serde(default = "default_repo")]
    name: String,
    tree: PathBuf,
    staging_dir: Option<PathBuf>,
    #[serde(default = "default_index_globs")]
    index_globs: Vec<String>,
    #[serde(default = "default_grace")]
    delete_grace_secs: u64,
    stale_after_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkSection {
    listen: Option<String>,
    data_listen: Option<String>,
    #[serde(default)]
    bootstrap: Vec<String>,
    allow: Option<Vec<String>>,
    upload_bytes_per_sec: Option<u64>,
    forget_after_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustSection {
    #[serde(default)]
    publishers: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminSection {
    listen: Option<String>,
    /// Bearer token for everything (reads and `POST /publish`).
    token: Option<String>,
    /// Bearer token for reads only (status, peers, repos, metrics, wait); needs `token`.
    read_token: Option<String>,
    /// Further names (or addresses) the admin API answers to in the `Host` header, beside its listen address and
    /// `localhost`: the name operators and Prometheus use to reach it.
    #[serde(default)]
    hosts: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OriginSection {
    #[serde(default)]
    watch: bool,
    quiet_secs: Option<u64>,
    /// `quiet_secs` in milliseconds, for masters that want a change published within a second (one or the other).
    quiet_ms: Option<u64>,
    validity_hours: Option<u64>,
    removal_limit_percent: Option<u32>,
    #[serde(default)]
    require_mount: bool,
    require_file: Option<String>,
}

/// Fault injection, for testing the fabric's defences against misbehaving peers. Only a binary built with the cargo
/// feature `faults` (test builds: the package's dev-dependency on itself enables it) accepts any of these; a release
/// build refuses a config that sets one.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Serve chunks with one byte flipped (peers must detect it by hash and ban this node).
    #[serde(default)]
    pub corrupt_served_chunks: bool,
    /// Claim to hold every snapshot completely (peers must notice the "missing" answers and stop asking).
    #[serde(default)]
    pub lie_about_holdings: bool,
    /// Send every control request malformed: hellos with an oversized length prefix, the others as garbage.
    #[serde(default)]
    pub malformed_control: bool,
    /// Flood every peer's data plane with stalled, oversized and malformed requests.
    #[serde(default)]
    pub flood_data_plane: bool,
    /// Announce made-up chunk ids to every peer, a have message of `HAVE_CHUNKS_MAX` ids per peer and tick.
    #[serde(default)]
    pub announce_fake_chunks: bool,
}

impl Faults {
    pub fn any(&self) -> bool {
        self.corrupt_served_chunks
            || self.lie_about_holdings
            || self.malformed_control
            || self.flood_data_plane
            || self.announce_fake_chunks
    }
}

/// A config that sets a fault is refused by a binary built without the cargo feature `faults` (release builds).
fn refuse_faults_not_built_in(faults: &Faults, built_in: bool) -> Result<()> {
    if faults.any() && !built_in {
        bail!(
            "[faults]: fault injection is not built into this binary (the cargo feature `faults`, which only test \
             builds enable); remove the section"
        );
    }
    Ok(())
}

fn default_repo() -> String {
    "alpine".into()
}
fn default_index_globs() -> Vec<String> {
    vec!["APKINDEX.tar.gz".into()]
}
fn default_grace() -> u64 {
    DEFAULT_DELETE_GRACE_SECS
}

/// Every problem found in a config file, each naming its key (one line each).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct ConfigProblems(pub Vec<String>);

/// `result`'s value; its error noted in `problems` instead.
fn noted<T>(problems: &mut Vec<String>, result: Result<T>) -> Option<T> {
    result.map_err(|e| problems.push(format!("{e:#}"))).ok()
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was loaded from (re-read on SIGHUP).
    pub path: Option<PathBuf>,
    pub key: PathBuf,
    /// Log filter (`node.log`); `RUST_LOG` wins when set.
    pub log: Option<String>,
    pub role: RoleName,
    pub state_dir: PathBuf,
    pub repo: RepoId,
    pub tree: PathBuf,
    pub staging_dir: PathBuf,
    /// File-name globs of index files, applied after every other file.
    pub index_globs: IndexGlobs,
    pub delete_grace: Duration,
    /// A served snapshot created longer ago than this is reported stale (`None`: only expiry is checked).
    pub stale_after: Option<Duration>,
    pub listen: Multiaddr,
    pub data_listen: SocketAddr,
    /// Bootstrap peers: each address ends in `/p2p/<peer id>`.
    pub bootstrap: Vec<(PeerId, Multiaddr)>,
    pub allow: Option<BTreeSet<PeerId>>,
    pub upload_bytes_per_sec: Option<u64>,
    /// A member of the fabric neither connected nor reported seen for this long is forgotten
    /// (`network.forget_after_secs`).
    pub forget_after: Duration,
    /// Trusted publishers, as keys and as the peer ids of their nodes (the origins).
    pub publishers: Vec<(PublisherKey, PeerId)>,
    pub admin_listen: SocketAddr,
    /// Bearer token for every admin request (`admin.token`).
    pub admin_token: Option<String>,
    /// Bearer token for the admin API's reads only (`admin.read_token`); set only beside `admin_token`.
    pub admin_read_token: Option<String>,
    /// Host names (lowercase, no port) the admin API answers to beside its listen address and `localhost`.
    pub admin_hosts: Vec<String>,
    pub watch: bool,
    pub watch_quiet: Duration,
    pub validity: Duration,
    /// Origin: what a publish must find before it signs (the `force` flag comes per publish).
    pub publish_guard: PublishGuard,
    /// What this node writes for downstream mirrors and tells its MQTT broker (`downstream.rs`).
    pub downstream: crate::downstream::DownstreamConfig,
    pub faults: Faults,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let mut config = Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("config {}", path.display()))?;
        config.path = Some(path.to_owned());
        // The same check as in `parse`, with symlinks resolved: a staging directory reached through a symlink into
        // the tree would be served.
        let (tree, staging) = (resolve_existing(&config.tree), resolve_existing(&config.staging_dir));
        if staging.starts_with(&tree) || tree.starts_with(&staging) {
            bail!(
                "config {}: repo.staging_dir: {} resolves to {}, inside the served tree {}; it must be outside it",
                path.display(),
                config.staging_dir.display(),
                staging.display(),
                tree.display()
            );
        }
        Ok(config)
    }

    /// Parses and validates config text; relative paths are taken relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let file: File = toml::from_str(text).map_err(|e| anyhow!("{}", e.to_string().trim_end()))?;
        let abs = |p: &Path| if p.is_absolute() { p.to_owned() } else { base.join(p) };

        // Every check runs, each problem is noted: `mirrormesh config check` lists them all (the daemon too).
        let mut problems = Vec::new();
        let repo = noted(&mut problems, RepoId::new(&file.repo.name).map_err(|e| anyhow!("repo.name: {e}")));
        let dirs = noted(
            &mut problems,
            (|| {
                let tree = abs(&file.repo.tree);
                let staging_dir = match &file.repo.staging_dir {
                    Some(dir) => normalize(&abs(dir)),
                    None => default_staging(&tree).context("repo.staging_dir")?,
                };
                let tree = normalize(&tree);
                if staging_dir.starts_with(&tree) || tree.starts_with(&staging_dir) {
                    bail!(
                        "repo.staging_dir: {} is inside the served tree {}; it must be outside it",
                        staging_dir.display(),
                        tree.display()
                    );
                }
                Ok((tree, staging_dir))
            })(),
        );
        let index_globs = noted(&mut problems, IndexGlobs::new(&file.repo.index_globs));

        let listen_text =
            file.network.listen.unwrap_or_else(|| format!("/ip4/0.0.0.0/udp/{}/quic-v1", DEFAULT_DATA_PORT - 1));
        let listen: Option<Multiaddr> = noted(
            &mut problems,
            listen_text.parse().map_err(|e| anyhow!("network.listen: {listen_text:?} is not a multiaddr: {e}")),
        );
        let data_text = file.network.data_listen.unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_DATA_PORT}"));
        let data_listen: Option<SocketAddr> = noted(
            &mut problems,
            data_text.parse().map_err(|e| anyhow!("network.data_listen: {data_text:?} is not ip:port: {e}")),
        );
        let mut bootstrap = Vec::new();
        for text in &file.network.bootstrap {
            let entry = (|| {
                let addr: Multiaddr =
                    text.parse().map_err(|e| anyhow!("network.bootstrap: {text:?} is not a multiaddr: {e}"))?;
                let peer = addr
                    .iter()
                    .find_map(|p| match p {
                        libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
                        _ => None,
                    })
                    .ok_or_else(|| anyhow!("network.bootstrap: {text:?} must end in /p2p/<peer id>"))?;
                Ok((peer, addr))
            })();
            bootstrap.extend(noted(&mut problems, entry));
        }
        let allow = noted(
            &mut problems,
            (|| {
                Ok(match file.network.allow {
                    None => None,
                    Some(list) if list.is_empty() => bail!(
                        "network.allow: an empty list would refuse every peer; leave the key out to allow any peer, \
                         or list the node ids allowed"
                    ),
                    Some(list) => Some(
                        list.iter()
                            .map(|p| {
                                p.parse::<PeerId>().map_err(|e| anyhow!("network.allow: {p:?} is not a peer id: {e}"))
                            })
                            .collect::<Result<BTreeSet<_>>>()?,
                    ),
                })
            })(),
        );
        if file.network.upload_bytes_per_sec == Some(0) {
            problems.push("network.upload_bytes_per_sec: must be positive (leave it out for no limit)".into());
        }
        let forget_after_secs =
            file.network.forget_after_secs.unwrap_or(mirrormesh_proto::membership::FORGET_AFTER_MS_DEFAULT / 1000);
        refuse_faults_not_built_in(&file.faults, cfg!(feature = "faults"))?;
        if forget_after_secs == 0 {
            problems
                .push("network.forget_after_secs: must be positive (members unseen this long are forgotten)".into());
        }

        let mut publishers = Vec::new();
        for text in &file.trust.publishers {
            let entry = (|| {
                let key = parse_publisher(text).map_err(|e| anyhow!("trust.publishers: {e}"))?;
                let peer = crate::key::peer_id_of(&key).map_err(|e| anyhow!("trust.publishers: {text:?}: {e}"))?;
                Ok((key, peer))
            })();
            publishers.extend(noted(&mut problems, entry));
        }
        if file.node.role == RoleName::Mirror && file.trust.publishers.is_empty() {
            problems
                .push("trust.publishers: a mirror needs at least one trusted publisher (the origin's node id)".into());
        }

        let admin_text = file.admin.listen.unwrap_or_else(|| DEFAULT_ADMIN.into());
        let admin_listen: Option<SocketAddr> = noted(
            &mut problems,
            admin_text.parse().map_err(|e| anyhow!("admin.listen: {admin_text:?} is not ip:port: {e}")),
        );
        let admin_token = file.admin.token;
        let admin_read_token = file.admin.read_token;
        if let Some(token) = &admin_token {
            noted(&mut problems, check_token("admin.token", token));
        }
        if let Some(token) = &admin_read_token {
            noted(&mut problems, check_token("admin.read_token", token));
            match &admin_token {
                None => problems.push("admin.read_token: needs admin.token too (the token that may publish)".into()),
                Some(full) if full == token => problems.push("admin.read_token: must differ from admin.token".into()),
                Some(_) => {}
            }
        }
        if let Some(listen) = admin_listen
            && !listen.ip().is_loopback()
            && admin_token.is_none()
        {
            problems.push(format!("admin.token: required when admin.listen ({listen}) is not a loopback address"));
        }
        let admin_hosts: Vec<String> =
            file.admin.hosts.iter().filter_map(|h| noted(&mut problems, admin_host(h))).collect();
        if file.origin.watch && file.node.role != RoleName::Origin {
            problems.push("origin.watch: only an origin publishes".into());
        }
        let validity_hours = file.origin.validity_hours.unwrap_or(DEFAULT_VALIDITY_HOURS);
        if !(1..=VALIDITY_HOURS_MAX).contains(&validity_hours) {
            problems
                .push(format!("origin.validity_hours: {validity_hours} is out of range (1 to {VALIDITY_HOURS_MAX})"));
        }
        if file.origin.quiet_secs == Some(0) {
            problems.push("origin.quiet_secs: must be positive".into());
        }
        let watch_quiet = match (file.origin.quiet_secs, file.origin.quiet_ms) {
            (Some(_), Some(_)) => {
                problems.push("origin.quiet_secs and origin.quiet_ms: set one of them".into());
                DEFAULT_QUIET
            }
            (_, Some(ms)) if ms < QUIET_MS_MIN => {
                problems.push(format!("origin.quiet_ms: {ms} is below {QUIET_MS_MIN}"));
                DEFAULT_QUIET
            }
            (_, Some(ms)) => Duration::from_millis(ms),
            (Some(secs), None) => Duration::from_secs(secs),
            (None, None) => DEFAULT_QUIET,
        };
        let removal_limit_percent =
            file.origin.removal_limit_percent.unwrap_or(crate::publish::DEFAULT_REMOVAL_LIMIT_PERCENT);
        if removal_limit_percent > 100 {
            problems
                .push(format!("origin.removal_limit_percent: {removal_limit_percent} is not a percentage (0 to 100)"));
        }
        if let Some(file) = &file.origin.require_file
            && let Err(e) = mirrormesh_proto::path::validate_rel_path(file)
        {
            problems.push(format!("origin.require_file: {file:?} is not a path inside the tree: {e}"));
        }
        if file.repo.stale_after_secs == Some(0) {
            problems
                .push("repo.stale_after_secs: must be positive (leave it out to check only the root's expiry)".into());
        }

        let downstream = noted(&mut problems, crate::downstream::DownstreamConfig::new(&file.downstream));
        if downstream.as_ref().is_some_and(|d| d.mqtt.is_some()) && file.node.role == RoleName::Origin {
            problems.push(
                "downstream.mqtt_broker: only a mirror announces its snapshots (an origin only leaves its own files out)"
                    .into(),
            );
        }
        if let Some(log) = &file.node.log {
            noted(&mut problems, crate::logging::check(log).map_err(|e| anyhow!("node.log: {e}")));
        }
        if !problems.is_empty() {
            return Err(ConfigProblems(problems).into());
        }
        let (
            Some(repo),
            Some((tree, staging_dir)),
            Some(index_globs),
            Some(listen),
            Some(data_listen),
            Some(allow),
            Some(admin_listen),
            Some(downstream),
        ) = (repo, dirs, index_globs, listen, data_listen, allow, admin_listen, downstream)
        else {
            bail!("a config check failed without saying why");
        };
        Ok(Config {
            path: None,
            key: abs(&file.node.key),
            log: file.node.log,
            role: file.node.role,
            state_dir: abs(&file.node.state_dir),
            repo,
            tree,
            staging_dir,
            index_globs,
            delete_grace: Duration::from_secs(file.repo.delete_grace_secs),
            stale_after: file.repo.stale_after_secs.map(Duration::from_secs),
            listen,
            data_listen,
            bootstrap,
            allow,
            upload_bytes_per_sec: file.network.upload_bytes_per_sec,
            forget_after: Duration::from_secs(forget_after_secs),
            publishers,
            admin_listen,
            admin_token,
            admin_read_token,
            admin_hosts,
            watch: file.origin.watch,
            watch_quiet,
            validity: Duration::from_secs(validity_hours * 3600),
            publish_guard: PublishGuard {
                removal_limit_percent,
                require_mount: file.origin.require_mount,
                require_file: file.origin.require_file,
                force: false,
            },
            downstream,
            faults: file.faults,
        })
    }
}

/// Checks a config file as the daemon does before it starts (`mirrormesh config check`, like `nginx -t`): the file
/// parses and validates ([`Config::load`]), and the node key it names loads as [`crate::daemon::Daemon::start`]
/// loads it (an origin's key, which signs snapshots, must not be readable by group or others). Starts nothing and
/// creates no file. On failure, every problem found, each naming its key (a file that is not valid TOML, or has an
/// unknown key, gives the first such problem only; the key file is checked once the rest is valid).
pub fn check(path: &Path) -> std::result::Result<(Config, crate::key::NodeKey), Vec<String>> {
    let config = Config::load(path).map_err(|e| match e.downcast_ref::<ConfigProblems>() {
        Some(ConfigProblems(problems)) => problems.clone(),
        None => vec![format!("{e:#}")],
    })?;
    let key = match config.role {
        RoleName::Origin => crate::key::NodeKey::load_publisher(&config.key),
        RoleName::Mirror => crate::key::NodeKey::load(&config.key),
    };
    match key {
        Ok(key) => Ok((config, key)),
        Err(e) if !config.key.exists() => Err(vec![format!(
            "node.key: {} does not exist; create it with `mirrormesh keygen --out {}` ({e:#})",
            config.key.display(),
            config.key.display()
        )]),
        Err(e) => Err(vec![format!("node.key: {e:#}")]),
    }
}

impl Config {
    /// What a reload from `new` would change that only a restart can: one message per key, naming it. The rest
    /// (`network.bootstrap`, `network.allow`, `network.upload_bytes_per_sec`, `network.forget_after_secs`, `node.log`,
    /// `repo.delete_grace_secs`, `repo.stale_after_secs`, `origin.quiet_secs` and the publish checks) takes effect on
    /// reload.
    pub fn needs_restart(&self, new: &Config) -> Vec<String> {
        let mut out = Vec::new();
        let mut same = |key: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{key} changed ({a} -> {b})"));
            }
        };
        same("node.key", self.key.display().to_string(), new.key.display().to_string());
        same("node.role", format!("{:?}", self.role).to_lowercase(), format!("{:?}", new.role).to_lowercase());
        same("node.state_dir", self.state_dir.display().to_string(), new.state_dir.display().to_string());
        same("repo.name", self.repo.to_string(), new.repo.to_string());
        same("repo.tree", self.tree.display().to_string(), new.tree.display().to_string());
        same("repo.staging_dir", self.staging_dir.display().to_string(), new.staging_dir.display().to_string());
        same("repo.index_globs", self.index_globs.patterns.join(","), new.index_globs.patterns.join(","));
        same("network.listen", self.listen.to_string(), new.listen.to_string());
        same("network.data_listen", self.data_listen.to_string(), new.data_listen.to_string());
        let ids = |c: &Config| c.publishers.iter().map(|(_, p)| p.to_string()).collect::<Vec<_>>().join(",");
        same("trust.publishers", ids(self), ids(new));
        same("admin.listen", self.admin_listen.to_string(), new.admin_listen.to_string());
        // Tokens are never shown: only whether they are set.
        let token = |t: &Option<String>| t.as_ref().map_or("unset", |_| "set").to_owned();
        if self.admin_token != new.admin_token {
            same("admin.token", token(&self.admin_token), format!("another, {}", token(&new.admin_token)));
        }
        if self.admin_read_token != new.admin_read_token {
            same(
                "admin.read_token",
                token(&self.admin_read_token),
                format!("another, {}", token(&new.admin_read_token)),
            );
        }
        same("admin.hosts", self.admin_hosts.join(","), new.admin_hosts.join(","));
        same("origin.watch", self.watch.to_string(), new.watch.to_string());
        same("downstream", format!("{:?}", self.downstream), format!("{:?}", new.downstream));
        same(
            "origin.validity_hours",
            (self.validity.as_secs() / 3600).to_string(),
            (new.validity.as_secs() / 3600).to_string(),
        );
        out
    }
}

/// `path` with `.` and `..` components resolved lexically (no filesystem access), so that `other/../tree/x` is seen
/// to be inside `tree`. `Config::load` also compares the paths with symlinks resolved.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `path` with symlinks resolved as far as it exists (the rest appended as written).
fn resolve_existing(path: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut at = path.to_owned();
    loop {
        if let Ok(real) = at.canonicalize() {
            return missing.iter().rev().fold(real, |p, name| p.join(name));
        }
        match (at.file_name().map(ToOwned::to_owned), at.parent()) {
            (Some(name), Some(parent)) => {
                missing.push(name);
                at = parent.to_owned();
            }
            _ => return path.to_owned(),
        }
    }
}

/// An admin token must be long enough not to be guessed and fit an `Authorization: Bearer` header as it is.
fn check_token(key: &str, token: &str) -> Result<()> {
    let len = token.chars().count();
    if len < ADMIN_TOKEN_LEN_MIN {
        bail!(
            "{key}: must be at least {ADMIN_TOKEN_LEN_MIN} characters long (it has {len}); e.g. `openssl rand -hex 16`"
        );
    }
    if let Some(c) = token.chars().find(|c| !c.is_ascii_graphic()) {
        bail!("{key}: only printable ASCII without spaces is allowed (it contains {c:?})");
    }
    Ok(())
}

/// One `admin.hosts` entry: a DNS name or an IP address, without a port. Returned lowercase.
fn admin_host(text: &str) -> Result<String> {
    let name = text.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(text);
    let dns_name = !name.is_empty()
        && name.len() <= ADMIN_HOST_LEN_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !dns_name && name.parse::<std::net::IpAddr>().is_err() {
        bail!("admin.hosts: {text:?} is neither a host name nor an IP address (give no port or scheme)");
    }
    Ok(name.to_ascii_lowercase())
}

/// `<parent of tree>/.<tree name>.mirrormesh-staging`: beside the tree, so on the same filesystem, outside it.
fn default_staging(tree: &Path) -> Result<PathBuf> {
    let name = tree
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("cannot derive a default from tree {}", tree.display()))?;
    let parent = tree.parent().ok_or_else(|| anyhow!("tree {} has no parent directory", tree.display()))?;
    Ok(parent.join(format!(".{name}.mirrormesh-staging")))
}

/// The file-name patterns of index files (`repo.index_globs`: `*`, `?`, `[...]`, `{a,b}` as in shells), matched
/// against the last component of a path.
#[derive(Debug, Clone)]
pub struct IndexGlobs {
    pub patterns: Vec<String>,
    set: globset::GlobSet,
}

impl IndexGlobs {
    pub fn new(patterns: &[String]) -> Result<Self> {
        let mut set = globset::GlobSetBuilder::new();
        for pattern in patterns {
            if pattern.is_empty() || pattern.contains('/') {
                bail!("repo.index_globs: {pattern:?} must be a non-empty file-name pattern without '/'");
            }
            let glob = globset::GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| anyhow!("repo.index_globs: {pattern:?}: {e}"))?;
            set.add(glob);
        }
        let set = set.build().map_err(|e| anyhow!("repo.index_globs: {e}"))?;
        Ok(Self { patterns: patterns.to_vec(), set })
    }

    /// The rule as the core takes it (the engine orders an apply's index files last by it): whether the file
    /// `name` (one path component) is an index file.
    pub fn names(&self) -> mirrormesh_proto::sync::IndexNames {
        let set = self.set.clone();
        mirrormesh_proto::sync::IndexNames::new(move |name| set.is_match(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";

    fn minimal(role: &str) -> String {
        format!(
            "[node]\nkey = \"node.key\"\nrole = \"{role}\"\nstate_dir = \"state\"\n[repo]\ntree = \"/srv/mirror\"\n[trust]\npublishers = [\"{PEER}\"]\n"
        )
    }

    #[test]
    fn faults_are_refused_by_a_binary_built_without_them() {
        let none = Faults::default();
        assert!(refuse_faults_not_built_in(&none, false).is_ok());
        let flood = Faults { flood_data_plane: true, ..Faults::default() };
        let e = refuse_faults_not_built_in(&flood, false).unwrap_err().to_string();
        assert!(e.contains("[faults]") && e.contains("not built into this binary"), "{e}");
        assert!(refuse_faults_not_built_in(&flood, true).is_ok());
    }

    #[test]
    fn defaults() {
        let c = Config::parse(&minimal("mirror"), Path::new("/etc/mm")).unwrap();
        assert_eq!(c.key, Path::new("/etc/mm/node.key"));
        assert_eq!(c.staging_dir, Path::new("/srv/.mirror.mirrormesh-staging"));
        assert_eq!(c.repo.as_str(), "alpine");
        assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN);
        assert_eq!(c.publishers.len(), 1);
        assert_eq!(c.publishers[0].1.to_string(), PEER);
    }

    #[test]
    fn the_watch_quiet_time_is_given_in_seconds_or_milliseconds_not_both() {
        let origin = |extra: &str| minimal("origin") + "[origin]\nwatch = true\n" + extra;
        let quiet = |extra: &str| Config::parse(&origin(extra), Path::new("/")).map(|c| c.watch_quiet);
        assert_eq!(quiet("").unwrap(), DEFAULT_QUIET);
        assert_eq!(quiet("quiet_secs = 5\n").unwrap(), Duration::from_secs(5));
        assert_eq!(quiet("quiet_ms = 200\n").unwrap(), Duration::from_millis(200));
        let err = |extra: &str| format!("{:#}", quiet(extra).unwrap_err());
        assert!(err("quiet_secs = 5\nquiet_ms = 200\n").contains("set one of them"));
        assert!(err("quiet_ms = 20\n").contains("origin.quiet_ms: 20 is below 100"));
    }

    #[test]
    fn errors_name_the_key() {
        let err = |text: String| format!("{:#}", Config::parse(&text, Path::new("/")).unwrap_err());
        assert!(err(minimal("mirror") + "bogus = 1\n").contains("bogus"));
        assert!(err(minimal("primary")).contains("role"));
        assert!(err(minimal("mirror") + "[network]\nlisten = \"nonsense\"\n").contains("network.listen"));
        assert!(err(minimal("mirror") + "[network]\ndata_listen = \"x\"\n").contains("network.data_listen"));
        assert!(err(minimal("mirror") + "[network]\nbootstrap = [\"/ip4/1.2.3.4/udp/1/quic-v1\"]\n").contains("/p2p/"));
        assert!(err(minimal("mirror") + "[network]\nallow = [\"nope\"]\n").contains("network.allow"));
        assert!(err(minimal("mirror") + "[admin]\nlisten = \"0.0.0.0:7480\"\n").contains("admin.token"));
        assert!(
            err(minimal("mirror")
                .replace("[trust]\npublishers = [\"12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA\"]\n", ""))
            .contains("trust.publishers")
        );
        assert!(
            err(minimal("mirror")
                .replace("tree = \"/srv/mirror\"", "tree = \"/srv/mirror\"\nstaging_dir = \"/srv/mirror/.stage\""))
            .contains("repo.staging_dir")
        );
        assert!(err(minimal("mirror") + "[origin]\nwatch = true\n").contains("origin.watch"));
        assert!(err(minimal("mirror") + "[downstream]\nlast_updated = \"../x\"\n").contains("downstream.last_updated"));
        let origin_mqtt = minimal("origin") + "[downstream]\nhost = \"h\"\nmqtt_broker = \"b:1883\"\n";
        assert!(err(origin_mqtt).contains("downstream.mqtt_broker"));
    }

    #[test]
    fn values_that_would_break_later_are_refused_now() {
        let err = |text: String| format!("{:#}", Config::parse(&text, Path::new("/")).unwrap_err());
        let origin = minimal("origin");
        assert!(err(origin.clone() + "[origin]\nvalidity_hours = 0\n").contains("origin.validity_hours"));
        assert!(err(origin.clone() + "[origin]\nvalidity_hours = 1000000\n").contains("origin.validity_hours"));
        assert!(err(origin.clone() + "[origin]\nremoval_limit_percent = 101\n").contains("removal_limit_percent"));
        assert!(err(origin.clone() + "[origin]\nrequire_file = \"../x\"\n").contains("origin.require_file"));
        assert!(err(minimal("mirror") + "[network]\nallow = []\n").contains("network.allow"));
        assert!(err(minimal("mirror") + "[network]\nforget_after_secs = 0\n").contains("network.forget_after_secs"));
        // Inside the tree through `..`.
        let sneaky = minimal("mirror")
            .replace("tree = \"/srv/mirror\"", "tree = \"/srv/mirror\"\nstaging_dir = \"/srv/other/../mirror/.stage\"");
        assert!(err(sneaky).contains("repo.staging_dir"));
        let c = Config::parse(&(origin + "[origin]\nremoval_limit_percent = 25\n"), Path::new("/")).unwrap();
        assert_eq!(c.publish_guard.removal_limit_percent, 25);
    }

    #[test]
    fn a_staging_directory_reached_through_a_symlink_into_the_tree_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tree")).unwrap();
        std::os::unix::fs::symlink("tree", dir.path().join("alias")).unwrap();
        let text =
            minimal("mirror").replace("tree = \"/srv/mirror\"", "tree = \"tree\"\nstaging_dir = \"alias/.stage\"");
        let config = dir.path().join("node.toml");
        std::fs::write(&config, text).unwrap();
        let e = format!("{:#}", Config::load(&config).unwrap_err());
        assert!(e.contains("repo.staging_dir") && e.contains("resolves to"), "{e}");
    }

    #[test]
    fn a_short_admin_token_is_refused() {
        for short in ["x", "", "0123456789abcde"] {
            let text = minimal("mirror") + &format!("[admin]\ntoken = \"{short}\"\n");
            let e = format!("{:#}", Config::parse(&text, Path::new("/")).unwrap_err());
            assert!(e.contains("admin.token") && e.contains("at least 16"), "{short:?}: {e}");
        }
        assert!(
            Config::parse(&(minimal("mirror") + "[admin]\ntoken = \"0123456789abcdef\"\n"), Path::new("/")).is_ok()
        );
    }

    #[test]
    fn admin_tokens_are_long_distinct_header_safe_and_a_read_token_needs_an_admin_token() {
        let parse = |admin: &str| Config::parse(&(minimal("mirror") + "[admin]\n" + admin), Path::new("/"));
        let err = |admin: &str| format!("{:#}", parse(admin).unwrap_err());
        let long = "0123456789abcdef";
        let other = "fedcba9876543210";
        for short in ["x", "", "0123456789abcde"] {
            let e = err(&format!("token = \"{short}\"\n"));
            assert!(e.contains("admin.token") && e.contains("at least 16"), "{short:?}: {e}");
            let e = err(&format!("token = \"{long}\"\nread_token = \"{short}\"\n"));
            assert!(e.contains("admin.read_token") && e.contains("at least 16"), "{short:?}: {e}");
        }
        let e = err(&format!("token = \"{long} with spaces\"\n"));
        assert!(e.contains("admin.token") && e.contains("space"), "{e}");
        let e = err(&format!("token = \"{long}\"\nread_token = \"{long}\"\n"));
        assert!(e.contains("admin.read_token") && e.contains("differ"), "{e}");
        let e = err(&format!("read_token = \"{other}\"\n"));
        assert!(e.contains("admin.read_token") && e.contains("admin.token"), "{e}");
        let e = err("hosts = [\"evil example\"]\n");
        assert!(e.contains("admin.hosts"), "{e}");
        let c = parse(&format!("token = \"{long}\"\nread_token = \"{other}\"\nhosts = [\"Mirror1.example.org\"]\n"))
            .unwrap();
        assert_eq!(c.admin_token.as_deref(), Some(long));
        assert_eq!(c.admin_read_token.as_deref(), Some(other));
        assert_eq!(c.admin_hosts, ["mirror1.example.org"]);
        let c = parse("").unwrap();
        assert_eq!((c.admin_token, c.admin_read_token, c.admin_hosts.len()), (None, None, 0));
    }

    #[test]
    fn globs() {
        let globs = |p: &str| IndexGlobs::new(&[p.to_owned()]).unwrap().names();
        assert!(globs("APKINDEX.tar.gz").is_index("APKINDEX.tar.gz"));
        assert!(globs("*.db").is_index("core.db"));
        assert!(globs("Release*").is_index("Release.gpg"));
        assert!(!globs("*.db").is_index("core.db.sig"));
        assert!(globs("?x").is_index("ax"));
        assert!(globs("{InRelease,Release.gpg}").is_index("Release.gpg"));
        // Linear, not exponential, in the pattern (the hand-written matcher backtracked on runs of `*`).
        let stars = "*a".repeat(40);
        assert!(!globs(&stars).is_index(&"a".repeat(39)));
        assert!(IndexGlobs::new(&["x/y".into()]).is_err() && IndexGlobs::new(&["[".into()]).is_err());
    }
}
