//! The dashboard's fabric view and history: what this node remembers of the fabric beyond the moment, kept by the
//! daemon from its own observations, with no external service.
//!
//! - **Samples**: every [`SAMPLE_INTERVAL`] the chunk bytes per second received from peers and from the origin and
//!   served to peers, in a ring of [`SAMPLES_MAX`] (one hour).
//! - **Snapshots**: the last [`SNAPSHOTS_MAX`] snapshots this node heard of (the newest root it accepted, or the
//!   origin's own publish), each with its propagation: on a mirror, from the root's creation to its apply here;
//!   on every node, from the creation to each connected mirror's announce of it (the snapshot a peer holds
//!   completely changes to it, seen while the peer was connected since before this node knew the root, so a peer
//!   that connects already holding it is not counted as propagation; nor is an origin's, which announces what it
//!   publishes at once). On the origin also what an update cost: chunk
//!   bytes sent while it was the newest snapshot over the bytes it changed, the copies of the update it sent.
//! - **Members**: the snapshot each peer last said it serves and its last measured delivery rate, kept after it
//!   disconnects (a stopped mirror stays in the view, behind), at most [`MEMBERS_REMEMBERED_MAX`] (the membership
//!   cap and this node); forgotten with the member.
//!
//! The daemon calls [`History::observe`] with every status it publishes (at most every 50 ms): that costs a pass
//! over the connected peers, as building the status does; the fabric view (a pass over the members) and the
//! history report are rebuilt at most every [`FABRIC_REFRESH`] and handed to the admin API through watch
//! channels ([`Feeds`]), so a request never touches the event loop.
//!
//! Announces are seen when the status is next built (50 ms) after the engine took in the peer's hello or have
//! message, which a peer sends after `HAVE_FLUSH_MS`: a lag measured here is that much above the real one.
//! Lags compare the origin's clock (the root's creation) with this node's.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirrormesh_proto::membership::MEMBERS_MAX;
use tokio::sync::watch;

use crate::status::{FabricView, HistoryReport, HistorySample, MemberView, SnapshotHistory, Status};

/// Time between two samples: fine enough to show a sync of a minute, and an hour of them is 360 points.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept: one hour.
pub const SAMPLES_MAX: usize = 3600 / SAMPLE_INTERVAL.as_secs() as usize;
/// Snapshots remembered. Alpine's edge is published every few minutes at its busiest, so 64 cover more than the
/// hour the charts show; a record costs at most 8 bytes per announcing peer.
pub const SNAPSHOTS_MAX: usize = 64;
/// Announces counted per snapshot: one per member at most.
pub const ANNOUNCES_PER_SNAPSHOT_MAX: usize = MEMBERS_MAX;
/// Peers remembered: every member and this node.
pub const MEMBERS_REMEMBERED_MAX: usize = MEMBERS_MAX + 1;
/// How often the fabric view and the history report are rebuilt (the dashboard polls once a second).
pub const FABRIC_REFRESH: Duration = Duration::from_secs(1);

/// A member of the fabric as the peer manager knows it.
#[derive(Clone, Debug)]
pub struct MemberInfo {
    pub id: String,
    pub origin: bool,
    pub learned: &'static str,
    /// When it was last connected here or reported seen by a peer (ms since the Unix epoch).
    pub last_seen_ms: u64,
}

/// The newest root this node knows: its sequence number and when the origin created it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Newest {
    pub seq: u64,
    pub created_ms: u64,
}

/// What the admin API reads.
#[derive(Clone)]
pub struct Feeds {
    pub fabric: watch::Receiver<Arc<FabricView>>,
    pub history: watch::Receiver<Arc<HistoryReport>>,
}

/// What this node remembers of a peer.
#[derive(Default)]
struct Memo {
    /// The snapshot it last said it holds completely.
    seq: Option<u64>,
    /// When it was last seen connected (ms since the Unix epoch).
    heard_ms: Option<u64>,
    rate: Option<f64>,
    rtt_ms: Option<f64>,
    connected: bool,
    /// Chunk bytes received from it and sent to it at the last sample (or when it was first seen since), and the
    /// rates since.
    bytes_at_sample: Option<(Instant, u64, u64)>,
    received_bps: Option<f64>,
    sent_bps: Option<f64>,
}

