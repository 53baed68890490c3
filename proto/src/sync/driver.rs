//! The one way to drive an [`Engine`]: feed it an input, then carry out every output in order, feeding back the
//! answers a host gives at once. The daemon, the simulator and the engine tests are all [`Host`]s of this driver,
//! so they cannot drift apart in how they call the engine.
//!
//! A host whose answer to an output is immediate (the simulator stages and applies in zero time) returns it as
//! follow-up inputs; one whose answer comes later (the daemon stages on a thread) returns none and calls [`step`]
//! with the answer when it comes. When to call [`step`] with [`Input::Timeout`] is [`Engine::poll_timeout`]'s to
//! say.

use std::collections::VecDeque;

use super::{Engine, EngineError, Input, Output, PeerKey};
use crate::node_store::NodeSource;
use crate::timestamp::Now;

/// What drives an engine: it holds the engine and the node store the engine reads, and carries out its outputs.
pub trait Host<P: PeerKey> {
    type Source<'s>: NodeSource
    where
        Self: 's;

    /// Runs `f` with the engine and the node store, in which every `StoreNodes` carried out so far is readable;
    /// `None` if the host has no engine now (a node that is down).
    fn with_engine<R>(&mut self, f: impl FnOnce(&mut Engine<P>, &Self::Source<'_>) -> R) -> Option<R>;

    /// Carries out one output; returns the inputs it answers with at once (usually none).
    fn execute(&mut self, now: Now, output: Output<P>) -> Vec<Input<P>>;
}

/// Hands `input` to the host's engine at `now`, then carries out every output in order through the host, feeding
/// back the answers it gives at once (with the same `now`) until there are none. The first error is returned after
/// every output was carried out; a host without an engine ignores the input.
pub fn step<P: PeerKey, H: Host<P>>(host: &mut H, now: Now, input: Input<P>) -> Result<(), EngineError> {
    let mut inputs = VecDeque::from([input]);
    let mut result = Ok(());
    while let Some(input) = inputs.pop_front() {
        let Some(handled) = host.with_engine(|engine, source| engine.handle(now, input, source)) else { break };
        if result.is_ok() {
            result = handled;
        }
        while let Some(output) = host.with_engine(|engine, _| engine.poll_output()).flatten() {
            inputs.extend(host.execute(now, output));
        }
    }
    result
}
