//! The WAN emulator of one testbed host: `mirrormesh-lab testbed emulate`, run inside the host's namespace (hidden; the
//! testbed starts one per host, see [`super::wan`]).
//!
//! Every IPv4 packet that reaches the host from the bridge is queued by an iptables `NFQUEUE` rule (raw table,
//! PREROUTING, so before anything else sees it). The emulator takes each packet's id and source address and:
//! 1. drops it with probability `--loss` (a seeded ChaCha8 generator: a run with one seed loses the same packets
//!    of the same arrival sequence);
//! 2. otherwise holds its verdict for the one-way delay of its source (`--delay SOURCE=MICROS`), then accepts it.
//!    Packets of one source wait in one FIFO with one delay, so they leave in the order they came (no reordering
//!    of a flow); packets from a source without a delay, and non-IPv4 heads, are accepted at once and counted.
//!
//! Delaying at the receiver's ingress, after its download link's `tbf`, keeps the sender's socket and queues as
//! they are (a delay at the sender's egress would hold its socket buffers and throttle it). The time a packet is
//! held runs from when the emulator read it; it waits in `ppoll` for a packet, its standard input, or the next
//! release, whichever is first, at `SCHED_FIFO` priority when the kernel allows it, so that the delays hold while
//! the hosts keep both cores busy. It runs until its standard input closes, then prints one line of counters.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::nfqueue::NfQueue;

/// Bytes of each packet the kernel copies to the emulator: an IPv4 header without options, enough for the source.
pub const COPY_RANGE: u32 = 20;
/// Packets that may wait for a verdict at once (the kernel drops what comes beyond and counts it). The most held at
/// once is a host's download rate times the longest one-way delay: 1 Gbit/s for 1 s (a 2,000 ms round trip) is
/// about 85,000 full-size packets; offloaded (GSO) packets are larger, so fewer.
pub const QUEUE_PACKETS_MAX: u32 = 100_000;
/// Real-time priority of the emulator (SCHED_FIFO, 1 to 99): above every normal process, below the kernel's own.
const RT_PRIORITY: i32 = 10;

#[derive(Args)]
pub struct EmulateArgs {
    /// The host's name (its namespace), for messages and for finding the process.
    #[arg(long)]
    host: String,
    /// The NFQUEUE number to bind.
    #[arg(long, default_value_t = 0)]
    queue: u16,
    /// SOURCE=MICROS: packets from SOURCE are held this many microseconds (one per source).
    #[arg(long = "delay", value_parser = parse_delay)]
    delays: Vec<(Ipv4Addr, Duration)>,
    /// Probability that a packet is dropped.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn parse_delay(text: &str) -> Result<(Ipv4Addr, Duration), String> {
    let (ip, us) = text.split_once('=').ok_or_else(|| format!("{text:?} is not SOURCE=MICROS"))?;
    let ip = ip.parse().map_err(|e| format!("{ip:?}: {e}"))?;
    let us: u64 = us.parse().map_err(|e| format!("{us:?}: {e}"))?;
    Ok((ip, Duration::from_micros(us)))
}

/// What to do with a packet now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Accept,
    Drop,
    /// Held: [`DelayLine::release`] hands its id out when its time comes.
    Held,
}

/// What the emulator did, counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DelayCounters {
    pub packets: u64,
    /// Bytes of those packets (IP headers included, as the kernel reports their length).
    pub bytes: u64,
    /// Held for their source's delay.
    pub held: u64,
    /// Accepted at once: a source with no delay.
    pub passed: u64,
    /// Dropped by the loss draw.
    pub dropped: u64,
    /// Accepted at once: not IPv4, or a source without a configured delay.
    pub unknown: u64,
    /// Accepted at once because [`QUEUE_PACKETS_MAX`] packets were held already (the kernel should have stopped
    /// queueing before; counted in case it did not).
    pub overflow: u64,
}

struct Source {
    delay: Duration,
    /// Release time and packet id, oldest first; release times only grow (one delay, arrivals in order).
    fifo: VecDeque<(Duration, u32)>,
}

/// The emulator's policy, without I/O: time is passed in (a `Duration` since some start).
///
/// Call order: [`DelayLine::handle_packet`] for every packet as it arrives; [`DelayLine::release`] after each batch
/// and whenever [`DelayLine::next_release`] is due.
pub struct DelayLine {
    sources: Vec<Source>,
    by_addr: BTreeMap<Ipv4Addr, usize>,
    loss: f64,
    rng: ChaCha8Rng,
    held: usize,
    pub counters: DelayCounters,
}

