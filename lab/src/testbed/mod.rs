//! `mirrormesh-lab testbed`: real daemons on hosts in network namespaces, links shaped with `tc`, the rsync recipe side
//! by side on the same hosts and the same tree, each benchmark printing its ratios.
//!
//! - `sync`: initial sync and an N-package update to every mirror, by mirrormesh and by `rsync` from an rsync daemon
//!   on the origin host (all mirrors at once, with the flags of Alpine's mirror guide): time until all converged,
//!   bytes the origin host sent (on its link, headers included), and both against the Kumar–Ross bound `T_min`.
//! - `freshness`: a one-package update published, time until every mirror serves it.
//! - `idle`: bytes a converged fabric sends per node and minute with nothing to do.
//! - `partition`: one mirror's link cut mid-sync and restored: it converges, fetching nothing twice.
//! - `throughput`: on loopback, one mirror pulling a tree from one peer, against an rsync daemon and raw quinn.
//! - `wan`: the WAN emulator checked on its own (pings between every pair, UDP loss probes, TCP copies).
//! - `cleanup`: removes what an interrupted run left behind.
//!
//! `sync`, `freshness`, `idle` and `partition` take `--profile world`, `--rtt-ms N` and `--loss P`: round trips and
//! loss between every pair of hosts, emulated at each host's ingress ([`wan`]).
//!
//! Every run checks that every mirror's tree is byte-identical to the origin's before it reports. Needs root (network
//! namespaces, `tc`), `rsync`, and for WAN emulation `iptables` (and `ping` for `wan`).

mod emulator;
pub mod net;
mod nfqueue;
mod throughput;
mod timeline;
mod wan;
mod wan_check;
pub mod world;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use indicatif::HumanBytes;
use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::local_fabric::{LocalFabric, NodeOptions, compare_trees};
use net::{Link, Testbed};

/// How long one sync may take before the run is declared failed.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(1800);
/// The rsync recipe of Alpine's mirror guide.
pub const RSYNC_FLAGS: [&str; 6] =
    ["--archive", "--update", "--hard-links", "--delete", "--delete-after", "--delay-updates"];

#[derive(Args)]
pub struct TestbedArgs {
    #[command(subcommand)]
    command: TestbedCommand,
}

#[derive(Subcommand)]
enum TestbedCommand {
    /// Initial sync and an update: mirrormesh and rsync, time and origin bytes, against T_min.
    Sync(SyncArgs),
    /// Time from publishing a one-package update until every mirror serves it.
    Freshness(FreshnessArgs),
    /// Bytes per node and minute of a converged fabric with nothing to do.
    Idle(IdleArgs),
    /// Cut one mirror's link mid-sync, restore it: it converges without fetching anything twice.
    Partition(PartitionArgs),
    /// One mirror pulling a tree from one peer on loopback, against an rsync daemon and raw quinn.
    Throughput(throughput::ThroughputArgs),
    /// Check the WAN emulator itself: pings between every pair against the profile, loss, TCP copies, its CPU.
    Wan(wan_check::WanCheckArgs),
    /// Remove namespaces and links left by testbed runs that were killed.
    Cleanup,
    /// One host's WAN emulator (started by the testbed inside the host's namespace; runs until stdin closes).
    #[command(hide = true)]
    Emulate(emulator::EmulateArgs),
}