struct Snapshot {
    seq: u64,
    created_ms: u64,
    /// When this node first knew of it (ms since the Unix epoch): a peer connected since before then and seen
    /// holding it afterwards fetched it meanwhile.
    known_ms: u64,
    applied_lag_ms: Option<u64>,
    announce_lags_ms: Vec<u64>,
    /// Origin: bytes the update changed, and chunk bytes served when it was published and since.
    changed_bytes: Option<u64>,
    served_at_publish: u64,
    origin_sent_bytes: Option<u64>,
}

/// Chunk byte totals at a sample.
#[derive(Clone, Copy, Default)]
struct Totals {
    from_peers: u64,
    from_origin: u64,
    served: u64,
}

impl Totals {
    fn of(status: &Status) -> Self {
        let from_origin = status.bytes_fetched_from_origin;
        Totals {
            from_peers: status.bytes_fetched_total.saturating_sub(from_origin),
            from_origin,
            served: status.bytes_served_total,
        }
    }
}

pub struct History {
    origin: bool,
    samples: VecDeque<HistorySample>,
    last_sample: Option<(Instant, Totals)>,
    snapshots: VecDeque<Snapshot>,
    memos: BTreeMap<String, Memo>,
    /// The applied snapshot and its apply time at the last observation.
    own: (Option<u64>, Option<u64>),
    newest: Option<Newest>,
    next_refresh: Instant,
    /// Bumped whenever the history report changes; the report is rebuilt at the next refresh.
    version: u64,
    sent_version: u64,
    /// Peers not remembered because the table was full (should stay 0: the membership has the same cap).
    pub memos_dropped: u64,
    fabric_tx: watch::Sender<Arc<FabricView>>,
    history_tx: watch::Sender<Arc<HistoryReport>>,
}

impl History {
    /// The history of a node (`origin`: it publishes), and what the admin API reads of it.
    pub fn new(origin: bool, at: Instant) -> (Self, Feeds) {
        let report = HistoryReport { interval_ms: SAMPLE_INTERVAL.as_millis() as u64, ..Default::default() };
        let (fabric_tx, fabric_rx) = watch::channel(Arc::new(FabricView::default()));
        let (history_tx, history_rx) = watch::channel(Arc::new(report));
        let history = History {
            origin,
            samples: VecDeque::with_capacity(SAMPLES_MAX),
            last_sample: None,
            snapshots: VecDeque::with_capacity(SNAPSHOTS_MAX),
            memos: BTreeMap::new(),
            own: (None, None),
            newest: None,
            next_refresh: at,
            version: 0,
            sent_version: 0,
            memos_dropped: 0,
            fabric_tx,
            history_tx,
        };
        (history, Feeds { fabric: fabric_rx, history: history_rx })
    }

    /// The origin published snapshot `seq` (created at `created_ms`), changing `changed_bytes`, with
    /// `served_total` chunk bytes served so far.
    pub fn published(&mut self, wall_ms: u64, newest: Newest, changed_bytes: u64, served_total: u64) {
        if let Some(snapshot) = self.remember(wall_ms, newest) {
            snapshot.changed_bytes = Some(changed_bytes);
            snapshot.served_at_publish = served_total;
            snapshot.origin_sent_bytes = Some(0);
            self.version += 1;
        }
    }

    /// The record of snapshot `newest`, made if this node did not know it yet (the oldest is dropped past
    /// [`SNAPSHOTS_MAX`]; none for a snapshot older than every one of a full ring). Records stay in sequence order.
    fn remember(&mut self, wall_ms: u64, newest: Newest) -> Option<&mut Snapshot> {
        let at = match self.snapshots.binary_search_by_key(&newest.seq, |s| s.seq) {
            Ok(at) => at,
            Err(0) if self.snapshots.len() == SNAPSHOTS_MAX => return None,
            Err(mut at) => {
                if self.snapshots.len() == SNAPSHOTS_MAX {
                    self.snapshots.pop_front();
                    at -= 1;
                }
                let snapshot = Snapshot {
                    seq: newest.seq,
                    created_ms: newest.created_ms,
                    known_ms: wall_ms,
                    applied_lag_ms: None,
                    announce_lags_ms: Vec::new(),
                    changed_bytes: None,
                    served_at_publish: 0,
                    origin_sent_bytes: None,
                };
                self.snapshots.insert(at, snapshot);
                self.version += 1;
                at
            }
        };
        self.snapshots.get_mut(at)
    }

