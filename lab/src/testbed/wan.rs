//! WAN emulation for testbed runs: round trips and loss between every pair of hosts, for mirrormesh and rsync
//! alike, with what this kernel has (no `netem`): an iptables `NFQUEUE` rule on each host and one emulator process
//! per host ([`super::emulator`]) that holds each arriving packet's verdict for the one-way delay of its source, or
//! drops it.
//!
//! - `--profile world`: the round trips of [`super::world`] (origin NL, mirrors DE, LT, US-East, US-West, SG, BR,
//!   AU, ZA; 8 to 327 ms); each direction gets half.
//! - `--rtt-ms N`: every pair N ms; `--rtt-ms 0` runs the emulator and delays nothing (the control run that separates
//!   the emulator's own cost from the latency's).
//! - `--loss P`: every packet is lost with probability P, each direction on its own (a round trip loses
//!   `1 - (1 - P)^2`); with neither of the above, the emulator runs with no delay.
//!
//! On host `h` the rule is `iptables -t raw -A PREROUTING -i <h's veth> -s <testbed subnet> -j NFQUEUE`, and the
//! emulator is `mirrormesh-lab testbed emulate` under `ip netns exec`: both live in the host's namespace, so removing the
//! namespace (at the end, on Ctrl-C, by `testbed cleanup`) removes the rule and kills the emulator. Without
//! `--queue-bypass`, a host whose emulator died receives nothing, which shows (and [`Wan::check`] reports it) rather
//! than a run silently measured without delay.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use super::net::NetHost;
use super::world::{RTT_MS_MAX, RttProfile};

/// The NFQUEUE number every host's rule and emulator use (each host has its own namespace, so they do not meet).
const QUEUE_NUM: u16 = 0;

#[derive(Clone, Copy, ValueEnum)]
enum ProfileName {
    /// Origin NL; mirrors DE, LT, US-East, US-West, SG, BR, AU, ZA (then again from DE); 8 to 327 ms.
    World,
}

/// The WAN flags every testbed benchmark takes.
#[derive(Args, Clone)]
pub struct WanArgs {
    /// Round trips between hosts from a named profile (emulated with NFQUEUE; see BENCHMARKS.md, WAN).
    #[arg(long, value_enum, conflicts_with = "rtt_ms")]
    profile: Option<ProfileName>,
    /// The same round trip between every pair of hosts, ms (0: the emulator runs and delays nothing).
    #[arg(long)]
    rtt_ms: Option<f64>,
    /// Probability that a packet is lost, each direction on its own (0.001 is 0.1%).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
}

/// What the emulator is to do.
#[derive(Clone, Copy, Debug)]
pub struct WanSpec {
    pub rtt: RttProfile,
    pub loss: f64,
}

impl WanArgs {
    /// The emulation asked for; `None` when none was (no emulator runs).
    pub fn spec(&self) -> Result<Option<WanSpec>> {
        if !(0.0..1.0).contains(&self.loss) {
            bail!("--loss: {} is not a probability below 1", self.loss);
        }
        let rtt = match (self.profile, self.rtt_ms) {
            (Some(ProfileName::World), _) => RttProfile::World,
            (None, Some(ms)) if (0.0..=RTT_MS_MAX).contains(&ms) => RttProfile::Uniform(ms),
            (None, Some(ms)) => bail!("--rtt-ms: {ms} is not between 0 and {RTT_MS_MAX}"),
            (None, None) if self.loss > 0.0 => RttProfile::Uniform(0.0),
            (None, None) => return Ok(None),
        };
        Ok(Some(WanSpec { rtt, loss: self.loss }))
    }
}

impl fmt::Display for WanSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WAN emulated: {}, loss {}", self.rtt, self.loss)?;
        if self.loss > 0.0 {
            // Rounded to a millionth of a percent: no binary-fraction tails.
            write!(f, " ({}% each way)", (self.loss * 1e8).round() / 1e6)?;
        }
        Ok(())
    }
}

/// One host's emulator process.
struct Emulator {
    netns: String,
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    real_time: bool,
}

/// The emulators of a testbed's hosts, running.
pub struct Wan {
    pub spec: WanSpec,
    emulators: Vec<Emulator>,
}