#[derive(Args, Clone)]
struct FabricArgs {
    /// Mirrors (the origin is one more host).
    #[arg(long, default_value_t = 8)]
    mirrors: usize,
    /// The origin's link, Mbit/s each way.
    #[arg(long, default_value_t = 200)]
    origin_mbit: u64,
    /// The mirrors' links, Mbit/s each way: one value, or MIN-MAX spread evenly over the mirrors.
    #[arg(long, default_value = "200")]
    mirror_mbit: String,
    /// Share of the built-in Alpine size profile (3.6 GiB at 1) the tree holds.
    #[arg(long, default_value_t = 0.05)]
    fraction: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the work directory (trees, configs, logs) and print where it is.
    #[arg(long)]
    keep: bool,
    /// What each mirror's `network.bootstrap` names: `origin` (the shipped config: mirrors find each other by
    /// the peer exchange) or `all` (the origin and every mirror before it, as configs were written before peers
    /// were exchanged).
    #[arg(long, value_enum, default_value_t = Bootstrap::Origin)]
    bootstrap: Bootstrap,
    #[command(flatten)]
    wan: wan::WanArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Bootstrap {
    Origin,
    All,
}

#[derive(Args)]
struct SyncArgs {
    #[command(flatten)]
    fabric: FabricArgs,
    /// Packages the update rebuilds.
    #[arg(long, default_value_t = 50)]
    update_packages: usize,
    /// Also print, for each mirrormesh step, the origin's upload and every mirror's download per 100 ms.
    #[arg(long)]
    timeline: bool,
    /// TCP congestion control of the hosts for the rsync runs, comma-separated: each step runs rsync once per name
    /// (default: the system's; mirrormesh runs over QUIC with its own controller).
    #[arg(long, conflicts_with = "no_rsync")]
    rsync_cc: Option<String>,
    /// Time mirrormesh only (for trying a change to it quickly; the rsync columns show "-").
    #[arg(long)]
    no_rsync: bool,
}

#[derive(Args)]
struct FreshnessArgs {
    #[command(flatten)]
    fabric: FabricArgs,
    /// One-package updates to time.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    fabric: FabricArgs,
    /// How long to count, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

#[derive(Args)]
struct PartitionArgs {
    #[command(flatten)]
    fabric: FabricArgs,
    /// How long the link stays cut, in seconds (past 30 s, requests in flight time out and peers are dropped).
    #[arg(long, default_value_t = 40)]
    cut_secs: u64,
}

pub fn run(args: &TestbedArgs) -> Result<()> {
    let result = run_command(args);
    if result.is_err() && INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        // The interrupt handler is tearing the testbed down (which is what made this fail) and exits when done.
        loop {
            std::thread::park();
        }
    }
    result
}

fn run_command(args: &TestbedArgs) -> Result<()> {
    match &args.command {
        TestbedCommand::Sync(a) => sync(a),
        TestbedCommand::Freshness(a) => freshness(a),
        TestbedCommand::Idle(a) => idle(a),
        TestbedCommand::Partition(a) => partition(a),
        TestbedCommand::Throughput(a) => throughput::run(a),
        TestbedCommand::Wan(a) => wan_check::run(a),
        TestbedCommand::Emulate(a) => emulator::run(a),
        TestbedCommand::Cleanup => {
            let removed = net::remove_tagged(net::PREFIX);
            println!("removed {removed} namespaces and links");
            Ok(())
        }
    }
}

/// Set once SIGINT or SIGTERM arrived.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The work directory of the run in progress (removed on interrupt unless kept).
static WORK: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Removes this run's namespaces (and kills what runs in them) and work directory on SIGINT/SIGTERM, then exits.
fn cleanup_on_interrupt() -> Result<()> {
    let tag = format!("{}{}", net::PREFIX, std::process::id());
    ctrlc::set_handler(move || {
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        eprintln!("interrupted: removing the testbed");
        net::remove_tagged(&tag);
        if let Some(work) = WORK.lock().ok().and_then(|w| w.clone()) {
            let _ = std::fs::remove_dir_all(work);
        }
        std::process::exit(130);
    })
    .context("installing the interrupt handler")
}

fn parse_mbit(text: &str, mirrors: usize) -> Result<Vec<u64>> {
    let parse = |t: &str| t.trim().parse::<u64>().with_context(|| format!("--mirror-mbit: {t:?} is not a number"));
    let (lo, hi) = match text.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => (parse(text)?, parse(text)?),
    };
    if lo == 0 || hi < lo {
        bail!("--mirror-mbit: {text:?} is not N or MIN-MAX with 0 < MIN <= MAX");
    }
    Ok((0..mirrors).map(|i| if mirrors < 2 { lo } else { lo + (hi - lo) * i as u64 / (mirrors as u64 - 1) }).collect())
}

/// A running testbed: hosts, the fabric on them, the work directory.
struct Bed {
    fabric: LocalFabric,
    /// The WAN emulators, when asked for (stopped before the hosts go).
    wan: Option<wan::Wan>,
    net: Testbed,
    work: tempfile::TempDir,
    /// Upload and download of each host, bytes per second (origin first).
    rates: Vec<f64>,
    shape: String,
}

impl Bed {
    /// A status counter of every node (the origin first).
    fn counter_of_each(&self, name: &str) -> Result<Vec<u64>> {
        (0..self.net.hosts.len()).map(|i| Ok(self.fabric.status(i)?.counters.get(name).copied().unwrap_or(0))).collect()
    }

