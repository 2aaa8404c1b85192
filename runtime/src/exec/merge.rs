//! The merger (the calling thread): takes each input batch's outputs from
//! the parse stage and from every keyed worker, puts them in order and
//! writes the sinks; then hands a checkpoint whose outputs are all written
//! to the checkpoint writer.
//!
//! Order within a batch: by the event that caused an output, then
//! [`crate::msg::Phase`], window end, start and key. Since every keyed
//! worker sends one [`OutBatch`] per input batch, the result does not
//! depend on the number of workers.

use super::checkpoint::Checkpointer;
use super::reader::Cut;
use super::{RunError, RunStats};
use crate::context::RunContext;
use crate::metrics::{names, Counter};
use crate::msg::{End, Output, Schema, Stream};
use crate::operators::keyed::KeyChange;
use crate::sinks::Sink;
use crate::state::control::SavepointRequest;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

/// A keyed worker's part of a checkpoint.
pub(super) struct WorkerSnapshot {
    /// The checkpoint (barrier) id.
    pub id: u64,
    pub changes: Vec<KeyChange>,
    pub watermark: i64,
    /// The watermark of the worker's input (its valve).
    pub input_watermark: i64,
}

/// What one stage produced for one input batch.
#[derive(Default)]
pub(super) struct OutBatch {
    pub end: Option<End>,
    pub outputs: Vec<Output>,
    pub events: u64,
    pub filtered: u64,
    pub open_windows: u64,
    /// From the parse stage: the checkpoint this batch closes.
    pub checkpoint: Option<Cut>,
    /// From a keyed worker: its state changes for the checkpoint.
    pub snapshot: Option<WorkerSnapshot>,
    /// From a keyed worker: its operator's watermark after the frame.
    pub watermark: Option<i64>,
    /// From the parse stage: a savepoint to write after the checkpoint.
    pub savepoint: Option<Arc<SavepointRequest>>,
}

/// A further stream's name, fields and sinks.
pub(super) struct GraphSinks {
    pub name: String,
    /// The fields of its records (rows are written as JSON with them).
    pub schema: Schema,
    /// The fields its pass-through events carry for their topics.
    pub carried: Vec<String>,
    pub sinks: Vec<Box<dyn Sink>>,
}

/// The sinks of a run.
pub(super) struct Sinks {
    /// The fields of the main stream's records (rows are written as JSON
    /// here, at the sinks).
    pub schema: Schema,
    /// The fields carried with pass-through events (the plan's `carry`).
    pub carried: Vec<String>,
    pub main: Vec<Box<dyn Sink>>,
    /// A job graph's further streams: name, fields and sinks, by
    /// [`Stream::Graph`] index.
    pub graph: Vec<GraphSinks>,
    pub late: Vec<Box<dyn Sink>>,
    pub dead: Vec<Box<dyn Sink>>,
}

/// The tail of a pipeline (steps after the first keyed stage) and what it
/// needs to know of that stage.
pub(super) struct TailRun {
    pub tail: super::tail::Tail,
    /// The first stage's results carry their event time as `end` (alerts),
    /// not `end − 1` (window results).
    pub at_end: bool,
    pub source_name: String,
    /// Live state queries of further streams (node, segment, board),
    /// answered after each batch.
    pub queries: Vec<(usize, usize, Arc<crate::observe::query::Board>)>,
}

/// Where the merger hands checkpoints: the local writer, or in peer mode
/// the cluster layer (which makes them global).
pub(super) enum Checkpoints {
    Local(Checkpointer),
    Peer(std::sync::mpsc::Sender<super::peer::PeerCheckpoint>),
}

/// A checkpoint whose barrier the parse stage passed, waiting for every
/// keyed worker's snapshot (in peer mode one may come batches later, when
/// the barrier is aligned with the other peers').
struct Awaiting {
    cut: Cut,
    savepoint: Option<Arc<SavepointRequest>>,
    snapshots: usize,
    /// Largest (operator watermark, input watermark) of the snapshots.
    time: (i64, i64),
}