    fn snapshot_mut(&mut self, seq: u64) -> Option<&mut Snapshot> {
        let at = self.snapshots.binary_search_by_key(&seq, |s| s.seq).ok()?;
        self.snapshots.get_mut(at)
    }

    /// Takes in the status the daemon just published (at `at`, wall clock `wall_ms`) and the newest root it knows;
    /// rebuilds the fabric view (asking `members` for the fabric's members) and the history report when they are
    /// due. Costs a pass over the connected peers; the rebuild, at most every [`FABRIC_REFRESH`], one over the
    /// members.
    pub fn observe(
        &mut self,
        at: Instant,
        wall_ms: u64,
        status: &Status,
        newest: Option<Newest>,
        members: impl FnOnce() -> Vec<MemberInfo>,
    ) {
        if let Some(newest) = newest {
            self.remember(wall_ms, newest);
        }
        self.newest = newest;
        self.observe_own(status);
        self.observe_peers(at, wall_ms, status);
        self.sample(at, wall_ms, status);
        if self.origin
            && let Some(newest) = newest
            && let Some(snapshot) = self.snapshot_mut(newest.seq)
            && snapshot.changed_bytes.is_some()
        {
            let sent = status.bytes_served_total.saturating_sub(snapshot.served_at_publish);
            if snapshot.origin_sent_bytes != Some(sent) {
                snapshot.origin_sent_bytes = Some(sent);
                self.version += 1;
            }
        }
        if at >= self.next_refresh {
            self.next_refresh = at + FABRIC_REFRESH;
            let members = members();
            self.forget_gone(status, &members);
            let view = self.fabric_view(wall_ms, status, &members);
            self.fabric_tx.send_replace(Arc::new(view));
            if self.version != self.sent_version {
                self.sent_version = self.version;
                self.history_tx.send_replace(Arc::new(self.report()));
            }
        }
    }

    /// A mirror's own apply: the served snapshot changed with a new apply time.
    fn observe_own(&mut self, status: &Status) {
        let Some(repo) = status.repos.first() else { return };
        let own = (repo.seq, repo.last_apply_ms);
        if own == self.own {
            return;
        }
        self.own = own;
        if let (Some(seq), Some(_), Some(lag)) = (repo.seq, repo.last_apply_ms, repo.propagation_lag_ms)
            && let Some(snapshot) = self.snapshot_mut(seq)
        {
            snapshot.applied_lag_ms = Some(lag);
            self.version += 1;
        }
    }

    /// Connected peers: the snapshot each holds completely now, its announces, its measured rate.
    fn observe_peers(&mut self, at: Instant, wall_ms: u64, status: &Status) {
        let was: BTreeSet<String> = self.memos.iter().filter(|(_, m)| m.connected).map(|(id, _)| id.clone()).collect();
        for memo in self.memos.values_mut() {
            memo.connected = false;
        }
        for peer in status.peers.iter().filter(|p| p.connected) {
            if !self.memos.contains_key(&peer.id) {
                if self.memos.len() >= MEMBERS_REMEMBERED_MAX {
                    self.memos_dropped += 1;
                    continue;
                }
                self.memos.insert(peer.id.clone(), Memo::default());
            }
            let Some(memo) = self.memos.get_mut(&peer.id) else { continue };
            if !was.contains(&peer.id) || memo.bytes_at_sample.is_none() {
                memo.bytes_at_sample = Some((at, peer.bytes_received, peer.bytes_sent));
            }
            memo.connected = true;
            memo.heard_ms = Some(wall_ms);
            memo.rtt_ms = peer.rtt_ms;
            if peer.score.is_some() {
                memo.rate = peer.score;
            }
            // "None" is also what a peer not yet greeted reports: it never makes the remembered snapshot older.
            let Some(seq) = peer.complete_seq.filter(|s| memo.seq < Some(*s)) else { continue };
            memo.seq = Some(seq);
            let at = self.snapshots.binary_search_by_key(&seq, |s| s.seq);
            // An origin announces what it publishes at once: that is no propagation.
            if let Ok(at) = at
                && !peer.origin
                && let Some(snapshot) = self.snapshots.get_mut(at)
                && peer.connected_since_ms <= snapshot.known_ms
                && snapshot.announce_lags_ms.len() < ANNOUNCES_PER_SNAPSHOT_MAX
            {
                snapshot.announce_lags_ms.push(wall_ms.saturating_sub(snapshot.created_ms));
                self.version += 1;
            }
        }
    }

