//! Running a pipeline: threads, bounded queues, ordering and shutdown.
//!
//! ```text
//!  reader ──batch k──▶ parse worker (k mod N) ──sub-batch per owner──▶ window worker j
//!                            │                                              │
//!                            └──────── dead letters, pass-through ──▶ merger ◀── results
//! ```
//!
//! - The **reader** polls the source and cuts the input into numbered
//!   batches: up to 1024 events, or what arrived within 1 ms of the first
//!   (low latency for a quiet stream, full batches for a busy one).
//! - **Parse workers** (N of them, batches dealt round-robin) decode, time,
//!   map/filter, key and evaluate aggregate inputs, then split each batch by
//!   owner: a key hashes to one of 256 key groups, and window worker `j`
//!   owns a contiguous range of them.
//! - **Window workers** (N) take their sub-batches in batch order, so each
//!   sees its keys' events in input order. With each sub-batch comes the
//!   list of points where the whole batch's maximum timestamp rose, so every
//!   worker advances the watermark at exactly the event where a
//!   single-threaded run would.
//! - The **merger** (the calling thread) takes outputs batch by batch,
//!   orders them by the input event that caused them, then by window end,
//!   start and key, and writes the sinks. Output is therefore identical for
//!   any number of workers.
//!
//! - With `state:`, the batches that close a checkpoint carry the source
//!   position after them; the merger, once their outputs are written, hands
//!   the changed keys to the **checkpoint writer** thread
//!   ([`checkpoint`]), which commits them while processing goes on.
//!
//! Every queue is a bounded channel: a slow sink stops the reader
//! (backpressure), never grows memory. Each stage consumes strictly in
//! batch order, which rules out deadlock between them.

mod checkpoint;

use crate::operators::window::{AggFunc, Emitted, Outcome, WindowOperator};
use crate::operators::{Records, Status, Step};
use crate::partition::{Assignment, KeyGroup};
use crate::plan::{Format, Pipeline, Plan, TimeMode};
use crate::sinks::{Sink, SinkError};
use crate::sources::{Poll, RawBatch, Source, SourceError};
use crate::state::control::SavepointRequest;
use crate::time::{timestamp_from, Clock};
use crate::value::{encode_key, hash_key, write_json_str, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events per batch at most.
pub const BATCH_EVENTS: usize = 1024;
/// The longest the reader keeps adding to a batch while events keep coming.
const LINGER: Duration = Duration::from_millis(1);
/// How often the reader wakes when the source is quiet.
const TICK: Duration = Duration::from_millis(100);
/// Batches each queue holds.
const QUEUE: usize = 4;
pub use crate::partition::KEY_GROUPS;

/// Options of one run.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Set to stop the run: the reader stops, queued events are processed,
    /// open windows are not fired.
    pub shutdown: Arc<AtomicBool>,
    /// Live counters, readable while the run goes on.
    pub progress: Arc<Progress>,
    /// Start from this savepoint (copied into the state directory first).
    pub restore_from: Option<std::path::PathBuf>,
    /// With `restore_from`: start even if the pipeline changed so that the
    /// saved keyed state cannot be used (it is dropped; the position is kept).
    pub allow_non_restored_state: bool,
}

