//! Running a pipeline: threads, bounded queues, messages, ordering and
//! shutdown. `docs/architecture.md` tells the whole design; in short:
//!
//! ```text
//!  reader ──batch k──▶ parse worker (k mod N) ──frame per owner──▶ keyed worker j
//!                            │              (exchange)                   │
//!                            └──── dead letters, pass-through ──▶ merger ◀── results, snapshots
//!                                                                   │
//!                                                          checkpoint writer
//! ```
//!
//! - `reader`: polls the source, cuts batches, marks checkpoint cuts.
//! - `parse`: decode, time, steps, key; one frame per owner of key groups
//!   ([`crate::msg`]: data, watermarks, idleness, barriers, end).
//! - [`exchange`]: the key-by edge (in-process bounded channels today).
//! - [`keyed`]: runs a [`crate::operators::keyed::KeyedOperator`] behind a
//!   watermark valve and a barrier aligner.
//! - `merge`: deterministic output order, sinks, checkpoint hand-over.
//! - `checkpoint`: the checkpoint writer thread.
//!
//! Every queue is bounded: a slow sink stops the reader (backpressure),
//! never grows memory. Each stage consumes its inputs in batch order, which
//! rules out deadlock between them.

mod checkpoint;
pub mod exchange;
pub mod keyed;
mod merge;
mod parse;
pub mod peer;
mod reader;
pub(crate) mod tail;

pub use crate::msg::End;
pub use crate::partition::KEY_GROUPS;
#[cfg(test)]
pub(crate) use parse::operator_ids;
pub(crate) use parse::text_value;
pub use reader::BATCH_EVENTS;

use crate::context::RunContext;
use crate::metrics::Registry;
use crate::operators::keyed::KeyedOperator;
use crate::operators::window::{WindowStep, WindowStepOptions};
use crate::partition::{Assignment, KeyGroup};
use crate::plan::{Pipeline, Plan, TimeMode};
use crate::sinks::SinkError;
use crate::sources::SourceError;
use crate::state::control::SavepointRequest;
use crate::time::valve::bounded;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

/// Frames or batches each queue holds.
const QUEUE: usize = 4;

/// Options of one run.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Set to stop the run: the reader stops, queued events are processed,
    /// open windows are not fired.
    pub shutdown: Arc<AtomicBool>,
    /// The run's metrics, readable while it goes on (updated per batch).
    pub metrics: Arc<Registry>,
    /// Start from this savepoint (copied into the state directory first).
    pub restore_from: Option<std::path::PathBuf>,
    /// With `restore_from`: start even if the pipeline changed so that the
    /// saved keyed state cannot be used (it is dropped; the position is kept).
    pub allow_non_restored_state: bool,
    /// Live state queries for the keyed workers (`GET /api/state`).
    pub queries: Arc<crate::observe::query::Board>,
}

/// Counters of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Events read from the source.
    pub events: u64,
    /// Events sent to the dead-letter output.
    pub dead_letters: u64,
    /// Events dropped by a filter.
    pub filtered: u64,
    /// Events that arrived after their windows were gone.
    pub late: u64,
    /// Records written to the main sinks.
    pub results: u64,
    /// Windows still open when the run ended (nonzero only when stopped).
    pub open_windows: u64,
    /// The run was stopped rather than reaching the end of its input.
    pub stopped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Pipeline {
    /// Runs until the source ends or `opts.shutdown` is set.
    pub fn run(self, opts: RunOptions) -> Result<RunStats, RunError> {
        run(self, opts, None)
    }

    /// Runs as one peer of a cluster, in one view ([`peer::PeerRun`]),
    /// until `opts.shutdown` is set or the run is aborted.
    pub fn run_peer(self, opts: RunOptions, peer: peer::PeerRun) -> Result<RunStats, RunError> {
        run(self, opts, Some(peer))
    }

    /// The declarations of the keyed state this pipeline keeps.
    pub fn state_decls(&self) -> Vec<crate::operators::keyed::StateDecl> {
        keyed_operator(&self.plan, &Assignment::contiguous(1), 0)
            .map(|op| op.state())
            .into_iter()
            .collect()
    }
}

fn spawn<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, RunError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|e| RunError::Internal(format!("cannot start a thread: {e}")))
}

