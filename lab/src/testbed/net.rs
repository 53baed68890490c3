//! Hosts in network namespaces on one bridge, each with its own address and links shaped with `tc tbf`.
//!
//! Everything is named with a prefix of this process's id (`mmtb<pid>`), and removed on drop, on SIGINT/SIGTERM
//! (see [`super::interrupts`]) and by `mirrormesh-lab testbed cleanup`, which removes whatever an earlier run that was
//! killed outright left behind.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{Context, Result, bail};

use mirrormesh::local_fabric::Host;

/// Every name the testbed creates starts with this.
pub const PREFIX: &str = "mmtb";
/// The hosts' subnet is 10.77.X.0/24 for the first X no address in this namespace uses yet; the bridge is .254,
/// hosts from .1.
pub const SUBNET_PREFIX: [u8; 2] = [10, 77];
/// Most hosts on the bridge.
pub const HOSTS_MAX: usize = 200;

/// One direction's shaping of a host's link, in Mbit/s (`None`: unshaped).
#[derive(Clone, Copy, Debug, Default)]
pub struct Link {
    pub up_mbit: Option<u64>,
    pub down_mbit: Option<u64>,
}

pub struct Testbed {
    tag: String,
    pub hosts: Vec<NetHost>,
}

/// A third octet for 10.77.X.0/24 that no address here uses (concurrent testbeds get different ones).
fn free_subnet() -> Result<u8> {
    let used = run_output(&["ip", "-o", "-4", "addr", "show"])?;
    let start = (std::process::id() % 256) as usize;
    (0..256)
        .map(|k| ((start + k) % 256) as u8)
        .find(|x| !used.contains(&format!(" {}.{}.{x}.", SUBNET_PREFIX[0], SUBNET_PREFIX[1])))
        .context("every 10.77.X.0/24 subnet is in use")
}

pub struct NetHost {
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The veth end inside the namespace (its egress is the host's upload).
    pub inner: String,
    /// The veth end on the bridge (its egress is the host's download).
    pub outer: String,
    pub link: Link,
}

impl NetHost {
    pub fn host(&self) -> Host {
        Host { ip: IpAddr::V4(self.ip), netns: Some(self.netns.clone()) }
    }

    /// Bytes this host has sent on its link so far (IP packets, headers included).
    pub fn tx_bytes(&self) -> Result<u64> {
        self.statistic("tx_bytes")
    }

    /// Packets this host sent that never went out on its link, so far: dropped by its own link queue (the `tbf`
    /// shaping its upload), or by its veth (`tx_dropped`: the other end's backlog was full).
    pub fn upload_drops(&self) -> Result<u64> {
        let text = run_output(&["tc", "-s", "-n", &self.netns, "qdisc", "show", "dev", &self.inner])?;
        let queue = parse_qdisc_drops(&text).with_context(|| format!("qdisc drops of {}: {text:?}", self.netns))?;
        let veth = self.statistic("tx_dropped")?;
        Ok(queue + veth)
    }

    /// One of the link's counters (`/sys/class/net/<veth>/statistics/<name>`) inside the namespace.
    fn statistic(&self, name: &str) -> Result<u64> {
        let path = format!("/sys/class/net/{}/statistics/{name}", self.inner);
        let text = run_output(&["ip", "netns", "exec", &self.netns, "cat", &path])?;
        text.trim().parse().with_context(|| format!("{name} of {}: {text:?}", self.netns))
    }

    /// Cuts (`false`) or restores (`true`) this host's link: its end on the bridge goes down or up, so packets
    /// either way are dropped while it is down.
    pub fn set_link(&self, up: bool) -> Result<()> {
        run(&["ip", "link", "set", &self.outer, if up { "up" } else { "down" }])
    }

    /// A command run inside this host's namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, program]);
        c
    }

    /// Runs `args` inside this host's namespace to the end; fails with its stderr if it fails.
    pub fn run(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["ip", "netns", "exec", &self.netns];
        all.extend(args);
        run(&all)
    }

    /// Sets the TCP congestion control of this host's connections to the other hosts: on its route to the
    /// testbed's subnet (`congctl`), which every connection on it takes when it opens, an accepted one included.
    /// (The namespace's default, `net.ipv4.tcp_congestion_control`, can only name what the machine's
    /// `tcp_allowed_congestion_control` lists outside the initial namespace; the route can name any loaded one.)
    pub fn set_tcp_cc(&self, name: &str) -> Result<()> {
        let [a, b, c, _] = self.ip.octets();
        let subnet = format!("{a}.{b}.{c}.0/24");
        let src = self.ip.to_string();
        run(&[
            "ip",
            "-n",
            &self.netns,
            "route",
            "replace",
            &subnet,
            "dev",
            &self.inner,
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            &src,
            "congctl",
            name,
        ])
    }

    /// The namespace's default TCP congestion control (what connections use unless [`NetHost::set_tcp_cc`] set
    /// one).
    pub fn tcp_cc(&self) -> Result<String> {
        let out = run_output(&["ip", "netns", "exec", &self.netns, "sysctl", "-n", "net.ipv4.tcp_congestion_control"])?;
        Ok(out.trim().to_owned())
    }

