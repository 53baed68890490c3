//! Fabric membership: the nodes this node knows (id, control-plane addresses, when last seen, how learned), which
//! addresses it accepts from peers, when it forgets a node, and which nodes it keeps connections to (the mesh
//! rule). The shell feeds it connections, peers' own address advertisements and the member lists peers exchange
//! (`control::Members`), with the wall-clock time, and carries out what it says: dial [`Membership::wanted`],
//! persist [`Membership::take_dirty`], hand out [`Membership::records_for`]. The simulator builds its topology
//! with the same [`mesh_pick`].
//!
//! Rules:
//! 1. **Addresses** ([`check_addr`]): an address from a peer is kept only if its port is not 0 and its ip is not
//!    unspecified, multicast or broadcast, not loopback unless this node's own addresses are loopback, and not
//!    link-local unless this node's own addresses are link-local ([`AddrScope`]). A peer's own advertisement may
//!    name the unspecified ip, meaning "the ip you see me at" ([`check_addrs`]). At most
//!    [`PEER_ADDRS_MAX`] addresses are kept per member; every rejection is reported to the shell, which counts it.
//! 2. **Allow list**: with `network.allow` set, a node outside it is never stored, handed out or dialled.
//! 3. **Caps**: at most [`MembershipConfig::members_max`] members ([`MEMBERS_MAX`] by default); a member learned
//!    from a list is dropped (and reported) when the table is full. A list names at most
//!    `control::MEMBERS_PER_MESSAGE_MAX` members.
//! 4. **Who says what**: a member's own advertisement replaces its addresses; what other peers report about it only
//!    adds addresses while there is room, so a lying peer cannot push a member's real addresses out (a wrong
//!    address costs a failed dial: the handshake proves the id). A reported "last seen" only moves a member's
//!    forward, and is relative (`seen_ago_ms`), so no two clocks are compared.
//! 5. **Forgetting**: a member neither connected nor reported seen for `forget_after_ms` is forgotten, unless it
//!    is in the bootstrap list or is an origin (the config names those).
//! 6. **Mesh** ([`Membership::wanted`], [`mesh_pick`]): an origin keeps a connection to every member. A mirror
//!    keeps one to every origin and, once it has a member list (from a peer, or persisted), while it knows at most
//!    [`MESH_FULL_MIRRORS_MAX`] other mirrors, to every one of them; past that, to the [`MESH_DIALS`] mirrors that
//!    rank lowest under a hash keyed by its own id (a random choice, stable while members come and go). Before its
//!    first list, and whenever it has been connected to nobody for [`BOOTSTRAP_FALLBACK_MS`] (the origin may be
//!    down), it also dials the peers its bootstrap list names (a joining mirror meets the peers its operator named
//!    as soon as the origin, so it does not take its first chunks from the origin alone). A mirror never closes a
//!    connection another node dialed, so its degree is its own dials plus those of the mirrors that picked it:
//!    about `2 x MESH_DIALS` on average; the shell closes the connections it dialed that the rule no longer wants.
//!
//! 7. **Exchange** ([`Exchanges`]): besides the exchanges on connecting, one connected peer is asked in turn,
//!    [`MEMBERS_POLL_FIRST_MS`] after the last news (a member this node did not know) and then twice as long after
//!    each ask, up to [`MEMBERS_POLL_MAX_MS`]: a fabric that changes exchanges often, one whose members stay the same
//!    says little beyond its keep-alives. (Telling every peer of each newcomer instead slowed 64 mirrors starting
//!    together: 14-20 s to start instead of 5-7, and the origin sent up to 1.54 x.)
//!
//! Time here is the wall clock ([`Timestamp`]): "last seen" is persisted and must mean the same after a restart.
//! A clock stepped by hours moves forgetting by as much, which `forget_after_ms` (days) absorbs. The exchange's
//! timers are monotonic ([`Mono`]).
//!
//! Addresses are `core::net` values (plain data; this crate does no networking).

use core::net::{IpAddr, SocketAddr};
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::timestamp::{Mono, Timestamp};

/// Most members a node keeps. A fabric is its Tier-1 mirrors and the origin: tens of nodes today, and the simulator
/// runs 1,000 (`simulations/scenarios/release-1000.toml`); a member costs about 200 bytes, so the cap is a few
/// hundred KiB, and it also bounds a `Members` message this node sends (`control::MEMBERS_PER_MESSAGE_MAX`).
pub const MEMBERS_MAX: usize = 1024;
/// Most addresses kept per member (control plane) and per peer (data plane). A node listens on one address per
/// address family it uses; four leave room for IPv4, IPv6 and a change of address, and bound what one peer's word
/// can make this node dial.
pub const PEER_ADDRS_MAX: usize = 4;
/// A mirror connects to every other mirror while it knows at most this many. A full mesh lets every asker the origin
/// redirects (super-seeding) reach the chunk's first holder directly and gives the scheduler every peer's spare
/// upload; its cost grows with N^2 fabric-wide (hellos, keep-alives, and every `Have` batch to every peer). 64
/// mirrors with about 24 neighbours each kept the origin at <= 1.1 x per update (`tests/reliability.rs`), so 24 is
/// the degree at which the mesh is known to work; the mean degree past the limit ([`MESH_DIALS`] x 2) is the same,
/// so crossing it changes no mirror's neighbourhood much.
pub const MESH_FULL_MIRRORS_MAX: usize = 24;
/// Past [`MESH_FULL_MIRRORS_MAX`], how many mirrors each mirror dials (it is dialed by about as many).
pub const MESH_DIALS: usize = MESH_FULL_MIRRORS_MAX / 2;
/// A mirror connected to nobody for this long also dials its bootstrap peers (the origin may be down). A dial to a
/// live origin completes in a few round trips: under a second even across the world.
pub const BOOTSTRAP_FALLBACK_MS: u64 = 5_000;
/// Default of `network.forget_after_secs`, in milliseconds: a member unseen for a week is forgotten. A mirror down
/// for a long weekend of maintenance is still redialled when it returns; redialling a gone node costs one failed
/// dial per back-off interval (at most every 30 s).
pub const FORGET_AFTER_MS_DEFAULT: u64 = 7 * 24 * 3600 * 1000;