    fn start(a: &FabricArgs) -> Result<Bed> {
        if a.mirrors == 0 || a.mirrors >= net::HOSTS_MAX {
            bail!("--mirrors: 1 to {}", net::HOSTS_MAX - 1);
        }
        cleanup_on_interrupt()?;
        let mirror_mbit = parse_mbit(&a.mirror_mbit, a.mirrors)?;
        let mut mbits = vec![a.origin_mbit];
        mbits.extend(&mirror_mbit);
        let links: Vec<Link> = mbits.iter().map(|&m| Link { up_mbit: Some(m), down_mbit: Some(m) }).collect();
        let net = Testbed::create(&links).context("creating the testbed (needs root)")?;
        let wan = match a.wan.spec()? {
            Some(spec) => Some(wan::Wan::start(&net.hosts, spec, a.seed)?),
            None => None,
        };
        let work = tempfile::Builder::new().prefix("mirrormesh-testbed").tempdir()?;
        if !a.keep
            && let Ok(mut slot) = WORK.lock()
        {
            *slot = Some(work.path().to_owned());
        }
        let binary = crate::daemon_binary()?;
        let token = format!("{:016x}", rand::random::<u64>());
        let base = match a.bootstrap {
            // As the shipped config: the mirrors find each other by the peer exchange.
            Bootstrap::Origin => NodeOptions::origin_only(),
            Bootstrap::All => NodeOptions::default(),
        };
        let options = vec![NodeOptions { admin_token: Some(token), delete_grace_secs: 0, ..base }; a.mirrors + 1];
        let hosts: Vec<_> = net.hosts.iter().map(|h| h.host()).collect();
        let mut fabric = LocalFabric::create_on(&work.path().join("fabric"), &binary, &hosts, &options)?;
        let generated = gentree::generate(&GenTreeArgs {
            out: fabric.nodes[0].tree.clone(),
            fraction: a.fraction,
            seed: a.seed,
            ..GenTreeArgs::default()
        })?;
        fabric.start_all()?;
        let mut shape = format!(
            "{} mirrors (bootstrap: {}); links (each way): origin {} Mbit/s, mirrors {} Mbit/s; tree: {} packages, {} (fraction {})",
            a.mirrors,
            if a.bootstrap == Bootstrap::Origin { "the origin" } else { "the origin and every mirror" },
            a.origin_mbit,
            a.mirror_mbit,
            generated.packages,
            HumanBytes(generated.bytes),
            a.fraction
        );
        if let Some(wan) = &wan {
            shape.push_str(&format!("; {}", wan.spec));
        }
        println!("testbed: {shape}");
        let rates = mbits.iter().map(|&m| m as f64 * 1e6 / 8.0).collect();
        Ok(Bed { fabric, wan, net, work, rates, shape })
    }

    fn mirrors(&self) -> usize {
        self.fabric.nodes.len() - 1
    }

    /// Kumar–Ross: `max(S/U0, S/min(Di), N·S/(U0 + ΣUi))` (links are symmetric here).
    fn t_min(&self, bytes: u64) -> f64 {
        let s = bytes as f64;
        let n = self.mirrors() as f64;
        let u0 = self.rates[0];
        let min_d = self.rates[1..].iter().copied().fold(f64::INFINITY, f64::min);
        let sum_u: f64 = self.rates.iter().sum();
        (s / u0).max(s / min_d).max(n * s / sum_u)
    }

    fn origin_tx(&self) -> Result<u64> {
        self.net.hosts[0].tx_bytes()
    }

    /// Publishes the origin's tree; the time is until every mirror serves the new snapshot (applied). Then waits
    /// until the old files are removed too and checks every tree. With `timeline`, the links are sampled until
    /// every mirror serves it and printed under that title.
    /// CPU the WAN emulators used so far (`None` without emulation).
    fn emulator_cpu(&self) -> Result<Option<Duration>> {
        self.wan.as_ref().map(|w| Ok(w.cpu()?.total())).transpose()
    }

    /// CPU the daemons used so far (user and system), all nodes together.
    fn daemons_cpu(&self) -> Result<Duration> {
        (0..self.fabric.nodes.len())
            .filter_map(|i| self.fabric.pid(i))
            .map(|pid| Ok(wan::Cpu::of(pid)?.total()))
            .try_fold(Duration::ZERO, |sum, cpu: Result<Duration>| Ok(sum + cpu?))
    }

    fn mirrormesh_update(&self, timeline: Option<&str>) -> Result<Measured> {
        let tx0 = self.origin_tx()?;
        let daemons0 = self.daemons_cpu()?;
        let origin0 = self.fabric.status(0)?;
        let (served0, wire0) = (origin0.bytes_served_total, WireSent::of(&origin0, &self.net.hosts[0])?);
        let cpu0 = self.emulator_cpu()?;
        let t0 = Instant::now();
        let recorder = timeline.map(|_| timeline::Recorder::start(&self.net.hosts, t0)).transpose()?;
        let published = self.fabric.publish()?;
        let seq = published.seq;
        let elapsed = std::thread::scope(|scope| {
            let waits: Vec<_> = (1..self.fabric.nodes.len())
                .map(|i| {
                    let client = self.fabric.client(i, SYNC_TIMEOUT);
                    scope.spawn(move || client.wait_for_seq(seq, SYNC_TIMEOUT.as_millis() as u64).map(|_| t0.elapsed()))
                })
                .collect();
            waits
                .into_iter()
                .map(|w| w.join().map_err(|_| anyhow::anyhow!("waiting thread panicked"))?)
                .try_fold(Duration::ZERO, |max, t| anyhow::Ok(max.max(t?)))
        })?;
        let emulator_cpu = self.emulator_cpu()?.zip(cpu0).map(|(c, c0)| c - c0);
        let daemons_cpu = Some(self.daemons_cpu()? - daemons0);
        if let (Some(recorder), Some(title)) = (recorder, timeline) {
            recorder.finish_and_print(title, &self.rates);
        }
        self.fabric.wait_all_settled(seq, SYNC_TIMEOUT)?;
        self.check_wan()?;
        let tx = self.origin_tx()? - tx0;
        for i in 1..self.fabric.nodes.len() {
            self.fabric.check_identical(i)?;
        }
        let origin = self.fabric.wait_origin_heard(seq, SYNC_TIMEOUT)?;
        Ok(Measured {
            bytes: published.changed_bytes,
            elapsed,
            origin_tx: tx,
            origin_chunks: Some(origin.bytes_served_total - served0),
            emulator_cpu,
            daemons_cpu,
            origin_wire: Some(WireSent::of(&origin, &self.net.hosts[0])?.since(wire0)),
        })
    }

