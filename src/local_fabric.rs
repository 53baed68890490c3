//! A fabric of real daemons: an origin and N mirrors, each a child process of the `mirrormesh` binary with its own
//! key, config, tree, state and staging directories under one work directory. On loopback (`mirrormesh demo`, the
//! integration tests) or one node per network namespace (`mirrormesh-lab testbed`).
//!
//! Nothing here sleeps to wait: a daemon is ready when it logs that its admin API listens (read from its stderr),
//! and progress is awaited through the admin API's long-poll `/wait`.
//!
//! The daemons end with the process that started them, whatever ends it: dropping the fabric kills them; a signal
//! handler can stop them with [`LocalFabric::stopper`] (the demo's does, for SIGINT, SIGTERM and SIGHUP); and each
//! daemon is spawned with a parent-death signal (`PR_SET_PDEATHSIG`, SIGTERM), which covers SIGKILL and crashes.
//! Linux sends that signal when the *thread* that spawned the daemon ends: start nodes from a thread that lives as
//! long as the fabric (the demo's and the tests' do).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::admin_client::AdminClient;
use crate::key::NodeKey;
use crate::status::{PublishReply, Status};

/// How long a daemon may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-node settings beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    pub upload_bytes_per_sec: Option<u64>,
    pub corrupt_served_chunks: bool,
    pub delete_grace_secs: u64,
    /// Extra TOML appended to the config right after its `[admin]` section (tests of config handling).
    pub extra_config: String,
    /// The admin API's bearer token (the fabric's clients send it).
    pub admin_token: Option<String>,
    /// Log as JSON lines (`--log-format json`).
    pub log_json: bool,
    /// Bootstrap to the origin and at most this many of the mirrors before this one, picked pseudo-randomly
    /// (default: all of them). `Some(0)`: the origin only, as the shipped `packaging/mirror.toml` (the mirrors find
    /// each other through the peer exchange; see [`NodeOptions::origin_only`]).
    pub bootstrap_mirrors_max: Option<usize>,
    /// Origin: `origin.removal_limit_percent` (default [`LAB_REMOVAL_LIMIT_PERCENT`]).
    pub removal_limit_percent: Option<u32>,
    /// Origin: publish by itself once the tree has been quiet this long (`origin.watch`, `origin.quiet_secs`).
    pub watch_quiet_secs: Option<u64>,
    /// `repo.stale_after_secs`.
    pub stale_after_secs: Option<u64>,
}

impl NodeOptions {
    /// A mirror whose config names only the origin in `network.bootstrap`, as an operator's first config does.
    pub fn origin_only() -> Self {
        Self { bootstrap_mirrors_max: Some(0), ..Self::default() }
    }
}

/// The lab's origins allow an update to remove any share of the tree: lab trees hold a few hundred packages, where
/// a 50-package update replaces a third of the bytes, while on a real mirror of 10^6 files the default limit (10%)
/// only stops a tree that went missing or empty.
pub const LAB_REMOVAL_LIMIT_PERCENT: u32 = 100;

/// Where a node runs: an address of its own in a network namespace, or loopback in this one.
#[derive(Clone, Debug)]
pub struct Host {
    pub ip: IpAddr,
    pub netns: Option<String>,
}

impl Host {
    pub fn loopback() -> Self {
        Self { ip: IpAddr::V4(Ipv4Addr::LOCALHOST), netns: None }
    }
}

/// Ports of a node that has an address of its own.
pub const HOST_P2P_PORT: u16 = 4001;
pub const HOST_DATA_PORT: u16 = 4002;
pub const HOST_ADMIN_PORT: u16 = 7480;

/// Patterns awaited in a daemon's log, each with the channel its first matching line goes to.
type LogWatches = Arc<Mutex<Vec<(String, mpsc::Sender<String>)>>>;

pub struct LocalNode {
    pub name: String,
    pub host: Host,
    pub origin: bool,
    pub dir: PathBuf,
    pub tree: PathBuf,
    pub config: PathBuf,
    pub key: PathBuf,
    pub peer_id: String,
    pub admin: SocketAddr,
    pub p2p_port: u16,
    pub data_port: u16,
    pub log: PathBuf,
    pub admin_token: Option<String>,
    log_json: bool,
    child: Option<Child>,
    /// Log watches of the running daemon: a line containing the pattern is sent once, then the watch is dropped.
    watches: LogWatches,
}