/// How a member first became known. A member from the bootstrap list is shown as such whatever else said it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Learned {
    /// Listed in `network.bootstrap`.
    Bootstrap,
    /// Named in a member list a peer sent.
    Exchange,
    /// It connected to this node first.
    Inbound,
}

impl Learned {
    pub fn name(self) -> &'static str {
        match self {
            Learned::Bootstrap => "bootstrap",
            Learned::Exchange => "exchange",
            Learned::Inbound => "inbound",
        }
    }
}

/// One known node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Control-plane addresses (QUIC over UDP), checked, at most [`PEER_ADDRS_MAX`]; its own advertisement first.
    pub addrs: Vec<SocketAddr>,
    /// When it was last connected here or reported seen by a peer.
    pub last_seen: Timestamp,
    pub learned: Learned,
}

/// The kinds of address beside routable ones that this node accepts from peers: those its own addresses are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrScope {
    pub loopback: bool,
    pub link_local: bool,
}

impl AddrScope {
    /// The scope of a node with these addresses of its own (its configured listen addresses): a node on loopback
    /// (a lab, the tests) accepts loopback addresses, one on a link-local network link-local ones. An unspecified
    /// address ("every interface") accepts neither: such a node talks to others over routable addresses.
    pub fn of<'a>(own: impl IntoIterator<Item = &'a IpAddr>) -> Self {
        let mut scope = AddrScope::default();
        for ip in own {
            let ip = canonical(*ip);
            scope.loopback |= ip.is_loopback();
            scope.link_local |= is_link_local(&ip);
        }
        scope
    }
}

/// Why an address from a peer was not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddrRejection {
    /// Port 0.
    PortZero,
    /// 0.0.0.0 or :: where a real address is needed.
    Unspecified,
    /// Multicast or broadcast.
    Multicast,
    Loopback,
    LinkLocal,
    /// Beyond [`PEER_ADDRS_MAX`] for one peer.
    OverCap,
}

impl AddrRejection {
    pub fn name(self) -> &'static str {
        match self {
            AddrRejection::PortZero => "port_zero",
            AddrRejection::Unspecified => "unspecified",
            AddrRejection::Multicast => "multicast",
            AddrRejection::Loopback => "loopback",
            AddrRejection::LinkLocal => "link_local",
            AddrRejection::OverCap => "over_cap",
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// Whether this node may dial `addr`, learned from a peer (rule 1).
pub fn check_addr(addr: &SocketAddr, scope: AddrScope) -> Result<(), AddrRejection> {
    let ip = canonical(addr.ip());
    if addr.port() == 0 {
        return Err(AddrRejection::PortZero);
    }
    if ip.is_unspecified() {
        return Err(AddrRejection::Unspecified);
    }
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_multicast() || broadcast {
        return Err(AddrRejection::Multicast);
    }
    if ip.is_loopback() && !scope.loopback {
        return Err(AddrRejection::Loopback);
    }
    if is_link_local(&ip) && !scope.link_local {
        return Err(AddrRejection::LinkLocal);
    }
    Ok(())
}

/// Addresses checked: those kept (in the order given, duplicates dropped, at most [`PEER_ADDRS_MAX`]) and why each
/// other one was not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    pub kept: Vec<SocketAddr>,
    pub rejected: Vec<AddrRejection>,
}

/// Checks a list of addresses from a peer. With `observed` set the list is the peer's own advertisement, where an
/// unspecified ip means "the ip you see me at" and is replaced by `observed`; otherwise an unspecified ip is
/// refused.
pub fn check_addrs(addrs: &[SocketAddr], observed: Option<IpAddr>, scope: AddrScope) -> Checked {
    let mut out = Checked::default();
    for addr in addrs {
        let mut addr = *addr;
        if addr.ip().is_unspecified()
            && let Some(ip) = observed
        {
            addr.set_ip(ip);
        }
        match check_addr(&addr, scope) {
            Err(why) => out.rejected.push(why),
            Ok(()) if out.kept.contains(&addr) => {}
            Ok(()) if out.kept.len() == PEER_ADDRS_MAX => out.rejected.push(AddrRejection::OverCap),
            Ok(()) => out.kept.push(addr),
        }
    }
    out
}

/// The mesh rule's parameters (the defaults are the named constants; tests and scenarios may use others).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshRule {
    /// See [`MESH_FULL_MIRRORS_MAX`].
    pub full_mirrors_max: usize,
    /// See [`MESH_DIALS`].
    pub dials: usize,
}