/// Counters updated while a pipeline runs (per batch, not per event).
#[derive(Debug, Default)]
pub struct Progress {
    /// Events read from the source so far.
    pub events_read: AtomicU64,
    /// Batches fully written to the sinks so far.
    pub batches_written: AtomicU64,
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

/// A window worker's part of a checkpoint.
struct WorkerSnapshot {
    changes: crate::operators::window::Changes,
    watermark: i64,
    max_ts: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// End of a bounded input: the watermark goes to +infinity.
    Flush,
    /// Stopped: process what was read, fire nothing more.
    Stop,
}

struct InBatch {
    now_ms: i64,
    /// Arrival time of the newest event so far (`i64::MIN` before any).
    last_arrival_ms: i64,
    raw: Arc<RawBatch>,
    end: Option<End>,
    /// Set on batches that close a checkpoint: the source position after them.
    checkpoint: Option<Arc<Vec<u8>>>,
    /// A savepoint to write once this batch's checkpoint is committed.
    savepoint: Option<Arc<SavepointRequest>>,
}

/// One event routed to a window worker.
struct Rec {
    idx: u32,
    ts: i64,
    hash: u64,
    key: (u32, u32),
    vals: u32,
}

struct SubBatch {
    now_ms: i64,
    last_arrival_ms: i64,
    first_arrival_ms: i64,
    end: Option<End>,
    /// (event index, new maximum timestamp) wherever the batch's running
    /// maximum rose; shared by all window workers.
    raises: Arc<Vec<(u32, i64)>>,
    recs: Vec<Rec>,
    keys: Vec<u8>,
    vals: Vec<Value>,
    raw: Arc<RawBatch>,
    checkpoint: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stream {
    Main,
    Late,
    Dead,
}

/// A record for a sink, with its place in the output order.
struct Output {
    idx: u32,
    phase: u8,
    end: i64,
    start: i64,
    key: Box<[u8]>,
    stream: Stream,
    line: Vec<u8>,
}

#[derive(Default)]
struct OutBatch {
    end: Option<End>,
    outputs: Vec<Output>,
    events: u64,
    filtered: u64,
    open_windows: u64,
    /// From the parse stage: the position this batch's checkpoint saves.
    checkpoint: Option<Arc<Vec<u8>>>,
    /// From a window worker: its state changes for the checkpoint.
    snapshot: Option<WorkerSnapshot>,
    /// From the parse stage: a savepoint to write after the checkpoint.
    savepoint: Option<Arc<SavepointRequest>>,
}

impl Pipeline {
    /// Runs until the source ends or `opts.shutdown` is set.
    pub fn run(self, opts: RunOptions) -> Result<RunStats, RunError> {
        run(self, opts)
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

fn run(p: Pipeline, opts: RunOptions) -> Result<RunStats, RunError> {
    let plan = p.plan.clone();
    let n = plan.workers;
    let windowed = plan.window.is_some();
    let assignment = Assignment::contiguous(n);
    let mut source = p.source;

    // Durable state: load the last checkpoint, resume the source after it.
    let fingerprint = plan.fingerprint();
    let mut store = None;
    let mut restored_keys: Vec<Vec<(Vec<u8>, crate::operators::window::KeySnapshot)>> =
        (0..n).map(|_| Vec::new()).collect();
    let mut restored_time = (i64::MIN, i64::MIN);
    let mut control = None;
    if let Some((dir, _)) = &plan.state {
        if let Some(sp) = &opts.restore_from {
            crate::state::install_savepoint(sp, dir)?;
            tracing::info!(savepoint = %sp.display(), "starting from a savepoint");
        }
        let (s, restored) = crate::state::StateStore::open(
            dir,
            &fingerprint,
            &plan.state_layout(),
            opts.allow_non_restored_state,
        )?;
        control = Some(crate::state::control::listen(dir)?);
        if let Some(r) = restored {
            tracing::info!(
                state = %s.path().display(),
                checkpoint = r.epoch,
                keys = r.keys.len(),
                "resuming from the last checkpoint"
            );
            if !r.position.is_empty() {
                if let Err(e) = source.seek(&r.position) {
                    tracing::warn!(error = %e, "the source cannot resume; reading from where it stands now");
                }
            }
            restored_time = (r.watermark, r.max_ts);
            for (key, snap) in r.keys {
                restored_keys[assignment.owner(KeyGroup::of_key(&key))].push((key, snap));
            }
        }
        store = Some(s);
    }
    let checkpoint_every = plan.state.as_ref().map(|(_, every)| *every);
    let on_checkpoint = source.checkpoint_hook();

    // reader -> parse workers
    let mut to_parse = Vec::new();
    let mut parse_rx = Vec::new();
    for _ in 0..n {
        let (tx, rx) = sync_channel::<InBatch>(QUEUE);
        to_parse.push(tx);
        parse_rx.push(rx);
    }
    // parse worker i -> window worker j
    let mut sub_tx: Vec<Vec<SyncSender<SubBatch>>> = (0..n).map(|_| Vec::new()).collect();
    let mut sub_rx: Vec<Vec<Receiver<SubBatch>>> = (0..n).map(|_| Vec::new()).collect();
    if windowed {
        for tx_row in sub_tx.iter_mut() {
            for rx_col in sub_rx.iter_mut() {
                let (tx, rx) = sync_channel(QUEUE);
                tx_row.push(tx);
                rx_col.push(rx);
            }
        }
    }
    // parse workers and window workers -> merger
    let mut parse_out_rx = Vec::new();
    let mut win_out_rx = Vec::new();

    let mut handles = Vec::new();
    for (i, (rx, subs)) in parse_rx.into_iter().zip(sub_tx).enumerate() {
        let (tx, out_rx) = sync_channel::<OutBatch>(QUEUE);
        parse_out_rx.push(out_rx);
        let mut worker = ParseWorker {
            plan: plan.clone(),
            assignment: assignment.clone(),
            before: p.steps_before_key.iter().map(|s| s.clone_box()).collect(),
            after: p.steps_after_key.iter().map(|s| s.clone_box()).collect(),
            slots: Vec::new(),
            status: Vec::new(),
        };
        handles.push(spawn(format!("rivulet-parse-{i}"), move || {
            for batch in rx {
                let end = batch.end;
                let (out, subs_out) = worker.process(batch);
                if tx.send(out).is_err() {
                    return;
                }
                for (sub, ch) in subs_out.into_iter().zip(&subs) {
                    if ch.send(sub).is_err() {
                        return;
                    }
                }
                if end.is_some() {
                    return;
                }
            }
        })?);
    }
    if let Some(def) = &plan.window {
        for (j, rxs) in sub_rx.into_iter().enumerate() {
            let (tx, out_rx) = sync_channel::<OutBatch>(QUEUE);
            win_out_rx.push(out_rx);
            let mut op = WindowOperator::new(def.clone(), plan.key_names.clone());
            if let Some(max) = def.max_keys {
                // This worker's share of the bound, by the key groups it owns.
                op.limit_keys(assignment.share_of(j, max));
            }
            if store.is_some() {
                op.track_changes();
                op.restore_watermark(restored_time.0);
                for (key, snap) in std::mem::take(&mut restored_keys[j]) {
                    op.restore_key(&key, hash_key(&key), snap);
                }
            }
            let mut worker = WindowWorker {
                plan: plan.clone(),
                op,
                max_ts: restored_time.1,
                emitted: Vec::new(),
            };
            handles.push(spawn(format!("rivulet-window-{j}"), move || {
                let mut seq = 0usize;
                loop {
                    let Ok(sub) = rxs[seq % rxs.len()].recv() else {
                        return;
                    };
                    let out = worker.process(sub);
                    let end = out.end;
                    if tx.send(out).is_err() || end.is_some() {
                        return;
                    }
                    seq += 1;
                }
            })?);
        }
    }

    let clock = p.clock.clone();
    let shutdown = opts.shutdown.clone();
    let ticks = matches!(plan.time, TimeMode::Processing)
        || matches!(
            plan.time,
            TimeMode::Event {
                idle_timeout: Some(_),
                ..
            }
        );
    let max_payload = plan.max_payload;
    let progress = opts.progress.clone();
    let savepoint_rx = control.as_mut().and_then(|c| c.take_requests());
    let reader = spawn("rivulet-reader".into(), move || {
        read(
            source,
            to_parse,
            clock,
            shutdown,
            ReaderConfig {
                ticks,
                max_payload,
                checkpoint_every,
                savepoints: savepoint_rx,
            },
            &progress,
        )
    })?;

    let checkpointer = match store {
        Some(s) => Some(checkpoint::Checkpointer::start(
            s,
            fingerprint,
            on_checkpoint,
        )?),
        None => None,
    };
    let merged = merge(
        checkpointer,
        &opts.progress,
        parse_out_rx,
        win_out_rx,
        p.sinks,
        p.late,
        p.dead_letter,
    );
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

/// The reader thread: polls the source and deals numbered batches.
/// What the reader needs to know besides its channels.
struct ReaderConfig {
    /// Send empty batches when quiet (processing time, idleness).
    ticks: bool,
    max_payload: usize,
    checkpoint_every: Option<Duration>,
    /// Savepoint requests from the control socket.
    savepoints: Option<Receiver<SavepointRequest>>,
}

fn read(
    mut source: Box<dyn Source>,
    to_parse: Vec<SyncSender<InBatch>>,
    clock: Arc<dyn Clock>,
    shutdown: Arc<AtomicBool>,
    cfg: ReaderConfig,
    progress: &Progress,
) -> Result<(), SourceError> {
    let ReaderConfig {
        ticks,
        max_payload,
        checkpoint_every,
        savepoints,
    } = cfg;
    let mut next_checkpoint = checkpoint_every.map(|d| Instant::now() + d);
    // Whether events came since the last checkpoint (a quiet input gets
    // one more checkpoint, then none until something arrives).
    let mut read_since_checkpoint = false;
    let mut seq = 0u64;
    let mut last_arrival = i64::MIN;
    let mut result = Ok(());
    // Size each batch like the last full one, so buffers rarely regrow.
    let (mut cap_items, mut cap_bytes) = (16, 1024);
    loop {
        let mut batch = RawBatch {
            data: Vec::with_capacity(cap_bytes),
            items: Vec::with_capacity(cap_items),
            topics: Vec::new(),
        };
        let started = Instant::now();
        let mut end = None;
        loop {
            if shutdown.load(Ordering::Relaxed) {
                end = Some(End::Stop);
                break;
            }
            // Wait for the first event; after that, linger briefly for more.
            let wait = if batch.is_empty() {
                TICK.saturating_sub(started.elapsed())
            } else {
                LINGER.saturating_sub(started.elapsed())
            };
            let before = batch.len();
            let room = BATCH_EVENTS - batch.len();
            let polled = source.poll(&mut batch, room, max_payload, wait);
            if batch.len() > before {
                let now = clock.now_ms();
                for it in &mut batch.items[before..] {
                    it.arrival_ms = now;
                }
                last_arrival = now;
                progress
                    .events_read
                    .fetch_add((batch.len() - before) as u64, Ordering::Relaxed);
            }
            match polled {
                Ok(Poll::Finished) => {
                    end = Some(End::Flush);
                    break;
                }
                Ok(Poll::Open) => {}
                Err(e) => {
                    result = Err(e);
                    end = Some(End::Stop);
                    break;
                }
            }
            let full = batch.len() >= BATCH_EVENTS;
            let lingered = !batch.is_empty() && started.elapsed() >= LINGER;
            let ticked = batch.is_empty() && started.elapsed() >= TICK;
            if full || lingered || ticked {
                break;
            }
        }
        // Every checkpoint_interval, at the end, and for a savepoint, the
        // batch closes a checkpoint; when the input is quiet, an empty
        // batch does, if events came since the last one.
        let savepoint = savepoints
            .as_ref()
            .and_then(|rx| rx.try_recv().ok())
            .map(Arc::new);
        let due = next_checkpoint.is_some_and(|at| Instant::now() >= at);
        read_since_checkpoint |= !batch.is_empty();
        let quiet_checkpoint = due && read_since_checkpoint;
        if batch.is_empty() && end.is_none() && !ticks && savepoint.is_none() && !quiet_checkpoint {
            continue;
        }
        cap_items = batch.items.len().clamp(16, BATCH_EVENTS);
        cap_bytes = batch.data.len().clamp(1024, 1 << 20);
        let checkpoint = match checkpoint_every {
            Some(every) if end.is_some() || savepoint.is_some() || due => {
                next_checkpoint = Some(Instant::now() + every);
                read_since_checkpoint = false;
                Some(Arc::new(source.position().unwrap_or_default()))
            }
            _ => None,
        };
        let msg = InBatch {
            now_ms: clock.now_ms(),
            last_arrival_ms: last_arrival,
            raw: Arc::new(batch),
            end,
            checkpoint,
            savepoint,
        };
        if to_parse[(seq % to_parse.len() as u64) as usize]
            .send(msg)
            .is_err()
        {
            // The merger stopped (a sink failed); it reports why.
            return result;
        }
        seq += 1;
        if end.is_some() {
            return result;
        }
    }
}

struct ParseWorker {
    plan: Arc<Plan>,
    /// Which window worker owns each key group.
    assignment: Assignment,
    before: Vec<Box<dyn Step>>,
    after: Vec<Box<dyn Step>>,
    slots: Vec<Value>,
    status: Vec<Status>,
}

impl ParseWorker {
    fn process(&mut self, batch: InBatch) -> (OutBatch, Vec<SubBatch>) {
        let plan = &*self.plan;
        let raw = &batch.raw;
        let n = raw.items.len();
        let width = plan.fields.len().max(1);
        self.slots.clear();
        self.slots.resize(n * width, Value::Null);
        self.status.clear();
        self.status.resize(n, Status::Live);
        let mut ts = vec![0i64; n];
        let mut raises = Vec::new();
        let mut running = i64::MIN;
        for (i, item) in raw.items.iter().enumerate() {
            let row = &mut self.slots[i * width..(i + 1) * width];
            if let Some(size) = item.oversize {
                self.status[i] = Status::Dead(format!(
                    "payload of {size} bytes exceeds max_payload ({} bytes)",
                    plan.max_payload
                ));
                continue;
            }
            let payload = raw.payload(item);
            match plan.format {
                Format::Json => {
                    if let Err(e) = plan.fields.decode(payload, row) {
                        self.status[i] = Status::Dead(e);
                        continue;
                    }
                }
                Format::Text => row[plan.value_slot] = text_value(payload),
            }
            if let (Some((binder, slots)), Some(topic)) = (&plan.binder, raw.topic(item)) {
                bind_topic(binder, slots, topic, row);
            }
            ts[i] = match (&plan.time, plan.ts_slot) {
                (TimeMode::Event { field, .. }, Some(slot)) => match timestamp_from(&row[slot]) {
                    Ok(t) => t,
                    Err(e) => {
                        self.status[i] = Status::Dead(format!("event_time `{field}`: {e}"));
                        continue;
                    }
                },
                (TimeMode::Processing, _) => item.arrival_ms,
                _ => 0,
            };
            if ts[i] > running && matches!(plan.time, TimeMode::Event { .. }) {
                running = ts[i];
                raises.push((i as u32, running));
            }
        }
        let mut records = Records {
            slots: &mut self.slots,
            width,
            status: &mut self.status,
        };
        for s in &mut self.before {
            s.process(&mut records);
        }
        let mut keys = Vec::new();
        let mut key_ranges = vec![(0u32, 0u32); n];
        if plan.window.is_some() {
            for (i, range) in key_ranges.iter_mut().enumerate() {
                if records.status[i] != Status::Live {
                    continue;
                }
                let start = keys.len() as u32;
                let row = records.get(i);
                if let Some(k) = plan.key_slots.iter().position(|&s| row[s].is_null()) {
                    records.reject(
                        i,
                        format!("key field `{}` is missing or null", plan.key_names[k]),
                    );
                    continue;
                }
                for &s in &plan.key_slots {
                    encode_key(&row[s], &mut keys);
                }
                *range = (start, keys.len() as u32);
            }
        }
        for s in &mut self.after {
            s.process(&mut records);
        }

        let mut out = OutBatch {
            end: batch.end,
            events: n as u64,
            checkpoint: batch.checkpoint.clone(),
            savepoint: batch.savepoint.clone(),
            ..Default::default()
        };
        let workers = plan.workers;
        let mut subs: Vec<SubBatch> = Vec::new();
        if plan.window.is_some() {
            let first_arrival_ms = raw
                .items
                .iter()
                .map(|i| i.arrival_ms)
                .min()
                .unwrap_or(batch.now_ms);
            let raises = Arc::new(raises);
            subs = (0..workers)
                .map(|_| SubBatch {
                    now_ms: batch.now_ms,
                    last_arrival_ms: batch.last_arrival_ms,
                    first_arrival_ms,
                    end: batch.end,
                    raises: raises.clone(),
                    recs: Vec::with_capacity(n / workers + 1),
                    keys: Vec::new(),
                    vals: Vec::new(),
                    raw: batch.raw.clone(),
                    checkpoint: batch.checkpoint.is_some(),
                })
                .collect();
            let width = plan.aggs.len();
            'rec: for i in 0..n {
                if records.status[i] != Status::Live {
                    continue;
                }
                let (ks, ke) = key_ranges[i];
                let key = &keys[ks as usize..ke as usize];
                let hash = hash_key(key);
                let sub = &mut subs[self.assignment.owner_of_hash(hash)];
                let vals_start = sub.vals.len();
                let row = records.get(i);
                for (func, arg, name) in &plan.aggs {
                    let v = match arg {
                        None => Value::Bool(true),
                        Some(e) => match e.eval(row) {
                            Ok(v) => v,
                            Err(e) => {
                                sub.vals.truncate(vals_start);
                                records.reject(i, format!("aggregate `{name}`: {e}"));
                                continue 'rec;
                            }
                        },
                    };
                    if func.numeric() && !v.is_null() && v.as_f64().is_none() {
                        sub.vals.truncate(vals_start);
                        records.reject(
                            i,
                            format!(
                                "aggregate `{name}`: {} needs numbers, got a {} ({v})",
                                func_name(*func),
                                v.type_name()
                            ),
                        );
                        continue 'rec;
                    }
                    sub.vals.push(v);
                }
                debug_assert_eq!(sub.vals.len(), vals_start + width);
                let kstart = sub.keys.len() as u32;
                sub.keys.extend_from_slice(key);
                sub.recs.push(Rec {
                    idx: i as u32,
                    ts: ts[i],
                    hash,
                    key: (kstart, sub.keys.len() as u32),
                    vals: vals_start as u32,
                });
            }
        } else {
            for i in 0..n {
                if records.status[i] == Status::Live {
                    let line = passthrough(plan, raw.payload(&raw.items[i]), records.get(i));
                    out.outputs
                        .push(Output::plain(i as u32, Stream::Main, line));
                }
            }
        }
        for (i, st) in records.status.iter().enumerate() {
            match st {
                Status::Dropped => out.filtered += 1,
                Status::Dead(reason) => {
                    let item = &raw.items[i];
                    out.outputs.push(Output::plain(
                        i as u32,
                        Stream::Dead,
                        dead_letter_line(
                            reason,
                            &plan.source_name,
                            item.position,
                            raw.topic(item),
                            raw.payload(item),
                            item.oversize,
                        ),
                    ));
                }
                Status::Live => {}
            }
        }
        (out, subs)
    }
}

/// A text payload as a value: a number where it parses as one, else a string.
fn text_value(payload: &[u8]) -> Value {
    let text = String::from_utf8_lossy(payload);
    let t = text.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Value::Int(i);
    }
    match t.parse::<f64>() {
        Ok(f) if f.is_finite() => Value::Float(f),
        _ => Value::Str(t.into()),
    }
}

/// Sets the fields bound by the first pattern the topic matches, and the
/// whole-topic field. Bound fields replace fields of the payload.
fn bind_topic(
    binder: &crate::sources::TopicBinder,
    slots: &[(String, usize)],
    topic: &str,
    row: &mut [Value],
) {
    let slot = |name: &str| slots.iter().find(|(n, _)| n == name).map(|(_, s)| *s);
    for p in &binder.patterns {
        if p.matches(topic, |name, v| {
            if let Some(s) = slot(name) {
                row[s] = Value::Str(v.into());
            }
        }) {
            break;
        }
    }
    if let Some(s) = binder.topic_field.as_deref().and_then(slot) {
        row[s] = Value::Str(topic.into());
    }
}

fn func_name(f: AggFunc) -> &'static str {
    match f {
        AggFunc::Count | AggFunc::CountOf => "count",
        AggFunc::Sum => "sum",
        AggFunc::Avg => "avg",
        AggFunc::Min => "min",
        AggFunc::Max => "max",
        AggFunc::First => "first",
        AggFunc::Last => "last",
    }
}

impl Output {
    fn plain(idx: u32, stream: Stream, line: Vec<u8>) -> Output {
        Output {
            idx,
            phase: 0,
            end: 0,
            start: 0,
            key: Box::new([]),
            stream,
            line,
        }
    }
}

/// The output of a pipeline without a window: the event as it came, with
/// the fields written by steps set over it.
/// A text payload passes through as it came, unless steps wrote fields:
/// then it becomes an object with `value` and those fields.
fn passthrough(plan: &Plan, payload: &[u8], row: &[Value]) -> Vec<u8> {
    let writes = &plan.writes;
    if writes.is_empty() {
        return payload.to_vec();
    }
    let mut obj: serde_json::Value = match plan.format {
        // The payload decoded as an object earlier, so this parse succeeds.
        Format::Json => serde_json::from_slice(payload).unwrap_or_default(),
        Format::Text => serde_json::json!({ "value": row[plan.value_slot].to_json() }),
    };
    for (path, slot) in writes {
        let mut cur = &mut obj;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            if !cur.is_object() {
                *cur = serde_json::Value::Object(Default::default());
            }
            let serde_json::Value::Object(map) = cur else {
                break;
            };
            if parts.peek().is_none() {
                map.insert(part.to_string(), row[*slot].to_json());
                break;
            }
            cur = map
                .entry(part.to_string())
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
        }
    }
    serde_json::to_vec(&obj).unwrap_or_default()
}

/// A dead-letter record: the reason, where the event came from and the
/// original payload (as text, or hex when it is not UTF-8).
pub(crate) fn dead_letter_line(
    reason: &str,
    source: &str,
    position: u64,
    topic: Option<&str>,
    payload: &[u8],
    oversize: Option<u64>,
) -> Vec<u8> {
    let mut line = Vec::with_capacity(payload.len() + reason.len() + 64);
    line.extend_from_slice(b"{\"reason\":");
    write_json_str(reason, &mut line);
    line.extend_from_slice(b",\"source\":");
    write_json_str(source, &mut line);
    line.extend_from_slice(b",\"position\":");
    Value::Int(position as i64).write_json(&mut line);
    if let Some(t) = topic {
        line.extend_from_slice(b",\"topic\":");
        write_json_str(t, &mut line);
    }
    match std::str::from_utf8(payload) {
        Ok(s) => {
            line.extend_from_slice(b",\"payload\":");
            write_json_str(s, &mut line);
        }
        Err(_) => {
            line.extend_from_slice(b",\"payload_hex\":\"");
            for b in payload {
                line.extend_from_slice(format!("{b:02x}").as_bytes());
            }
            line.push(b'"');
        }
    }
    if let Some(size) = oversize {
        line.extend_from_slice(b",\"payload_truncated\":true,\"payload_size\":");
        Value::Int(size as i64).write_json(&mut line);
    }
    line.push(b'}');
    line
}

struct WindowWorker {
    plan: Arc<Plan>,
    op: WindowOperator,
    /// Largest event timestamp of the whole input so far.
    max_ts: i64,
    emitted: Vec<Emitted>,
}

impl WindowWorker {
    fn bound(&self) -> i64 {
        match self.plan.time {
            TimeMode::Event {
                max_out_of_orderness,
                ..
            } => max_out_of_orderness,
            _ => 0,
        }
    }

