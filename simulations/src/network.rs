//! The flow-level network model.
//!
//! Every node has an upload and a download capacity (bytes per second). Bytes travel in **flows**, one per ordered
//! pair of nodes with something to send: a flow is a FIFO of items (a chunk, a batch of manifest nodes, a small
//! reply), like the ordered stream of one connection. Concurrent flows share capacities **max-min fairly**: rates are
//! found by progressive filling (raise every flow's rate together; when a node's upload or download is full, freeze
//! the flows through it; continue with the rest).
//!
//! Time advances in steps. Rates are recomputed at the start of a step when the set of active flows changed, and
//! stay fixed within it; every item that finishes inside the step is given its exact finishing instant at those
//! rates. A flow that starts or drains inside a step changes the others' rates from the next step on: the model's
//! only approximation, bounded by the step length (1 ms by default, against transfers of tens of milliseconds and
//! more). [`Network::time_to_next_completion`] lets a caller with few flows step from one completion to the next
//! exactly (the client-server baseline does).
//!
//! Optionally every flow also passes through one **shared** capacity: the CPU of a single machine that runs every
//! node (the testbed: nine daemons on two cores), where each byte costs CPU at its sender and its receiver, so the
//! bytes per second of all flows together are bounded ([`Network::with_shared`]).
//!
//! Latency is not modelled here: the caller adds the pair's one-way latency to each finishing instant.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};

/// Nanoseconds of virtual time.
pub type Nanos = u64;

/// An item's remaining bytes below this count as sent (floating-point slack).
const BYTES_EPSILON: f64 = 1e-6;

struct Item<T> {
    bytes: f64,
    payload: T,
}

struct Flow<T> {
    src: u32,
    dst: u32,
    /// Bytes per second, as of the last rate computation.
    rate: f64,
    items: VecDeque<Item<T>>,
    /// Bytes of the head item already sent.
    head_sent: f64,
}

/// An item that finished sending.
#[derive(Debug)]
pub struct Delivered<T> {
    /// The instant its last byte left the sender (add the latency for its arrival).
    pub at: Nanos,
    pub src: u32,
    pub dst: u32,
    pub bytes: u64,
    pub payload: T,
}

pub struct Network<T> {
    /// Upload and download capacity of each node, bytes per second.
    up: Vec<f64>,
    down: Vec<f64>,
    /// Active flows, in the order they became active (the order reaches completions: it must be deterministic).
    flows: Vec<Flow<T>>,
    /// Index into `flows` of the active flow of each pair.
    by_pair: HashMap<(u32, u32), usize>,
    /// The set of active flows changed since rates were computed.
    dirty: bool,
    /// Rate recomputations so far (for the run statistics).
    pub recomputations: u64,
    /// Bytes each node has sent so far, counted as they leave (not when an item completes).
    sent: Vec<f64>,
    /// Bytes per second all flows together may carry (`None`: no such bound).
    shared: Option<f64>,
}

/// A min-heap entry of progressive filling: a resource and its fair share when pushed.
#[derive(PartialEq)]
struct Share {
    share: f64,
    resource: usize,
}

impl Eq for Share {}

impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Share {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap. Ties by resource number, for determinism.
        other.share.total_cmp(&self.share).then_with(|| other.resource.cmp(&self.resource))
    }
}

impl<T> Network<T> {
    /// A network of nodes with these capacities (bytes per second).
    pub fn new(up: Vec<f64>, down: Vec<f64>) -> Self {
        assert_eq!(up.len(), down.len(), "one upload and one download capacity per node");
        let sent = vec![0.0; up.len()];
        Self {
            up,
            down,
            flows: Vec::new(),
            by_pair: HashMap::new(),
            dirty: false,
            recomputations: 0,
            sent,
            shared: None,
        }
    }

    /// The same network where all flows together carry at most `bytes_per_sec` (a shared resource every flow passes
    /// through, filled max-min fairly with the links).
    pub fn with_shared(mut self, bytes_per_sec: f64) -> Self {
        assert!(bytes_per_sec > 0.0, "a shared capacity must be positive");
        self.shared = Some(bytes_per_sec);
        self
    }