impl Default for MeshRule {
    fn default() -> Self {
        Self { full_mirrors_max: MESH_FULL_MIRRORS_MAX, dials: MESH_DIALS }
    }
}

/// The mirrors `me` (a mirror) dials among `mirrors` (other mirrors; `me` and origins are skipped if present): all of
/// them up to `rule.full_mirrors_max`, else the `rule.dials` whose hash keyed by `me` is lowest. `key` gives a node's
/// id as bytes (the same bytes on every node).
pub fn mesh_pick<'a, P: Ord + Clone + 'a>(
    me: &P,
    mirrors: impl IntoIterator<Item = &'a P>,
    rule: MeshRule,
    key: fn(&P) -> Vec<u8>,
) -> BTreeSet<P> {
    let others: BTreeSet<&P> = mirrors.into_iter().filter(|p| *p != me).collect();
    if others.len() <= rule.full_mirrors_max {
        return others.into_iter().cloned().collect();
    }
    let salt = blake3::derive_key("mirrormesh mesh rank v1", &key(me));
    let mut ranked: Vec<([u8; 32], &P)> =
        others.into_iter().map(|p| (*blake3::keyed_hash(&salt, &key(p)).as_bytes(), p)).collect();
    ranked.sort();
    ranked.into_iter().take(rule.dials).map(|(_, p)| p.clone()).collect()
}

/// A member as one node tells another about it (the core's side of `control::MemberEntry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRecord<P> {
    pub id: P,
    pub addrs: Vec<SocketAddr>,
    /// 0 while the sender is connected to it.
    pub seen_ago_ms: u64,
}

/// What feeding the table did, for the shell to count and act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report<P> {
    /// Addresses not kept, and why.
    pub rejected: Vec<AddrRejection>,
    /// Members named that `network.allow` does not list (dropped).
    pub not_allowed: usize,
    /// Members dropped because the table is full.
    pub full: usize,
    /// Members named without any address this node may dial (dropped if unknown).
    pub without_addrs: usize,
    /// Members this node did not know before.
    pub new: Vec<P>,
}

impl<P> Default for Report<P> {
    fn default() -> Self {
        Self { rejected: Vec::new(), not_allowed: 0, full: 0, without_addrs: 0, new: Vec::new() }
    }
}

#[derive(Clone, Debug)]
pub struct MembershipConfig<P> {
    pub me: P,
    /// This node is an origin (it keeps a connection to every member).
    pub origin: bool,
    /// The origins this node trusts (always wanted, never forgotten).
    pub origins: BTreeSet<P>,
    pub scope: AddrScope,
    /// `network.allow`.
    pub allow: Option<BTreeSet<P>>,
    pub forget_after_ms: u64,
    pub members_max: usize,
    pub mesh: MeshRule,
    /// A node's id as bytes, the same on every node (ranks the mesh).
    pub key: fn(&P) -> Vec<u8>,
}

/// The membership table. Deterministic: ordered maps only; every time is passed in.
#[derive(Clone, Debug)]
pub struct Membership<P: Ord> {
    cfg: MembershipConfig<P>,
    members: BTreeMap<P, Member>,
    connected: BTreeSet<P>,
    bootstrap: BTreeSet<P>,
    /// Members changed (or removed) since the shell last persisted them.
    dirty: BTreeSet<P>,
    /// A member list arrived (or members were persisted): the mesh rule has a fabric to choose from.
    listed: bool,
    /// Since when no peer has been connected (`None` while one is, or before the bootstrap list was set).
    alone_since: Option<Timestamp>,
}

impl<P: Ord + Clone> Membership<P> {
    /// A table holding `stored` (what the shell persisted), checked again against the current configuration: a
    /// member no longer allowed, or with addresses this node no longer accepts, is dropped or trimmed.
    pub fn new(cfg: MembershipConfig<P>, stored: impl IntoIterator<Item = (P, Member)>) -> Self {
        let mut table = Self {
            cfg,
            members: BTreeMap::new(),
            connected: BTreeSet::new(),
            bootstrap: BTreeSet::new(),
            dirty: BTreeSet::new(),
            listed: false,
            alone_since: None,
        };
        for (id, mut member) in stored {
            if id == table.cfg.me || !table.allowed(&id) || table.members.len() >= table.cfg.members_max {
                table.dirty.insert(id);
                continue;
            }
            let checked = check_addrs(&member.addrs, None, table.cfg.scope);
            if checked.kept != member.addrs {
                member.addrs = checked.kept;
                table.dirty.insert(id.clone());
            }
            table.members.insert(id, member);
        }
        table.listed = !table.members.is_empty();
        table
    }

    pub fn config(&self) -> &MembershipConfig<P> {
        &self.cfg
    }

    fn allowed(&self, id: &P) -> bool {
        self.cfg.allow.as_ref().is_none_or(|allow| allow.contains(id))
    }

