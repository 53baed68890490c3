//! The daemon as the engine's host: how the loop feeds the engine (with its two clocks) and carries out the
//! engine's outputs, and the state database as the engine's node store.

use super::*;

impl Daemon {
    /// Hands `input` to the engine through the core's one driver ([`step`]), which carries out its outputs here.
    pub(super) fn feed(&mut self, input: Input<PeerId>) -> Result<(), EngineError> {
        let span = self.sync_span.clone();
        let _sync = span.enter();
        let now = self.clock();
        step(self, now, input)
    }

    /// The engine's timer is due.
    pub(super) fn on_engine_timeout(&mut self) {
        if let Err(e) = self.feed(Input::Timeout) {
            self.error(format!("{e:#}"));
        }
    }

    /// Both clocks: monotonic milliseconds since the daemon started (timeouts, windows, bans) and the wall clock
    /// (roots' creation and expiry). A step of the wall clock moves no timer.
    pub(super) fn clock(&self) -> Now {
        Now { mono: Mono(self.started.elapsed().as_millis() as u64), wall: now() }
    }

    /// The instant a monotonic time of [`Daemon::clock`] names.
    pub(super) fn instant_of(&self, at: Mono) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.started) + Duration::from_millis(at.0)
    }

    /// Carries out one output of the engine; returns the inputs it answers with at once (only a failure to start
    /// something: the daemon's answers come later, through events).
    pub(super) fn carry_out(&mut self, out: Output<PeerId>) -> Result<Vec<Input<PeerId>>> {
        match out {
            Output::Gossip(root) => {
                if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(self.topic.clone(), root.encode()) {
                    // No subscribed peer yet, or a duplicate: peers learn the root from hellos instead.
                    tracing::debug!("gossip not sent: {e}");
                }
            }
            Output::SendHello(peer, mut hello) => {
                hello.data_addrs = vec![self.data_addr_text()];
                self.fault_lie(&mut hello.complete_seq);
                self.control.send(&mut self.swarm, peer, control::Outgoing::Hello(hello));
            }
            Output::SendHave(peer, mut have) => {
                self.fault_lie(&mut have.complete_seq);
                self.control.send(&mut self.swarm, peer, control::Outgoing::Have(have));
            }
            Output::FetchNodes { peer, req, hashes, descendants_max } => {
                self.control.send(&mut self.swarm, peer, control::Outgoing::Nodes { req, hashes, descendants_max });
            }
            Output::FetchDelta { peer, req, hash } => {
                self.control.send(&mut self.swarm, peer, control::Outgoing::Delta { req, hash });
            }
            Output::StoreNodes(nodes) => {
                // Flushed with the next durable commit (at the latest when the manifest is complete, below): a
                // crash before loses only nodes the sync fetches again.
                let mut writer = self.store.writer()?;
                for (hash, bytes) in nodes {
                    writer.put_node(hash, bytes);
                }
                writer.commit_unflushed()?;
            }
            Output::StoreDelta(hash, bytes) => {
                let mut writer = self.store.writer()?;
                writer.put_delta(&hash, &bytes)?;
                writer.commit()?;
            }
            Output::Plan(job) => {
                // The whole diff and the scheduler of every chunk to fetch: off the loop.
                let (store, events) = (self.store.clone(), self.events_tx.clone());
                let span = self.sync_span.clone();
                tokio::task::spawn_blocking(move || {
                    let _sync = span.enter();
                    let started = Instant::now();
                    let seq = job.seq();
                    let planned = job.run(&Reader::open(&store));
                    tracing::info!(seq, ms = started.elapsed().as_millis() as u64, "planned");
                    let _ = events.blocking_send(LoopEvent::Planned(planned));
                });
            }
            Output::Stage { seq, files } => {
                // Both in proportion to the files (the whole tree in a first sync): off the loop.
                self.sync.files = None;
                let staging = self.staging.clone();
                let index = self.index.clone();
                let events = self.events_tx.clone();
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || {
                    // The manifest is complete: its nodes, stored unflushed as they came, are made durable.
                    let flushed = store.writer().and_then(|w| w.commit()).context("flushing the manifest's nodes");
                    let result = match (flushed, index.read()) {
                        (Err(e), _) => Err(e),
                        (Ok(()), Ok(index)) => staging.prepare(seq, &files, &index),
                        (Ok(()), Err(_)) => Err(anyhow!("chunk index lock poisoned")),
                    };
                    let mut progress = Box::new(progress::FileProgress::new(seq, &files));
                    for id in result.iter().flat_map(|prepared| &prepared.held) {
                        progress.held(id);
                    }
                    let _ = events.blocking_send(LoopEvent::Staged { seq, result, progress });
                });
            }
            Output::FetchChunks { peer, req, chunks } => self.fetch_chunks(peer, req, chunks),
            Output::Cancel { req, .. } => {
                if let Some((task, _)) = self.fetches.remove(&req) {
                    task.abort();
                }
            }
            Output::Apply { target, plan } => {
                tracing::info!(seq = target.body.seq, "applying snapshot");
                let record = tree_writer::Record {
                    repo: self.cfg.repo.clone(),
                    grace_ms: self.cfg.delete_grace.as_millis() as u64,
                    keep: self.downstream.config().paths().into_iter().collect(),
                };
                self.tree_writer.submit(tree_writer::TreeJob::Apply { target: Box::new(target), plan, record })?;
            }
            Output::Ban { peer, reason, until: None } => {
                tracing::warn!(%peer, reason = reason.name(), "peer banned for this snapshot");
                self.count(format!("peers_banned_{}", reason.name()));
            }
            Output::Republish => {
                if !self.publisher.is_running() {
                    let seq = self.engine.current().map(|c| c.body.seq);
                    tracing::info!(seq, "root past half its validity: re-signing");
                    self.start_publish(false, super::PublishScope::Whole, None);
                }
            }
            Output::PersistRoot(root) => {
                let mut writer = self.store.writer()?;
                writer.set_root(&root, &self.cfg.repo)?;
                writer.commit()?;
            }
            Output::Ban { peer, reason, until: Some(until) } => {
                let minutes = until.millis_since(self.clock().mono) / 60_000;
                tracing::warn!(%peer, reason = reason.name(), minutes, "peer banned for breaking the protocol");
                self.count(format!("peers_banned_{}", reason.name()));
                self.data.deny(peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Output::Unban { peer } => {
                tracing::info!(%peer, "ban lifted");
                self.data.undeny(&peer);
            }
            Output::Notice(notice) => self.notice(notice)?,
            Output::RemoveDue { now } => {
                if let Err(e) = self.tree_writer.submit(tree_writer::TreeJob::RemoveDue { now_ms: now.0 }) {
                    // A run that cannot start failed: what was due stays due.
                    self.error(format!("pending deletions: {e:#}"));
                    return Ok(vec![Input::RemovalsDone { left: None, pending: None }]);
                }
            }
        }
        Ok(Vec::new())
    }

    pub(super) fn notice(&mut self, notice: Notice<PeerId>) -> Result<()> {
        match notice {
            Notice::RootAccepted { seq } => {
                tracing::info!(seq, "accepted a new root");
                self.count("roots_accepted");
                self.health.clear(ProblemKind::RootsUntrusted);
                if self.cfg.role == RoleName::Mirror {
                    self.sync_span = tracing::info_span!("sync", seq);
                    self.sync.started = Some((seq, Instant::now()));
                    self.sync.need_bytes = 0;
                }
            }
            Notice::RootRejected { from, error } => {
                let why = self.describe_root_error(&error);
                match from {
                    Some(peer) => tracing::warn!(%peer, "root rejected: {why}"),
                    None => tracing::warn!("root rejected: {why}"),
                }
                self.count(format!("roots_rejected_{}", error.reason()));
                if matches!(error, RootError::UnknownPublisher(_)) && self.engine.latest().is_none() {
                    self.set_problem(ProblemKind::RootsUntrusted, format!("roots rejected: {why}"), now().0);
                }
            }
            Notice::DeltaRejected => self.count("deltas_rejected"),
            Notice::WaitingForOrigin { chunks } => {
                tracing::warn!(chunks, "waiting for origin: some chunks exist on no reachable peer");
            }
            Notice::ManifestError(e) => self.set_problem(ProblemKind::Manifest, format!("manifest: {e}"), now().0),
            Notice::WrongRepo { from } => {
                tracing::debug!(%from, "peer speaks of another repository");
                self.count("messages_wrong_repo");
            }
            Notice::LocalFailure => self.count("local_write_failures"),
            Notice::PeerStalled { peer } => {
                tracing::warn!(%peer, "peer claims the snapshot but delivered nothing while asked; asking the origin");
                self.count("peers_stalled");
            }
            Notice::SyncComplete { seq } => {
                tracing::info!(seq, "snapshot applied");
                self.count("syncs_completed");
                let t = now();
                let lag = self.engine.current().filter(|c| c.body.seq == seq).map(|c| t.millis_since(c.body.created));
                self.sync.last_apply_ms = Some(t.0);
                self.sync.propagation_lag_ms = lag;
                self.sync.staged_seq = None;
                self.sync.files = None;
                self.sync_span = tracing::Span::none();
                if let Some((_, started)) = self.sync.started.take() {
                    let lag_secs = lag.map(|l| l as f64 / 1000.0);
                    self.projector.metrics.observe_sync(
                        self.cfg.repo.as_str(),
                        started.elapsed().as_secs_f64(),
                        lag_secs,
                    );
                }
            }
        }
        Ok(())
    }

    pub(super) fn data_addr_text(&self) -> String {
        self.data.local_addr().to_string()
    }

    pub(super) fn fetch_chunks(&mut self, peer: PeerId, req: ReqId, chunks: Vec<ChunkId>) {
        tracing::debug!(%peer, req = req.0, chunks = chunks.len(), "fetching chunks");
        let addrs = self.peers.state(&peer).map(|p| p.data_addrs.clone()).unwrap_or_default();
        let fetch =
            fetching::Fetch { data: self.data.clone(), staging: self.staging.clone(), peer, req, chunks, addrs };
        let span = tracing::info_span!(parent: &self.sync_span, "fetch", %peer, req = req.0);
        let task = tokio::spawn(tracing::Instrument::instrument(fetch.run(self.events_tx.clone()), span));
        self.fetches.insert(req, (task.abort_handle(), Instant::now()));
    }
}