/// CPU time of a process: in user space, and in the kernel on its behalf.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub user: Duration,
    /// Includes the network stack's work on every packet the emulator accepts: the kernel carries a packet on
    /// (IP, TCP, the receiving socket, the ACK it sends back out) inside the verdict's system call, work that
    /// softirq context would otherwise do for it.
    pub system: Duration,
}

impl Cpu {
    /// `/proc/PID/stat`'s utime and stime.
    pub fn of(pid: u32) -> Result<Cpu> {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // utime and stime are fields 14 and 15, 12 and 13 after the command name (in parentheses).
        let rest = stat.rsplit_once(')').with_context(|| format!("unexpected {path}"))?.1;
        let fields: Vec<u64> = rest.split_whitespace().skip(11).take(2).map(str::parse).collect::<Result<_, _>>()?;
        // CLK_TCK is 100 on Linux.
        match fields[..] {
            [user, system] => {
                Ok(Cpu { user: Duration::from_millis(user * 10), system: Duration::from_millis(system * 10) })
            }
            _ => bail!("short {path}"),
        }
    }

    pub fn total(&self) -> Duration {
        self.user + self.system
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, other: Cpu) -> Cpu {
        Cpu { user: self.user - other.user, system: self.system - other.system }
    }
}

impl std::iter::Sum for Cpu {
    fn sum<I: Iterator<Item = Cpu>>(iter: I) -> Cpu {
        iter.fold(Cpu::default(), |a, b| Cpu { user: a.user + b.user, system: a.system + b.system })
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.2} CPU s (user {:.2}, system {:.2})",
            self.total().as_secs_f64(),
            self.user.as_secs_f64(),
            self.system.as_secs_f64()
        )
    }
}

/// What the emulators did, added up over the hosts.
pub struct WanReport {
    pub emulators: usize,
    pub real_time: bool,
    pub cpu: Cpu,
    /// The counters of each emulator's last line, summed (`packets`, `bytes`, `held`, `dropped`, ...).
    pub counters: BTreeMap<String, u64>,
}

impl WanReport {
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

impl fmt::Display for WanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gb = self.counter("bytes") as f64 / 1e9;
        write!(
            f,
            "WAN emulator: {} processes ({}), {} for {} packets, {:.3} GB ({:.2} CPU s per GB, user {:.2}); held {}, \
             dropped (loss) {}, passed {}, unknown source {}; kernel queue full {}, socket full {}, verdict errors {}",
            self.emulators,
            if self.real_time { "SCHED_FIFO" } else { "normal priority" },
            self.cpu,
            self.counter("packets"),
            gb,
            if gb > 0.0 { self.cpu.total().as_secs_f64() / gb } else { 0.0 },
            if gb > 0.0 { self.cpu.user.as_secs_f64() / gb } else { 0.0 },
            self.counter("held"),
            self.counter("dropped"),
            self.counter("passed"),
            self.counter("unknown"),
            self.counter("kernel_queue_full"),
            self.counter("kernel_socket_full"),
            self.counter("verdict_errors"),
        )
    }
}

/// `host`'s one-way delay from `other`: half their round trip.
fn one_way(spec: &WanSpec, host: usize, other: usize) -> Duration {
    Duration::from_micros((spec.rtt.rtt_ms(host, other) * 500.0).round() as u64)
}

impl Wan {
    /// Starts one emulator per host (host 0 is the origin) and queues every host's incoming packets to it.
    pub fn start(hosts: &[NetHost], spec: WanSpec, seed: u64) -> Result<Wan> {
        let exe = std::env::current_exe()?;
        let mut wan = Wan { spec, emulators: Vec::new() };
        for (i, host) in hosts.iter().enumerate() {
            let mut command = host.command(&exe.to_string_lossy());
            command.args(["testbed", "emulate", "--host", &host.netns, "--queue", &QUEUE_NUM.to_string()]);
            command.args(["--loss", &spec.loss.to_string(), "--seed", &(seed.wrapping_add(i as u64)).to_string()]);
            for (j, other) in hosts.iter().enumerate().filter(|&(j, _)| j != i) {
                command.arg("--delay").arg(format!("{}={}", other.ip, one_way(&spec, i, j).as_micros()));
            }
            let mut child = command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting the WAN emulator")?;
            let stdout = child.stdout.take().context("emulator stdout")?;
            let mut emulator =
                Emulator { netns: host.netns.clone(), child, stdout: BufReader::new(stdout).lines(), real_time: false };
            let ready = emulator.stdout.next().transpose()?.unwrap_or_default();
            let Some(flags) = ready.strip_prefix("ready ") else {
                let status = emulator.child.wait()?;
                bail!("the WAN emulator on {} did not start ({status})", host.netns);
            };
            emulator.real_time = flags.contains("real_time=true");
            wan.emulators.push(emulator);
            let [a, b, c, _] = host.ip.octets();
            host.run(&[
                "iptables",
                "-w",
                "-t",
                "raw",
                "-A",
                "PREROUTING",
                "-i",
                &host.inner,
                "-s",
                &format!("{a}.{b}.{c}.0/24"),
                "-j",
                "NFQUEUE",
                "--queue-num",
                &QUEUE_NUM.to_string(),
            ])
            .context("queueing the host's packets to its emulator (is iptables installed?)")?;
        }
        Ok(wan)
    }