    /// Runs `f` on a new thread that has entered this host's network namespace (sockets it opens live there).
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on this thread only, with a namespace descriptor that is open for the call.
            let ret = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            if ret != 0 {
                return Err(std::io::Error::last_os_error()).with_context(|| format!("entering {path}"));
            }
            f()
        })
    }
}

/// The TCP congestion controls this kernel offers.
pub fn tcp_cc_available() -> Result<Vec<String>> {
    let path = "/proc/sys/net/ipv4/tcp_available_congestion_control";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(text.split_whitespace().map(str::to_owned).collect())
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn run_output(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The drops of the first qdisc in `tc -s qdisc show` output (`... Sent B bytes P pkt (dropped D, ...`); `None`
/// if the text has no drop count.
fn parse_qdisc_drops(text: &str) -> Option<u64> {
    text.split("(dropped ").nth(1)?.split(',').next()?.trim().parse().ok()
}

/// `tc tbf` on `dev` (in namespace `netns` if given): `mbit` Mbit/s with a bucket of 10 ms of traffic (at least
/// 32 KiB) and at most 50 ms of queue.
fn shape(netns: Option<&str>, dev: &str, mbit: u64) -> Result<()> {
    let burst = (mbit * 1_000_000 / 8 / 100).max(32 << 10);
    let rate = format!("{mbit}mbit");
    let burst = format!("{burst}");
    let mut args: Vec<&str> = vec!["tc"];
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst, "latency", "50ms"]);
    run(&args)
}

impl Testbed {
    /// Creates one host per entry of `links` (host 0 is meant for the origin), all on one bridge.
    pub fn create(links: &[Link]) -> Result<Self> {
        if links.is_empty() || links.len() > HOSTS_MAX {
            bail!("a testbed has 1 to {HOSTS_MAX} hosts, not {}", links.len());
        }
        let tag = format!("{PREFIX}{}", std::process::id());
        let bridge = format!("{tag}br");
        let mut bed = Testbed { tag: tag.clone(), hosts: Vec::new() };
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        let x = free_subnet()?;
        let [a, b] = SUBNET_PREFIX;
        let bridge_ip = format!("{a}.{b}.{x}.254/24");
        run(&["ip", "addr", "add", &bridge_ip, "dev", &bridge])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        for (i, link) in links.iter().enumerate() {
            let netns = format!("{tag}h{i}");
            let outer = format!("{tag}o{i}");
            let inner = format!("{tag}i{i}");
            let ip = Ipv4Addr::new(a, b, x, (i + 1) as u8);
            run(&["ip", "netns", "add", &netns])?;
            // IPv4 only: no IPv6 neighbour discovery or multicast listener reports in the byte counts.
            for key in ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"] {
                run(&["ip", "netns", "exec", &netns, "sysctl", "-q", "-w", key])?;
            }
            bed.hosts.push(NetHost {
                netns: netns.clone(),
                ip,
                inner: inner.clone(),
                outer: outer.clone(),
                link: *link,
            });
            run(&["ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
            run(&["ip", "link", "set", &inner, "netns", &netns])?;
            run(&["ip", "link", "set", &outer, "master", &bridge, "up"])?;
            run(&["ip", "-n", &netns, "addr", "add", &format!("{ip}/24"), "dev", &inner])?;
            run(&["ip", "-n", &netns, "link", "set", &inner, "up"])?;
            run(&["ip", "-n", &netns, "link", "set", "lo", "up"])?;
            if let Some(up) = link.up_mbit {
                shape(Some(&netns), &inner, up)?;
            }
            if let Some(down) = link.down_mbit {
                shape(None, &outer, down)?;
            }
        }
        Ok(bed)
    }

    /// Removes everything this testbed created.
    pub fn destroy(&mut self) {
        remove_tagged(&self.tag);
        self.hosts.clear();
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// Removes the namespaces and links whose names start with `tag` (processes still running in a namespace keep it
/// alive until they exit; the name is gone at once).
pub fn remove_tagged(tag: &str) -> usize {
    let mut removed = 0;
    if let Ok(list) = run_output(&["ip", "netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(tag)) {
            // Kill what still runs inside first (a daemon of an interrupted run).
            if let Ok(pids) = run_output(&["ip", "netns", "pids", ns]) {
                for pid in pids.split_whitespace().filter_map(|p| p.parse::<libc::pid_t>().ok()) {
                    // SAFETY: kill(2) with a pid listed in our own namespace and SIGKILL; no memory is passed.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if run(&["ip", "netns", "del", ns]).is_ok() {
                removed += 1;
            }
        }
    }
    if let Ok(list) = run_output(&["ip", "-o", "link", "show"]) {
        for name in list.lines().filter_map(|l| l.split(':').nth(1)).map(|n| n.trim().split('@').next().unwrap_or("")) {
            if name.starts_with(tag) && run(&["ip", "link", "del", name]).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qdisc_drops_parse() {
        let text = "qdisc tbf 8001: root refcnt 2 rate 200Mbit burst 250000b lat 50ms \n \
                    Sent 248106843 bytes 170713 pkt (dropped 4021, overlimits 39213 requeues 0) \n \
                    backlog 0b 0p requeues 0\n";
        assert_eq!(parse_qdisc_drops(text), Some(4021));
        assert_eq!(parse_qdisc_drops("qdisc noqueue 0: root refcnt 2"), None);
    }
}