/// The daemon as the host of its engine (see [`step`]).
impl Host<PeerId> for Daemon {
    type Source<'s>
        = Reader
    where
        Self: 's;

    fn with_engine<R>(&mut self, f: impl FnOnce(&mut Engine<PeerId>, &Reader) -> R) -> Option<R> {
        // A fresh read transaction per input: it sees every node stored by the outputs carried out before.
        let reader = Reader::open(&self.store);
        Some(f(&mut self.engine, &reader))
    }

    fn execute(&mut self, _now: Now, output: Output<PeerId>) -> Vec<Input<PeerId>> {
        self.carry_out(output).unwrap_or_else(|e| {
            self.error(format!("{e:#}"));
            Vec::new()
        })
    }
}

/// The state database as the engine's node store; a database that cannot be opened fails every read.
pub struct Reader(Result<StoreReader, SourceError>);

impl Reader {
    /// A fresh read transaction: it sees every commit made before.
    pub fn open(store: &StateStore) -> Self {
        Reader(store.reader().map_err(|e| SourceError(format!("opening the state database: {e:#}"))))
    }
}

impl NodeSource for Reader {
    fn node_bytes(&self, hash: &mirrormesh_proto::node::NodeHash) -> Result<Option<Vec<u8>>, SourceError> {
        self.0.as_ref().map_err(Clone::clone)?.node_bytes(hash)
    }

    fn has_node(&self, hash: &mirrormesh_proto::node::NodeHash) -> Result<bool, SourceError> {
        self.0.as_ref().map_err(Clone::clone)?.has_node(hash)
    }
}