    /// Members known, this node not included.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn get(&self, id: &P) -> Option<&Member> {
        self.members.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&P, &Member)> {
        self.members.iter()
    }

    pub fn is_connected(&self, id: &P) -> bool {
        self.connected.contains(id)
    }

    /// Inserts a new member if the table has room; reports it.
    fn insert(&mut self, id: P, member: Member, report: &mut Report<P>) -> bool {
        if self.members.len() >= self.cfg.members_max {
            report.full += 1;
            return false;
        }
        self.dirty.insert(id.clone());
        self.members.insert(id.clone(), member);
        report.new.push(id);
        true
    }

    /// The bootstrap list (the config's, on start and reload): its peers become members learned from it (with no
    /// address of their own yet: the shell dials the configured address). A peer outside `network.allow` is not.
    pub fn set_bootstrap(&mut self, now: Timestamp, peers: impl IntoIterator<Item = P>) -> Report<P> {
        let mut report = Report::default();
        if self.connected.is_empty() && self.alone_since.is_none() {
            self.alone_since = Some(now);
        }
        self.bootstrap.clear();
        for id in peers {
            if id == self.cfg.me {
                continue;
            }
            if !self.allowed(&id) {
                report.not_allowed += 1;
                continue;
            }
            self.bootstrap.insert(id.clone());
            match self.members.get_mut(&id) {
                Some(member) if member.learned != Learned::Bootstrap => {
                    member.learned = Learned::Bootstrap;
                    self.dirty.insert(id);
                }
                Some(_) => {}
                None => {
                    let member = Member { addrs: Vec::new(), last_seen: now, learned: Learned::Bootstrap };
                    self.insert(id, member, &mut report);
                }
            }
        }
        report
    }

    /// A new allow list (reload): members it does not list are forgotten, and returned.
    pub fn set_allow(&mut self, allow: Option<BTreeSet<P>>) -> Vec<P> {
        self.cfg.allow = allow;
        let gone: Vec<P> = self.members.keys().filter(|id| !self.allowed(id)).cloned().collect();
        for id in &gone {
            self.members.remove(id);
            self.bootstrap.remove(id);
            self.dirty.insert(id.clone());
        }
        gone
    }

    /// A new forget-after time (reload).
    pub fn set_forget_after(&mut self, ms: u64) {
        self.cfg.forget_after_ms = ms;
    }

    /// `id` connected (its first connection). A node not known yet is a member learned inbound.
    pub fn on_connected(&mut self, now: Timestamp, id: P) -> Report<P> {
        let mut report = Report::default();
        if id == self.cfg.me || !self.allowed(&id) {
            return report;
        }
        self.connected.insert(id.clone());
        self.alone_since = None;
        match self.members.get_mut(&id) {
            Some(member) => {
                member.last_seen = now;
                self.dirty.insert(id);
            }
            None => {
                let member = Member { addrs: Vec::new(), last_seen: now, learned: Learned::Inbound };
                self.insert(id, member, &mut report);
            }
        }
        report
    }

    /// `id`'s last connection closed.
    pub fn on_disconnected(&mut self, now: Timestamp, id: &P) {
        if self.connected.remove(id) && self.connected.is_empty() {
            self.alone_since = Some(now);
        }
        if let Some(member) = self.members.get_mut(id) {
            member.last_seen = now;
            self.dirty.insert(id.clone());
        }
    }

    /// Records every connected member as seen now, so what is persisted stays fresh while connections last (a node
    /// killed after a week of uptime must not forget its peers when it starts again).
    pub fn touch_connected(&mut self, now: Timestamp) {
        for id in &self.connected {
            if let Some(member) = self.members.get_mut(id) {
                member.last_seen = now;
                self.dirty.insert(id.clone());
            }
        }
    }

    /// `id` (connected) advertised where its control plane listens; `observed` is the ip its connection comes from.
    /// Its own word replaces what others said of it (rule 4).
    pub fn on_listen(
        &mut self,
        now: Timestamp,
        id: &P,
        advertised: &[SocketAddr],
        observed: Option<IpAddr>,
    ) -> Report<P> {
        let mut report = Report::default();
        let checked = check_addrs(advertised, observed, self.cfg.scope);
        report.rejected = checked.rejected;
        if *id == self.cfg.me || !self.allowed(id) {
            return report;
        }
        if checked.kept.is_empty() {
            report.without_addrs += 1;
        }
        match self.members.get_mut(id) {
            Some(member) => {
                if member.addrs != checked.kept && !checked.kept.is_empty() {
                    member.addrs = checked.kept;
                    self.dirty.insert(id.clone());
                }
                member.last_seen = member.last_seen.max(now);
            }
            None => {
                let learned = Learned::Inbound;
                let member = Member { addrs: checked.kept, last_seen: now, learned };
                self.insert(id.clone(), member, &mut report);
            }
        }
        report
    }

    /// A member list from peer `from` (rules 1 to 4).
    pub fn on_members(&mut self, now: Timestamp, from: &P, records: Vec<MemberRecord<P>>) -> Report<P> {
        let mut report = Report::default();
        self.listed = true;
        for record in records {
            if record.id == self.cfg.me || record.id == *from {
                continue;
            }
            if !self.allowed(&record.id) {
                report.not_allowed += 1;
                continue;
            }
            let checked = check_addrs(&record.addrs, None, self.cfg.scope);
            report.rejected.extend(checked.rejected);
            if record.seen_ago_ms >= self.cfg.forget_after_ms {
                continue;
            }
            let seen = Timestamp(now.0.saturating_sub(record.seen_ago_ms));
            let connected = self.connected.contains(&record.id);
            match self.members.get_mut(&record.id) {
                Some(member) => {
                    let mut changed = false;
                    if !connected {
                        for addr in checked.kept {
                            if member.addrs.len() < PEER_ADDRS_MAX && !member.addrs.contains(&addr) {
                                member.addrs.push(addr);
                                changed = true;
                            }
                        }
                    }
                    if seen > member.last_seen {
                        member.last_seen = seen;
                        changed = true;
                    }
                    if changed {
                        self.dirty.insert(record.id);
                    }
                }
                None if checked.kept.is_empty() => report.without_addrs += 1,
                None => {
                    let member = Member { addrs: checked.kept, last_seen: seen, learned: Learned::Exchange };
                    self.insert(record.id, member, &mut report);
                }
            }
        }
        report
    }

    /// What this node tells `to` about the fabric: every member with an address, but `to` itself, most recently
    /// seen first (connected ones as seen now), at most `limit`.
    pub fn records_for(&self, now: Timestamp, to: &P, limit: usize) -> Vec<MemberRecord<P>> {
        let mut records: Vec<MemberRecord<P>> = self
            .members
            .iter()
            .filter(|(id, m)| *id != to && !m.addrs.is_empty())
            .map(|(id, m)| MemberRecord {
                id: id.clone(),
                addrs: m.addrs.clone(),
                seen_ago_ms: if self.connected.contains(id) { 0 } else { now.millis_since(m.last_seen) },
            })
            .collect();
        // Stable: equal ages stay in id order.
        records.sort_by_key(|r| r.seen_ago_ms);
        records.truncate(limit);
        records
    }

    /// Forgets members unseen for `forget_after_ms` (rule 5) and returns them.
    pub fn expire(&mut self, now: Timestamp) -> Vec<P> {
        let forget_after = self.cfg.forget_after_ms;
        let gone: Vec<P> = self
            .members
            .iter()
            .filter(|(id, m)| {
                !self.connected.contains(*id)
                    && !self.bootstrap.contains(*id)
                    && !self.cfg.origins.contains(*id)
                    && now.millis_since(m.last_seen) >= forget_after
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.members.remove(id);
            self.dirty.insert(id.clone());
        }
        gone
    }

    /// The members this node keeps a connection to at `now` (rule 6). Only members it can dial are named: with an
    /// address, or in the bootstrap list (dialled at the configured address).
    pub fn wanted(&self, now: Timestamp) -> BTreeSet<P> {
        let dialable = |id: &P, m: &Member| !m.addrs.is_empty() || self.bootstrap.contains(id);
        let candidates = self.members.iter().filter(|(id, m)| dialable(id, m)).map(|(id, _)| id);
        if self.cfg.origin {
            return candidates.cloned().collect();
        }
        let (origins, mirrors): (Vec<&P>, Vec<&P>) = candidates.partition(|id| self.cfg.origins.contains(*id));
        let mut wanted = match self.listed {
            true => mesh_pick(&self.cfg.me, mirrors, self.cfg.mesh, self.cfg.key),
            false => BTreeSet::new(),
        };
        let fallback = !self.listed
            || origins.is_empty()
            || self.alone_since.is_some_and(|since| now.millis_since(since) >= BOOTSTRAP_FALLBACK_MS);
        wanted.extend(origins.into_iter().cloned());
        if fallback {
            wanted.extend(self.bootstrap.iter().cloned());
        }
        wanted
    }

    /// Members changed since the last call: each with its state now, or `None` if it was forgotten.
    pub fn take_dirty(&mut self) -> Vec<(P, Option<Member>)> {
        std::mem::take(&mut self.dirty).into_iter().map(|id| (id.clone(), self.members.get(&id).cloned())).collect()
    }
}