    /// Every [`SAMPLE_INTERVAL`]: the node's chunk rates, and each connected peer's.
    fn sample(&mut self, at: Instant, wall_ms: u64, status: &Status) {
        let totals = Totals::of(status);
        let Some((last_at, last)) = self.last_sample else {
            self.last_sample = Some((at, totals));
            return;
        };
        let elapsed = at.duration_since(last_at);
        if elapsed < SAMPLE_INTERVAL {
            return;
        }
        let secs = elapsed.as_secs_f64();
        let per_sec = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        if self.samples.len() == SAMPLES_MAX {
            self.samples.pop_front();
        }
        self.samples.push_back(HistorySample {
            t_ms: wall_ms,
            from_peers_bps: per_sec(totals.from_peers, last.from_peers),
            from_origin_bps: per_sec(totals.from_origin, last.from_origin),
            served_bps: per_sec(totals.served, last.served),
        });
        self.last_sample = Some((at, totals));
        self.sample_peers(at, status);
        self.version += 1;
    }

    /// Each connected peer's chunk rates since the last sample (or since it was first seen, if later).
    fn sample_peers(&mut self, at: Instant, status: &Status) {
        for memo in self.memos.values_mut().filter(|m| !m.connected) {
            (memo.bytes_at_sample, memo.received_bps, memo.sent_bps) = (None, None, None);
        }
        for peer in status.peers.iter().filter(|p| p.connected) {
            let Some(memo) = self.memos.get_mut(&peer.id) else { continue };
            if let Some((then, received, sent)) = memo.bytes_at_sample {
                let secs = at.duration_since(then).as_secs_f64();
                if secs > 0.0 {
                    memo.received_bps = Some(peer.bytes_received.saturating_sub(received) as f64 / secs);
                    memo.sent_bps = Some(peer.bytes_sent.saturating_sub(sent) as f64 / secs);
                }
            }
            memo.bytes_at_sample = Some((at, peer.bytes_received, peer.bytes_sent));
        }
    }

    /// Forgets peers that are neither members nor connected any more.
    fn forget_gone(&mut self, status: &Status, members: &[MemberInfo]) {
        let keep: BTreeSet<&str> = members
            .iter()
            .map(|m| m.id.as_str())
            .chain(status.peers.iter().filter(|p| p.connected).map(|p| p.id.as_str()))
            .collect();
        self.memos.retain(|id, _| keep.contains(id.as_str()));
    }

    /// How far a member serving `seq` is behind the newest snapshot: whether it is, the snapshots it lacks among
    /// those remembered (and whether that is a lower bound), and since when (ms).
    fn lag(&self, wall_ms: u64, seq: Option<u64>) -> (bool, u64, bool, Option<u64>) {
        let Some(newest) = self.newest else { return (false, 0, false, None) };
        if seq >= Some(newest.seq) {
            return (false, 0, false, None);
        }
        let mut lacking = self.snapshots.iter().filter(|s| Some(s.seq) > seq && s.seq <= newest.seq);
        let oldest = lacking.next();
        let count = oldest.map_or(0, |_| 1 + lacking.count() as u64);
        let exact = seq.is_some_and(|seq| self.snapshots.iter().any(|s| s.seq == seq));
        let since = oldest.map(|s| wall_ms.saturating_sub(s.created_ms));
        (true, count, !exact, since)
    }