    /// The round trips each mirror's `mirrormesh peers` shows for its peers, against the emulated ones: the ratio
    /// shown / emulated over every pair (min, median, max) and the largest difference.
    fn shown_round_trips(&self) -> Result<String> {
        let Some(wan) = &self.wan else { return Ok("no WAN emulated".into()) };
        let mut ratios = Vec::new();
        let mut worst: (f64, String) = (0.0, String::new());
        for i in 1..self.fabric.nodes.len() {
            for peer in self.fabric.status(i)?.peers {
                let Some(j) = self.fabric.nodes.iter().position(|n| n.peer_id == peer.id) else { continue };
                let (Some(shown), emulated) = (peer.rtt_ms, wan.spec.rtt.rtt_ms(i, j)) else { continue };
                if emulated <= 0.0 {
                    continue;
                }
                ratios.push(shown / emulated);
                if (shown - emulated).abs() >= worst.0 {
                    let pair = format!(
                        "{} -> {}: {shown:.1} ms shown, {emulated:.1} emulated",
                        self.fabric.nodes[i].name, self.fabric.nodes[j].name
                    );
                    worst = ((shown - emulated).abs(), pair);
                }
            }
        }
        if ratios.is_empty() {
            return Ok("peers' round trips: none shown".into());
        }
        ratios.sort_by(f64::total_cmp);
        Ok(format!(
            "peers' round trips shown by the daemons / emulated, over {} pairs: min {:.2}, median {:.2}, max {:.2}; \
             largest difference {}",
            ratios.len(),
            ratios[0],
            ratios[ratios.len() / 2],
            ratios[ratios.len() - 1],
            worst.1
        ))
    }

    /// Fails if a WAN emulator stopped (the run would not have been measured as asked).
    fn check_wan(&self) -> Result<()> {
        self.wan.as_ref().map_or(Ok(()), |w| w.check())
    }

    /// The tree mirror `i` syncs with rsync under TCP congestion control `cc`.
    fn rsync_dir(&self, cc: &str, i: usize) -> PathBuf {
        self.work.path().join("rsync").join(cc).join(&self.fabric.nodes[i].name)
    }