    /// The resources flow `f` passes through: its sender's upload (`2 src`), its receiver's download (`2 dst + 1`)
    /// and, if there is one, the shared capacity (`2 n`).
    fn resources_of(&self, f: &Flow<T>) -> ([usize; 3], usize) {
        let links = [2 * f.src as usize, 2 * f.dst as usize + 1, 2 * self.up.len()];
        (links, if self.shared.is_some() { 3 } else { 2 })
    }

    pub fn up(&self, node: u32) -> f64 {
        self.up[node as usize]
    }

    pub fn down(&self, node: u32) -> f64 {
        self.down[node as usize]
    }

    /// Bytes `node` has sent so far.
    pub fn sent(&self, node: u32) -> f64 {
        self.sent[node as usize]
    }

    pub fn is_idle(&self) -> bool {
        self.flows.is_empty()
    }

    /// Queues `bytes` from `src` to `dst` behind whatever that pair is already sending.
    pub fn send(&mut self, src: u32, dst: u32, bytes: u64, payload: T) {
        let item = Item { bytes: bytes as f64, payload };
        if let Some(&i) = self.by_pair.get(&(src, dst)) {
            self.flows[i].items.push_back(item);
            return;
        }
        self.by_pair.insert((src, dst), self.flows.len());
        self.flows.push(Flow { src, dst, rate: 0.0, items: VecDeque::from([item]), head_sent: 0.0 });
        self.dirty = true;
    }

    /// Removes the items of pair `(src, dst)` that `drop` selects (a cancelled request, a closed connection), even
    /// one partly sent, and returns their payloads in queue order.
    pub fn remove(&mut self, src: u32, dst: u32, mut drop: impl FnMut(&T) -> bool) -> Vec<T> {
        let Some(&i) = self.by_pair.get(&(src, dst)) else { return Vec::new() };
        let flow = &mut self.flows[i];
        let mut removed = Vec::new();
        let mut kept = VecDeque::with_capacity(flow.items.len());
        for (at, item) in flow.items.drain(..).enumerate() {
            if drop(&item.payload) {
                if at == 0 {
                    flow.head_sent = 0.0;
                }
                removed.push(item.payload);
            } else {
                kept.push_back(item);
            }
        }
        flow.items = kept;
        if flow.items.is_empty() {
            self.retire(i);
        }
        removed
    }

    /// Time until the first item finishes at the current rates (recomputing them if needed); `None` when idle or
    /// when nothing moves.
    pub fn time_to_next_completion(&mut self) -> Option<Nanos> {
        if self.dirty {
            self.compute_rates();
        }
        self.flows
            .iter()
            .filter(|f| f.rate > 0.0)
            .map(|f| {
                let left = (f.items[0].bytes - f.head_sent).max(0.0);
                (left / f.rate * 1e9).ceil() as Nanos
            })
            .min()
    }

    /// Sends for `dt` nanoseconds starting at `now`, appending every item that finished to `out`, in order of flow
    /// activation and, within a flow, queue order.
    pub fn step(&mut self, now: Nanos, dt: Nanos, out: &mut Vec<Delivered<T>>) {
        if self.dirty {
            self.compute_rates();
        }
        let mut i = 0;
        while i < self.flows.len() {
            let flow = &mut self.flows[i];
            let mut budget = flow.rate * dt as f64 / 1e9;
            let mut used = 0.0;
            let mut elapsed = 0.0;
            while let Some(head) = flow.items.front() {
                let left = head.bytes - flow.head_sent;
                if left > budget + BYTES_EPSILON {
                    flow.head_sent += budget;
                    used += budget;
                    break;
                }
                let left = left.max(0.0);
                budget -= left;
                used += left;
                if flow.rate > 0.0 {
                    elapsed += left / flow.rate * 1e9;
                }
                let item = flow.items.pop_front().expect("head exists");
                flow.head_sent = 0.0;
                out.push(Delivered {
                    at: now + (elapsed.round() as Nanos).min(dt),
                    src: flow.src,
                    dst: flow.dst,
                    bytes: item.bytes as u64,
                    payload: item.payload,
                });
            }
            let src = flow.src as usize;
            self.sent[src] += used;
            if self.flows[i].items.is_empty() {
                self.retire(i);
            } else {
                i += 1;
            }
        }
    }

