//! The control protocol's bookkeeping: the requests this node has outstanding (what each answer is for), what a
//! request's timeout means for its connection (the core's rule, `links.rs`), and each peer's budget for manifest
//! answers. It reads the request-response behaviour's events into [`Step`]s; the loop carries them out (feeds the
//! engine, tells the peer manager, closes a connection, answers a request).

use std::collections::HashMap;
use std::time::Instant;

use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::ConnectionId;
use libp2p::{PeerId, Swarm};
use mirrormesh_proto::Mono;
use mirrormesh_proto::control::{ControlRequest, ControlResponse, Hello};
use mirrormesh_proto::links::{CONTROL_TIMEOUT_MS, ControlAnswers, ControlTimeout};
use mirrormesh_proto::sync::{Input, ReqId};
use serde_bytes::ByteBuf;

use super::manifest_answers::{self, AnswerBudgets};
use crate::swarm::{Behaviour, WireRequest};

/// What an outstanding request of this node's is for.
enum Pending {
    Hello { sent: Instant },
    Have { sent: Instant },
    Nodes { peer: PeerId, req: ReqId },
    Delta { peer: PeerId, req: ReqId },
}

/// A request of this node's to send.
pub enum Outgoing {
    Hello(Hello),
    Have(mirrormesh_proto::control::Have),
    Nodes { req: ReqId, hashes: Vec<mirrormesh_proto::node::NodeHash>, descendants_max: u16 },
    Delta { req: ReqId, hash: mirrormesh_proto::delta::DeltaHash },
}

/// What one control event asks of the loop, in order.
pub enum Step {
    /// A peer's request, to be answered (`Control::answer_later` for manifest fetches).
    Request {
        peer: PeerId,
        request: ControlRequest,
        channel: ResponseChannel<ControlResponse>,
    },
    /// A request that did not decode: an offence (not answered: dropping the channel resets the stream).
    Malformed {
        peer: PeerId,
        why: String,
    },
    /// An answer to a request the peer manager sent (a member exchange); `Control` does not know its ids.
    Unclaimed {
        peer: PeerId,
        request_id: OutboundRequestId,
        response: Option<ControlResponse>,
    },
    /// A round trip to `peer` took this long (a hello or have answered).
    RoundTrip {
        peer: PeerId,
        ms: f64,
    },
    Hello {
        peer: PeerId,
        hello: Hello,
    },
    /// For the engine: a manifest fetch's answer (`Input::Nodes`, `Input::Delta`), or that it got no usable
    /// answer (`Input::FetchFailed`: the engine asks elsewhere).
    Feed(Input<PeerId>),
    /// The connection stopped answering: close it; if the peer has another, the engine starts over on that one.
    Gone {
        peer: PeerId,
        connection: ConnectionId,
    },
    /// Counted (a metric name), nothing else to do.
    Count(&'static str),
}

pub struct Control {
    pending: HashMap<OutboundRequestId, Pending>,
    /// When each connection last answered a control request (what a timeout means: the core's rule).
    answered: ControlAnswers<ConnectionId>,
    /// What each peer may still take in manifest answers.
    budgets: AnswerBudgets,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            pending: HashMap::new(),
            answered: ControlAnswers::new(CONTROL_TIMEOUT_MS),
            budgets: Default::default(),
        }
    }
}

impl Control {
    /// Sends a request of this node's and remembers what its answer is for.
    pub fn send(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, request: Outgoing) {
        let (request, pending) = match request {
            Outgoing::Hello(hello) => (ControlRequest::Hello(hello), Pending::Hello { sent: Instant::now() }),
            Outgoing::Have(have) => (ControlRequest::Have(have), Pending::Have { sent: Instant::now() }),
            Outgoing::Nodes { req, hashes, descendants_max } => {
                (ControlRequest::GetNodes { hashes, descendants_max }, Pending::Nodes { peer, req })
            }
            Outgoing::Delta { req, hash } => (ControlRequest::GetDelta { hash }, Pending::Delta { peer, req }),
        };
        let id = swarm.behaviour_mut().control.send_request(&peer, request.into());
        self.pending.insert(id, pending);
    }

    /// A connection closed: its answers are forgotten.
    pub fn closed(&mut self, connection: &ConnectionId) {
        self.answered.closed(connection);
    }

