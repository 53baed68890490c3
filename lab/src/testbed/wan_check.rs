//! `mirrormesh-lab testbed wan`: the WAN emulator checked on its own, with no daemons on the hosts.
//!
//! 1. `ping -U` between every pair of hosts, all pairs at once: each pair's average and mdev against its round
//!    trip in the profile (target: within [`PING_TOLERANCE_MS`]). `-U` times each echo from user space to user
//!    space: without it ping takes the reply's kernel receive timestamp, which is stamped before the reply waits in
//!    the origin's ingress queue, and it would show only half the delay. ping runs at real-time priority
//!    (`chrt -f`) so that what it measures is the emulator, not how long ping itself waited for a core on a busy
//!    machine (without it, ping -U read 40 ms pairs as 42.5 ms with a 2.9 ms mdev at load 7 on 2 cores).
//! 2. One-way UDP probes from the origin to mirror1, counted at mirror1: the share lost against `--loss`.
//! 3. Plain TCP copies from the origin to each mirror, one at a time, for each congestion control asked for: the
//!    rate achieved against the shaped rate, and the emulators' CPU seconds per GB moved.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::net::{self, Link, NetHost, Testbed};
use super::wan::{Wan, WanArgs};

/// A pair's average ping is to be this close to its round trip in the profile.
pub const PING_TOLERANCE_MS: f64 = 1.0;
/// Time between two pings of one pair.
const PING_INTERVAL: &str = "0.2";
/// ping's SCHED_FIFO priority: as high as the emulators' (a reply is read as soon as it is let through).
const PING_RT_PRIORITY: &str = "10";
/// Most UDP probes one run sends (they go out in one burst and must fit the receiver's socket buffer).
const PROBES_MAX: u32 = 1000;
/// After the last probe was sent, how long past the longest one-way delay the receiver still counts arrivals.
const PROBE_GRACE: Duration = Duration::from_secs(1);
const PROBE_PORT: u16 = 47_000;
const TCP_PORT: u16 = 47_001;

#[derive(Args)]
pub struct WanCheckArgs {
    /// Mirrors (the origin is one more host).
    #[arg(long, default_value_t = 8)]
    mirrors: usize,
    /// The origin's link, Mbit/s each way.
    #[arg(long, default_value_t = 100)]
    origin_mbit: u64,
    /// Every mirror's link, Mbit/s each way.
    #[arg(long, default_value_t = 100)]
    mirror_mbit: u64,
    #[command(flatten)]
    wan: WanArgs,
    /// Seed of the emulators' loss draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pings per pair.
    #[arg(long, default_value_t = 20)]
    pings: u32,
    /// One-way UDP probes from the origin to mirror1 (0: none).
    #[arg(long, default_value_t = 200)]
    probes: u32,
    /// MiB each TCP copy moves (0: no TCP copies).
    #[arg(long, default_value_t = 128)]
    tcp_mib: u64,
    /// TCP congestion controls to copy with, comma-separated (default: the system's).
    #[arg(long)]
    tcp_cc: Option<String>,
    /// Raise every host's largest TCP send and receive buffer (`tcp_wmem`, `tcp_rmem`) to this many MiB (default:
    /// the system's), to tell a window-limited copy from one the emulator slows.
    #[arg(long)]
    tcp_buffer_mib: Option<u64>,
}

/// The load averages (1, 5, 15 minutes) as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The congestion controls named in `list` (comma-separated), each checked against what the kernel offers; the
/// namespace default of `host` when `list` is `None`.
pub fn tcp_ccs(list: Option<&str>, host: &NetHost) -> Result<Vec<String>> {
    let Some(list) = list else { return Ok(vec![host.tcp_cc()?]) };
    let available = net::tcp_cc_available()?;
    let names: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
    if names.is_empty() {
        bail!("--tcp-cc: no congestion control named");
    }
    for name in &names {
        if !available.contains(name) {
            bail!("TCP congestion control {name:?} is not available here (available: {})", available.join(" "));
        }
    }
    Ok(names)
}

/// What ping's summary says.
#[derive(Debug, PartialEq)]
struct PingSummary {
    sent: u32,
    received: u32,
    /// Average and mdev, ms (`None` when no reply came back).
    avg_mdev: Option<(f64, f64)>,
}