pub struct LocalFabric {
    pub dir: PathBuf,
    binary: PathBuf,
    pub nodes: Vec<LocalNode>,
    /// Pids of the running daemons not yet reaped, shared with [`Stopper`]s: whoever takes a pid out of the set
    /// (the fabric stopping a node, or a stopper stopping them all) is the one that kills and reaps it.
    running: Arc<Mutex<BTreeSet<u32>>>,
}

/// Stops a fabric's daemons from another thread (a signal handler): see [`LocalFabric::stopper`].
#[derive(Clone)]
pub struct Stopper(Arc<Mutex<BTreeSet<u32>>>);

impl Stopper {
    /// Sends SIGTERM to every running daemon of the fabric and waits for each to exit. The fabric keeps its
    /// handles but no longer touches these processes.
    pub fn stop(&self) {
        let pids = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        for &pid in &pids {
            // SAFETY: kill(2) with the pid of a child this process has not reaped (so not reused) and SIGTERM.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        for &pid in &pids {
            let mut status = 0;
            // SAFETY: waitpid(2) on a child of this process, writing its status into a local integer.
            unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        }
    }
}

/// Ports handed to daemons come from below the kernel's ephemeral range (32768 and up on Linux), so that the
/// outgoing connections of running processes cannot take a port between its reservation and its use.
const PORTS: std::ops::Range<u16> = 20_000..32_000;
/// Lines of a daemon's log a failed wait reports.
const STUCK_LOG_LINES: usize = 40;

/// A port in [`PORTS`] free for both UDP and TCP right now, picked pseudo-randomly so concurrent fabrics (tests
/// run in parallel) rarely try the same one.
pub fn free_port() -> Result<u16> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = u64::from(std::process::id()) << 32;
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mixed = blake3::hash(&(seed | n).to_le_bytes());
        let span = u64::from(PORTS.end - PORTS.start);
        let port = PORTS.start + (u64::from_le_bytes(mixed.as_bytes()[..8].try_into()?) % span) as u16;
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in {PORTS:?}")
}

impl LocalFabric {
    /// Lays out an origin (node 0, serving `dir/origin/tree`) and `mirrors` mirrors under `dir`; starts nothing.
    /// `binary` is the `mirrormesh` executable to run.
    pub fn create(dir: &Path, binary: &Path, mirrors: usize, options: &[NodeOptions]) -> Result<Self> {
        Self::create_on(dir, binary, &vec![Host::loopback(); mirrors + 1], options)
    }