/// The merger: writes each batch's outputs in order.
pub(super) fn merge(
    checkpointer: Option<Checkpoints>,
    ctx: &RunContext,
    parse_out: Vec<Receiver<OutBatch>>,
    win_out: Vec<Receiver<OutBatch>>,
    sinks: Sinks,
    tail: Option<TailRun>,
) -> Result<RunStats, RunError> {
    let mut m = Merger::new(checkpointer, ctx, win_out, sinks, tail);
    let mut seq = 0usize;
    loop {
        let batch = parse_out[seq % parse_out.len()]
            .recv()
            .map_err(|_| lost())?;
        if let Some(stats) = m.step(batch)? {
            return Ok(stats);
        }
        seq += 1;
    }
}

fn lost() -> RunError {
    RunError::Internal("a worker stopped unexpectedly".into())
}

/// The merger's state between batches.
pub(super) struct Merger {
    checkpointer: Option<Checkpoints>,
    ctx: RunContext,
    win_out: Vec<Receiver<OutBatch>>,
    schema: Schema,
    carried: Vec<String>,
    sinks: Vec<Box<dyn Sink>>,
    graph: Vec<GraphSinks>,
    late: Vec<Box<dyn Sink>>,
    dead: Vec<Box<dyn Sink>>,
    tail: Option<TailRun>,
    buf: Vec<u8>,
    stats: RunStats,
    /// Dead letters without a dead-letter sink are logged: the first, then
    /// at most one line (with a count) every 10 s.
    dead_log: crate::observe::logs::RateLimit,
    pending: crate::state::Pending,
    awaiting: Option<Awaiting>,
    counters: MergeCounters,
    /// Records written to each further stream's sinks in this batch.
    graph_written: Vec<u64>,
    counted: RunStats,
}

impl Merger {
    pub(super) fn new(
        checkpointer: Option<Checkpoints>,
        ctx: &RunContext,
        win_out: Vec<Receiver<OutBatch>>,
        sinks: Sinks,
        tail: Option<TailRun>,
    ) -> Merger {
        let Sinks {
            schema,
            carried,
            main,
            graph,
            late,
            dead,
        } = sinks;
        Merger {
            checkpointer,
            ctx: ctx.clone(),
            win_out,
            schema,
            carried,
            counters: MergeCounters::new(ctx, &graph),
            graph_written: vec![0u64; graph.len()],
            sinks: main,
            graph,
            late,
            dead,
            tail,
            buf: Vec::with_capacity(256),
            stats: RunStats::default(),
            dead_log: crate::observe::logs::RateLimit::new(std::time::Duration::from_secs(10)),
            pending: crate::state::Pending::default(),
            awaiting: None,
            counted: RunStats::default(),
        }
    }