    /// CPU time the emulators used so far.
    pub fn cpu(&self) -> Result<Cpu> {
        self.emulators.iter().map(|e| Cpu::of(e.child.id())).sum()
    }

    /// Fails if an emulator is no longer running (its host would receive nothing).
    pub fn check(&self) -> Result<()> {
        for e in &self.emulators {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", e.child.id())).unwrap_or_default();
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
            if matches!(state, None | Some("Z") | Some("X")) {
                bail!("the WAN emulator on {} exited", e.netns);
            }
        }
        Ok(())
    }

    /// Stops the emulators (their standard input closes) and adds up what they counted.
    pub fn stop(mut self) -> Result<WanReport> {
        self.check()?;
        let cpu = self.cpu()?;
        let mut counters = BTreeMap::new();
        let real_time = self.emulators.iter().all(|e| e.real_time);
        let count = self.emulators.len();
        for mut e in self.emulators.drain(..) {
            drop(e.child.stdin.take());
            let mut last = None;
            for line in e.stdout.by_ref() {
                let line = line?;
                if let Some(rest) = line.strip_prefix("emulator: ") {
                    last = Some(rest.to_owned());
                }
            }
            let status = e.child.wait()?;
            let Some(last) = last else { bail!("the WAN emulator on {} ended without its counts ({status})", e.netns) };
            for (key, value) in last.split_whitespace().filter_map(|kv| kv.split_once('=')) {
                if let Ok(value) = value.parse::<u64>() {
                    *counters.entry(key.to_owned()).or_insert(0) += value;
                }
            }
        }
        Ok(WanReport { emulators: count, real_time, cpu, counters })
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        for e in &mut self.emulators {
            let _ = e.child.kill();
            let _ = e.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        wan: WanArgs,
    }

    fn spec(args: &[&str]) -> Result<Option<WanSpec>> {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))?.wan.spec()
    }

    #[test]
    fn flags_choose_the_emulation() {
        assert!(spec(&[]).unwrap().is_none(), "no flag, no emulator");
        let s = spec(&["--profile", "world", "--loss", "0.001"]).unwrap().unwrap();
        assert_eq!((s.rtt, s.loss), (RttProfile::World, 0.001));
        assert_eq!(spec(&["--rtt-ms", "0"]).unwrap().unwrap().rtt, RttProfile::Uniform(0.0), "the control run");
        assert_eq!(spec(&["--loss", "0.5"]).unwrap().unwrap().rtt, RttProfile::Uniform(0.0));
        assert!(spec(&["--profile", "world", "--rtt-ms", "40"]).is_err(), "one or the other");
        assert!(spec(&["--loss", "1"]).is_err());
        assert!(spec(&["--loss", "-0.1"]).is_err());
        assert!(spec(&["--rtt-ms", "5000"]).is_err());
        assert!(spec(&["--rtt-ms", "-1"]).is_err());
    }

    #[test]
    fn each_direction_gets_half_the_round_trip() {
        let s = WanSpec { rtt: RttProfile::World, loss: 0.0 };
        assert_eq!(one_way(&s, 0, 1), Duration::from_millis(4));
        assert_eq!(one_way(&s, 1, 0), Duration::from_millis(4));
        let s = WanSpec { rtt: RttProfile::Uniform(40.0), loss: 0.0 };
        assert_eq!(one_way(&s, 3, 5), Duration::from_millis(20));
    }
}
