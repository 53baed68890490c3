//! Noticing two nodes that use the same key. Each node needs its own key (`mirrormesh keygen`); a copied key file
//! makes two nodes one peer id, and every node they both connect to sees that peer replace its own connection from
//! one address, then from the other, over and over (each new inbound connection closes the earlier ones, which a
//! restarted peer needs). A restart replaces a connection once; [`FLAPS_MIN`] replacements from changing addresses
//! within [`FLAP_WINDOW`] mean two nodes.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

/// Replacements from another address within [`FLAP_WINDOW`] that make a duplicate.
pub const FLAPS_MIN: usize = 3;
pub const FLAP_WINDOW: Duration = Duration::from_secs(60);
/// A duplicate is warned about at most this often.
pub const WARN_INTERVAL: Duration = Duration::from_secs(600);
/// Peers tracked at once (keyed by peer input: the least recently seen is forgotten beyond this).
pub const PEERS_TRACKED_MAX: usize = 1024;

#[derive(Default)]
pub struct DuplicateKeys {
    peers: BTreeMap<PeerId, Track>,
}

struct Track {
    /// When its connection was replaced from another address, newest last.
    flaps: VecDeque<Instant>,
    /// The addresses seen doing it (at most two kept: enough to name both nodes).
    addresses: Vec<Multiaddr>,
    warned: Option<Instant>,
    seen: Instant,
}

impl DuplicateKeys {
    /// `peer`'s earlier connections from `old` were replaced by one from `new`. Returns the addresses to name when
    /// this looks like two nodes with one key and was not warned about lately.
    pub fn replaced(
        &mut self,
        now: Instant,
        peer: PeerId,
        old: &[Multiaddr],
        new: &Multiaddr,
    ) -> Option<Vec<Multiaddr>> {
        if old.iter().all(|a| a == new) {
            return None;
        }
        if !self.peers.contains_key(&peer) && self.peers.len() >= PEERS_TRACKED_MAX {
            let oldest = self.peers.iter().min_by_key(|(_, t)| t.seen).map(|(p, _)| *p)?;
            self.peers.remove(&oldest);
        }
        let track = self.peers.entry(peer).or_insert_with(|| Track {
            flaps: VecDeque::new(),
            addresses: Vec::new(),
            warned: None,
            seen: now,
        });
        track.seen = now;
        track.flaps.push_back(now);
        while track.flaps.front().is_some_and(|at| now.duration_since(*at) > FLAP_WINDOW) {
            track.flaps.pop_front();
        }
        while track.flaps.len() > FLAPS_MIN {
            track.flaps.pop_front();
        }
        for addr in old.iter().chain([new]) {
            if !track.addresses.contains(addr) {
                if track.addresses.len() >= 2 {
                    track.addresses.remove(0);
                }
                track.addresses.push(addr.clone());
            }
        }
        let due = track.warned.is_none_or(|at| now.duration_since(at) >= WARN_INTERVAL);
        if track.flaps.len() >= FLAPS_MIN && due {
            track.warned = Some(now);
            return Some(track.addresses.clone());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternating_addresses_are_a_duplicate_a_restart_is_not() {
        let mut d = DuplicateKeys::default();
        let peer = PeerId::random();
        let (a, b): (Multiaddr, Multiaddr) =
            ("/ip4/10.0.0.1/udp/4001/quic-v1".parse().unwrap(), "/ip4/10.0.0.2/udp/4001/quic-v1".parse().unwrap());
        let t = Instant::now();
        assert_eq!(d.replaced(t, peer, std::slice::from_ref(&a), &a), None, "same address: nothing");
        assert_eq!(d.replaced(t, peer, std::slice::from_ref(&a), &b), None, "one replacement is a restart");
        assert_eq!(d.replaced(t + Duration::from_secs(1), peer, std::slice::from_ref(&b), &a), None);
        let named = d.replaced(t + Duration::from_secs(2), peer, std::slice::from_ref(&a), &b).expect("third flap");
        assert!(named.contains(&a) && named.contains(&b));
        assert_eq!(d.replaced(t + Duration::from_secs(3), peer, std::slice::from_ref(&b), &a), None, "warned once");
        // Slow restarts, a minute apart, never add up.
        let other = PeerId::random();
        for i in 0..10 {
            assert_eq!(d.replaced(t + Duration::from_secs(61 * i), other, std::slice::from_ref(&a), &b), None);
        }
    }
}