    /// Reads one event of the request-response behaviour.
    pub fn on_event(&mut self, event: request_response::Event<WireRequest, ControlResponse>, now: Mono) -> Vec<Step> {
        match event {
            request_response::Event::Message { peer, connection_id, message } => match message {
                request_response::Message::Request { request: WireRequest::Valid(request), channel, .. } => {
                    vec![Step::Request { peer, request, channel }]
                }
                request_response::Message::Request { request: WireRequest::Malformed(why), .. } => {
                    vec![Step::Count("control_malformed"), Step::Malformed { peer, why }]
                }
                request_response::Message::Response { request_id, response } => {
                    self.answered.answered(connection_id, now);
                    self.on_response(peer, request_id, response)
                }
            },
            request_response::Event::OutboundFailure { peer, connection_id, request_id, error } => {
                tracing::debug!(%peer, "control request failed: {error}");
                let mut steps = vec![Step::Count("control_requests_failed")];
                let verdict = matches!(error, request_response::OutboundFailure::Timeout)
                    .then(|| self.answered.timed_out(&connection_id, now));
                match verdict {
                    Some(ControlTimeout::Slow) => {
                        tracing::debug!(%peer, "control request timed out on a connection that still answers");
                        steps.push(Step::Count("control_requests_slow"));
                    }
                    Some(ControlTimeout::Gone) => {
                        tracing::info!(%peer, "control request timed out; closing the connection");
                        steps.push(Step::Gone { peer, connection: connection_id });
                    }
                    None => {}
                }
                match self.pending.remove(&request_id) {
                    Some(Pending::Nodes { peer, req } | Pending::Delta { peer, req }) => {
                        steps.push(Step::Feed(Input::FetchFailed { from: peer, req }))
                    }
                    Some(Pending::Hello { .. } | Pending::Have { .. }) => {}
                    None => steps.push(Step::Unclaimed { peer, request_id, response: None }),
                }
                steps
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "control request from peer failed: {error}");
                vec![Step::Count("control_inbound_failures")]
            }
            request_response::Event::ResponseSent { .. } => Vec::new(),
        }
    }

    fn on_response(&mut self, peer: PeerId, request_id: OutboundRequestId, response: ControlResponse) -> Vec<Step> {
        let Some(pending) = self.pending.remove(&request_id) else {
            return vec![Step::Unclaimed { peer, request_id, response: Some(response) }];
        };
        let mut steps = Vec::new();
        if let Pending::Hello { sent } | Pending::Have { sent } = &pending {
            steps.push(Step::RoundTrip { peer, ms: sent.elapsed().as_secs_f64() * 1000.0 });
        }
        match (pending, response) {
            (Pending::Hello { .. }, ControlResponse::Hello(hello)) => steps.push(Step::Hello { peer, hello }),
            (Pending::Nodes { peer, req }, ControlResponse::Nodes { nodes, descendants }) => {
                let nodes = nodes.into_iter().map(|n| n.map(ByteBuf::into_vec)).collect();
                let descendants = descendants.into_iter().map(ByteBuf::into_vec).collect();
                steps.push(Step::Feed(Input::Nodes { from: peer, req, nodes, descendants }));
            }
            (Pending::Delta { peer, req }, ControlResponse::Delta { delta }) => {
                steps.push(Step::Feed(Input::Delta { from: peer, req, delta: delta.map(ByteBuf::into_vec) }));
            }
            (Pending::Nodes { peer, req } | Pending::Delta { peer, req }, other) => {
                tracing::warn!(%peer, ?other, "unexpected answer to a manifest fetch");
                steps.push(Step::Count("control_unexpected_responses"));
                steps.push(Step::Feed(Input::FetchFailed { from: peer, req }));
            }
            _ => {}
        }
        steps
    }

    /// Starts reading a manifest fetch of `peer`'s if its budget allows (`None`), else returns the refusal to send.
    pub fn start_answer(&mut self, peer: PeerId, request: &ControlRequest) -> Option<ControlResponse> {
        if self.budgets.start(Instant::now(), peer) {
            return None;
        }
        let refusal = match request {
            ControlRequest::GetNodes { hashes, .. } => manifest_answers::refusal(hashes.len(), false),
            _ => manifest_answers::refusal(1, true),
        };
        Some(refusal)
    }

    /// A manifest answer was read (`bytes` of it, 0 if reading failed): paid from the peer's budget.
    pub fn answered(&mut self, peer: PeerId, bytes: usize) {
        self.budgets.spend(Instant::now(), peer, bytes);
    }
}