    fn fabric_view(&self, wall_ms: u64, status: &Status, members: &[MemberInfo]) -> FabricView {
        let own_seq = status.repos.first().and_then(|r| r.seq);
        let mut rows = Vec::with_capacity(members.len() + 1);
        let (behind, snapshots_behind, at_least, behind_ms) = self.lag(wall_ms, own_seq);
        rows.push(MemberView {
            id: status.node_id.clone(),
            this_node: true,
            origin: status.role == "origin",
            connected: true,
            learned: None,
            seq: own_seq,
            seen_ms: Some(wall_ms),
            behind,
            snapshots_behind,
            snapshots_behind_at_least: at_least,
            behind_ms,
            ..Default::default()
        });
        let mut others: Vec<MemberView> = members
            .iter()
            .map(|m| {
                let memo = self.memos.get(&m.id);
                let seq = memo.and_then(|m| m.seq);
                let (behind, snapshots_behind, at_least, behind_ms) = self.lag(wall_ms, seq);
                let connected = memo.is_some_and(|m| m.connected);
                MemberView {
                    id: m.id.clone(),
                    this_node: false,
                    origin: m.origin,
                    connected,
                    learned: Some(m.learned.to_owned()),
                    seq,
                    seen_ms: memo.and_then(|m| m.heard_ms).or(Some(m.last_seen_ms)),
                    behind,
                    snapshots_behind,
                    snapshots_behind_at_least: at_least,
                    behind_ms,
                    rate: memo.and_then(|m| m.rate),
                    received_bps: memo.and_then(|m| m.received_bps),
                    sent_bps: memo.and_then(|m| m.sent_bps),
                    rtt_ms: memo.filter(|m| m.connected).and_then(|m| m.rtt_ms),
                }
            })
            .collect();
        others.sort_by(|a, b| b.origin.cmp(&a.origin).then_with(|| a.id.cmp(&b.id)));
        rows.extend(others);
        FabricView {
            node_id: status.node_id.clone(),
            role: status.role.clone(),
            newest_seq: self.newest.map(|n| n.seq),
            newest_created_ms: self.newest.map(|n| n.created_ms),
            behind: rows.iter().filter(|r| r.behind).count() as u64,
            members: rows,
            history_version: self.version,
            updated_ms: wall_ms,
        }
    }