/// The keyed operator of worker `j`.
fn keyed_operator(
    plan: &Plan,
    assignment: &Assignment,
    j: usize,
) -> Option<Box<dyn KeyedOperator>> {
    if let Some(st) = &plan.stateful {
        return Some(Box::new(crate::operators::stateful::StatefulStep::new(
            st.clone(),
            crate::operators::stateful::StatefulOptions {
                key_names: plan.key_names.clone(),
                key_limit: plan
                    .stateful_max_keys
                    .map(|max| assignment.share_of(j, max)),
                max_keys: plan.stateful_max_keys,
                source_name: plan.source_name.clone(),
                ordered: matches!(plan.time, TimeMode::Event { .. } | TimeMode::Ingestion),
                fingerprint: plan.fingerprint(),
                layout: plan.state_layout(),
            },
        )));
    }
    let def = plan.window.as_ref()?;
    Some(Box::new(WindowStep::new(
        def.clone(),
        WindowStepOptions {
            key_names: plan.key_names.clone(),
            source_name: plan.source_name.clone(),
            key_limit: def.max_keys.map(|max| assignment.share_of(j, max)),
            fingerprint: plan.fingerprint(),
            layout: plan.state_layout(),
        },
    )))
}

fn run(
    p: Pipeline,
    opts: RunOptions,
    mut peer: Option<peer::PeerRun>,
) -> Result<RunStats, RunError> {
    let plan = p.plan.clone();
    let ctx = RunContext::new(&plan.name, opts.shutdown.clone(), opts.metrics.clone());
    // In peer mode one worker per stage, and the assignment maps key
    // groups to peers (this one is `peer.me`).
    let n = if peer.is_some() { 1 } else { plan.workers };
    let assignment = match &peer {
        Some(pr) => pr.assignment.clone(),
        None => Assignment::contiguous(n),
    };
    let mut source = p.source;
    let mut tail = tail::Tail::new(p.tail, p.graph);
    let has_tail = !tail.is_empty();
    let mut operators: Vec<Box<dyn KeyedOperator>> = (0..n)
        .filter_map(|j| keyed_operator(&plan, &assignment, j))
        .collect();

    // Durable state: load the last checkpoint, resume the source after it.
    let mut store = None;
    let mut restored_input_watermark = None;
    let mut control = None;
    if let Some(pr) = peer.as_mut() {
        // Peer mode: the cluster layer owns the state file and restored
        // the global checkpoint (if there is one).
        for op in &mut operators {
            op.track_changes();
        }
        if let Some(restored) = pr.restored.take() {
            for op in &mut operators {
                op.restore(restored.watermark, restored.keys.clone())
                    .map_err(|e| RunError::Internal(format!("restoring keyed state: {e}")))?;
            }
            if let Some(pos) = &restored.position {
                if let Err(e) = source.seek(pos) {
                    tracing::warn!(error = %e, "the source cannot resume; reading from where it stands now");
                }
            }
            restored_input_watermark = restored.input_watermark;
        }
    } else if let Some((dir, _)) = &plan.state {
        if let Some(sp) = &opts.restore_from {
            crate::state::install_savepoint(sp, dir)?;
            tracing::info!(savepoint = %sp.display(), "starting from a savepoint");
        }
        // Every worker runs the same operator (id 0) on its own key groups.
        // Operators after the first stage (the tail) are 1, 2, …
        let mut decls: Vec<_> = operators.first().map(|op| op.state()).into_iter().collect();
        decls.extend(tail.state());
        let (s, restored) =
            crate::state::StateStore::open(dir, &decls, opts.allow_non_restored_state)?;
        control = Some(crate::state::control::listen(dir)?);
        for op in &mut operators {
            op.track_changes();
        }
        tail.track_changes();
        if let Some(mut r) = restored {
            tracing::info!(
                state = %s.path().display(),
                checkpoint = r.epoch,
                keys = r.key_count(),
                "resuming from the last checkpoint"
            );
            if !r.position.is_empty() {
                if let Err(e) = source.seek(&r.position) {
                    tracing::warn!(error = %e, "the source cannot resume; reading from where it stands now");
                }
            }
            // Format 1 recorded the largest event time instead.
            let bound = match plan.time {
                TimeMode::Event {
                    max_out_of_orderness,
                    ..
                } => max_out_of_orderness,
                _ => 0,
            };
            restored_input_watermark = Some(
                r.input_watermark
                    .unwrap_or_else(|| bounded(r.max_ts, bound)),
            );
            let mut per_worker: Vec<Vec<(Vec<u8>, Vec<u8>)>> = (0..n).map(|_| Vec::new()).collect();
            let mut by_operator = std::mem::take(&mut r.keys).into_iter();
            let first: Vec<_> = by_operator.next().unwrap_or_default();
            for (i, keys) in by_operator.enumerate() {
                tail.restore(i, r.watermark, keys).map_err(|e| {
                    crate::state::StateError::Store {
                        path: s.path().display().to_string(),
                        message: e,
                    }
                })?;
            }
            for (key, record) in first {
                per_worker[assignment.owner(KeyGroup::of_key(&key))].push((key, record));
            }
            for (op, keys) in operators.iter_mut().zip(per_worker) {
                op.restore(r.watermark, keys)
                    .map_err(|e| crate::state::StateError::Store {
                        path: s.path().display().to_string(),
                        message: e,
                    })?;
            }
        }
        store = Some(s);
    }
    source.start(&ctx.for_operator("source"));
    if let Some(op) = operators.first() {
        opts.queries.open(crate::observe::query::Queryable {
            workers: operators.len(),
            key_names: plan.key_names.clone(),
            schema: op.output_schema(),
        });
    }
    tail.count(&ctx, p.steps_before_key.len() + p.steps_after_key.len());
    let mut sinks = merge::Sinks {
        schema: tail.output_schema().unwrap_or_else(|| {
            operators
                .first()
                .map(|op| op.output_schema())
                .unwrap_or_default()
        }),
        carried: plan.carry.iter().map(|(n, _)| n.clone()).collect(),
        main: p.sinks,
        graph: {
            let schemas = tail.graph_streams();
            p.graph_sinks
                .into_iter()
                .enumerate()
                .map(|(i, g)| merge::GraphSinks {
                    name: g.name,
                    schema: schemas.get(i).map(|s| s.1.clone()).unwrap_or_default(),
                    carried: g.carried,
                    sinks: g.sinks,
                })
                .collect()
        },
        late: p.late,
        dead: p.dead_letter,
    };
    for (name, list) in [
        ("sink_main", &mut sinks.main),
        ("sink_late", &mut sinks.late),
        ("sink_dead_letter", &mut sinks.dead),
    ] {
        let c = ctx.for_operator(name);
        for s in list.iter_mut() {
            s.start(&c);
        }
    }
    for g in &mut sinks.graph {
        let c = ctx.for_operator(&format!("sink_{}", g.name));
        for s in g.sinks.iter_mut() {
            s.start(&c);
        }
    }
    let checkpoint_every = plan.state.as_ref().map(|(_, every)| *every);
    let mut on_checkpoint = source.checkpoint_hook();
    if let Some(pr) = &peer {
        // Called by the cluster layer once a checkpoint is global.
        if let Ok(mut h) = pr.source_hook.lock() {
            *h = on_checkpoint.take();
        }
    }

    let clock = p.clock.clone();
    let shutdown = opts.shutdown.clone();
    let peer_mode = peer.is_some();
    let drain = peer.as_ref().map(|pr| pr.drain.clone());
    // A process function's processing-time timers need frames while the
    // input is quiet.
    let process_fn = matches!(
        plan.stateful,
        Some(crate::operators::stateful::StatefulDef::Process(_))
    );
    let ticks = peer_mode
        || process_fn
        || matches!(plan.time, TimeMode::Processing | TimeMode::Ingestion)
        || matches!(
            plan.time,
            TimeMode::Event {
                idle_timeout: Some(_),
                ..
            }
        );
    // A stateless pipeline reading a live source runs on one thread:
    // each batch is read, parsed and written where it was read, so a
    // quiet stream goes through at once, without a hand-over per stage.
    let inline = operators.is_empty()
        && !has_tail
        && sinks.graph.is_empty()
        && peer.is_none()
        && plan.parts.len() <= 1
        && source.runs_inline();
    // reader -> parse workers
    let mut to_parse = Vec::new();
    let mut parse_rx = Vec::new();
    for _ in 0..n {
        let (tx, rx) = sync_channel(QUEUE);
        to_parse.push(tx);
        parse_rx.push(rx);
    }
    // parse workers -> keyed workers
    let keyed = !operators.is_empty();
    let (mut outboxes, inboxes) = exchange::local(n, if keyed { n } else { 0 }, QUEUE);
    let peer_parts = peer.as_mut().map(|pr| {
        if keyed {
            for o in &mut outboxes {
                o.ring_on_send(0, pr.bell.clone());
            }
        }
        (
            pr.me,
            std::mem::take(&mut pr.links),
            std::mem::take(&mut pr.inputs),
            pr.bell.clone(),
            pr.hold_until,
        )
    });
    // parse workers and keyed workers -> merger
    let mut parse_out_rx = Vec::new();
    let mut keyed_out_rx = Vec::new();

    let make_worker = |i: usize| parse::ParseWorker {
        plan: plan.clone(),
        assignment: assignment.clone(),
        before: p.steps_before_key.iter().map(|s| s.clone_box()).collect(),
        after: p.steps_after_key.iter().map(|s| s.clone_box()).collect(),
        tees: p
            .tee_steps
            .iter()
            .map(|steps| steps.iter().map(|s| s.clone_box()).collect())
            .collect(),
        carry_payloads: plan.has_late_sink
            || plan.window.as_ref().is_some_and(|w| w.max_keys.is_some())
            || plan.stateful_max_keys.is_some(),
        slots: Vec::new(),
        status: Vec::new(),
        counters: parse::ParseCounters::new(&ctx, i, &p.steps_before_key, &p.steps_after_key),
    };
    if inline {
        return run_inline(
            make_worker(0),
            InlineParts {
                source,
                clock: p.clock.clone(),
                shutdown: opts.shutdown.clone(),
                ticks,
                max_payload: plan.max_payload,
                checkpoint_every,
                savepoints: control.as_mut().and_then(|c| c.take_requests()),
                queries: opts.queries.clone(),
                store,
                on_checkpoint,
                sinks,
            },
            &ctx,
        );
    }
    let mut handles = Vec::new();
    for (i, (rx, outbox)) in parse_rx.into_iter().zip(outboxes).enumerate() {
        let (tx, out_rx) = sync_channel(QUEUE);
        parse_out_rx.push(out_rx);
        let worker = make_worker(i);
        match &peer_parts {
            Some((me, links, ..)) => {
                let outbox = peer::PeerOutbox::new(*me, outbox, links.clone(), keyed);
                handles.push(spawn(format!("rivulet-parse-{i}"), move || {
                    worker.run(rx, tx, outbox)
                })?);
            }
            None => handles.push(spawn(format!("rivulet-parse-{i}"), move || {
                worker.run(rx, tx, outbox)
            })?),
        }
    }
    let mut peer_inputs = peer_parts.map(|(_, _, inputs, bell, hold)| (inputs, bell, hold));
    let window_ctx = ctx.for_operator(plan.stateful.as_ref().map_or("window", |s| s.kind()));
    for (j, (mut op, inbox)) in operators.into_iter().zip(inboxes).enumerate() {
        let (tx, out_rx) = sync_channel(QUEUE);
        keyed_out_rx.push(out_rx);
        op.start(&window_ctx, j);
        if let Some((remote, bell, hold)) = peer_inputs.take() {
            // Peer mode: this peer's stream is input 0, each other peer's
            // link one more.
            let mut all: Vec<Box<dyn exchange::InputSource>> = vec![Box::new(inbox)];
            all.extend(remote);
            let inbox = exchange::MultiInbox::new(all, bell);
            let mut host = keyed::KeyedHost::new(op, exchange::Inbox::inputs(&inbox));
            host.local_end = true;
            host.hold = hold.map(|until| (restored_input_watermark.unwrap_or(i64::MIN), until));
            host.count(&window_ctx, j);
            host.queries = Some(opts.queries.clone());
            if let Some(w) = restored_input_watermark {
                host.valve.restore(w);
            }
            handles.push(spawn(format!("rivulet-window-{j}"), move || {
                host.run_peer(inbox, tx)
            })?);
            continue;
        }
        let mut host = keyed::KeyedHost::new(op, exchange::Inbox::inputs(&inbox));
        host.count(&window_ctx, j);
        host.queries = Some(opts.queries.clone());
        host.marks = has_tail;
        host.valve.set_parts(plan.parts.len());
        if let Some(w) = restored_input_watermark {
            host.valve.restore(w);
        }
        handles.push(spawn(format!("rivulet-window-{j}"), move || {
            host.run(inbox, tx)
        })?);
    }

    // The room of each stage's queues, for their fill ratio: the reader's
    // to the parse workers, the exchange, the merger's.
    let keyed_workers = keyed_out_rx.len();
    for (stage, room) in [
        ("parse", n * QUEUE),
        ("keyed", n * keyed_workers * QUEUE),
        ("merge", (n + keyed_workers) * QUEUE),
    ] {
        ctx.gauge(
            crate::metrics::names::QUEUE_CAPACITY,
            "room of a stage's queues",
            &[("stage", stage)],
        )
        .set(room as i64);
    }
    let max_payload = plan.max_payload;
    let source_ctx = ctx.for_operator("source");
    let savepoint_rx = control.as_mut().and_then(|c| c.take_requests());
    let queries = opts.queries.clone();
    let reader = spawn("rivulet-reader".into(), move || {
        reader::read(
            source,
            to_parse,
            clock,
            shutdown,
            reader::ReaderConfig {
                ticks,
                max_payload,
                checkpoint_every,
                savepoints: savepoint_rx,
                clock_ids: peer_mode,
                drain,
                queries: Some(queries),
                linger: reader::LINGER,
            },
            &source_ctx,
        )
    })?;

    let checkpointer = match (store, &peer) {
        (_, Some(pr)) => Some(merge::Checkpoints::Peer(pr.checkpoints.clone())),
        (Some(s), None) => Some(merge::Checkpoints::Local(checkpoint::Checkpointer::start(
            s,
            on_checkpoint,
            &ctx.for_operator("checkpoint"),
        )?)),
        (None, None) => None,
    };
    // A job graph's further streams answer `/api/state` from the merger.
    // Registered here, as nothing can fail between this and the merge,
    // after which the boards are closed.
    if let Some(first) = tail.first_stream() {
        opts.queries.name_first(first);
    }
    let tail = (!tail.is_empty()).then(|| merge::TailRun {
        queries: tail.queryable(&opts.queries),
        tail,
        // Alerts carry their time; window results end − 1.
        at_end: plan.stateful.is_some(),
        source_name: plan.source_name.clone(),
    });
    let merged = merge::merge(checkpointer, &ctx, parse_out_rx, keyed_out_rx, sinks, tail);
    opts.queries.close();
    // On a merge error the channels close and every thread winds down.
    let read_result = reader
        .join()
        .map_err(|_| RunError::Internal("the reader thread panicked".into()))?;
    for h in handles {
        h.join()
            .map_err(|_| RunError::Internal("a worker thread panicked".into()))?;
    }
    let stats = merged?;
    read_result?;
    Ok(stats)
}

