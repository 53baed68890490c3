//! Sending slots: the few replies that may send chunk data at once (the origin's [`ORIGIN_SENDING_REPLIES_MAX`]),
//! shared fairly between peers.
//!
//! Rules, kept by [`SendingSlots`]:
//! 1. A reply takes a free slot at once; a free slot exists only while nobody waits.
//! 2. A slot that comes free goes to a waiting reply of the peer holding the fewest slots, and among peers holding
//!    equally few, to the reply that has waited longest. So while others wait, no peer gets a second slot before
//!    each waiting peer holds one, however many requests it queued (a greedy peer's queue is served one reply per
//!    turn, beside everyone else's); a peer alone may take every slot, so fairness never leaves the link idle.
//! 3. A reply that stops waiting (its stream reset, its connection gone) leaves the queue at once, so the queue holds
//!    live requests only: at most [`STREAMS_PER_CONNECTION_MAX`] per connection, on at most [`CONNECTIONS_MAX`]
//!    connections. Both tables are keyed by peer and hold only peers with a slot (at most the number of slots) or a
//!    waiting reply.
//!
//! Fairness is per peer, not per connection, because one peer may hold [`CONNECTIONS_PER_PEER_MAX`] connections.
//!
//! [`ORIGIN_SENDING_REPLIES_MAX`]: super::ORIGIN_SENDING_REPLIES_MAX
//! [`STREAMS_PER_CONNECTION_MAX`]: super::STREAMS_PER_CONNECTION_MAX
//! [`CONNECTIONS_MAX`]: super::CONNECTIONS_MAX
//! [`CONNECTIONS_PER_PEER_MAX`]: super::CONNECTIONS_PER_PEER_MAX

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use libp2p::PeerId;
use tokio::sync::oneshot;

/// A fixed number of sending slots, handed out by the rules above.
#[derive(Debug)]
pub(super) struct SendingSlots {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Slots nobody holds; zero whenever a reply waits.
    free: usize,
    /// Slots held, per peer holding at least one.
    held: HashMap<PeerId, usize>,
    /// Waiting replies, per peer with at least one, oldest first.
    waiting: HashMap<PeerId, VecDeque<Waiter>>,
    /// Order of arrival of waiting replies.
    next_ticket: u64,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    grant: oneshot::Sender<SendingSlot>,
}

/// A held sending slot; dropping it frees the slot for the next reply by the rules.
#[derive(Debug)]
pub(super) struct SendingSlot {
    slots: Arc<SendingSlots>,
    peer: PeerId,
    /// False for a slot whose grant did not reach its waiter (the grant was taken back).
    armed: bool,
}

impl Drop for SendingSlot {
    fn drop(&mut self) {
        if self.armed {
            self.slots.release(self.peer);
        }
    }
}

/// A reply waiting for a slot; leaves the queue if dropped before its grant.
struct Waiting<'a> {
    slots: &'a SendingSlots,
    peer: PeerId,
    ticket: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        if let Some(queue) = state.waiting.get_mut(&self.peer) {
            // Absent if it was granted meanwhile: the grant is then dropped with its channel, freeing the slot.
            queue.retain(|w| w.ticket != self.ticket);
            if queue.is_empty() {
                state.waiting.remove(&self.peer);
            }
        }
    }
}

