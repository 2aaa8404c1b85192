//! The parse stage: decode, time, steps, key, aggregate inputs; then one
//! frame per owner of key groups.
//!
//! Parse workers run in parallel, each on the batches the reader deals it.
//! For every input batch a worker sends each keyed worker exactly one frame
//! (through the [`super::exchange`]) and the merger one `OutBatch` with the
//! batch's dead letters, pass-through records and counts. A frame is, in
//! order: a processing-time watermark before the records (processing-time
//! pipelines), the records the owner's key groups hold with the event-time
//! watermarks reached inside the batch, a watermark or idleness after them,
//! the final watermark (+infinity) at the end of a bounded input, a
//! checkpoint barrier, the end.

use super::exchange::Outbox;
use super::merge::OutBatch;
use super::reader::InBatch;
use crate::metrics::{names, reason, Counter};
use crate::msg::{
    dead_letter_line, DeadSource, End, Frame, KeyedBatch, KeyedRec, Msg, Output, Stream,
};
use crate::operators::{Records, Status, Step};
use crate::partition::Assignment;
use crate::plan::{Format, Plan, TimeMode};
use crate::time::valve::bounded;
use crate::value::{encode_key, hash_key, Value};
use std::sync::Arc;

/// What a parse worker counts, per batch: records into and out of each of
/// its operators, and dead letters by reason class.
#[derive(Default)]
pub(super) struct ParseCounters {
    /// Batches processed (for the queue fill of the stage).
    pub batches: Counter,
    /// (in, out) of `decode`, of each step before the key, of `key_by`
    /// (with a window), of each step after it.
    pub decode: (Counter, Counter),
    pub before: Vec<(Counter, Counter)>,
    pub key: (Counter, Counter),
    pub after: Vec<(Counter, Counter)>,
    /// By class, in the order of [`reason::ALL`].
    pub dead: Vec<Counter>,
}

impl ParseCounters {
    /// Registers the counters of worker `worker`, for the operators of
    /// [`operator_ids`].
    pub fn new(
        ctx: &crate::context::RunContext,
        worker: usize,
        before: &[Box<dyn Step>],
        after: &[Box<dyn Step>],
    ) -> Self {
        let w = worker.to_string();
        let pair = |op: &str| {
            ctx.for_operator(op)
                .records_in_out(&[("stream", "main"), ("worker", &w)])
        };
        let ids = operator_ids(before, after);
        let mut ids = ids.iter();
        let mut next = || pair(ids.next().map_or("step", |s| s.as_str()));
        let decode = next();
        let before = before.iter().map(|_| next()).collect();
        let key = pair("key_by");
        let after = after.iter().map(|_| next()).collect();
        ParseCounters {
            batches: ctx.counter(
                names::STAGE_BATCHES,
                "batches a stage has taken from its queues",
                &[("stage", "parse"), ("worker", &w)],
            ),
            decode,
            before,
            key,
            after,
            dead: reason::ALL
                .iter()
                .map(|r| {
                    ctx.counter(
                        names::DEAD_LETTERS,
                        "records sent to the dead-letter output, by reason class",
                        &[("reason", r)],
                    )
                })
                .collect(),
        }
    }
}

/// The operator ids of the parse stage, in order: `decode`, then each step
/// as `<kind>_<n>` counting from 1 (`map_1`, `filter_2`).
pub fn operator_ids(before: &[Box<dyn Step>], after: &[Box<dyn Step>]) -> Vec<String> {
    std::iter::once("decode".to_string())
        .chain(
            before
                .iter()
                .chain(after)
                .enumerate()
                .map(|(i, s)| format!("{}_{}", s.kind(), i + 1)),
        )
        .collect()
}

fn count(pair: &(Counter, Counter), live_in: usize, removed: usize) -> usize {
    pair.0.add(live_in as u64);
    let out = live_in.saturating_sub(removed);
    pair.1.add(out as u64);
    out
}