/// A stateless pipeline on one thread: the reader hands each batch to the
/// parse stage and the merger right there (see `run`).
struct Inline {
    worker: parse::ParseWorker,
    merger: merge::Merger,
    /// The merger's outcome once it ended or failed.
    done: Option<Result<RunStats, RunError>>,
}

impl reader::Deal for Inline {
    fn deal(&mut self, _seq: u64, batch: reader::InBatch) -> bool {
        // No keyed stage: the parse stage's frames have no one to go to.
        let (out, _frames) = self.worker.process(batch);
        match self.merger.step(out) {
            Ok(None) => true,
            Ok(Some(stats)) => {
                self.done = Some(Ok(stats));
                false
            }
            Err(e) => {
                self.done = Some(Err(e));
                false
            }
        }
    }
}

/// What an inline run needs besides its parse stage.
struct InlineParts {
    source: Box<dyn crate::sources::Source>,
    clock: Arc<dyn crate::time::Clock>,
    shutdown: Arc<AtomicBool>,
    ticks: bool,
    max_payload: usize,
    checkpoint_every: Option<std::time::Duration>,
    savepoints: Option<std::sync::mpsc::Receiver<SavepointRequest>>,
    queries: Arc<crate::observe::query::Board>,
    store: Option<crate::state::StateStore>,
    on_checkpoint: Option<crate::sources::CheckpointHook>,
    sinks: merge::Sinks,
}