/// One connected peer is asked for its members this long after news (and at first), in turn.
pub const MEMBERS_POLL_FIRST_MS: u64 = 30_000;
/// Each ask that follows no news waits twice as long as the one before, up to this: the safety net for news lost
/// with a connection (forgetting takes days: `FORGET_AFTER_MS_DEFAULT`). Asked every 30 s whatever happened, an
/// idle 9-node fabric sent 3.2 KiB per node and minute, three times its keep-alives.
pub const MEMBERS_POLL_MAX_MS: u64 = 600_000;

/// When this node asks a connected peer for its members (rule 7).
#[derive(Clone, Debug)]
pub struct Exchanges {
    interval_ms: u64,
    poll_at: Mono,
}

impl Exchanges {
    pub fn new(now: Mono) -> Self {
        Self { interval_ms: MEMBERS_POLL_FIRST_MS, poll_at: now.plus_ms(MEMBERS_POLL_FIRST_MS) }
    }

    /// This node learned of a member it did not know (from a list, or a node that connected): the fabric is
    /// changing, so asking goes back to its first pace.
    pub fn news(&mut self, now: Mono) {
        self.interval_ms = MEMBERS_POLL_FIRST_MS;
        self.poll_at = self.poll_at.min(now.plus_ms(MEMBERS_POLL_FIRST_MS));
    }