fn parse_ping(text: &str) -> Result<PingSummary> {
    let counts = text.lines().find(|l| l.contains("packets transmitted")).context("no ping summary")?;
    let mut numbers = counts.split(',').map(|part| part.split_whitespace().next().and_then(|n| n.parse().ok()));
    let sent = numbers.next().flatten().context("ping: packets transmitted")?;
    let received = numbers.next().flatten().context("ping: received")?;
    let times = text
        .lines()
        .find_map(|l| l.strip_prefix("rtt min/avg/max/mdev = "))
        // "A/B/C/D ms", with ", pipe N" after it when several pings were out at once.
        .map(|t| t.split(" ms").next().unwrap_or(t).split('/').map(str::parse::<f64>).collect::<Result<Vec<_>, _>>())
        .transpose()?
        .and_then(|v| (v.len() == 4).then(|| (v[1], v[3])));
    Ok(PingSummary { sent, received, avg_mdev: times })
}

/// The congestion control of a connected TCP socket.
fn socket_cc(stream: &TcpStream) -> String {
    let mut buf = [0u8; 16];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` and `len` are live and `len` is the buffer's size.
    let ret = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_CONGESTION, buf.as_mut_ptr().cast(), &mut len)
    };
    if ret != 0 {
        return "unknown".to_owned();
    }
    let name = &buf[..(len as usize).min(buf.len())];
    String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
}

fn join<T>(handle: std::thread::JoinHandle<Result<T>>) -> Result<T> {
    handle.join().map_err(|_| anyhow::anyhow!("a thread in a namespace panicked"))?
}

fn pings(bed: &Testbed, wan: &Wan, count: u32) -> Result<()> {
    let n = bed.hosts.len();
    let mut children = Vec::new();
    for a in 0..n {
        for b in a + 1..n {
            let child = bed.hosts[a]
                .command("chrt")
                .args(["-f", PING_RT_PRIORITY, "ping", "-U", "-q", "-c", &count.to_string(), "-i", PING_INTERVAL])
                .arg(bed.hosts[b].ip.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting ping (is iputils-ping installed?)")?;
            children.push((a, b, child));
        }
    }
    println!(
        "chrt -f {PING_RT_PRIORITY} ping -U -c {count} -i {PING_INTERVAL}, all {} pairs at once; avg and mdev of each pair against its round \
         trip in the profile:",
        children.len()
    );
    println!("| pair | profile ms | ping avg ms | mdev ms | avg - profile ms | replies |");
    println!("|---|---|---|---|---|---|");
    let (mut within, mut worst, mut measured) = (0, 0.0f64, 0);
    for (a, b, child) in children {
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let PingSummary { sent, received, avg_mdev } =
            parse_ping(&text).with_context(|| format!("ping: {}", String::from_utf8_lossy(&out.stderr)))?;
        let profile = wan.spec.rtt.rtt_ms(a, b);
        let pair = format!("{} - {}", wan.spec.rtt.host_name(a), wan.spec.rtt.host_name(b));
        match avg_mdev {
            Some((avg, mdev)) => {
                let diff = avg - profile;
                measured += 1;
                worst = worst.max(diff.abs());
                if diff.abs() <= PING_TOLERANCE_MS {
                    within += 1;
                }
                println!("| {pair} | {profile:.1} | {avg:.2} | {mdev:.2} | {diff:+.2} | {received}/{sent} |");
            }
            None => println!("| {pair} | {profile:.1} | - | - | - | {received}/{sent} |"),
        }
    }
    println!(
        "pairs within {PING_TOLERANCE_MS} ms of the profile: {within} of {measured} measured (largest |avg - profile| \
         {worst:.2} ms)"
    );
    Ok(())
}

fn probes(bed: &Testbed, wan: &Wan, count: u32) -> Result<()> {
    if count > PROBES_MAX {
        bail!("--probes: at most {PROBES_MAX}");
    }
    let (from, to) = (&bed.hosts[0], &bed.hosts[1]);
    let to_ip = to.ip;
    let window = Duration::from_secs_f64(wan.spec.rtt.rtt_ms(0, 1) / 2000.0) + PROBE_GRACE;
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<Instant>();
    let receiver = to.spawn_in(move || {
        let socket = UdpSocket::bind((to_ip, PROBE_PORT))?;
        ready_tx.send(())?;
        let mut seen = BTreeSet::new();
        let mut deadline: Option<Instant> = None;
        let mut buf = [0u8; 64];
        loop {
            if deadline.is_none()
                && let Ok(sent_at) = done_rx.try_recv()
            {
                deadline = Some(sent_at + window);
            }
            // Until the sender is done, wake now and then to look for its word; then wait out the window: a lost
            // probe shows only as one that never comes.
            let wait = match deadline {
                Some(d) if Instant::now() >= d => break,
                Some(d) => d - Instant::now(),
                None => Duration::from_millis(100),
            };
            socket.set_read_timeout(Some(wait))?;
            match socket.recv(&mut buf) {
                Ok(n) if n >= 4 => {
                    seen.insert(u32::from_be_bytes(buf[..4].try_into()?));
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(seen.into_iter().filter(|&s| s < count).count() as u32)
    });
    ready_rx.recv().context("the probe receiver did not start")?;
    let sender = from.spawn_in(move || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let mut probe = [0u8; 64];
        for seq in 0..count {
            probe[..4].copy_from_slice(&seq.to_be_bytes());
            socket.send_to(&probe, (to_ip, PROBE_PORT))?;
        }
        done_tx.send(Instant::now())?;
        Ok(())
    });
    join(sender)?;
    let received = join(receiver)?;
    let lost = 1.0 - f64::from(received) / f64::from(count);
    println!(
        "UDP one-way probes {} -> {}: {count} sent, {received} received: lost {lost:.3} (told {})",
        wan.spec.rtt.host_name(0),
        wan.spec.rtt.host_name(1),
        wan.spec.loss
    );
    Ok(())
}

/// One TCP copy of `mib` MiB from `from` to `to`: `(seconds from connect to the last byte, congestion control)`.
fn tcp_copy(from: &NetHost, to: &NetHost, mib: u64) -> Result<(Duration, String)> {
    let to_ip = to.ip;
    let (ready_tx, ready_rx) = mpsc::channel();
    let receiver = to.spawn_in(move || {
        let listener = TcpListener::bind((to_ip, TCP_PORT))?;
        ready_tx.send(())?;
        let (mut stream, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        Ok((total, Instant::now()))
    });
    ready_rx.recv().context("the TCP receiver did not start")?;
    let t0 = Instant::now();
    let sender = from.spawn_in(move || {
        let mut stream = TcpStream::connect((to_ip, TCP_PORT))?;
        let cc = socket_cc(&stream);
        let buf = vec![0x5au8; 1 << 20];
        for _ in 0..mib {
            stream.write_all(&buf)?;
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok(cc)
    });
    let cc = join(sender)?;
    let (total, done) = join(receiver)?;
    if total != mib << 20 {
        bail!("the TCP copy moved {total} bytes, not {}", mib << 20);
    }
    Ok((done - t0, cc))
}

fn tcp_copies(bed: &Testbed, wan: &Wan, a: &WanCheckArgs) -> Result<()> {
    let ccs = tcp_ccs(a.tcp_cc.as_deref(), &bed.hosts[0])?;
    let shaped = a.origin_mbit.min(a.mirror_mbit) as f64;
    println!();
    if let Some(mib) = a.tcp_buffer_mib {
        let bytes = mib << 20;
        for host in &bed.hosts {
            host.run(&["sysctl", "-q", "-w", &format!("net.ipv4.tcp_wmem=4096 16384 {bytes}")])?;
            host.run(&["sysctl", "-q", "-w", &format!("net.ipv4.tcp_rmem=4096 131072 {bytes}")])?;
        }
        println!("every host's tcp_wmem and tcp_rmem raised to at most {mib} MiB");
    }
    println!("TCP copies of {} MiB from the origin, one at a time (time from connect to the last byte):", a.tcp_mib);
    println!("| to | RTT ms | cc | s | Mbit/s | / shaped ({shaped} Mbit/s) |");
    println!("|---|---|---|---|---|---|");
    let cpu0 = wan.cpu()?;
    let mut moved = 0u64;
    for cc in &ccs {
        for host in &bed.hosts {
            host.set_tcp_cc(cc)?;
        }
        for m in 1..bed.hosts.len() {
            let (elapsed, used) = tcp_copy(&bed.hosts[0], &bed.hosts[m], a.tcp_mib)?;
            moved += a.tcp_mib << 20;
            let mbit = (a.tcp_mib << 20) as f64 * 8.0 / elapsed.as_secs_f64() / 1e6;
            println!(
                "| {} | {:.1} | {used} | {:.2} | {mbit:.1} | {:.3} |",
                wan.spec.rtt.host_name(m),
                wan.spec.rtt.rtt_ms(0, m),
                elapsed.as_secs_f64(),
                mbit / shaped
            );
        }
    }
    let cpu = wan.cpu()? - cpu0;
    let gb = moved as f64 / 1e9;
    println!(
        "emulators' CPU during the copies: {cpu} for {gb:.3} GB of payload: {:.2} CPU s per GB (user {:.2})",
        cpu.total().as_secs_f64() / gb,
        cpu.user.as_secs_f64() / gb
    );
    Ok(())
}

pub fn run(a: &WanCheckArgs) -> Result<()> {
    let Some(spec) = a.wan.spec()? else { bail!("give --profile, --rtt-ms or --loss: the emulation to check") };
    if a.mirrors == 0 || a.mirrors >= net::HOSTS_MAX {
        bail!("--mirrors: 1 to {}", net::HOSTS_MAX - 1);
    }
    super::cleanup_on_interrupt()?;
    let load_before = load_average();
    let mut links = vec![Link { up_mbit: Some(a.origin_mbit), down_mbit: Some(a.origin_mbit) }];
    links.extend(vec![Link { up_mbit: Some(a.mirror_mbit), down_mbit: Some(a.mirror_mbit) }; a.mirrors]);
    let bed = Testbed::create(&links).context("creating the testbed (needs root)")?;
    let wan = Wan::start(&bed.hosts, spec, a.seed)?;
    println!(
        "testbed wan: {} mirrors; links (each way): origin {} Mbit/s, mirrors {} Mbit/s; {spec}",
        a.mirrors, a.origin_mbit, a.mirror_mbit
    );
    if a.pings > 0 {
        pings(&bed, &wan, a.pings)?;
    }
    if a.probes > 0 {
        probes(&bed, &wan, a.probes)?;
    }
    if a.tcp_mib > 0 {
        tcp_copies(&bed, &wan, a)?;
    }
    let report = wan.stop()?;
    println!("{report}");
    println!("load average (1, 5, 15 min) before: {load_before}; after: {}", load_average());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summaries_parse() {
        let text = "PING 10.77.1.2 (10.77.1.2) 56(84) bytes of data.\n\n--- 10.77.1.2 ping statistics ---\n\
                    20 packets transmitted, 19 received, 5% packet loss, time 3805ms\n\
                    rtt min/avg/max/mdev = 40.089/40.164/40.319/0.056 ms\n";
        let summary = |sent, received, avg_mdev| PingSummary { sent, received, avg_mdev };
        assert_eq!(parse_ping(text).unwrap(), summary(20, 19, Some((40.164, 0.056))));
        let piped = "20 packets transmitted, 20 received, 0% packet loss, time 3800ms, pipe 2\n\
                     rtt min/avg/max/mdev = 203.012/203.300/203.500/0.100 ms, pipe 2\n";
        assert_eq!(parse_ping(piped).unwrap(), summary(20, 20, Some((203.3, 0.1))));
        let none = "--- x ping statistics ---\n20 packets transmitted, 0 received, 100% packet loss, time 1ms\n";
        assert_eq!(parse_ping(none).unwrap(), summary(20, 0, None));
        let errors = "20 packets transmitted, 3 received, +17 errors, 85% packet loss, time 1ms\n";
        assert_eq!(parse_ping(errors).unwrap(), summary(20, 3, None));
        assert!(parse_ping("ping: unknown host").is_err());
    }
}