    /// Writes one input batch's outputs (taking the keyed workers' parts
    /// of it); at the end of the input, the run's figures.
    pub(super) fn step(&mut self, mut batch: OutBatch) -> Result<Option<RunStats>, RunError> {
        let Merger {
            checkpointer,
            ctx,
            win_out,
            schema,
            carried,
            sinks,
            graph,
            late,
            dead,
            tail,
            buf,
            stats,
            dead_log,
            pending,
            awaiting,
            counters,
            graph_written,
            counted,
        } = self;
        let (schema, carried) = (&*schema, &*carried);
        stats.events += batch.events;
        stats.filtered += batch.filtered;
        if let Some(cut) = batch.checkpoint.take() {
            // A newer barrier overtakes a checkpoint still waiting (a
            // peer skipped it): its changes stay pending for this one.
            *awaiting = Some(Awaiting {
                cut,
                savepoint: batch.savepoint.take(),
                snapshots: 0,
                time: (i64::MIN, i64::MIN),
            });
        }
        // The keyed stage's watermark after this batch: the least of its
        // workers' (they all see the same watermarks).
        let mut first_watermark = i64::MAX;
        for rx in win_out.iter() {
            let mut w = rx.recv().map_err(|_| lost())?;
            first_watermark = first_watermark.min(w.watermark.unwrap_or(i64::MIN));
            batch.outputs.append(&mut w.outputs);
            stats.open_windows += w.open_windows;
            if let Some(snap) = w.snapshot.take() {
                // One keyed operator per pipeline today: id 0.
                for (k, record) in snap.changes {
                    match record {
                        Some(r) => pending.upsert(0, k, r),
                        None => pending.delete(0, k),
                    }
                }
                if let Some(a) = awaiting.as_mut().filter(|a| a.cut.id == snap.id) {
                    a.snapshots += 1;
                    a.time = (
                        a.time.0.max(snap.watermark),
                        a.time.1.max(snap.input_watermark),
                    );
                }
            }
        }
        // The page shows the last few of each batch's odd records.
        let mut noted = 0;
        let outputs = &mut batch.outputs;
        outputs.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        if let Some(t) = tail.as_mut().filter(|_| !win_out.is_empty()) {
            // The first stage's results feed the tail; its records are the
            // main output, after the first stage's late and dead ones.
            let (main, rest): (Vec<Output>, Vec<Output>) = std::mem::take(outputs)
                .into_iter()
                .partition(|o| matches!(o.stream, Stream::Main | Stream::Mark | Stream::Side));
            *outputs = rest;
            if let Some(name) = t.tail.first_stream() {
                for o in outputs.iter_mut().filter(|o| o.stream == Stream::Late) {
                    super::tail::tag_late(o, name);
                }
            }
            let at_end = t.at_end;
            let time = move |o: &Output| {
                if at_end {
                    o.end
                } else {
                    o.end.saturating_sub(1)
                }
            };
            t.tail
                .run(main, &time, first_watermark, &t.source_name, outputs);
            for (node, seg, board) in t.queries.iter().filter(|(_, _, b)| b.waiting()) {
                t.tail.answer(*node, *seg, board);
            }
        }
        for o in outputs.iter() {
            match o.stream {
                Stream::Mark | Stream::Side => {}
                Stream::Main => {
                    stats.results += 1;
                    if let crate::msg::Body::Event(e) = &o.body {
                        let meta = crate::sinks::EventMeta {
                            names: carried,
                            values: &e.fields,
                            retain: e.retain,
                        };
                        for s in sinks.iter_mut() {
                            s.write_event(&e.record, &meta)?;
                        }
                        continue;
                    }
                    let line = o.json(schema, buf);
                    for s in sinks.iter_mut() {
                        s.write(line)?;
                    }
                }
                Stream::Graph(i) => {
                    stats.results += 1;
                    if let Some(n) = graph_written.get_mut(i as usize) {
                        *n += 1;
                    }
                    if let Some(g) = graph.get_mut(i as usize) {
                        if let crate::msg::Body::Event(e) = &o.body {
                            let meta = crate::sinks::EventMeta {
                                names: &g.carried,
                                values: &e.fields,
                                retain: e.retain,
                            };
                            for s in &mut g.sinks {
                                s.write_event(&e.record, &meta)?;
                            }
                            continue;
                        }
                        let line = o.json(&g.schema, buf);
                        for s in &mut g.sinks {
                            s.write(line)?;
                        }
                    }
                }
                Stream::Late => {
                    stats.late += 1;
                    let line = o.json(schema, buf);
                    if noted < crate::metrics::RECENT_KEPT {
                        noted += 1;
                        ctx.metrics.note("late", &String::from_utf8_lossy(line));
                    }
                    for s in late.iter_mut() {
                        s.write(line)?;
                    }
                }
                Stream::Dead => {
                    stats.dead_letters += 1;
                    if dead.is_empty() {
                        if let Some(held_back) = dead_log.hit() {
                            tracing::warn!(
                                record = %String::from_utf8_lossy(o.json(schema, buf)),
                                since_last = held_back,
                                "dead letter (configure `dead_letter:` to keep them; more are counted in rivulet_dead_letters_total)"
                            );
                        }
                    }
                    let line = o.json(schema, buf);
                    if noted < crate::metrics::RECENT_KEPT {
                        noted += 1;
                        ctx.metrics
                            .note("dead_letter", &String::from_utf8_lossy(line));
                    }
                    for s in dead.iter_mut() {
                        s.write(line)?;
                    }
                }
            }
        }
        for s in sinks
            .iter_mut()
            .chain(graph.iter_mut().flat_map(|g| &mut g.sinks))
            .chain(late.iter_mut())
            .chain(dead.iter_mut())
        {
            s.flush()?;
        }
        // The outputs up to here are written: now the checkpoint that
        // covers them (written by its own thread while processing goes on).
        let complete = awaiting
            .as_ref()
            .is_some_and(|a| a.snapshots == win_out.len());
        let ready = if complete { awaiting.take() } else { None };
        if let (Some(_), Some(t)) = (&ready, tail.as_mut()) {
            // The tail's state now holds exactly the results before the
            // barrier: it belongs to this checkpoint.
            let mut changes = Vec::new();
            t.tail.snapshot(&mut changes);
            for (op, (k, record)) in changes {
                match record {
                    Some(r) => pending.upsert(op, k, r),
                    None => pending.delete(op, k),
                }
            }
        }
        match checkpointer.as_mut() {
            Some(Checkpoints::Local(cp)) => match ready {
                Some(a) => cp.checkpoint(a.cut.position, a.time, pending, a.savepoint),
                None => cp.poll(),
            },
            Some(Checkpoints::Peer(tx)) => {
                if let Some(a) = ready {
                    let _ = tx.send(super::peer::PeerCheckpoint {
                        id: a.cut.id,
                        position: a.cut.position,
                        watermark: a.time.0,
                        input_watermark: a.time.1,
                        pending: std::mem::take(pending),
                    });
                }
            }
            None => {}
        }
        counters.batches.add(1);
        counters.count(stats, counted, graph_written);
        if let Some(end) = batch.end {
            stats.stopped = end == End::Stop;
            if let Some(Checkpoints::Local(cp)) = checkpointer.as_mut() {
                cp.finish();
            }
            for s in sinks
                .iter_mut()
                .chain(graph.iter_mut().flat_map(|g| &mut g.sinks))
                .chain(late.iter_mut())
                .chain(dead.iter_mut())
            {
                s.close()?;
            }
            return Ok(Some(stats.clone()));
        }
        Ok(None)
    }
}