pub(super) struct ParseWorker {
    pub plan: Arc<Plan>,
    /// Which keyed worker owns each key group.
    pub assignment: Assignment,
    pub before: Vec<Box<dyn Step>>,
    pub after: Vec<Box<dyn Step>>,
    /// The steps of each tee (the plan's `tees`).
    pub tees: Vec<Vec<Box<dyn Step>>>,
    /// Whether keyed records carry their payload (a late output or a key
    /// bound may need it).
    pub carry_payloads: bool,
    pub slots: Vec<Value>,
    pub status: Vec<Status>,
    pub counters: ParseCounters,
}

impl ParseWorker {
    /// Runs until the reader stops or a receiver goes away.
    pub fn run(
        mut self,
        rx: std::sync::mpsc::Receiver<InBatch>,
        to_merge: std::sync::mpsc::SyncSender<OutBatch>,
        mut outbox: impl Outbox,
    ) {
        for batch in rx {
            let end = batch.end;
            let (out, frames) = self.process(batch);
            if to_merge.send(out).is_err() {
                return;
            }
            for (owner, frame) in frames.into_iter().enumerate() {
                if outbox.send(owner, frame).is_err() {
                    return;
                }
            }
            if end.is_some() {
                return;
            }
        }
    }

    pub fn process(&mut self, batch: InBatch) -> (OutBatch, Vec<Frame>) {
        let plan = &*self.plan;
        let raw = &batch.raw;
        let n = raw.items.len();
        let width = plan.fields.len().max(1);
        self.slots.clear();
        self.slots.resize(n * width, Value::Null);
        self.status.clear();
        self.status.resize(n, Status::Live);
        let mut ts = vec![0i64; n];
        // Event-time watermarks reached inside the batch, by event.
        let mut watermarks = Vec::new();
        let mut running = i64::MIN;
        // A union of sources: each one's largest timestamp, and the source
        // of each watermark.
        let mut part_running = vec![i64::MIN; plan.parts.len()];
        let mut watermark_parts: Vec<u16> = Vec::new();
        let bound = match plan.time {
            TimeMode::Event {
                max_out_of_orderness,
                ..
            } => Some(max_out_of_orderness),
            TimeMode::Ingestion => Some(0),
            _ => None,
        };
        // Records the decode stage sent to dead letters (for its in/out).
        let mut undecoded = 0;
        for (i, item) in raw.items.iter().enumerate() {
            let row = &mut self.slots[i * width..(i + 1) * width];
            if let Some(size) = item.oversize {
                self.status[i] = Status::Dead(
                    reason::OVERSIZED,
                    format!(
                        "payload of {size} bytes exceeds max_payload ({} bytes)",
                        plan.max_payload
                    ),
                );
                undecoded += 1;
                continue;
            }
            let payload = raw.payload(item);
            match plan.format {
                Format::Json => {
                    if let Err(e) = plan.fields.decode(payload, row) {
                        self.status[i] = Status::Dead(reason::INVALID_JSON, e);
                        undecoded += 1;
                        continue;
                    }
                }
                Format::Text => row[plan.value_slot] = text_value(payload),
                Format::Raw => {}
            }
            if let (Some((binder, slots)), Some(topic)) = (&plan.binder, raw.topic(item)) {
                bind_topic(binder, slots, topic, row);
            }
            if let Some(part) = plan.parts.get(item.source as usize) {
                match part.stamps.read(&row[part.ts_slot]) {
                    Ok(t) => ts[i] = t,
                    Err(e) => {
                        self.status[i] = Status::Dead(
                            reason::BAD_TIMESTAMP,
                            format!("event_time `{}`: {e}", part.field),
                        );
                        undecoded += 1;
                        continue;
                    }
                }
                let r = &mut part_running[item.source as usize];
                if ts[i] > *r {
                    *r = ts[i];
                    watermarks.push((i as u32, bounded(*r, part.bound)));
                    watermark_parts.push(item.source);
                }
                continue;
            }
            ts[i] = match (&plan.time, plan.ts_slot) {
                (TimeMode::Event { field, stamps, .. }, Some(slot)) => {
                    match stamps.read(&row[slot]) {
                        Ok(t) => t,
                        Err(e) => {
                            self.status[i] = Status::Dead(
                                reason::BAD_TIMESTAMP,
                                format!("event_time `{field}`: {e}"),
                            );
                            undecoded += 1;
                            continue;
                        }
                    }
                }
                (TimeMode::Processing | TimeMode::Ingestion, _) => item.arrival_ms,
                _ => 0,
            };
            if let Some(bound) = bound {
                if ts[i] > running {
                    running = ts[i];
                    watermarks.push((i as u32, bounded(running, bound)));
                }
            }
        }
        // Sources of a union that ended: their event time is +infinity.
        if !plan.parts.is_empty() {
            for &p in &raw.finished {
                watermarks.push((n as u32, i64::MAX));
                watermark_parts.push(p);
            }
        }
        // Events as decoded, for the streams that read the sources besides
        // the first (before this stream's steps change them).
        let side_rows: Vec<Output> = match &plan.side {
            Some(slots) => (0..n)
                .filter(|&i| self.status[i] == Status::Live)
                .map(|i| {
                    let row = &self.slots[i * width..(i + 1) * width];
                    Output {
                        idx: i as u32,
                        phase: crate::msg::Phase::During,
                        end: ts[i],
                        start: 0,
                        key: Box::new([]),
                        stream: Stream::Side,
                        body: crate::msg::Body::Row(
                            slots.iter().map(|&s| row[s].clone()).collect(),
                        ),
                    }
                })
                .collect(),
            None => Vec::new(),
        };
        // Tees: each its own steps on a copy of the decoded events, then
        // out as they came, with what the steps wrote.
        let mut tee_out: Vec<Output> = Vec::new();
        for (tee, steps) in plan.tees.iter().zip(&mut self.tees) {
            let mut slots = self.slots.clone();
            let mut status = self.status.clone();
            let mut records = Records {
                slots: &mut slots,
                width,
                status: &mut status,
                removed: 0,
            };
            for s in steps.iter_mut() {
                s.process(&mut records);
            }
            for i in 0..n {
                let item = &raw.items[i];
                match (&self.status[i], &records.status[i]) {
                    (_, Status::Live) => {}
                    // Its own steps failed on the event: a dead letter.
                    (Status::Live, Status::Dead(class, reason)) => {
                        if let Some(c) = reason::ALL.iter().position(|r| r == class) {
                            self.counters.dead[c].add(1);
                        }
                        let reason = format!("stream `{}`: {reason}", tee.name);
                        tee_out.push(dead_letter(plan, raw, i, &reason));
                        continue;
                    }
                    _ => continue,
                }
                let row = records.get(i);
                let line = passthrough_with(&tee.writes, plan, raw.payload(item), row);
                let event = crate::msg::Event {
                    record: line,
                    fields: tee.carry.iter().map(|(_, s)| row[*s].clone()).collect(),
                    retain: item.retain,
                };
                tee_out.push(Output {
                    stream: Stream::Graph(tee.route),
                    ..Output::event(i as u32, event)
                });
            }
        }
        let counters = &self.counters;
        let mut live = count(&counters.decode, n, undecoded);
        counters.batches.add(1);
        let mut records = Records {
            slots: &mut self.slots,
            width,
            status: &mut self.status,
            removed: 0,
        };
        for (s, c) in self.before.iter_mut().zip(&counters.before) {
            records.removed = 0;
            s.process(&mut records);
            live = count(c, live, records.removed);
        }
        records.removed = 0;
        let mut keys = Vec::new();
        let mut key_ranges = vec![(0u32, 0u32); n];
        if plan.keyed() {
            for (i, range) in key_ranges.iter_mut().enumerate() {
                if records.status[i] != Status::Live {
                    continue;
                }
                let start = keys.len() as u32;
                let row = records.get(i);
                if let Some(k) = plan.key_slots.iter().position(|&s| row[s].is_null()) {
                    records.reject_as(
                        i,
                        reason::MISSING_KEY,
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
        if plan.keyed() {
            live = count(&counters.key, live, records.removed);
        }
        for (s, c) in self.after.iter_mut().zip(&counters.after) {
            records.removed = 0;
            s.process(&mut records);
            live = count(c, live, records.removed);
        }
        let _ = live;
        let mut dead = [0u64; reason::ALL.len()];

        let mut out = OutBatch {
            end: batch.end,
            events: n as u64,
            checkpoint: batch.checkpoint.clone(),
            savepoint: batch.savepoint.clone(),
            outputs: side_rows.into_iter().chain(tee_out).collect(),
            ..Default::default()
        };
        let owners = self.assignment.size();
        let mut frames: Vec<Frame> = Vec::new();
        if plan.keyed() {
            let watermarks = Arc::new(watermarks);
            let watermark_parts = Arc::new(watermark_parts);
            let mut data: Vec<KeyedBatch> = (0..owners)
                .map(|_| KeyedBatch {
                    recs: Vec::with_capacity(n / owners + 1),
                    watermarks: watermarks.clone(),
                    watermark_parts: watermark_parts.clone(),
                    ..Default::default()
                })
                .collect();
            let width = plan.aggs.len() + plan.stateful_inputs.len();
            let pass_events = plan.stateful.as_ref().is_some_and(|s| s.passes_events());
            'rec: for i in 0..n {
                if records.status[i] != Status::Live {
                    continue;
                }
                let (ks, ke) = key_ranges[i];
                let key = &keys[ks as usize..ke as usize];
                let hash = hash_key(key);
                let kb = &mut data[self.assignment.owner_of_hash(hash)];
                let vals_start = kb.vals.len();
                let row = records.get(i);
                for (func, arg, name) in &plan.aggs {
                    let v = match arg {
                        None => Value::Bool(true),
                        Some(e) => match e.eval(row) {
                            Ok(v) => v,
                            Err(e) => {
                                kb.vals.truncate(vals_start);
                                records.reject(i, format!("aggregate `{name}`: {e}"));
                                continue 'rec;
                            }
                        },
                    };
                    if func.numeric() && !v.is_null() && v.as_f64().is_none() {
                        kb.vals.truncate(vals_start);
                        records.reject(
                            i,
                            format!(
                                "aggregate `{name}`: {} needs numbers, got a {} ({v})",
                                func.name(),
                                v.type_name()
                            ),
                        );
                        continue 'rec;
                    }
                    kb.vals.push(v);
                }
                for (e, numeric, label) in &plan.stateful_inputs {
                    let v = match e.eval(row) {
                        Ok(v) => v,
                        Err(e) => {
                            kb.vals.truncate(vals_start);
                            records.reject(i, format!("{label}: {e}"));
                            continue 'rec;
                        }
                    };
                    if *numeric && v.as_f64().is_none() {
                        kb.vals.truncate(vals_start);
                        records.reject(
                            i,
                            format!("{label}: needs a number, got {} ({v})", v.type_name()),
                        );
                        continue 'rec;
                    }
                    kb.vals.push(v);
                }
                debug_assert_eq!(kb.vals.len(), vals_start + width);
                let kstart = kb.keys.len() as u32;
                kb.keys.extend_from_slice(key);
                let item = &raw.items[i];
                kb.recs.push(KeyedRec {
                    idx: i as u32,
                    ts: ts[i],
                    hash,
                    position: item.position,
                    key: (kstart, kb.keys.len() as u32),
                    vals: vals_start as u32,
                });
                if self.carry_payloads {
                    kb.carry(raw.payload(item), raw.topic(item));
                }
                if pass_events {
                    kb.events.push(crate::msg::Event {
                        record: passthrough(plan, raw.payload(item), row),
                        fields: plan.carry.iter().map(|(_, s)| row[*s].clone()).collect(),
                        retain: item.retain,
                    });
                }
            }
            // Processing time: the batch's first arrival, once for all owners.
            let first_arrival = match plan.time {
                TimeMode::Processing => raw.items.iter().map(|i| i.arrival_ms).min(),
                _ => None,
            }
            .unwrap_or(batch.now_ms);
            frames = data
                .into_iter()
                .map(|kb| frame(plan, &batch, first_arrival, kb))
                .collect();
        } else {
            for i in 0..n {
                if records.status[i] == Status::Live {
                    let item = &raw.items[i];
                    let row = records.get(i);
                    let line = passthrough(plan, raw.payload(item), row);
                    out.outputs
                        .push(if plan.carry.is_empty() && !plan.carry_retain {
                            Output::plain(i as u32, Stream::Main, line)
                        } else {
                            let fields = plan.carry.iter().map(|(_, s)| row[*s].clone());
                            Output::event(
                                i as u32,
                                crate::msg::Event {
                                    record: line,
                                    fields: fields.collect(),
                                    retain: item.retain,
                                },
                            )
                        });
                }
            }
        }
        for (i, st) in records.status.iter().enumerate() {
            match st {
                Status::Dropped => out.filtered += 1,
                Status::Dead(class, reason) => {
                    if let Some(c) = reason::ALL.iter().position(|r| r == class) {
                        dead[c] += 1;
                    }
                    out.outputs.push(dead_letter(plan, raw, i, reason));
                }
                Status::Live => {}
            }
        }
        for (c, n) in counters.dead.iter().zip(dead) {
            if n > 0 {
                c.add(n);
            }
        }
        (out, frames)
    }
}

/// The dead-letter output of event `i` of the batch, for `reason`.
fn dead_letter(plan: &Plan, raw: &crate::sources::RawBatch, i: usize, reason: &str) -> Output {
    let item = &raw.items[i];
    let from = DeadSource {
        source: &plan.source_name,
        position: item.position,
        topic: raw.topic(item),
        payload: raw.payload(item),
        oversize: item.oversize,
    };
    Output::plain(i as u32, Stream::Dead, dead_letter_line(reason, &from))
}

/// One owner's frame for a batch (see the module docs for the order).
fn frame(plan: &Plan, batch: &InBatch, first_arrival: i64, data: KeyedBatch) -> Frame {
    let mut frame = Vec::with_capacity(4);
    // After how long without input event time follows the wall clock.
    let idle = match plan.time {
        TimeMode::Event {
            idle_timeout: Some(idle),
            ..
        } => Some(idle),
        TimeMode::Ingestion => Some(crate::plan::INGESTION_IDLE_MS),
        _ => None,
    };
    if let TimeMode::Processing = plan.time {
        frame.push(Msg::Watermark(first_arrival.saturating_sub(1)));
        frame.push(Msg::Data(data));
        frame.push(Msg::Watermark(batch.now_ms.saturating_sub(1)));
    } else {
        frame.push(Msg::Data(data));
        if let Some(idle) = idle {
            let quiet = batch.now_ms.saturating_sub(batch.last_arrival_ms);
            if batch.raw.is_empty() && batch.last_arrival_ms != i64::MIN && quiet >= idle {
                frame.push(Msg::Idle { quiet_ms: quiet });
            }
        }
    }
    // The end of a bounded input is the final watermark, +infinity: every
    // window fires before the last checkpoint is cut (as in Flink).
    if batch.end == Some(End::Flush) {
        frame.push(Msg::Watermark(i64::MAX));
    }
    if let Some(cut) = &batch.checkpoint {
        frame.push(Msg::Barrier(cut.id));
    }
    if let Some(end) = batch.end {
        frame.push(Msg::End(end));
    }
    frame
}

/// A text payload as a value: a number where it parses as one, else a string.
pub(crate) fn text_value(payload: &[u8]) -> Value {
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

/// The output of a pipeline without a window: the event as it came, with
/// the fields written by steps set over it.
/// A text payload passes through as it came, unless steps wrote fields:
/// then it becomes an object with `value` and those fields.
fn passthrough(plan: &Plan, payload: &[u8], row: &[Value]) -> Vec<u8> {
    passthrough_with(&plan.writes, plan, payload, row)
}

/// [`passthrough`] with the fields `writes` (a tee's).
fn passthrough_with(
    writes: &[(String, usize)],
    plan: &Plan,
    payload: &[u8],
    row: &[Value],
) -> Vec<u8> {
    if writes.is_empty() {
        return payload.to_vec();
    }
    let mut obj: serde_json::Value = match plan.format {
        // The payload decoded as an object earlier, so this parse succeeds.
        Format::Json => serde_json::from_slice(payload).unwrap_or_default(),
        Format::Text => serde_json::json!({ "value": row[plan.value_slot].to_json() }),
        // The builder refuses steps that write fields with raw payloads.
        Format::Raw => return payload.to_vec(),
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
