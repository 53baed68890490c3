//! Fault injection for tests of peers' defences (`faults.flood_data_plane`): a requester that misbehaves in
//! every way the serving side must survive. Never enabled in production.

use std::net::SocketAddr;
use std::time::Duration;

use libp2p::PeerId;

use super::{Inner, client};

/// Stalled requests kept open at once (the server allows `STREAMS_PER_CONNECTION_MAX` streams per connection).
const STALLED_MAX: usize = 48;
/// Pause between two bad requests, and before redialing after the connection ends.
const PACE: Duration = Duration::from_millis(20);
const REDIAL: Duration = Duration::from_secs(2);

/// Opens request streams to `peer` in turn: one that stops inside its length prefix and stalls, one announcing a
/// frame over the limit, one with an undecodable body. Redials when the connection ends; runs until dropped.
pub(super) async fn flood(inner: &Inner, peer: PeerId, addrs: &[SocketAddr]) {
    let Some(&addr) = addrs.first() else { return };
    loop {
        let conn = match client::dial(inner, peer, addr, inner.shared.timeouts.dial).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(%peer, error = format!("{e:#}"), "flood: dial failed");
                tokio::time::sleep(REDIAL).await;
                continue;
            }
        };
        let mut stalled = Vec::new();
        for n in 0u64.. {
            let Ok((mut send, recv)) = conn.open_bi().await else { break };
            match n % 3 {
                0 => {
                    let _ = send.write_all(&[0, 0]).await;
                    stalled.push((send, recv));
                    if stalled.len() > STALLED_MAX {
                        stalled.remove(0);
                    }
                }
                1 => {
                    let _ = send.write_all(&u32::MAX.to_be_bytes()).await;
                    let _ = send.finish();
                }
                _ => {
                    let _ = send.write_all(&[0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).await;
                    let _ = send.finish();
                }
            }
            tokio::time::sleep(PACE).await;
        }
        tracing::debug!(%peer, "flood: connection ended");
        tokio::time::sleep(REDIAL).await;
    }
}