    /// Whether to ask the next connected peer now (each time is given once).
    pub fn due(&mut self, now: Mono) -> bool {
        if now < self.poll_at {
            return false;
        }
        self.interval_ms = (self.interval_ms * 2).min(MEMBERS_POLL_MAX_MS);
        self.poll_at = now.plus_ms(self.interval_ms);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::{Ipv4Addr, Ipv6Addr};

    fn key(p: &u32) -> Vec<u8> {
        p.to_le_bytes().to_vec()
    }

    fn cfg(me: u32) -> MembershipConfig<u32> {
        MembershipConfig {
            me,
            origin: false,
            origins: [0].into(),
            scope: AddrScope::default(),
            allow: None,
            forget_after_ms: 10_000,
            members_max: MEMBERS_MAX,
            mesh: MeshRule::default(),
            key,
        }
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn record(id: u32, addrs: &[&str], seen_ago_ms: u64) -> MemberRecord<u32> {
        MemberRecord { id, addrs: addrs.iter().map(|a| addr(a)).collect(), seen_ago_ms }
    }

    const T: Timestamp = Timestamp(1_000_000);

    #[test]
    fn addresses_are_checked_against_the_nodes_own_kind() {
        let public = AddrScope::of(&[IpAddr::V4(Ipv4Addr::UNSPECIFIED)]);
        assert_eq!(public, AddrScope::default());
        assert_eq!(check_addr(&addr("192.0.2.1:4001"), public), Ok(()));
        assert_eq!(check_addr(&addr("10.77.0.2:4001"), public), Ok(()));
        assert_eq!(check_addr(&addr("127.0.0.1:4001"), public), Err(AddrRejection::Loopback));
        assert_eq!(check_addr(&addr("[::1]:4001"), public), Err(AddrRejection::Loopback));
        assert_eq!(check_addr(&addr("[::ffff:127.0.0.1]:4001"), public), Err(AddrRejection::Loopback));
        assert_eq!(check_addr(&addr("169.254.3.4:4001"), public), Err(AddrRejection::LinkLocal));
        assert_eq!(check_addr(&addr("[fe80::1]:4001"), public), Err(AddrRejection::LinkLocal));
        assert_eq!(check_addr(&addr("0.0.0.0:4001"), public), Err(AddrRejection::Unspecified));
        assert_eq!(check_addr(&addr("[::]:4001"), public), Err(AddrRejection::Unspecified));
        assert_eq!(check_addr(&addr("224.0.0.1:4001"), public), Err(AddrRejection::Multicast));
        assert_eq!(check_addr(&addr("255.255.255.255:4001"), public), Err(AddrRejection::Multicast));
        assert_eq!(check_addr(&addr("[ff02::1]:4001"), public), Err(AddrRejection::Multicast));
        assert_eq!(check_addr(&addr("192.0.2.1:0"), public), Err(AddrRejection::PortZero));

        let lab = AddrScope::of(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        assert_eq!((lab.loopback, lab.link_local), (true, false));
        assert_eq!(check_addr(&addr("127.0.0.1:4001"), lab), Ok(()));
        assert_eq!(check_addr(&addr("169.254.3.4:4001"), lab), Err(AddrRejection::LinkLocal));
        let link = AddrScope::of(&[IpAddr::V6("fe80::7".parse::<Ipv6Addr>().unwrap())]);
        assert_eq!(check_addr(&addr("[fe80::1]:4001"), link), Ok(()));
        assert_eq!(check_addr(&addr("[::1]:4001"), link), Err(AddrRejection::Loopback));
    }

    #[test]
    fn an_advertisement_resolves_the_unspecified_ip_and_keeps_at_most_the_cap() {
        let observed = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)));
        let many: Vec<SocketAddr> =
            ["0.0.0.0:4001", "192.0.2.1:1", "192.0.2.1:1", "192.0.2.2:1", "192.0.2.3:1", "192.0.2.4:1", "127.0.0.1:1"]
                .iter()
                .map(|a| addr(a))
                .collect();
        let checked = check_addrs(&many, observed, AddrScope::default());
        assert_eq!(checked.kept, ["192.0.2.9:4001", "192.0.2.1:1", "192.0.2.2:1", "192.0.2.3:1"].map(addr));
        assert_eq!(checked.rejected, [AddrRejection::OverCap, AddrRejection::Loopback]);
        // In a list about others, "unspecified" means nothing.
        let checked = check_addrs(&many[..1], None, AddrScope::default());
        assert_eq!(checked.rejected, [AddrRejection::Unspecified]);
    }