fn run_inline(
    worker: parse::ParseWorker,
    parts: InlineParts,
    ctx: &RunContext,
) -> Result<RunStats, RunError> {
    let checkpointer = match parts.store {
        Some(s) => Some(merge::Checkpoints::Local(checkpoint::Checkpointer::start(
            s,
            parts.on_checkpoint,
            &ctx.for_operator("checkpoint"),
        )?)),
        None => None,
    };
    let mut source = parts.source;
    source.poll_on_caller();
    let mut inline = Inline {
        worker,
        merger: merge::Merger::new(checkpointer, ctx, Vec::new(), parts.sinks, None),
        done: None,
    };
    let read = reader::read(
        source,
        &mut inline,
        parts.clock,
        parts.shutdown,
        reader::ReaderConfig {
            ticks: parts.ticks,
            max_payload: parts.max_payload,
            checkpoint_every: parts.checkpoint_every,
            savepoints: parts.savepoints,
            clock_ids: false,
            drain: None,
            queries: Some(parts.queries.clone()),
            // Processed where it is read: a batch is what has arrived.
            linger: std::time::Duration::ZERO,
        },
        &ctx.for_operator("source"),
    );
    parts.queries.close();
    let merged = inline.done.take().unwrap_or_else(|| {
        Err(RunError::Internal(
            "the run stopped before its last batch".into(),
        ))
    });
    let stats = merged?;
    read?;
    Ok(stats)
}