impl DelayLine {
    pub fn new(delays: &[(Ipv4Addr, Duration)], loss: f64, seed: u64) -> Self {
        let mut by_addr = BTreeMap::new();
        let mut sources = Vec::new();
        for &(addr, delay) in delays {
            let index = *by_addr.entry(addr).or_insert_with(|| {
                sources.push(Source { delay, fifo: VecDeque::new() });
                sources.len() - 1
            });
            sources[index].delay = delay;
        }
        DelayLine {
            sources,
            by_addr,
            loss,
            rng: ChaCha8Rng::seed_from_u64(seed),
            held: 0,
            counters: DelayCounters::default(),
        }
    }

    /// A packet `id` arrived at `now`; `head` is the start of its IP header, `len` its length.
    pub fn handle_packet(&mut self, now: Duration, id: u32, head: &[u8], len: u32) -> Decision {
        self.counters.packets += 1;
        self.counters.bytes += u64::from(len);
        let source = match head {
            [v, _, _, _, _, _, _, _, _, _, _, _, a, b, c, d, ..] if v >> 4 == 4 => Ipv4Addr::new(*a, *b, *c, *d),
            _ => {
                self.counters.unknown += 1;
                return Decision::Accept;
            }
        };
        let Some(&index) = self.by_addr.get(&source) else {
            self.counters.unknown += 1;
            return Decision::Accept;
        };
        if self.loss > 0.0 && self.rng.random::<f64>() < self.loss {
            self.counters.dropped += 1;
            return Decision::Drop;
        }
        let source = &mut self.sources[index];
        if source.delay.is_zero() {
            self.counters.passed += 1;
            return Decision::Accept;
        }
        if self.held >= QUEUE_PACKETS_MAX as usize {
            self.counters.overflow += 1;
            return Decision::Accept;
        }
        source.fifo.push_back((now + source.delay, id));
        self.held += 1;
        self.counters.held += 1;
        Decision::Held
    }

    /// When the next held packet is due.
    pub fn next_release(&self) -> Option<Duration> {
        self.sources.iter().filter_map(|s| s.fifo.front().map(|&(at, _)| at)).min()
    }

    /// Hands out every held packet due at `now`, each source's in arrival order.
    pub fn release(&mut self, now: Duration, mut accept: impl FnMut(u32)) {
        for source in &mut self.sources {
            while let Some(&(at, id)) = source.fifo.front() {
                if at > now {
                    break;
                }
                source.fifo.pop_front();
                self.held -= 1;
                accept(id);
            }
        }
    }

    /// Packets held now.
    pub fn held(&self) -> usize {
        self.held
    }
}

/// Asks for `SCHED_FIFO`; whether the kernel granted it.
fn real_time() -> bool {
    let param = libc::sched_param { sched_priority: RT_PRIORITY };
    // SAFETY: a valid sched_param for this process.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// Waits until one of `fds` is ready (see their `revents`) or `timeout` passed (`None`: no timeout).
fn wait(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> Result<()> {
    let ts = timeout.map(|t| libc::timespec { tv_sec: t.as_secs() as libc::time_t, tv_nsec: t.subsec_nanos() as _ });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    loop {
        // SAFETY: `fds` and `ts` are live for the call; no signal mask is passed.
        let n = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ts_ptr, std::ptr::null()) };
        if n >= 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err).context("ppoll");
        }
    }
}

/// The kernel's own counts for queue `queue` in this namespace: (dropped because the queue was full, dropped
/// because the socket could not take them).
fn kernel_drops(queue: u16) -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/netfilter/nfnetlink_queue").unwrap_or_default();
    text.lines()
        .map(|l| l.split_whitespace().filter_map(|f| f.parse::<u64>().ok()).collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == u64::from(queue))
        .map_or((0, 0), |f| (f[5], f[6]))
}