impl SendingSlots {
    /// `slots` sending slots (at least one).
    pub(super) fn new(slots: usize) -> Arc<Self> {
        assert!(slots > 0, "no sending slot");
        let state = State { free: slots, held: HashMap::new(), waiting: HashMap::new(), next_ticket: 0 };
        Arc::new(Self { state: Mutex::new(state) })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a slot for a reply to `peer`. None only if the slots were dropped meanwhile, which cannot happen
    /// while this borrows them.
    pub(super) async fn acquire(self: &Arc<Self>, peer: PeerId) -> Option<SendingSlot> {
        let (ticket, granted) = {
            let mut state = self.lock();
            if state.free > 0 {
                debug_assert!(state.waiting.is_empty(), "a free slot while replies wait");
                state.free -= 1;
                *state.held.entry(peer).or_default() += 1;
                return Some(SendingSlot { slots: self.clone(), peer, armed: true });
            }
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let (grant, granted) = oneshot::channel();
            state.waiting.entry(peer).or_default().push_back(Waiter { ticket, grant });
            (ticket, granted)
        };
        let _waiting = Waiting { slots: self, peer, ticket };
        granted.await.ok()
    }

    /// Slots `peer` holds now.
    pub(super) fn held_by(&self, peer: &PeerId) -> usize {
        self.lock().held.get(peer).copied().unwrap_or(0)
    }

    /// Frees one of `peer`'s slots and grants free slots to waiting replies by the rules.
    fn release(self: &Arc<Self>, peer: PeerId) {
        let mut state = self.lock();
        match state.held.get_mut(&peer) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                state.held.remove(&peer);
            }
            None => unreachable!("a sending slot released by a peer holding none"),
        }
        state.free += 1;
        while state.free > 0 {
            // The waiting peer holding fewest slots, then the longest-waiting reply.
            let next = state
                .waiting
                .iter()
                .filter_map(|(p, queue)| queue.front().map(|w| (state.held.get(p).copied().unwrap_or(0), w.ticket, *p)))
                .min();
            let Some((_, _, to)) = next else { break };
            let Some(queue) = state.waiting.get_mut(&to) else { break };
            let Some(waiter) = queue.pop_front() else { break };
            if queue.is_empty() {
                state.waiting.remove(&to);
            }
            state.free -= 1;
            *state.held.entry(to).or_default() += 1;
            let slot = SendingSlot { slots: self.clone(), peer: to, armed: true };
            if let Err(mut slot) = waiter.grant.send(slot) {
                // The waiter is gone (its drop is about to take it out of the queue): take the grant back.
                slot.armed = false;
                state.free += 1;
                match state.held.get_mut(&to) {
                    Some(n) if *n > 1 => *n -= 1,
                    _ => {
                        state.held.remove(&to);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;

    use super::*;

    fn peer(n: u8) -> PeerId {
        let key = libp2p::identity::Keypair::ed25519_from_bytes([n; 32]).unwrap();
        key.public().to_peer_id()
    }

    type Acquiring<'a> = Pin<Box<dyn Future<Output = Option<SendingSlot>> + 'a>>;

    /// An acquisition polled once: it has taken a slot or joined the queue.
    async fn queue(slots: &Arc<SendingSlots>, peer: PeerId) -> Acquiring<'_> {
        let mut acquiring: Acquiring<'_> = Box::pin(slots.acquire(peer));
        assert!(futures::poll!(&mut acquiring).is_pending(), "a slot was free");
        acquiring
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_waiting_peer_holding_fewest() {
        let (greedy, a, b) = (peer(1), peer(2), peer(3));
        let slots = SendingSlots::new(2);
        // The greedy peer takes both slots and queues three more replies; then a and b queue one each.
        let mut held = vec![slots.acquire(greedy).await.unwrap(), slots.acquire(greedy).await.unwrap()];
        let mut pending = Vec::new();
        for p in [greedy, greedy, greedy, a, b] {
            pending.push(queue(&slots, p).await);
        }
        // Each time the oldest held slot is freed, exactly one waiting reply is granted at once.
        let mut order = Vec::new();
        while !pending.is_empty() {
            drop(held.remove(0));
            let (slot, _, rest) = futures::future::select_all(pending).await;
            let slot = slot.unwrap();
            order.push(if slot.peer == greedy {
                "greedy"
            } else if slot.peer == a {
                "a"
            } else {
                "b"
            });
            held.push(slot);
            pending = rest;
        }
        // First a (holding none, while the greedy peer holds one); then the greedy peer's oldest reply and b both hold
        // none, and the greedy peer's waited longer; then b (none) before the greedy peer's second (it holds one).
        // First come, first served would have been greedy, greedy, greedy, a, b.
        assert_eq!(order, ["a", "greedy", "b", "greedy", "greedy"]);
        drop(held);
        let state = slots.lock();
        assert_eq!((state.free, state.held.len(), state.waiting.len()), (2, 0, 0));
    }

    #[tokio::test]
    async fn a_reply_that_stops_waiting_leaves_the_queue_and_takes_no_slot() {
        let (x, y) = (peer(1), peer(2));
        let slots = SendingSlots::new(1);
        let first = slots.acquire(x).await.unwrap();
        let gone = queue(&slots, y).await;
        assert_eq!(slots.lock().waiting.len(), 1);
        drop(gone);
        assert_eq!(slots.lock().waiting.len(), 0);
        drop(first);
        let state = slots.lock();
        assert_eq!((state.free, state.held.len()), (1, 0), "the slot is free, not held by the reply that left");
    }
}