    /// Every host's TCP congestion control set to `cc`, an rsync daemon started on the origin host (its connections
    /// take the congestion control it listens with), then every mirror host runs the rsync recipe against it at
    /// once; checks every tree.
    fn rsync_update(&self, changed: u64, cc: &str) -> Result<Measured> {
        for host in &self.net.hosts {
            host.set_tcp_cc(cc)?;
        }
        let origin = &self.net.hosts[0];
        let rsyncd = RsyncDaemon::start(
            self.work.path(),
            &self.fabric.nodes[0].tree,
            &origin.ip.to_string(),
            873,
            Some(origin),
        )?;
        let tx0 = self.origin_tx()?;
        let cpu0 = self.emulator_cpu()?;
        let t0 = Instant::now();
        let mut clients = Vec::new();
        for i in 1..self.fabric.nodes.len() {
            let dest = self.rsync_dir(cc, i);
            std::fs::create_dir_all(&dest)?;
            let child = rsync_client(self.net.hosts[i].command("rsync"), &rsyncd.url, &dest)
                .spawn()
                .context("starting rsync")?;
            clients.push(child);
        }
        for (i, child) in clients.into_iter().enumerate() {
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("rsync on mirror{}: {}", i + 1, String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        let elapsed = t0.elapsed();
        let emulator_cpu = self.emulator_cpu()?.zip(cpu0).map(|(c, c0)| c - c0);
        let tx = self.origin_tx()? - tx0;
        drop(rsyncd);
        self.check_wan()?;
        for i in 1..self.fabric.nodes.len() {
            compare_trees(&self.fabric.nodes[0].tree, &self.rsync_dir(cc, i), &format!("rsync mirror{i}"))?;
        }
        Ok(Measured {
            bytes: changed,
            elapsed,
            origin_tx: tx,
            origin_chunks: None,
            emulator_cpu,
            daemons_cpu: None,
            origin_wire: None,
        })
    }

    /// Stops the WAN emulators (printing what they did) and keeps the work directory if asked.
    fn finish(mut self, keep: bool) -> Result<()> {
        if let Some(wan) = self.wan.take() {
            println!("{}", wan.stop()?);
        }
        if keep {
            let path = self.work.keep();
            println!("work directory kept: {}", path.display());
        }
        Ok(())
    }
}

struct Measured {
    /// Bytes of the files the update added or changed.
    bytes: u64,
    elapsed: Duration,
    /// Bytes the origin host sent on its link.
    origin_tx: u64,
    /// Chunk bytes the origin daemon served.
    origin_chunks: Option<u64>,
    /// CPU the WAN emulators used from the start of the step until its time was taken.
    emulator_cpu: Option<Duration>,
    /// CPU the daemons (all nodes) used in the same span (mirrormesh only).
    daemons_cpu: Option<Duration>,
    /// What the origin daemon's data plane sent on the wire in the step (mirrormesh only).
    origin_wire: Option<WireSent>,
}

/// The step's difference in the origin daemon's `dataplane_sent_*` and `dataplane_lost_*` counters, and in the
/// packets the origin host's own link queue dropped.
#[derive(Clone, Copy, Default)]
struct WireSent {
    udp_bytes: u64,
    datagrams: u64,
    lost_bytes: u64,
    queue_drops: u64,
}

impl WireSent {
    fn of(status: &mirrormesh::status::Status, host: &net::NetHost) -> Result<Self> {
        let count = |name: &str| status.counters.get(name).copied().unwrap_or(0);
        Ok(WireSent {
            udp_bytes: count("dataplane_sent_udp_bytes"),
            datagrams: count("dataplane_sent_datagrams"),
            lost_bytes: count("dataplane_lost_bytes"),
            queue_drops: host.upload_drops()?,
        })
    }

    fn since(self, before: WireSent) -> Self {
        WireSent {
            udp_bytes: self.udp_bytes.saturating_sub(before.udp_bytes),
            datagrams: self.datagrams.saturating_sub(before.datagrams),
            lost_bytes: self.lost_bytes.saturating_sub(before.lost_bytes),
            queue_drops: self.queue_drops.saturating_sub(before.queue_drops),
        }
    }
}

/// Ethernet, IPv4 and UDP headers of one datagram: what a host's link counts beyond the UDP payload.
const DATAGRAM_HEADER_BYTES: u64 = 14 + 20 + 8;

/// `command` (an `rsync` to run here or in a namespace) made into the rsync recipe pulling `url` into `dest`, its
/// errors captured.
fn rsync_client(mut command: Command, url: &str, dest: &Path) -> Command {
    command
        .args(RSYNC_FLAGS)
        .arg(url)
        .arg(format!("{}/", dest.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// `rsync --daemon` on a host, serving the origin's tree read-only as module `alpine`.
struct RsyncDaemon {
    child: Child,
    url: String,
}

impl RsyncDaemon {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RsyncDaemon {
    /// Starts it (in `netns` if given) and returns once it logs that it listens.
    fn start(work: &Path, tree: &Path, ip: &str, port: u16, netns: Option<&net::NetHost>) -> Result<Self> {
        let conf = work.join("rsyncd.conf");
        std::fs::write(
            &conf,
            format!("use chroot = no\nnumeric ids = yes\n[alpine]\n  path = {}\n  read only = yes\n", tree.display()),
        )?;
        let mut command = match netns {
            Some(host) => host.command("rsync"),
            None => Command::new("rsync"),
        };
        let mut child = command
            .arg("--daemon")
            .arg("--no-detach")
            .arg(format!("--config={}", conf.display()))
            .arg(format!("--address={ip}"))
            .arg(format!("--port={port}"))
            .arg("--log-file=/dev/stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting rsync --daemon (is rsync installed?)")?;
        let stderr = child.stderr.take().context("rsyncd stderr")?;
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening on port") => break,
                Some(Ok(_)) => {}
                _ => bail!("rsync --daemon exited before listening"),
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Self { child, url: format!("rsync://{ip}:{port}/alpine/") })
    }
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}", a / b)
}

/// "X s (Y cores)": the emulators' CPU in a step and its share of the step's time.
/// The origin host's bytes on its link in each step, over `S`, taken apart: what the data plane's QUIC handed to
/// the kernel (of which QUIC declared lost and sent again), less what never reached the link (the host's own link
/// queue or veth dropped it; estimated at the step's mean datagram), and the rest: the packets' Ethernet, IP and
/// UDP headers as the veth counts them (once per GSO batch of up to 64 datagrams, not once per datagram as a real
/// link would), the control plane, gossip and manifests. The rest is what is left, so a negative one means the
/// counts disagree.
fn origin_wire_breakdown(steps: &[(&str, &Measured)]) -> String {
    let mut out = String::from(
        "the origin host's bytes on its link / S, taken apart: data-plane QUIC packets (of which declared lost) - \
         dropped before the link + the rest (headers as the veth counts them, control plane, manifests, gossip)",
    );
    for (name, m) in steps {
        let Some(wire) = m.origin_wire else { continue };
        let s = m.bytes as f64;
        let per_datagram = wire.udp_bytes as f64 / wire.datagrams.max(1) as f64;
        let dropped = wire.queue_drops as f64 * (per_datagram + DATAGRAM_HEADER_BYTES as f64);
        let rest = m.origin_tx as f64 - (wire.udp_bytes as f64 - dropped);
        out.push_str(&format!(
            "\n  {name}: {:.3} = {:.3} (lost {:.3}) - {:.3} ({} packets) + {:.3}",
            m.origin_tx as f64 / s,
            wire.udp_bytes as f64 / s,
            wire.lost_bytes as f64 / s,
            dropped / s,
            wire.queue_drops,
            rest / s
        ));
    }
    out
}

fn emulator_share(m: &Measured) -> String {
    let cpu = m.emulator_cpu.unwrap_or_default().as_secs_f64();
    format!("{cpu:.2} s ({:.2} cores)", cpu / m.elapsed.as_secs_f64())
}

fn sync(a: &SyncArgs) -> Result<()> {
    let load_before = wan_check::load_average();
    let bed = Bed::start(&a.fabric)?;
    let ccs = if a.no_rsync { Vec::new() } else { wan_check::tcp_ccs(a.rsync_cc.as_deref(), &bed.net.hosts[0])? };
    let n = bed.mirrors();
    let rsync_all = |bytes| ccs.iter().map(|cc| bed.rsync_update(bytes, cc)).collect::<Result<Vec<_>>>();

    println!("initial sync ...");
    let mm_initial = bed.mirrormesh_update(a.timeline.then_some("the initial sync"))?;
    let rs_initial = rsync_all(mm_initial.bytes)?;
    gentree::generate(&GenTreeArgs {
        out: bed.fabric.nodes[0].tree.clone(),
        update: Some(a.update_packages),
        seed: a.fabric.seed + 1,
        ..GenTreeArgs::default()
    })?;
    println!("{}-package update ...", a.update_packages);
    let mm_update = bed.mirrormesh_update(a.timeline.then_some("the update"))?;
    let rs_update = rsync_all(mm_update.bytes)?;

    println!();
    println!("mirrormesh-lab testbed sync: {}", bed.shape);
    println!("every mirror's tree checked byte-identical to the origin's after each step (both tools)");
    println!("rsync's TCP congestion control: {}", ccs.first().map_or("- (not run)", String::as_str));
    println!();
    println!(
        "{:<18} {:>10} {:>8} | {:>9} {:>7} {:>9} {:>7} | {:>10} {:>7} {:>7} {:>10} {:>7}",
        "step", "S", "T_min", "mm time", "/T_min", "rsync", "/T_min", "mm origin", "/S", "chunks", "rsync orig", "/S"
    );
    let label = format!("{}-package update", a.update_packages);
    let steps = [("initial sync", &mm_initial, &rs_initial), (label.as_str(), &mm_update, &rs_update)];
    for (name, mm, rs) in steps {
        let s = mm.bytes as f64;
        let t_min = bed.t_min(mm.bytes);
        let (rs_time, rs_ratio, rs_origin, rs_origin_ratio) = match rs.first() {
            Some(rs) => (
                format!("{:.2}s", rs.elapsed.as_secs_f64()),
                ratio(rs.elapsed.as_secs_f64(), t_min),
                HumanBytes(rs.origin_tx).to_string(),
                ratio(rs.origin_tx as f64, s),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<18} {:>10} {:>7.2}s | {:>8.2}s {:>7} {:>9} {:>7} | {:>10} {:>7} {:>7} {:>10} {:>7}",
            name,
            HumanBytes(mm.bytes).to_string(),
            t_min,
            mm.elapsed.as_secs_f64(),
            ratio(mm.elapsed.as_secs_f64(), t_min),
            rs_time,
            rs_ratio,
            HumanBytes(mm.origin_tx).to_string(),
            ratio(mm.origin_tx as f64, s),
            ratio(mm.origin_chunks.unwrap_or(0) as f64, s),
            rs_origin,
            rs_origin_ratio,
        );
    }
    println!();
    println!(
        "targets: mirrormesh origin bytes / S <= 1.05 (rsync: N = {n}); time <= 1.3 x T_min with homogeneous links \
         (rsync: about N x T_min). \"/S\" counts every byte the origin host sent (headers, control, manifests); \
         \"chunks\" only the chunk bytes its daemon served."
    );
    println!();
    println!("{}", origin_wire_breakdown(&steps.map(|(name, mm, _)| (name, mm))));
    let longest = bed.counter_of_each("loop_turn_longest_us")?;
    let mirrors_longest = longest[1..].iter().copied().max().unwrap_or(0);
    println!(
        "longest event-loop turn of each daemon since its start (status counter loop_turn_longest_us: the loop's \
         longest stall): origin {:.1} ms, mirrors up to {:.1} ms (median {:.1} ms); target <= 50 ms",
        longest[0] as f64 / 1000.0,
        mirrors_longest as f64 / 1000.0,
        {
            let mut mirrors = longest[1..].to_vec();
            mirrors.sort_unstable();
            mirrors.get(mirrors.len() / 2).copied().unwrap_or(0) as f64 / 1000.0
        }
    );
    println!(
        "daemons' CPU (all {} nodes, user + system) per step, until its time was taken: {}; per GB the mirrors \
         received (N x S): {}",
        n + 1,
        steps
            .map(|(name, mm, _)| format!("{name} {:.1} s", mm.daemons_cpu.unwrap_or_default().as_secs_f64()))
            .join(", "),
        steps
            .map(|(name, mm, _)| format!(
                "{name} {:.1} s",
                mm.daemons_cpu.unwrap_or_default().as_secs_f64() / (n as f64 * mm.bytes as f64 / 1e9)
            ))
            .join(", "),
    );
    if ccs.len() > 1 {
        println!();
        println!("rsync under each TCP congestion control (same steps, one run each, trees checked):");
        println!("{:<18} {:>8} {:>9} {:>7} {:>10} {:>7}", "step", "cc", "rsync", "/T_min", "rsync orig", "/S");
        for (name, mm, rs) in steps {
            let t_min = bed.t_min(mm.bytes);
            for (cc, rs) in ccs.iter().zip(rs) {
                println!(
                    "{:<18} {:>8} {:>8.2}s {:>7} {:>10} {:>7}",
                    name,
                    cc,
                    rs.elapsed.as_secs_f64(),
                    ratio(rs.elapsed.as_secs_f64(), t_min),
                    HumanBytes(rs.origin_tx).to_string(),
                    ratio(rs.origin_tx as f64, mm.bytes as f64)
                );
            }
        }
    }
    if bed.wan.is_some() {
        println!();
        println!("WAN emulators' CPU during each step (CPU s, and over the step's time: cores busy):");
        for (name, mm, rs) in steps {
            let mut line = format!("  {name}: mirrormesh {}", emulator_share(mm));
            for (cc, rs) in ccs.iter().zip(rs) {
                line.push_str(&format!(", rsync {cc} {}", emulator_share(rs)));
            }
            println!("{line}");
        }
        println!();
        println!("{}", bed.shown_round_trips()?);
    }
    let finished = bed.finish(a.fabric.keep);
    println!("load average (1, 5, 15 min) before the run: {load_before}; after: {}", wan_check::load_average());
    finished
}

fn freshness(a: &FreshnessArgs) -> Result<()> {
    let bed = Bed::start(&a.fabric)?;
    bed.mirrormesh_update(None)?;
    let mut times = Vec::new();
    for round in 0..a.rounds {
        gentree::generate(&GenTreeArgs {
            out: bed.fabric.nodes[0].tree.clone(),
            update: Some(1),
            seed: a.fabric.seed + 100 + round as u64,
            ..GenTreeArgs::default()
        })?;
        let m = bed.mirrormesh_update(None)?;
        println!(
            "  round {}: {} changed, all {} mirrors serving it after {:.3} s",
            round + 1,
            HumanBytes(m.bytes),
            bed.mirrors(),
            m.elapsed.as_secs_f64()
        );
        times.push(m.elapsed.as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
    let max = times.last().copied().unwrap_or(0.0);
    println!();
    println!("mirrormesh-lab testbed freshness: {}", bed.shape);
    println!(
        "one-package update, publish to every mirror serving it (trees checked): median {median:.3} s, max {max:.3} s \
         over {} rounds; target < 1 s: max / target = {}",
        a.rounds,
        ratio(max, 1.0)
    );
    bed.finish(a.fabric.keep)
}

fn idle(a: &IdleArgs) -> Result<()> {
    let bed = Bed::start(&a.fabric)?;
    bed.mirrormesh_update(None)?;
    let turns_before = bed.counter_of_each("loop_wakeups")?;
    let before: Vec<u64> = bed.net.hosts.iter().map(|h| h.tx_bytes()).collect::<Result<_>>()?;
    // The measurement is a span of wall time with nothing to do: waiting is what is measured.
    std::thread::sleep(Duration::from_secs(a.seconds));
    let after: Vec<u64> = bed.net.hosts.iter().map(|h| h.tx_bytes()).collect::<Result<_>>()?;
    let turns: Vec<f64> = bed
        .counter_of_each("loop_wakeups")?
        .iter()
        .zip(&turns_before)
        .map(|(after, before)| after.saturating_sub(*before) as f64 / a.seconds as f64)
        .collect();
    let minutes = a.seconds as f64 / 60.0;
    let per_node: Vec<f64> = before.iter().zip(&after).map(|(b, a)| (a - b) as f64 / minutes).collect();
    let nodes = per_node.len() as f64;
    let mean = per_node.iter().sum::<f64>() / nodes;
    let max = per_node.iter().copied().fold(0.0, f64::max);
    println!();
    println!("mirrormesh-lab testbed idle: {}", bed.shape);
    println!(
        "converged fabric of {} nodes, {} s with nothing to do: {:.0} B per node per minute on average (origin {:.0}, \
         busiest node {:.0}); target < 1024: mean / target = {}",
        per_node.len(),
        a.seconds,
        mean,
        per_node[0],
        max,
        ratio(mean, 1024.0)
    );
    let busiest = turns.iter().copied().fold(0.0, f64::max);
    println!(
        "event loop turns per second and node (the status counter loop_wakeups; each status read is a turn too): \
         {:.2} on average, origin {:.2}, busiest node {:.2}; a 50 ms tick alone would be 20: mean / 20 = {}",
        turns.iter().sum::<f64>() / turns.len() as f64,
        turns[0],
        busiest,
        ratio(turns.iter().sum::<f64>() / turns.len() as f64, 20.0)
    );
    bed.finish(a.fabric.keep)
}

fn partition(a: &PartitionArgs) -> Result<()> {
    if a.fabric.mirrors < 2 {
        bail!("--mirrors: a partition needs at least 2 mirrors (one is cut off, the others go on)");
    }
    let bed = Bed::start(&a.fabric)?;
    let victim = bed.mirrors();
    let tx0 = bed.origin_tx()?;
    let published = bed.fabric.publish()?;
    let size = published.changed_bytes;
    let timeout_ms = SYNC_TIMEOUT.as_millis() as u64;
    let t0 = Instant::now();
    // Cut once the victim holds a third of the snapshot.
    bed.fabric.client(victim, SYNC_TIMEOUT).wait_fetched(size / 3, timeout_ms)?;
    bed.net.hosts[victim].set_link(false)?;
    let cut_at = t0.elapsed();
    let mut others = Duration::ZERO;
    for i in 1..victim {
        bed.fabric.client(i, SYNC_TIMEOUT).wait_for_seq(published.seq, timeout_ms)?;
        others = others.max(t0.elapsed());
    }
    // The fault schedule: the link stays cut for --cut-secs.
    let cut = Duration::from_secs(a.cut_secs);
    std::thread::sleep((cut_at + cut).saturating_sub(t0.elapsed()));
    bed.net.hosts[victim].set_link(true)?;
    let restored = Instant::now();
    let status = bed.fabric.client(victim, SYNC_TIMEOUT).wait_settled(published.seq, timeout_ms)?;
    let after_restore = restored.elapsed();
    bed.fabric.wait_all_settled(published.seq, SYNC_TIMEOUT)?;
    for i in 1..=victim {
        bed.fabric.check_identical(i)?;
    }
    let origin_tx = bed.origin_tx()? - tx0;
    let fetched = status.bytes_fetched_total;
    let counter = |c: &str| status.counters.get(c).copied().unwrap_or(0);
    println!();
    println!("mirrormesh-lab testbed partition: {}", bed.shape);
    println!("| snapshot | victim | cut at | cut for | others converged | victim converged after the restore |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | mirror{victim} | {:.2} s ({} fetched) | {} s | {:.2} s | {:.2} s |",
        HumanBytes(size),
        cut_at.as_secs_f64(),
        HumanBytes(size / 3),
        a.cut_secs,
        others.as_secs_f64(),
        after_restore.as_secs_f64()
    );
    println!(
        "victim: verified chunk bytes fetched / snapshot = {} (duplicates: {}; chunks received again: {} endgame \
         copies, {} other); chunk requests failed {}, peers dropped as unreachable {}; origin sent / snapshot = {}",
        ratio(fetched as f64, size as f64),
        HumanBytes(fetched.saturating_sub(size)),
        counter("chunks_received_again_endgame"),
        counter("chunks_received_again_other"),
        counter("chunk_requests_failed"),
        counter("peers_unreachable"),
        ratio(origin_tx as f64, size as f64)
    );
    println!("all {victim} mirrors checked byte-identical to the origin");
    bed.finish(a.fabric.keep)
}