/// What the merger counts, per batch.
struct MergeCounters {
    batches: Counter,
    results: Counter,
    late: Counter,
    dead: Counter,
    /// Each further stream's sinks (`sink` is the stream's name).
    graph: Vec<Counter>,
    late_records: Counter,
    filtered: Counter,
}

impl MergeCounters {
    fn new(ctx: &RunContext, graph: &[GraphSinks]) -> Self {
        let sink = |name: &str| {
            ctx.for_operator(&format!("sink_{name}")).counter(
                names::SINK_RECORDS,
                "records written to a sink",
                &[("sink", name)],
            )
        };
        MergeCounters {
            batches: ctx.counter(
                names::BATCHES_WRITTEN,
                "input batches whose outputs are all written",
                &[],
            ),
            results: sink("main"),
            late: sink("late"),
            dead: sink("dead_letter"),
            graph: graph.iter().map(|g| sink(&g.name)).collect(),
            late_records: ctx.counter(
                names::LATE_EVENTS,
                "records too late for their windows",
                &[],
            ),
            filtered: ctx.counter(
                names::FILTERED_EVENTS,
                "records dropped on purpose by a filter",
                &[],
            ),
        }
    }

    /// Adds what `stats` gained since `counted`, then remembers it;
    /// `graph` holds what each further stream's sinks got in the batch
    /// (part of `stats.results`, counted under their own names).
    fn count(&self, stats: &RunStats, counted: &mut RunStats, graph: &mut [u64]) {
        let d = |now: u64, before: u64| now - before;
        let mut others = 0;
        for (c, n) in self.graph.iter().zip(graph.iter_mut()) {
            if *n > 0 {
                c.add(*n);
                others += std::mem::take(n);
            }
        }
        self.results
            .add(d(stats.results, counted.results).saturating_sub(others));
        self.late.add(d(stats.late, counted.late));
        self.late_records.add(d(stats.late, counted.late));
        self.dead.add(d(stats.dead_letters, counted.dead_letters));
        self.filtered.add(d(stats.filtered, counted.filtered));
        *counted = stats.clone();
    }
}
