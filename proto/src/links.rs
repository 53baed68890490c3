//! Rules about a node's control connections, decided here and carried out by the shell (which owns the sockets):
//! what a control request's timeout means ([`ControlAnswers`]) and which connections a new one from the same peer
//! replaces ([`replaced_by`]).
//!
//! Connections are named by the shell's own key `K` (the daemon uses libp2p's connection id); the rules only order
//! and compare them.

use std::collections::BTreeMap;

use crate::timestamp::Mono;

/// How long a control request may take before it fails (the shell's request-response timeout).
pub const CONTROL_TIMEOUT_MS: u64 = 30_000;
/// Connections whose last answer [`ControlAnswers`] remembers. The shell's connection limits keep far fewer open;
/// past this the entry answered longest ago is forgotten (its next timeout then counts as [`ControlTimeout::Gone`]).
pub const ANSWERING_CONNECTIONS_MAX: usize = 4_096;

/// What a control request that timed out says about its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlTimeout {
    /// The connection answered another request within the timeout: the peer is slow (an origin that dozens of
    /// mirrors ask at once), not gone; closing would throw away everything else in flight. Keep it.
    Slow,
    /// Nothing came back on the connection for a whole timeout: the peer or the connection is gone. Close it, so
    /// the peer is redialed (or greeted afresh on another connection it still has).
    Gone,
}

/// Per connection, when it last answered a control request.
#[derive(Debug)]
pub struct ControlAnswers<K: Ord> {
    last: BTreeMap<K, Mono>,
    timeout_ms: u64,
}

impl<K: Ord + Clone> ControlAnswers<K> {
    /// `timeout_ms`: the control request timeout ([`CONTROL_TIMEOUT_MS`] in the daemon).
    pub fn new(timeout_ms: u64) -> Self {
        Self { last: BTreeMap::new(), timeout_ms }
    }

    /// `conn` answered a control request at `now`.
    pub fn answered(&mut self, conn: K, now: Mono) {
        if self.last.len() >= ANSWERING_CONNECTIONS_MAX
            && !self.last.contains_key(&conn)
            && let Some(oldest) = self.last.iter().min_by_key(|(_, at)| **at).map(|(k, _)| k.clone())
        {
            self.last.remove(&oldest);
        }
        self.last.insert(conn, now);
    }

    /// `conn` closed.
    pub fn closed(&mut self, conn: &K) {
        self.last.remove(conn);
    }

    /// A control request on `conn` timed out at `now`: keep the connection or close it.
    pub fn timed_out(&self, conn: &K, now: Mono) -> ControlTimeout {
        match self.last.get(conn) {
            Some(at) if now.millis_since(*at) < self.timeout_ms => ControlTimeout::Slow,
            _ => ControlTimeout::Gone,
        }
    }

    /// Connections remembered.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// How long before a peer's new dial a connection this node dialed to it may have been established and still be
/// alive: both ends dialing each other at once (each dials only while it holds no connection to the other) establish
/// their connections within a handshake of each other.
pub const DIAL_RACE_MS: u64 = 5_000;

/// A peer opened a new connection to this node (`new_inbound`: the peer dialed) at `now` while these were open
/// (`existing`: key, whether the peer dialed it, when it was established). Returns the connections to close. A
/// peer dials only while it holds no connection to this node, so when it dials again it restarted or lost its
/// network and every connection this node still holds to it is dead (a request sent on one is lost until it times
/// out: requests to a peer go over its connections in turn): its earlier inbound connections, and the ones this
/// node dialed, unless they were established within [`DIAL_RACE_MS`] of now (both ends dialed at once). A
/// connection this node dialed replaces nothing.
pub fn replaced_by<K: Clone>(existing: &[(K, bool, Mono)], new_inbound: bool, now: Mono) -> Vec<K> {
    if !new_inbound {
        return Vec::new();
    }
    existing
        .iter()
        .filter(|(_, inbound, since)| *inbound || now.millis_since(*since) > DIAL_RACE_MS)
        .map(|(k, _, _)| k.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_on_a_connection_that_answered_within_the_timeout_is_slowness() {
        let mut answers = ControlAnswers::new(30_000);
        assert_eq!(answers.timed_out(&1u32, Mono(0)), ControlTimeout::Gone, "never answered");
        answers.answered(1, Mono(10_000));
        assert_eq!(answers.timed_out(&1, Mono(39_999)), ControlTimeout::Slow);
        assert_eq!(answers.timed_out(&1, Mono(40_000)), ControlTimeout::Gone, "silent for a whole timeout");
        assert_eq!(answers.timed_out(&2, Mono(10_001)), ControlTimeout::Gone, "another connection's answer counts not");
        answers.closed(&1);
        assert_eq!(answers.timed_out(&1, Mono(10_001)), ControlTimeout::Gone);
        assert!(answers.is_empty());
    }

    #[test]
    fn the_table_is_capped_and_forgets_the_connection_answered_longest_ago() {
        let mut answers = ControlAnswers::new(30_000);
        for k in 0..ANSWERING_CONNECTIONS_MAX as u64 {
            answers.answered(k, Mono(1_000 + k));
        }
        answers.answered(0, Mono(50_000)); // refreshed: no longer the oldest
        answers.answered(u64::MAX, Mono(50_001));
        assert_eq!(answers.len(), ANSWERING_CONNECTIONS_MAX);
        assert_eq!(answers.timed_out(&1, Mono(50_002)), ControlTimeout::Gone, "forgotten");
        assert_eq!(answers.timed_out(&0, Mono(50_002)), ControlTimeout::Slow);
        assert_eq!(answers.timed_out(&u64::MAX, Mono(50_002)), ControlTimeout::Slow);
    }

    #[test]
    fn a_peer_dialing_again_replaces_its_connections_but_one_this_node_dialed_in_the_same_instant() {
        let now = Mono(100_000);
        let existing = [
            ("in-a", true, Mono(1_000)),
            ("out-b", false, Mono(2_000)),
            ("in-c", true, Mono(99_000)),
            ("out-d", false, Mono(100_000 - DIAL_RACE_MS)),
        ];
        assert_eq!(replaced_by(&existing, true, now), vec!["in-a", "out-b", "in-c"], "out-d: both dialed at once");
        assert!(replaced_by(&existing, false, now).is_empty(), "this node dialing again replaces nothing");
        assert!(replaced_by::<&str>(&[], true, now).is_empty());
    }
}