    /// The history as `GET /history` serves it.
    pub fn report(&self) -> HistoryReport {
        let snapshots = self
            .snapshots
            .iter()
            .map(|s| {
                let mut lags = s.announce_lags_ms.clone();
                lags.sort_unstable();
                let copies = match (s.changed_bytes, s.origin_sent_bytes) {
                    (Some(changed), Some(sent)) if changed > 0 => Some(sent as f64 / changed as f64),
                    _ => None,
                };
                SnapshotHistory {
                    seq: s.seq,
                    created_ms: s.created_ms,
                    applied_lag_ms: s.applied_lag_ms,
                    announced: lags.len() as u64,
                    announce_lag_ms_min: lags.first().copied(),
                    announce_lag_ms_median: lags.get(lags.len() / 2).copied(),
                    announce_lag_ms_max: lags.last().copied(),
                    changed_bytes: s.changed_bytes,
                    origin_sent_bytes: s.origin_sent_bytes,
                    copies,
                }
            })
            .collect();
        HistoryReport {
            interval_ms: SAMPLE_INTERVAL.as_millis() as u64,
            samples: self.samples.iter().cloned().collect(),
            snapshots,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{PeerStatus, RepoStatus};

    const T0: u64 = 1_700_000_000_000;

    fn status(seq: Option<u64>, peers: &[(&str, Option<u64>)]) -> Status {
        Status {
            node_id: "me".into(),
            role: "mirror".into(),
            repos: vec![RepoStatus { seq, ..Default::default() }],
            peers: peers
                .iter()
                .map(|(id, seq)| PeerStatus {
                    id: (*id).into(),
                    connected: true,
                    complete_seq: *seq,
                    connected_since_ms: T0,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn member(id: &str) -> MemberInfo {
        MemberInfo { id: id.into(), origin: id == "origin", learned: "exchange", last_seen_ms: T0 }
    }

    fn members() -> Vec<MemberInfo> {
        ["origin", "a", "b"].into_iter().map(member).collect()
    }

    fn newest(seq: u64) -> Option<Newest> {
        Some(Newest { seq, created_ms: T0 + seq * 1000 })
    }

    fn view(feeds: &Feeds) -> Arc<FabricView> {
        feeds.fabric.borrow().clone()
    }

    #[test]
    fn a_member_that_stops_stays_in_the_view_behind_by_the_snapshots_it_missed() {
        let start = Instant::now();
        let (mut h, feeds) = History::new(false, start);
        let mut at = start;
        let mut tick = |h: &mut History, s: &Status, n: Option<Newest>| {
            at += FABRIC_REFRESH;
            let wall = T0 + at.duration_since(start).as_millis() as u64;
            h.observe(at, wall, s, n, members);
        };
        tick(&mut h, &status(Some(1), &[("origin", Some(1)), ("a", Some(1)), ("b", Some(1))]), newest(1));
        let v = view(&feeds);
        assert_eq!(v.members.len(), 4);
        assert_eq!(v.members[0].id, "me");
        assert_eq!(v.members[1].id, "origin", "origins next");
        assert_eq!(v.behind, 0);

        // b stops; two snapshots follow.
        tick(&mut h, &status(Some(1), &[("origin", Some(2)), ("a", Some(1))]), newest(2));
        tick(&mut h, &status(Some(3), &[("origin", Some(3)), ("a", Some(3))]), newest(3));
        let v = view(&feeds);
        let b = v.members.iter().find(|m| m.id == "b").unwrap();
        assert!(!b.connected && b.behind && b.seq == Some(1));
        assert_eq!((b.snapshots_behind, b.snapshots_behind_at_least), (2, false));
        let wall = T0 + 3 * FABRIC_REFRESH.as_millis() as u64;
        assert_eq!(b.behind_ms, Some(wall - (T0 + 2000)), "behind since snapshot 2 was created");
        assert_eq!(v.behind, 1);
        assert!(v.members.iter().filter(|m| m.id != "b").all(|m| !m.behind && m.seq == Some(3)));

        // A member whose snapshot this node never heard of: a lower bound.
        let (never, n, at_least, _) = h.lag(wall, None);
        assert!(never && n == 3 && at_least);
        // b is forgotten with the member.
        tick(&mut h, &status(Some(3), &[("origin", Some(3)), ("a", Some(3))]), newest(3));
        let few = || ["origin", "a"].into_iter().map(member).collect::<Vec<_>>();
        at += FABRIC_REFRESH;
        h.observe(at, wall + 5000, &status(Some(3), &[("origin", Some(3))]), newest(3), few);
        assert!(!h.memos.contains_key("b") && h.memos.contains_key("a"));
        assert_eq!(view(&feeds).members.len(), 3);
    }

    #[test]
    fn announces_count_only_peers_that_fetched_the_snapshot_while_connected() {
        let start = Instant::now();
        let (mut h, feeds) = History::new(true, start);
        let wall = T0 + 10_000;
        // Snapshot 5 published at T0 + 5000, known here at `wall`; peer "a" connected since T0.
        h.published(wall, newest(5).unwrap(), 1_000_000, 0);
        h.observe(start, wall, &status(Some(5), &[("a", None)]), newest(5), members);
        let mut s = status(Some(5), &[("a", Some(5))]);
        s.bytes_served_total = 1_100_000;
        h.observe(start, wall + 700, &s, newest(5), members);
        // A peer that connects after the root was known, already holding it, is no announce.
        let mut late = status(Some(5), &[("a", Some(5)), ("b", Some(5))]);
        late.peers[1].connected_since_ms = wall + 800;
        late.bytes_served_total = 1_100_000;
        h.observe(start + FABRIC_REFRESH, wall + 900, &late, newest(5), members);
        let report = feeds.history.borrow().clone();
        let snap = report.snapshots.iter().find(|s| s.seq == 5).unwrap();
        assert_eq!(snap.announced, 1);
        assert_eq!(snap.announce_lag_ms_max, Some(wall + 700 - (T0 + 5000)));
        assert_eq!((snap.changed_bytes, snap.origin_sent_bytes), (Some(1_000_000), Some(1_100_000)));
        assert!((snap.copies.unwrap() - 1.1).abs() < 1e-9);
        // The peer reporting nothing (not yet greeted after a reconnect) keeps its snapshot.
        h.observe(start + 2 * FABRIC_REFRESH, wall + 2000, &status(Some(5), &[("a", None)]), newest(5), members);
        assert_eq!(h.memos["a"].seq, Some(5));
    }

    #[test]
    fn samples_are_rates_over_the_interval_and_the_rings_are_capped() {
        let start = Instant::now();
        let (mut h, feeds) = History::new(false, start);
        let mut s = status(Some(1), &[]);
        for i in 0..(SAMPLES_MAX as u64 + 5) {
            s.bytes_fetched_total = i * 30_000;
            s.bytes_fetched_from_origin = i * 10_000;
            s.bytes_served_total = i * 5_000;
            let at = start + SAMPLE_INTERVAL * i as u32;
            h.observe(at, T0 + i * 10_000, &s, newest(i + 1), members);
        }
        assert_eq!(h.samples.len(), SAMPLES_MAX);
        assert_eq!(h.snapshots.len(), SNAPSHOTS_MAX);
        assert_eq!(h.snapshots.front().unwrap().seq, SAMPLES_MAX as u64 + 5 - SNAPSHOTS_MAX as u64 + 1);
        assert!(h.remember(T0, Newest { seq: 1, created_ms: T0 }).is_none(), "older than a full ring: not kept");
        assert_eq!(h.snapshots.len(), SNAPSHOTS_MAX);
        let report = feeds.history.borrow().clone();
        let last = report.samples.last().unwrap();
        assert_eq!((last.from_peers_bps, last.from_origin_bps, last.served_bps), (2000.0, 1000.0, 500.0));
        assert!(report.samples.windows(2).all(|w| w[0].t_ms < w[1].t_ms));
    }

    #[test]
    fn a_peers_rates_count_from_when_it_was_first_seen() {
        let start = Instant::now();
        let (mut h, feeds) = History::new(false, start);
        h.observe(start, T0, &status(Some(1), &[]), newest(1), members);
        let mut s = status(Some(1), &[("a", Some(1))]);
        h.observe(start + SAMPLE_INTERVAL / 2, T0 + 5000, &s, newest(1), members);
        s.peers[0].bytes_received = 50_000;
        s.peers[0].bytes_sent = 5_000;
        h.observe(start + SAMPLE_INTERVAL, T0 + 10_000, &s, newest(1), members);
        let a = feeds.fabric.borrow().members.iter().find(|m| m.id == "a").cloned().unwrap();
        assert_eq!((a.received_bps, a.sent_bps), (Some(10_000.0), Some(1_000.0)), "over the 5 s it was seen");
    }

    #[test]
    fn own_apply_lag_is_recorded_per_snapshot() {
        let start = Instant::now();
        let (mut h, feeds) = History::new(false, start);
        let mut s = status(Some(1), &[]);
        h.observe(start, T0, &s, newest(2), members);
        s.repos[0] = RepoStatus {
            seq: Some(2),
            last_apply_ms: Some(T0 + 2500),
            propagation_lag_ms: Some(500),
            ..Default::default()
        };
        h.observe(start + FABRIC_REFRESH, T0 + 2600, &s, newest(2), members);
        let report = feeds.history.borrow().clone();
        assert_eq!(report.snapshots.iter().find(|x| x.seq == 2).and_then(|x| x.applied_lag_ms), Some(500));
    }
}