    /// Removes flow `i` (empty) from the active set.
    fn retire(&mut self, i: usize) {
        let flow = self.flows.swap_remove(i);
        self.by_pair.remove(&(flow.src, flow.dst));
        if i < self.flows.len() {
            let moved = &self.flows[i];
            self.by_pair.insert((moved.src, moved.dst), i);
        }
        self.dirty = true;
    }

    /// Max-min fair rates by progressive filling. Resource `2n` is node n's upload, `2n + 1` its download. A
    /// resource's fair share only grows as flows through other resources freeze, so a lazy heap (re-push when a
    /// popped share is stale) finds the next bottleneck.
    fn compute_rates(&mut self) {
        self.dirty = false;
        self.recomputations += 1;
        let links = 2 * self.up.len();
        let resources = links + usize::from(self.shared.is_some());
        let mut remaining: Vec<f64> =
            (0..links).map(|r| if r % 2 == 0 { self.up[r / 2] } else { self.down[r / 2] }).chain(self.shared).collect();
        let mut users: Vec<u32> = vec![0; resources];
        for f in &self.flows {
            let (rs, k) = self.resources_of(f);
            for &r in &rs[..k] {
                users[r] += 1;
            }
        }
        // Flows through each resource, as one array sliced by offsets (counting sort).
        let mut start: Vec<usize> = vec![0; resources + 1];
        for r in 0..resources {
            start[r + 1] = start[r] + users[r] as usize;
        }
        let mut fill = start.clone();
        let mut through: Vec<usize> = vec![0; start[resources]];
        for (i, f) in self.flows.iter().enumerate() {
            let (rs, k) = self.resources_of(f);
            for &r in &rs[..k] {
                through[fill[r]] = i;
                fill[r] += 1;
            }
        }
        let mut frozen = vec![false; self.flows.len()];
        let mut heap = BinaryHeap::new();
        for r in 0..resources {
            if users[r] > 0 {
                heap.push(Share { share: remaining[r] / f64::from(users[r]), resource: r });
            }
        }
        while let Some(Share { share, resource }) = heap.pop() {
            if users[resource] == 0 {
                continue;
            }
            let current = remaining[resource].max(0.0) / f64::from(users[resource]);
            if current > share {
                heap.push(Share { share: current, resource });
                continue;
            }
            for &i in &through[start[resource]..start[resource + 1]] {
                if frozen[i] {
                    continue;
                }
                frozen[i] = true;
                let (rs, k) = self.resources_of(&self.flows[i]);
                self.flows[i].rate = current;
                for &r in &rs[..k] {
                    remaining[r] -= current;
                    users[r] -= 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    fn run_to_idle(net: &mut Network<u32>) -> Vec<Delivered<u32>> {
        let mut now = 0;
        let mut out = Vec::new();
        while let Some(dt) = net.time_to_next_completion() {
            net.step(now, dt, &mut out);
            now += dt;
        }
        out
    }

    #[test]
    fn a_shared_capacity_bounds_all_flows_together_and_is_shared_max_min_fairly() {
        // Three disjoint pairs of 100 MB/s links, all on one 150 MB/s machine: 50 MB/s each, so 100 MB each take 2 s.
        let mut net = Network::new(vec![100.0 * MB; 6], vec![100.0 * MB; 6]).with_shared(150.0 * MB);
        for src in 0..3 {
            net.send(src, src + 3, 100_000_000, src);
        }
        let done = run_to_idle(&mut net);
        assert_eq!(done.len(), 3);
        for d in &done {
            assert!((d.at as f64 / 1e9 - 2.0).abs() < 1e-3, "{} s", d.at as f64 / 1e9);
        }
        // A flow held below its share by its own link leaves the rest to the others: 10 MB/s, then 70 each.
        let mut net = Network::new(
            vec![100.0 * MB; 6],
            vec![100.0 * MB, 100.0 * MB, 100.0 * MB, 10.0 * MB, 100.0 * MB, 100.0 * MB],
        )
        .with_shared(150.0 * MB);
        net.send(1, 4, 70_000_000, 1);
        net.send(2, 5, 70_000_000, 2);
        net.send(0, 3, 10_000_000, 0);
        let done = run_to_idle(&mut net);
        for d in &done {
            assert!((d.at as f64 / 1e9 - 1.0).abs() < 1e-3, "flow {}: {} s", d.payload, d.at as f64 / 1e9);
        }
    }

    #[test]
    fn one_flow_runs_at_the_bottleneck() {
        let mut net = Network::new(vec![100.0 * MB, 100.0 * MB], vec![100.0 * MB, 10.0 * MB]);
        net.send(0, 1, 10_000_000, 7);
        let out = run_to_idle(&mut net);
        assert_eq!(out.len(), 1);
        // 10 MB at 10 MB/s (the receiver's download).
        assert!((out[0].at as f64 - 1e9).abs() < 1e3, "{}", out[0].at);
    }

    #[test]
    fn shares_are_max_min_fair() {
        // Node 0 uploads to 1 and 2; node 2's download is 10 MB/s, so 1 gets the other 90.
        let mut net = Network::new(vec![100.0 * MB; 3], vec![1000.0 * MB, 1000.0 * MB, 10.0 * MB]);
        net.send(0, 1, 90_000_000, 1);
        net.send(0, 2, 10_000_000, 2);
        let out = run_to_idle(&mut net);
        for d in &out {
            assert!((d.at as f64 - 1e9).abs() < 1e3, "both finish at 1 s: {d:?}");
        }
    }

    #[test]
    fn freed_capacity_goes_to_the_others() {
        // Two equal flows from one uploader: the short one finishes, the long one then gets everything.
        let mut net = Network::new(vec![10.0 * MB; 3], vec![100.0 * MB; 3]);
        net.send(0, 1, 5_000_000, 1);
        net.send(0, 2, 15_000_000, 2);
        let out = run_to_idle(&mut net);
        assert_eq!(out.iter().map(|d| d.payload).collect::<Vec<_>>(), vec![1, 2]);
        assert!((out[0].at as f64 - 1e9).abs() < 1e3);
        assert!((out[1].at as f64 - 2e9).abs() < 1e3, "{}", out[1].at);
    }

    #[test]
    fn items_of_a_pair_finish_in_order_with_exact_instants() {
        let mut net = Network::new(vec![1.0 * MB; 2], vec![1.0 * MB; 2]);
        net.send(0, 1, 250_000, 1);
        net.send(0, 1, 250_000, 2);
        net.send(0, 1, 0, 3);
        let mut out = Vec::new();
        net.step(0, 1_000_000_000, &mut out);
        let at: Vec<_> = out.iter().map(|d| (d.payload, d.at)).collect();
        assert_eq!(at, vec![(1, 250_000_000), (2, 500_000_000), (3, 500_000_000)]);
        assert!(net.is_idle());
    }

    #[test]
    fn removed_items_are_not_delivered() {
        let mut net = Network::new(vec![1.0 * MB; 2], vec![1.0 * MB; 2]);
        for p in 0..4 {
            net.send(0, 1, 100_000, p);
        }
        let mut out = Vec::new();
        net.step(0, 50_000_000, &mut out);
        assert!(out.is_empty());
        assert_eq!(net.remove(0, 1, |p| p % 2 == 0), vec![0, 2]);
        let out = run_to_idle(&mut net);
        assert_eq!(out.iter().map(|d| d.payload).collect::<Vec<_>>(), vec![1, 3]);
    }
}