    /// Lays out an origin on `hosts[0]` and a mirror on each further host; starts nothing. Nodes in a namespace
    /// listen on their own address with the fixed `HOST_*_PORT`s (their admin API needs a token there), nodes on
    /// loopback on free ports.
    pub fn create_on(dir: &Path, binary: &Path, hosts: &[Host], options: &[NodeOptions]) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut nodes = Vec::new();
        let mut taken = std::collections::BTreeSet::new();
        for (i, host) in hosts.iter().enumerate() {
            let name = if i == 0 { "origin".to_owned() } else { format!("mirror{i}") };
            let node_dir = dir.join(&name);
            std::fs::create_dir_all(node_dir.join("tree"))?;
            let key_path = node_dir.join("node.key");
            let key = NodeKey::generate()?;
            key.save(&key_path)?;
            let own = host.netns.is_some();
            // Ports picked for this fabric are not bound until its daemons start: never hand one out twice.
            let mut port = |fixed: u16| -> Result<u16> {
                if own {
                    return Ok(fixed);
                }
                loop {
                    let port = free_port()?;
                    if taken.insert(port) {
                        return Ok(port);
                    }
                }
            };
            let admin = SocketAddr::new(host.ip, port(HOST_ADMIN_PORT)?);
            nodes.push(LocalNode {
                name: name.clone(),
                host: host.clone(),
                origin: i == 0,
                tree: node_dir.join("tree"),
                config: node_dir.join("mirrormesh.toml"),
                key: key_path,
                peer_id: key.peer_id().to_string(),
                admin,
                p2p_port: port(HOST_P2P_PORT)?,
                data_port: port(HOST_DATA_PORT)?,
                log: node_dir.join("daemon.log"),
                dir: node_dir,
                admin_token: options.get(i).and_then(|o| o.admin_token.clone()),
                log_json: options.get(i).is_some_and(|o| o.log_json),
                child: None,
                watches: Arc::default(),
            });
        }
        let fabric = Self { dir: dir.to_owned(), binary: binary.to_owned(), nodes, running: Arc::default() };
        for i in 0..fabric.nodes.len() {
            let opts = options.get(i).cloned().unwrap_or_default();
            fabric.write_config(i, &opts)?;
        }
        Ok(fabric)
    }

    /// (Re)writes node `i`'s config: every node bootstraps to the origin and to the mirrors before it (or
    /// `bootstrap_mirrors_max` of them).
    pub fn write_config(&self, i: usize, opts: &NodeOptions) -> Result<()> {
        let node = &self.nodes[i];
        let origin = &self.nodes[0];
        let mut earlier: Vec<usize> = (1..i).collect();
        if let Some(k) = opts.bootstrap_mirrors_max {
            // A pseudo-random choice, the same for every run: a random graph keeps paths between mirrors short.
            earlier.sort_by_key(|j| {
                *blake3::hash(&[(i as u64).to_le_bytes(), (*j as u64).to_le_bytes()].concat()).as_bytes()
            });
            earlier.truncate(k);
        }
        let bootstrap: Vec<String> = std::iter::once(origin)
            .filter(|_| i > 0)
            .chain(earlier.iter().map(|j| &self.nodes[*j]))
            .map(|n| format!("\"/ip4/{}/udp/{}/quic-v1/p2p/{}\"", n.host.ip, n.p2p_port, n.peer_id))
            .collect();
        let mut text = format!(
            "[node]\nkey = \"node.key\"\nrole = \"{role}\"\nstate_dir = \"state\"\n\n\
             [repo]\nname = \"alpine\"\ntree = \"tree\"\nstaging_dir = \"staging\"\ndelete_grace_secs = {grace}\n\n\
             [network]\nlisten = \"/ip4/{ip}/udp/{p2p}/quic-v1\"\ndata_listen = \"{ip}:{data}\"\n\
             bootstrap = [{bootstrap}]\n{upload}\n\
             [trust]\npublishers = [\"{publisher}\"]\n\n\
             [admin]\nlisten = \"{admin}\"\n{token}",
            role = if node.origin { "origin" } else { "mirror" },
            grace = opts.delete_grace_secs,
            ip = node.host.ip,
            p2p = node.p2p_port,
            data = node.data_port,
            bootstrap = bootstrap.join(", "),
            upload = opts.upload_bytes_per_sec.map(|b| format!("upload_bytes_per_sec = {b}\n")).unwrap_or_default(),
            publisher = origin.peer_id,
            admin = node.admin,
            token = opts.admin_token.as_ref().map(|t| format!("token = \"{t}\"\n")).unwrap_or_default(),
        );
        // Right after the `[admin]` section it may add keys to.
        text.push_str(&opts.extra_config);
        if let Some(secs) = opts.stale_after_secs {
            text = text.replace("[network]\n", &format!("stale_after_secs = {secs}\n\n[network]\n"));
        }
        if node.origin {
            let limit = opts.removal_limit_percent.unwrap_or(LAB_REMOVAL_LIMIT_PERCENT);
            text.push_str(&format!("\n[origin]\nremoval_limit_percent = {limit}\n"));
            if let Some(quiet) = opts.watch_quiet_secs {
                text.push_str(&format!("watch = true\nquiet_secs = {quiet}\n"));
            }
        }
        if opts.corrupt_served_chunks {
            text.push_str("\n[faults]\ncorrupt_served_chunks = true\n");
        }
        std::fs::write(&node.config, text)?;
        Ok(())
    }

    /// Starts node `i` and returns once its admin API listens. The daemon gets SIGTERM if the calling thread ends
    /// before the fabric is dropped (see the module doc).
    pub fn start(&mut self, i: usize) -> Result<()> {
        let binary = self.binary.clone();
        let node = &mut self.nodes[i];
        if node.child.is_some() {
            bail!("{} is already running", node.name);
        }
        let format = if node.log_json { "json" } else { "human" };
        let mut command = match &node.host.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe calls (prctl,
        // getppid), allocating nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then nobody would ever signal this child.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            })
        };
        let mut child = command
            .args(["--log-format", format, "daemon", "--config"])
            .arg(&node.config)
            .env("RUST_LOG", std::env::var("MIRRORMESH_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} ({})", node.name, binary.display()))?;
        let stderr = child.stderr.take().context("daemon stderr")?;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let watches = node.watches.clone();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                watches.lock().unwrap_or_else(PoisonError::into_inner).retain(|(pattern, tx)| {
                    let hit = line.contains(pattern.as_str());
                    if hit {
                        let _ = tx.send(line.clone());
                    }
                    !hit
                });
                if line.contains("admin API listening")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(Ok(()));
                }
                if line.starts_with("error:")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(Err(line.clone()));
                }
            }
            if let Some(tx) = ready.take() {
                let _ = tx.send(Err("the daemon exited".into()));
            }
        });
        self.running.lock().unwrap_or_else(PoisonError::into_inner).insert(child.id());
        node.child = Some(child);
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow!("{} did not start: {e} (log: {})", node.name, node.log.display())),
            Err(_) => {
                Err(anyhow!("{} did not start within {START_TIMEOUT:?} (log: {})", node.name, node.log.display()))
            }
        }
    }

    pub fn start_all(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.start(i)?;
        }
        Ok(())
    }

    /// Sends `signal` (e.g. 9 for SIGKILL, 15 for SIGTERM) to node `i` and reaps it.
    pub fn kill(&mut self, i: usize, signal: i32) -> Result<()> {
        let Some(mut child) = self.nodes[i].child.take() else { return Ok(()) };
        if !self.release(&child) {
            return Ok(());
        }
        // SAFETY: kill(2) with a child's pid (not yet reaped, so not reused) and a signal number; no memory is passed.
        if unsafe { libc::kill(child.id() as libc::pid_t, signal) } != 0 {
            child.kill()?;
        }
        child.wait()?;
        Ok(())
    }

    /// A channel that receives the first line node `i`'s daemon logs containing `pattern` (from its next start
    /// on, or now if it runs).
    pub fn watch_log(&self, i: usize, pattern: &str) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel();
        self.nodes[i].watches.lock().unwrap_or_else(PoisonError::into_inner).push((pattern.to_owned(), tx));
        rx
    }

    /// Process id of node `i`'s daemon, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    pub fn client(&self, i: usize, timeout: Duration) -> AdminClient {
        AdminClient::new(&self.nodes[i].admin.to_string(), self.nodes[i].admin_token.clone(), timeout)
    }

    pub fn status(&self, i: usize) -> Result<Status> {
        self.client(i, Duration::from_secs(10)).status()
    }

    /// Asks the origin to publish its tree.
    pub fn publish(&self) -> Result<PublishReply> {
        self.client(0, Duration::from_secs(600)).publish()
    }

    /// Waits until every running mirror applied `seq`, is idle and has no removal pending.
    pub fn wait_all_settled(&self, seq: u64, timeout: Duration) -> Result<Vec<Status>> {
        let mut out = Vec::new();
        for i in 1..self.nodes.len() {
            if self.is_running(i) {
                let client = self.client(i, timeout + Duration::from_secs(5));
                match client.wait_settled(seq, timeout.as_millis() as u64) {
                    Ok(status) => out.push(status),
                    Err(e) => {
                        // Which of the others are behind too: one node stuck, or every one?
                        let behind: Vec<&str> = (i + 1..self.nodes.len())
                            .filter(|&j| self.is_running(j))
                            .filter(|&j| !self.status(j).is_ok_and(|s| s.repos.iter().all(|r| r.seq == Some(seq))))
                            .map(|j| self.nodes[j].name.as_str())
                            .collect();
                        let waited = format!(
                            "waiting for seq {seq} to settle; of the mirrors after it, {} have not applied it: {}",
                            behind.len(),
                            behind.join(" ")
                        );
                        return Err(e.context(self.stuck(i, &waited)));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Waits until the origin has heard from every peer connected to it that it holds snapshot `seq` (from a
    /// mirror's announcement after its apply): from then on the origin's status counts every byte it sent for
    /// `seq`. A mirror that settled may not have been heard yet.
    pub fn wait_origin_heard(&self, seq: u64, timeout: Duration) -> Result<Status> {
        self.client(0, timeout + Duration::from_secs(5))
            .wait_peers_at(seq, timeout.as_millis() as u64)
            .map_err(|e| e.context(self.stuck(0, &format!("waiting to hear every peer complete at {seq}"))))
    }

    /// What a failed wait reports about node `i`, most telling first (a test's output is often cut in the middle):
    /// what was waited for, its error, problems and counters, its repository's state, one line per peer, then the
    /// end of its log.
    pub fn stuck(&self, i: usize, waited_for: &str) -> String {
        let node = &self.nodes[i];
        let log = std::fs::read_to_string(&node.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(STUCK_LOG_LINES)..].join("\n");
        let name = &node.name;
        let status = match self.status(i) {
            Ok(s) => {
                let counters: Vec<String> = s.counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
                let problems: Vec<String> = s.problems.iter().map(|p| format!("{p:?}")).collect();
                let peers: Vec<String> = s
                    .peers
                    .iter()
                    .map(|p| {
                        format!(
                            "  {} origin={} connected={} complete={:?} rtt={:?} sent={} received={} chunks {}/{} \
                             failures={} banned={}",
                            p.id,
                            p.origin,
                            p.connected,
                            p.complete_seq,
                            p.rtt_ms.map(|r| r.round()),
                            p.bytes_sent,
                            p.bytes_received,
                            p.chunks_sent,
                            p.chunks_received,
                            p.failures,
                            p.banned
                        )
                    })
                    .collect();
                format!(
                    "{name} last error: {:?}\n{name} problems: {problems:?}\n{name} counters: {}\n{name} repos: {:?}\n\
                     {name} peers ({}):\n{}",
                    s.last_error,
                    counters.join(", "),
                    s.repos,
                    s.peers.len(),
                    peers.join("\n")
                )
            }
            Err(e) => format!("{name} status: {e:#}"),
        };
        format!("{name}: {waited_for}\n{status}\n{name} log (end):\n{tail}")
    }

    /// Checks that node `i`'s tree is identical to the origin's: same entries, kinds, sizes, modes, mtimes,
    /// symlink targets and bytes.
    pub fn check_identical(&self, i: usize) -> Result<TreeSummary> {
        compare_trees(&self.nodes[0].tree, &self.nodes[i].tree, &self.nodes[i].name)
    }
}

impl LocalFabric {
    /// A handle that stops every running daemon of this fabric from another thread (a signal handler).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.running.clone())
    }

    /// Takes `child` out of the running set: true if it was there (this fabric kills and reaps it), false if a
    /// [`Stopper`] took it already.
    fn release(&self, child: &Child) -> bool {
        self.running.lock().unwrap_or_else(PoisonError::into_inner).remove(&child.id())
    }
}

impl Drop for LocalFabric {
    fn drop(&mut self) {
        let children: Vec<Child> = self.nodes.iter_mut().filter_map(|n| n.child.take()).collect();
        for mut child in children {
            if self.release(&child) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// One tree entry as compared between nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TreeEntry {
    File { size: u64, mode: u32, mtime: i64, blake3: [u8; 32] },
    Symlink { target: PathBuf },
    Dir { mode: u32 },
}

#[derive(Debug, Default)]
pub struct TreeSummary {
    pub entries: BTreeMap<String, TreeEntry>,
    pub files: u64,
    pub bytes: u64,
}

/// Checks that the tree at `copy` (called `name` in errors) is identical to the one at `reference`: same entries,
/// kinds, sizes, modes, mtimes, symlink targets and bytes. Returns the copy's summary.
pub fn compare_trees(reference: &Path, copy: &Path, name: &str) -> Result<TreeSummary> {
    let a = summarize(reference)?;
    let b = summarize(copy)?;
    for (path, entry) in &a.entries {
        match b.entries.get(path) {
            None => bail!("{name}: {path} is missing"),
            Some(other) if other != entry => bail!("{name}: {path} differs: {other:?} vs origin {entry:?}"),
            Some(_) => {}
        }
    }
    if let Some(extra) = b.entries.keys().find(|p| !a.entries.contains_key(*p)) {
        bail!("{name}: {extra} is not in the origin's tree");
    }
    Ok(b)
}

/// Every entry under `root` (relative paths), with file contents hashed.
pub fn summarize(root: &Path) -> Result<TreeSummary> {
    let mut out = TreeSummary::default();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for item in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = item?.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&path)?;
            let entry = if meta.is_symlink() {
                TreeEntry::Symlink { target: std::fs::read_link(&path)? }
            } else if meta.is_dir() {
                stack.push(path.clone());
                TreeEntry::Dir { mode: meta.permissions().mode() & 0o7777 }
            } else {
                let mut hasher = blake3::Hasher::new();
                let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                hasher.update_reader(file).with_context(|| format!("hashing {}", path.display()))?;
                out.files += 1;
                out.bytes += meta.len();
                TreeEntry::File {
                    size: meta.len(),
                    mode: meta.permissions().mode() & 0o7777,
                    mtime: meta.mtime(),
                    blake3: *hasher.finalize().as_bytes(),
                }
            };
            out.entries.insert(rel, entry);
        }
    }
    Ok(out)
}