    fn advance_to_max(&mut self, max: i64, idx: u32, out: &mut OutBatch) {
        self.max_ts = self.max_ts.max(max);
        let wm = self.max_ts.saturating_sub(self.bound()).saturating_sub(1);
        self.advance(wm, idx, 1, out);
    }

    fn advance(&mut self, wm: i64, idx: u32, phase: u8, out: &mut OutBatch) {
        self.op.advance(wm, &mut self.emitted);
        self.collect(idx, phase, out);
    }

    fn collect(&mut self, idx: u32, phase: u8, out: &mut OutBatch) {
        for e in self.emitted.drain(..) {
            out.outputs.push(Output {
                idx,
                phase,
                end: e.end,
                start: e.start,
                key: e.key,
                stream: Stream::Main,
                line: e.line,
            });
        }
    }

    fn process(&mut self, sub: SubBatch) -> OutBatch {
        let mut out = OutBatch {
            end: sub.end,
            ..Default::default()
        };
        let processing = self.plan.time == TimeMode::Processing;
        if processing {
            self.advance(sub.first_arrival_ms.saturating_sub(1), 0, 0, &mut out);
        }
        let width = self.plan.aggs.len();
        let mut r = 0;
        for rec in &sub.recs {
            while r < sub.raises.len() && sub.raises[r].0 < rec.idx {
                let (q, m) = sub.raises[r];
                self.advance_to_max(m, q, &mut out);
                r += 1;
            }
            let key = &sub.keys[rec.key.0 as usize..rec.key.1 as usize];
            let vals = &sub.vals[rec.vals as usize..rec.vals as usize + width];
            let item = &sub.raw.items[rec.idx as usize];
            // Arrival order for `first`/`last` ties: the source position,
            // which goes on across restarts (a per-run counter would put
            // events after a recovery before those in the restored state).
            let seq = item.position;
            let outcome = self
                .op
                .process(key, rec.hash, rec.ts, seq, vals, &mut self.emitted);
            self.collect(rec.idx, 0, &mut out);
            match outcome {
                Outcome::Accepted => {}
                Outcome::Late => {
                    // Counted always; the payload only when someone reads it.
                    let line = if self.plan.has_late_sink {
                        sub.raw.payload(item).to_vec()
                    } else {
                        Vec::new()
                    };
                    out.outputs.push(Output::plain(rec.idx, Stream::Late, line));
                }
                Outcome::StateFull => {
                    let limit = self
                        .plan
                        .window
                        .as_ref()
                        .and_then(|w| w.max_keys)
                        .unwrap_or(0);
                    out.outputs.push(Output::plain(
                        rec.idx,
                        Stream::Dead,
                        dead_letter_line(
                            &format!(
                                "the window state is full: a new key beyond max_keys ({limit})"
                            ),
                            &self.plan.source_name,
                            item.position,
                            sub.raw.topic(item),
                            sub.raw.payload(item),
                            item.oversize,
                        ),
                    ));
                }
            }
        }
        while r < sub.raises.len() {
            let (q, m) = sub.raises[r];
            self.advance_to_max(m, q, &mut out);
            r += 1;
        }
        if let TimeMode::Event {
            max_out_of_orderness,
            idle_timeout: Some(idle),
            ..
        } = self.plan.time
        {
            let quiet = sub.now_ms.saturating_sub(sub.last_arrival_ms);
            if sub.raw.is_empty()
                && self.max_ts != i64::MIN
                && sub.last_arrival_ms != i64::MIN
                && quiet >= idle
            {
                let wm = self
                    .max_ts
                    .saturating_add(quiet)
                    .saturating_sub(max_out_of_orderness)
                    .saturating_sub(1);
                self.advance(wm, u32::MAX, 1, &mut out);
            }
        }
        if processing {
            self.advance(sub.now_ms.saturating_sub(1), u32::MAX, 1, &mut out);
        }
        match sub.end {
            Some(End::Flush) => self.advance(i64::MAX, u32::MAX, 2, &mut out),
            Some(End::Stop) => out.open_windows = self.op.open_windows() as u64,
            None => {}
        }
        if sub.checkpoint {
            out.snapshot = Some(WorkerSnapshot {
                changes: self.op.take_changes(),
                watermark: self.op.watermark(),
                max_ts: self.max_ts,
            });
        }
        out
    }
}

/// The merger: writes each batch's outputs in order.
fn merge(
    mut checkpointer: Option<checkpoint::Checkpointer>,
    progress: &Progress,
    parse_out: Vec<Receiver<OutBatch>>,
    win_out: Vec<Receiver<OutBatch>>,
    mut sinks: Vec<Box<dyn Sink>>,
    mut late: Vec<Box<dyn Sink>>,
    mut dead: Vec<Box<dyn Sink>>,
) -> Result<RunStats, RunError> {
    let mut stats = RunStats::default();
    let mut seq = 0usize;
    let lost = || RunError::Internal("a worker stopped unexpectedly".into());
    let mut logged_dead = 0u64;
    let mut pending = crate::state::Pending::default();
    loop {
        let mut batch = parse_out[seq % parse_out.len()]
            .recv()
            .map_err(|_| lost())?;
        stats.events += batch.events;
        stats.filtered += batch.filtered;
        let mut time = (i64::MIN, i64::MIN);
        for rx in &win_out {
            let mut w = rx.recv().map_err(|_| lost())?;
            batch.outputs.append(&mut w.outputs);
            stats.open_windows += w.open_windows;
            if let Some(snap) = w.snapshot.take() {
                for k in snap.changes.deletes {
                    pending.delete(k);
                }
                for (k, s) in snap.changes.upserts {
                    pending.upsert(k, s);
                }
                time = (time.0.max(snap.watermark), time.1.max(snap.max_ts));
            }
        }
        let outputs = &mut batch.outputs;
        outputs.sort_by(|a, b| {
            (a.idx, a.phase, a.end, a.start, &a.key, a.stream)
                .cmp(&(b.idx, b.phase, b.end, b.start, &b.key, b.stream))
        });
        for o in outputs.iter() {
            match o.stream {
                Stream::Main => {
                    stats.results += 1;
                    for s in &mut sinks {
                        s.write(&o.line)?;
                    }
                }
                Stream::Late => {
                    stats.late += 1;
                    for s in &mut late {
                        s.write(&o.line)?;
                    }
                }
                Stream::Dead => {
                    stats.dead_letters += 1;
                    if dead.is_empty() {
                        logged_dead += 1;
                        if logged_dead <= 10 {
                            tracing::warn!(
                                record = %String::from_utf8_lossy(&o.line),
                                "dead letter (configure `dead_letter:` to keep them)"
                            );
                        }
                    }
                    for s in &mut dead {
                        s.write(&o.line)?;
                    }
                }
            }
        }
        for s in sinks.iter_mut().chain(&mut late).chain(&mut dead) {
            s.flush()?;
        }
        // The outputs up to here are written: now the checkpoint that
        // covers them (written by its own thread while processing goes on).
        if let Some(cp) = checkpointer.as_mut() {
            match batch.checkpoint.take() {
                Some(position) => {
                    cp.checkpoint(position, time, &mut pending, batch.savepoint.take())
                }
                None => cp.poll(),
            }
        }
        progress.batches_written.fetch_add(1, Ordering::Relaxed);
        if let Some(end) = batch.end {
            stats.stopped = end == End::Stop;
            if let Some(cp) = checkpointer.as_mut() {
                cp.finish();
            }
            for s in sinks.iter_mut().chain(&mut late).chain(&mut dead) {
                s.close()?;
            }
            return Ok(stats);
        }
        seq += 1;
    }
}