    #[test]
    fn members_from_a_list_are_checked_capped_and_allowed() {
        let mut c = cfg(1);
        c.allow = Some([0, 1, 2, 3, 4].into());
        c.members_max = 2;
        let mut m = Membership::new(c, []);
        let report = m.on_members(
            T,
            &0,
            vec![
                record(1, &["192.0.2.1:1"], 0),                // me
                record(2, &["192.0.2.2:1", "127.0.0.1:1"], 0), // one address kept
                record(9, &["192.0.2.9:1"], 0),                // not allowed
                record(3, &["169.254.0.1:1", "0.0.0.0:1"], 0), // nothing dialable
                record(4, &["192.0.2.4:1"], 500),              // kept
                record(0, &["192.0.2.100:1"], 0),              // the sender itself: its own word counts
            ],
        );
        assert_eq!(report.new, [2, 4]);
        assert_eq!(report.not_allowed, 1);
        assert_eq!(report.without_addrs, 1);
        assert_eq!(report.rejected, [AddrRejection::Loopback, AddrRejection::LinkLocal, AddrRejection::Unspecified]);
        assert_eq!(m.get(&4).unwrap().last_seen, Timestamp(T.0 - 500));
        assert_eq!(m.get(&4).unwrap().learned, Learned::Exchange);
        // Full: the next new member is dropped and reported.
        let report = m.on_members(T, &0, vec![record(3, &["192.0.2.3:1"], 0)]);
        assert_eq!((report.full, report.new.len()), (1, 0));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn a_peer_cannot_push_out_a_members_own_addresses() {
        let mut m = Membership::new(cfg(1), []);
        m.on_connected(T, 2);
        m.on_listen(T, &2, &[addr("0.0.0.0:4001")], Some("192.0.2.2".parse().unwrap()));
        m.on_disconnected(T, &2);
        let lies: Vec<&str> = vec!["198.51.100.1:1", "198.51.100.2:1", "198.51.100.3:1", "198.51.100.4:1"];
        m.on_members(T.plus_ms(10), &3, vec![record(2, &lies, 0)]);
        let member = m.get(&2).unwrap();
        assert_eq!(member.addrs[0], addr("192.0.2.2:4001"), "its own address stays first");
        assert_eq!(member.addrs.len(), PEER_ADDRS_MAX);
        assert_eq!(member.learned, Learned::Inbound);
        // Its own word replaces the rest when it connects again.
        m.on_connected(T.plus_ms(20), 2);
        m.on_listen(T.plus_ms(20), &2, &[addr("192.0.2.22:4001")], None);
        assert_eq!(m.get(&2).unwrap().addrs, [addr("192.0.2.22:4001")]);
        // While connected, what others say of its addresses is ignored.
        m.on_members(T.plus_ms(30), &3, vec![record(2, &["198.51.100.9:1"], 0)]);
        assert_eq!(m.get(&2).unwrap().addrs, [addr("192.0.2.22:4001")]);
    }

    #[test]
    fn members_unseen_for_the_forget_time_are_forgotten_but_not_origins_or_bootstrap_peers() {
        let mut m = Membership::new(cfg(1), []);
        m.set_bootstrap(T, [5]);
        m.on_members(T, &9, vec![record(0, &["192.0.2.100:1"], 0), record(2, &["192.0.2.2:1"], 0)]);
        m.on_members(T, &9, vec![record(3, &["192.0.2.3:1"], 0)]);
        m.on_connected(T, 4);
        m.take_dirty();
        // A report that 2 was seen later keeps it; 3 is not reported again.
        m.on_members(T.plus_ms(6_000), &9, vec![record(2, &["192.0.2.2:1"], 0)]);
        assert!(m.expire(T.plus_ms(9_999)).is_empty());
        assert_eq!(m.expire(T.plus_ms(10_000)), [3]);
        assert_eq!(m.take_dirty(), [(2, m.get(&2).cloned()), (3, None)]);
        // 4 is connected; once it leaves, its time runs.
        m.on_disconnected(T.plus_ms(10_000), &4);
        assert_eq!(m.expire(T.plus_ms(16_000)), [2]);
        assert_eq!(m.expire(T.plus_ms(20_000)), [4]);
        // Never: the origin (0) and the bootstrap peer (5).
        assert!(m.expire(T.plus_ms(1 << 40)).is_empty());
        assert!(m.get(&0).is_some() && m.get(&5).is_some());
        // A report older than the forget time is not taken.
        let report = m.on_members(T.plus_ms(1 << 40), &9, vec![record(7, &["192.0.2.7:1"], 10_000)]);
        assert!(report.new.is_empty());
    }

    #[test]
    fn a_reload_that_drops_a_peer_from_allow_forgets_it() {
        let mut m = Membership::new(cfg(1), []);
        m.on_members(T, &0, vec![record(2, &["192.0.2.2:1"], 0), record(3, &["192.0.2.3:1"], 0)]);
        assert_eq!(m.set_allow(Some([0, 2].into())), [3]);
        assert!(m.get(&3).is_none());
        let report = m.on_members(T, &0, vec![record(3, &["192.0.2.3:1"], 0)]);
        assert_eq!((report.not_allowed, m.len()), (1, 1));
    }

    #[test]
    fn stored_members_are_checked_again() {
        let mut c = cfg(1);
        c.allow = Some([2, 3].into());
        let stored = vec![
            (1, Member { addrs: vec![addr("192.0.2.1:1")], last_seen: T, learned: Learned::Inbound }),
            (
                2,
                Member {
                    addrs: vec![addr("127.0.0.1:1"), addr("192.0.2.2:1")],
                    last_seen: T,
                    learned: Learned::Exchange,
                },
            ),
            (4, Member { addrs: vec![addr("192.0.2.4:1")], last_seen: T, learned: Learned::Exchange }),
        ];
        let mut m = Membership::new(c, stored);
        assert_eq!(m.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [2]);
        assert_eq!(m.get(&2).unwrap().addrs, [addr("192.0.2.2:1")]);
        let dirty: Vec<u32> = m.take_dirty().into_iter().map(|(id, _)| id).collect();
        assert_eq!(dirty, [1, 2, 4]);
    }

    #[test]
    fn records_name_dialable_members_newest_first_but_not_the_asker() {
        let mut m = Membership::new(cfg(1), []);
        m.on_members(T, &0, vec![record(2, &["192.0.2.2:1"], 300), record(3, &["192.0.2.3:1"], 100)]);
        m.on_connected(T, 4);
        m.on_listen(T, &4, &[addr("192.0.2.4:1")], None);
        m.on_connected(T, 5); // no address: not handed out
        let records = m.records_for(T.plus_ms(1_000), &3, 10);
        let ids: Vec<(u32, u64)> = records.iter().map(|r| (r.id, r.seen_ago_ms)).collect();
        assert_eq!(ids, [(4, 0), (2, 1_300)]);
        assert_eq!(m.records_for(T, &9, 1).len(), 1);
    }

    #[test]
    fn the_mesh_is_full_up_to_the_limit_then_a_bounded_random_choice_plus_the_origin() {
        let rule = MeshRule { full_mirrors_max: 4, dials: 2 };
        let all: Vec<u32> = (1..=5).collect();
        assert_eq!(mesh_pick(&1, &all, rule, key), [2, 3, 4, 5].into());
        let all: Vec<u32> = (1..=40).collect();
        let picked = mesh_pick(&1, &all, rule, key);
        assert_eq!(picked.len(), 2);
        assert!(!picked.contains(&1));
        // Stable as members come and go: adding members only ever displaces picks by better-ranked newcomers.
        let more: Vec<u32> = (1..=41).collect();
        let again = mesh_pick(&1, &more, rule, key);
        assert!(again == picked || again.contains(&41), "{picked:?} -> {again:?}");
        // Different nodes pick differently: over 40 mirrors, the picks spread (mean in-degree = dials).
        let mut in_degree = BTreeMap::<u32, usize>::new();
        for me in &all {
            for p in mesh_pick(me, &all, rule, key) {
                *in_degree.entry(p).or_default() += 1;
            }
        }
        assert!(in_degree.len() > 20, "{in_degree:?}");
        assert_eq!(in_degree.values().sum::<usize>(), 80);

        let mut c = cfg(1);
        c.mesh = rule;
        let mut m = Membership::new(c, []);
        m.set_bootstrap(T, [0, 7]);
        assert_eq!(m.wanted(T), [0, 7].into(), "the bootstrap peers, before a member list");
        let records: Vec<MemberRecord<u32>> = (2..=40).map(|i| record(i, &["192.0.2.1:1"], 0)).collect();
        m.on_connected(T, 0);
        m.on_members(T, &0, records);
        let wanted = m.wanted(T.plus_ms(BOOTSTRAP_FALLBACK_MS));
        assert!(wanted.contains(&0), "always the origin");
        assert_eq!(wanted.len(), 3, "the origin and two mirrors: {wanted:?}");
        let mirrors: Vec<u32> = m.iter().map(|(id, _)| *id).filter(|id| *id != 0).collect();
        let expected: BTreeSet<u32> = mesh_pick(&1, &mirrors, rule, key);
        assert!(expected.is_subset(&wanted));

        let mut origin = cfg(0);
        origin.origin = true;
        let mut o = Membership::new(origin, []);
        o.on_members(T, &99, (1..=40).map(|i| record(i, &["192.0.2.1:1"], 0)).collect());
        assert_eq!(o.wanted(T).len(), 40, "an origin keeps every member");

        // A mirror that knows no origin to dial starts from its bootstrap peers at once.
        let mut lost = Membership::new(cfg(1), []);
        lost.set_bootstrap(T, [7]);
        assert_eq!(lost.wanted(T), [7].into());
        // One with persisted members has a list already: it dials its picks at once.
        let stored =
            (2..=4).map(|i| (i, Member { addrs: vec![addr("192.0.2.1:1")], last_seen: T, learned: Learned::Exchange }));
        let mut restarted = Membership::new(cfg(1), stored);
        restarted.set_bootstrap(T, [0]);
        assert_eq!(restarted.wanted(T), [0, 2, 3, 4].into());
        // Past the limit, a listed mirror keeps only its picks and the origin; alone for a while (its last peer
        // left), its bootstrap peers too.
        let mut big = Membership::new(MembershipConfig { mesh: rule, ..cfg(1) }, []);
        big.set_bootstrap(T, [0, 9]);
        big.on_connected(T, 0);
        big.on_members(T, &0, (10..=40).map(|i| record(i, &["192.0.2.1:1"], 0)).collect());
        let picks = big.wanted(T);
        assert_eq!(picks.len(), 3, "{picks:?}");
        big.on_disconnected(T.plus_ms(10_000), &0);
        assert_eq!(big.wanted(T.plus_ms(14_999)), picks);
        let alone = big.wanted(T.plus_ms(15_000));
        assert!(alone.contains(&9) && picks.is_subset(&alone), "{alone:?}");
    }

    #[test]
    fn asking_backs_off_while_nothing_is_learnt_and_news_resets_it() {
        let start = Mono(1_000);
        let mut ex = Exchanges::new(start);
        let mut at = start;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            let next = (at.0..at.0 + 2 * MEMBERS_POLL_MAX_MS).find(|&t| ex.due(Mono(t))).unwrap();
            gaps.push(next - at.0);
            at = Mono(next);
        }
        assert_eq!(gaps, [30_000, 60_000, 120_000, 240_000, 480_000, 600_000, 600_000, 600_000]);
        // News: the next ask within 30 s, then doubling again.
        ex.news(at.plus_ms(1_000));
        assert!(!ex.due(at.plus_ms(30_999)));
        assert!(ex.due(at.plus_ms(31_000)));
        assert!(!ex.due(at.plus_ms(31_000 + 59_999)));
        assert!(ex.due(at.plus_ms(31_000 + 60_000)));
    }
}