pub fn run(args: &EmulateArgs) -> Result<()> {
    if !(0.0..1.0).contains(&args.loss) {
        bail!("--loss: {} is not a probability below 1", args.loss);
    }
    let mut queue = NfQueue::open(args.queue, COPY_RANGE, QUEUE_PACKETS_MAX)
        .with_context(|| format!("{}: binding NFQUEUE {}", args.host, args.queue))?;
    let real_time = real_time();
    let mut line = DelayLine::new(&args.delays, args.loss, args.seed);
    let start = Instant::now();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready real_time={real_time}")?;
    stdout.flush()?;
    let mut verdicts: Vec<(u32, bool)> = Vec::new();
    let mut stdin_buf = [0u8; 64];
    loop {
        let timeout = line.next_release().map(|at| at.saturating_sub(start.elapsed()));
        let mut fds = [
            libc::pollfd { fd: queue.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 },
        ];
        wait(&mut fds, timeout)?;
        if fds[1].revents != 0 {
            // SAFETY: reading into a live buffer of the length passed.
            let n = unsafe { libc::read(0, stdin_buf.as_mut_ptr().cast(), stdin_buf.len()) };
            if n <= 0 {
                break;
            }
        }
        if fds[0].revents != 0 {
            queue
                .receive(|p| match line.handle_packet(start.elapsed(), p.id, p.head, p.len) {
                    Decision::Accept => verdicts.push((p.id, true)),
                    Decision::Drop => verdicts.push((p.id, false)),
                    Decision::Held => {}
                })
                .context("receiving from the NFQUEUE")?;
        }
        line.release(start.elapsed(), |id| verdicts.push((id, true)));
        for &(id, accept) in &verdicts {
            queue.verdict(id, accept)?;
        }
        queue.flush().context("sending verdicts")?;
        verdicts.clear();
    }
    let c = line.counters;
    let q = queue.counters;
    let (queue_full, socket_full) = kernel_drops(args.queue);
    writeln!(
        stdout,
        "emulator: host={} packets={} bytes={} held={} passed={} dropped={} unknown={} overflow={} still_held={} \
         verdict_errors={} overruns={} malformed={} kernel_queue_full={} kernel_socket_full={}",
        args.host,
        c.packets,
        c.bytes,
        c.held,
        c.passed,
        c.dropped,
        c.unknown,
        c.overflow,
        line.held(),
        q.errors,
        q.overruns,
        q.malformed,
        queue_full,
        socket_full
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(src: [u8; 4]) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[12..16].copy_from_slice(&src);
        h
    }

    const A: [u8; 4] = [10, 77, 1, 1];
    const B: [u8; 4] = [10, 77, 1, 2];
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn each_source_is_held_for_its_delay_in_arrival_order() {
        let mut line = DelayLine::new(&[(A.into(), 20 * MS), (B.into(), 5 * MS)], 0.0, 1);
        for (i, at) in [0u32, 1, 2].iter().enumerate() {
            assert_eq!(line.handle_packet(*at * MS, i as u32, &head(A), 1500), Decision::Held);
        }
        assert_eq!(line.handle_packet(3 * MS, 10, &head(B), 60), Decision::Held);
        assert_eq!(line.next_release(), Some(8 * MS), "B's packet first");
        let mut out = Vec::new();
        line.release(8 * MS - Duration::from_micros(1), |id| out.push(id));
        assert!(out.is_empty(), "nothing before its time");
        line.release(8 * MS, |id| out.push(id));
        assert_eq!(out, [10]);
        assert_eq!(line.next_release(), Some(20 * MS));
        line.release(21 * MS, |id| out.push(id));
        assert_eq!(out, [10, 0, 1], "A's in order, the third not yet");
        line.release(22 * MS, |id| out.push(id));
        assert_eq!(out, [10, 0, 1, 2]);
        assert_eq!((line.next_release(), line.held()), (None, 0));
        assert_eq!(line.counters.bytes, 3 * 1500 + 60);
    }

    #[test]
    fn unknown_sources_and_zero_delays_pass_at_once() {
        let mut line = DelayLine::new(&[(A.into(), Duration::ZERO)], 0.0, 1);
        assert_eq!(line.handle_packet(Duration::ZERO, 1, &head(A), 100), Decision::Accept);
        assert_eq!(line.handle_packet(Duration::ZERO, 2, &head(B), 100), Decision::Accept);
        assert_eq!(line.handle_packet(Duration::ZERO, 3, &[0x60; 40], 100), Decision::Accept, "IPv6");
        assert_eq!(line.handle_packet(Duration::ZERO, 4, &[0x45; 8], 100), Decision::Accept, "cut short");
        assert_eq!((line.counters.passed, line.counters.unknown), (1, 3));
    }

    #[test]
    fn loss_drops_about_its_share_the_same_for_a_seed() {
        let run = |seed| {
            let mut line = DelayLine::new(&[(A.into(), MS)], 0.3, seed);
            (0..10_000u32)
                .map(|i| line.handle_packet(Duration::ZERO, i, &head(A), 100))
                .map(|d| d == Decision::Drop)
                .collect::<Vec<_>>()
        };
        let dropped = run(7).iter().filter(|&&d| d).count();
        assert!((2_800..3_200).contains(&dropped), "{dropped} of 10000 at 0.3");
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn delays_parse_from_the_command_line() {
        assert_eq!(parse_delay("10.77.1.2=4000").unwrap(), (Ipv4Addr::new(10, 77, 1, 2), 4 * MS));
        assert!(parse_delay("10.77.1.2").is_err());
        assert!(parse_delay("host=1").is_err());
        assert!(parse_delay("10.77.1.2=-1").is_err());
    }
}
