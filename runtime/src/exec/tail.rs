//! Steps after the first keyed stage: `map`/`filter` on window results,
//! and further `key_by` + window (or stateful step) pairs, such as a
//! per-site maximum of per-sensor averages, or an alert on an average.
//!
//! The tail runs in the merger, on the first stage's results in their
//! output order (which does not depend on the number of workers), one
//! segment after another. A segment is steps, then optionally `key_by` and
//! a keyed operator. A result's event time is `window_end − 1` (Flink's
//! rule; an alert's is its `at`); each segment's operator advances to its
//! input's watermark after every batch, so windows of windows follow
//! Flink's semantics: results fire when the watermark passes them, late
//! refirings of the first window can be late for the second.
//!
//! The tail's keyed operators are operators 1, 2, … of the state store;
//! the merger snapshots them at each checkpoint, after the outputs the
//! checkpoint covers (which is where their state is consistent with it).
//!
//! Ties of equal event time (`first`/`last` over results of one window
//! end) are broken by a hash of the result, which stays the same across
//! restarts.

use crate::expr::Expr;
use crate::metrics::{names, reason, Counter, Gauge};
use crate::msg::{Body, KeyedBatch, KeyedRec, Order, Output, Phase, Schema, Stream};
use crate::operators::keyed::{KeyChange, KeyedOperator, StateDecl};
use crate::operators::{Records, Status, Step};
use crate::value::{encode_key, hash_key, Value};
use std::sync::Arc;

/// The keyed part of a segment.
pub(crate) struct TailKeyed {
    pub key_names: Vec<String>,
    pub key_slots: Vec<usize>,
    /// Per record: the operator's inputs (aggregate arguments, or a
    /// stateful step's): expression (`None`: `count()`), whether it must be
    /// a number, its label for dead letters.
    pub inputs: Vec<(Option<Expr>, bool, String)>,
    pub op: Box<dyn KeyedOperator>,
    /// The operator passes its records on (`deduplicate`, `deadband`):
    /// its output is the segment's rows.
    pub passes: bool,
}

/// What a node of the tail counts: its watermark and each segment's
/// operators, under the operator ids the live page draws.
struct NodeCounters {
    watermark: Gauge,
    segments: Vec<SegmentCounters>,
}

/// Records in and out of each step, of `key_by` and of the keyed operator;
/// the keyed operator's keys.
#[derive(Default)]
struct SegmentCounters {
    steps: Vec<(Counter, Counter)>,
    key_by: Option<(Counter, Counter)>,
    keyed: Option<(Counter, Counter)>,
    keys: Option<Gauge>,
}

/// Adds `live_in` records in and what is left of them out; returns that.
fn count(pair: Option<&(Counter, Counter)>, live_in: usize, out: usize) -> usize {
    if let Some((i, o)) = pair {
        i.add(live_in as u64);
        o.add(out as u64);
    }
    out
}

/// One segment: steps, then optionally a keyed operator.
pub(crate) struct TailSegment {
    /// Fields of the input rows (slots `0..input_width`), then the fields
    /// the steps add.
    pub names: Vec<String>,
    pub input_width: usize,
    pub steps: Vec<Box<dyn Step>>,
    pub keyed: Option<TailKeyed>,
}

impl TailSegment {
    /// The fields of the records it puts out.
    pub fn output_schema(&self) -> Schema {
        match &self.keyed {
            Some(k) if !k.passes => k.op.output_schema(),
            _ => Schema {
                names: self.names.clone(),
            },
        }
    }
}

/// One stream of the tail: a chain of segments reading the first stage's
/// results (the stream the source feeds, node 0) or other streams' records
/// (a job graph's further streams).
pub(crate) struct TailNode {
    /// The stream's name (late records of a job graph carry it).
    pub name: String,
    /// The nodes it reads (earlier ones), each with the slot of this
    /// node's input where each of that node's fields goes. Empty for node
    /// 0, which reads the first stage.
    pub inputs: Vec<(usize, Vec<usize>)>,
    /// A stream that reads the sources besides the first: for each of its
    /// input's fields, where it is in the events' side rows
    /// ([`Stream::Side`]).
    pub side: Option<Vec<usize>>,
    /// Node 0 after a step that passes events on (`deduplicate`,
    /// `deadband`): for each of its input's fields, where it is in the
    /// events' carried fields.
    pub event_fields: Option<Vec<usize>>,
    /// The fields of its input (a union's: every input's fields).
    pub input_names: Vec<String>,
    pub segments: Vec<TailSegment>,
    /// Where its records are written: [`Stream::Main`] (the pipeline's
    /// sinks), [`Stream::Graph`] (a further stream's), or nowhere.
    pub route: Option<Stream>,
    /// Other nodes read its records.
    pub read: bool,
    /// The watermark it last saw.
    pub watermark: i64,
}

impl TailNode {
    /// Node 0 of a pipeline without further streams: `segments` after the
    /// first stage, whose results have the fields `input`.
    pub fn head(name: &str, input: Schema, segments: Vec<TailSegment>) -> Self {
        TailNode {
            name: name.to_string(),
            inputs: Vec::new(),
            side: None,
            event_fields: None,
            input_names: input.names,
            segments,
            route: Some(Stream::Main),
            read: false,
            watermark: i64::MIN,
        }
    }

    /// The fields of the records it puts out.
    pub fn output_schema(&self) -> Schema {
        match self.segments.last() {
            Some(s) => s.output_schema(),
            None => Schema {
                names: self.input_names.clone(),
            },
        }
    }
}

/// Every stream of a pipeline's tail, in an order where a node comes after
/// the nodes it reads.
#[derive(Default)]
pub(crate) struct Tail {
    pub nodes: Vec<TailNode>,
    /// A job graph: late records carry their stream's name.
    tag_late: bool,
    /// What each node counts, by node ([`Tail::count`]); empty until then.
    counters: Vec<NodeCounters>,
}

/// A row going into a segment: its event time and values.
struct Row {
    ts: i64,
    values: Box<[Value]>,
}

impl Tail {
    pub fn new(nodes: Vec<TailNode>, tag_late: bool) -> Self {
        Tail {
            nodes,
            tag_late,
            counters: Vec::new(),
        }
    }

    /// Nothing to run: the first stage's results are the output.
    pub fn is_empty(&self) -> bool {
        match self.nodes.as_slice() {
            [] => true,
            [only] => only.segments.is_empty(),
            _ => false,
        }
    }

    /// The fields of the records written to the pipeline's own sinks.
    pub fn output_schema(&self) -> Option<Schema> {
        self.nodes.first().map(TailNode::output_schema)
    }

    /// The name and the fields of each further stream with sinks, by its
    /// [`Stream::Graph`] index.
    pub fn graph_streams(&self) -> Vec<(String, Schema)> {
        let mut out = Vec::new();
        for n in &self.nodes {
            if let Some(Stream::Graph(i)) = n.route {
                let i = i as usize;
                if out.len() <= i {
                    out.resize(i + 1, (String::new(), Schema::default()));
                }
                out[i] = (n.name.clone(), n.output_schema());
            }
        }
        out
    }

    /// Registers what each node counts: `rivulet_operator_records_total`
    /// per step, `key_by` and keyed operator (labelled with the stream's
    /// name, `main` for the first stream), `rivulet_state_keys` per keyed operator and the stream's
    /// watermark. The ids are the live page's (`observe/graph.rs`): node 0
    /// goes on numbering after the `first_steps` steps and the first keyed
    /// stage of its stream; a further stream's ids start again, after its
    /// name (`per_site/window`).
    pub fn count(&mut self, ctx: &crate::context::RunContext, first_steps: usize) {
        self.counters = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                // The first stream is `main`, as its first stage's figures.
                let stream = if i == 0 { "main" } else { node.name.as_str() };
                let prefix = if i == 0 {
                    String::new()
                } else {
                    format!("{}/", node.name)
                };
                let (mut n, mut stage) = if i == 0 { (first_steps, 2) } else { (0, 1) };
                let staged = |base: &str, stage: usize| match stage {
                    1 => format!("{prefix}{base}"),
                    _ => format!("{prefix}{base}_{stage}"),
                };
                let pair = |id: &str| ctx.for_operator(id).records_in_out(&[("stream", stream)]);
                let segments = node
                    .segments
                    .iter()
                    .map(|seg| {
                        let steps = seg
                            .steps
                            .iter()
                            .map(|s| {
                                n += 1;
                                pair(&format!("{prefix}{}_{n}", s.kind()))
                            })
                            .collect();
                        let Some(k) = &seg.keyed else {
                            return SegmentCounters {
                                steps,
                                ..Default::default()
                            };
                        };
                        let op = staged(k.op.state().name, stage);
                        let counters = SegmentCounters {
                            steps,
                            key_by: Some(pair(&staged("key_by", stage))),
                            keyed: Some(pair(&op)),
                            keys: Some(ctx.for_operator(&op).gauge(
                                names::STATE_KEYS,
                                "keys with state in a keyed operator",
                                &[("stream", stream)],
                            )),
                        };
                        stage += 1;
                        counters
                    })
                    .collect();
                NodeCounters {
                    watermark: ctx.gauge_ms(
                        names::WATERMARK,
                        "a stream's watermark (further streams and later stages)",
                        &[("stream", stream)],
                    ),
                    segments,
                }
            })
            .collect();
    }

    /// Boards for the live state of the further streams (`/api/state`):
    /// each stream after the first whose steps keep keyed state gets one,
    /// registered on `run` under its name, for its first keyed segment.
    pub fn queryable(
        &self,
        run: &Arc<crate::observe::query::Board>,
    ) -> Vec<(usize, usize, Arc<crate::observe::query::Board>)> {
        let mut out = Vec::new();
        for (n, node) in self.nodes.iter().enumerate().skip(1) {
            let Some((s, k)) = node
                .segments
                .iter()
                .enumerate()
                .find_map(|(s, seg)| seg.keyed.as_ref().map(|k| (s, k)))
            else {
                continue;
            };
            let shape = crate::observe::query::Queryable {
                workers: 1,
                key_names: k.key_names.clone(),
                schema: k.op.output_schema(),
            };
            out.push((n, s, run.add_stream(&node.name, shape)));
        }
        out
    }

    /// Answers what waits on `board` from segment `seg` of node `node`.
    pub fn answer(&self, node: usize, seg: usize, board: &crate::observe::query::Board) {
        if let Some(k) = self
            .nodes
            .get(node)
            .and_then(|n| n.segments.get(seg))
            .and_then(|s| s.keyed.as_ref())
        {
            board.answer(0, k.op.watermark(), |key| k.op.query(key));
        }
    }

    /// The name late records of the first stage carry, in a job graph.
    pub fn first_stream(&self) -> Option<&str> {
        self.nodes
            .first()
            .filter(|_| self.tag_late)
            .map(|n| n.name.as_str())
    }

    /// The state each keyed segment keeps (operators 1, 2, …).
    pub fn state(&self) -> Vec<StateDecl> {
        self.keyed_ops().map(|op| op.state()).collect()
    }

    fn segments_mut(&mut self) -> impl Iterator<Item = &mut TailSegment> {
        self.nodes.iter_mut().flat_map(|n| n.segments.iter_mut())
    }

    fn keyed_ops(&self) -> impl Iterator<Item = &Box<dyn KeyedOperator>> {
        self.nodes
            .iter()
            .flat_map(|n| n.segments.iter())
            .filter_map(|s| s.keyed.as_ref().map(|k| &k.op))
    }

    pub fn track_changes(&mut self) {
        for s in self.segments_mut() {
            if let Some(k) = &mut s.keyed {
                k.op.track_changes();
            }
        }
    }

    /// Restores keyed segment `i` (0-based among the keyed ones).
    pub fn restore(
        &mut self,
        i: usize,
        watermark: i64,
        keys: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), String> {
        for n in &mut self.nodes {
            n.watermark = n.watermark.max(watermark);
        }
        match self.segments_mut().filter_map(|s| s.keyed.as_mut()).nth(i) {
            Some(k) => k.op.restore(watermark, keys),
            None => Ok(()),
        }
    }

    /// The changed keys of every keyed segment: (operator id from 1, change).
    pub fn snapshot(&mut self, out: &mut Vec<(u16, KeyChange)>) {
        let mut id = 1u16;
        for s in self.segments_mut() {
            if let Some(k) = &mut s.keyed {
                let mut changes = Vec::new();
                k.op.snapshot(&mut changes);
                out.extend(changes.into_iter().map(|c| (id, c)));
                id += 1;
            }
        }
    }

    /// Takes the first stage's main outputs and watermark marks of one
    /// batch (in output order) and its watermark after the batch; appends
    /// what the tail puts out, in order. Rows go through the segments up
    /// to each mark, then every segment advances to the mark's watermark:
    /// each row meets the watermark it would have met right after the
    /// first stage, whatever the batches.
    pub fn run(
        &mut self,
        first: Vec<Output>,
        first_op: &dyn Fn(&Output) -> i64,
        watermark: i64,
        source_name: &str,
        out: &mut Vec<Output>,
    ) {
        let mut rows: Vec<Row> = Vec::new();
        let mut side: Vec<Row> = Vec::new();
        for o in first {
            let ts = first_op(&o);
            match (o.stream, o.body) {
                (Stream::Mark, _) => {
                    let (rows, side) = (std::mem::take(&mut rows), std::mem::take(&mut side));
                    self.chunk(rows, side, o.start, source_name, out);
                }
                (Stream::Side, Body::Row(values)) => side.push(Row { ts: o.end, values }),
                (Stream::Main, Body::Event(e)) => {
                    // An event passed on by the first stage: the fields the
                    // steps after it read.
                    let Some(map) = self.nodes.first().and_then(|n| n.event_fields.as_ref()) else {
                        continue;
                    };
                    let values = map
                        .iter()
                        .map(|&i| e.fields.get(i).cloned().unwrap_or(Value::Null))
                        .collect();
                    rows.push(Row { ts: o.end, values });
                }
                (_, Body::Row(values)) => rows.push(Row { ts, values }),
                _ => {}
            }
        }
        self.chunk(rows, side, watermark, source_name, out);
    }

    /// Rows through every node, then the watermark `watermark`. A node's
    /// input is its inputs' records of this chunk, one input after
    /// another; its watermark the least of theirs.
    fn chunk(
        &mut self,
        rows: Vec<Row>,
        side: Vec<Row>,
        watermark: i64,
        source_name: &str,
        out: &mut Vec<Output>,
    ) {
        let mut first = Some(rows);
        // Each node's records (when read) and watermark after the chunk.
        let mut done: Vec<(Vec<Row>, i64)> = Vec::with_capacity(self.nodes.len());
        for (ni, node) in self.nodes.iter_mut().enumerate() {
            let counters = self.counters.get(ni);
            let (mut rows, wm) = if let Some(map) = &node.side {
                let rows = side
                    .iter()
                    .map(|r| Row {
                        ts: r.ts,
                        values: map
                            .iter()
                            .map(|&i| r.values.get(i).cloned().unwrap_or(Value::Null))
                            .collect(),
                    })
                    .collect();
                (rows, watermark)
            } else if node.inputs.is_empty() {
                (first.take().unwrap_or_default(), watermark)
            } else {
                let width = node.input_names.len();
                let mut rows = Vec::new();
                let mut wm = i64::MAX;
                for (from, slots) in &node.inputs {
                    let (theirs, w) = &done[*from];
                    wm = wm.min(*w);
                    rows.extend(theirs.iter().map(|r| {
                        let mut values = vec![Value::Null; width];
                        for (v, &s) in r.values.iter().zip(slots) {
                            values[s] = v.clone();
                        }
                        Row {
                            ts: r.ts,
                            values: values.into(),
                        }
                    }));
                }
                (rows, wm)
            };
            let mut wm = wm.max(node.watermark);
            if rows.is_empty() && wm == node.watermark {
                done.push((Vec::new(), wm));
                continue;
            }
            node.watermark = wm;
            if let Some(c) = counters {
                c.watermark.set(wm.max(i64::MIN / 2));
            }
            let mark = out.len();
            for (si, seg) in node.segments.iter_mut().enumerate() {
                let c = counters.and_then(|c| c.segments.get(si));
                (rows, wm) = seg.run(rows, wm, source_name, c, out);
            }
            if self.tag_late {
                for o in &mut out[mark..] {
                    if o.stream == Stream::Late {
                        tag_late(o, &node.name);
                    }
                }
            }
            let record = |i: usize, ts: i64, values: Box<[Value]>, stream: Stream| Output {
                idx: i as u32,
                phase: Phase::During,
                end: ts,
                start: 0,
                key: Box::new([]),
                stream,
                body: Body::Row(values),
            };
            match (node.route, node.read) {
                (Some(route), true) => out.extend(
                    rows.iter()
                        .enumerate()
                        .map(|(i, r)| record(i, r.ts, r.values.clone(), route)),
                ),
                (Some(route), false) => out.extend(
                    std::mem::take(&mut rows)
                        .into_iter()
                        .enumerate()
                        .map(|(i, r)| record(i, r.ts, r.values, route)),
                ),
                (None, _) => {}
            }
            done.push((if node.read { rows } else { Vec::new() }, wm));
        }
    }
}

/// Puts the stream's name into a late record: `{"stream": name, ...}` for
/// a JSON object, else `{"stream": name, "payload": "<as it came>"}`.
pub(crate) fn tag_late(o: &mut Output, stream: &str) {
    let Body::Line(line) = &o.body else {
        return;
    };
    let name = serde_json::to_string(stream).unwrap_or_else(|_| "\"\"".into());
    let mut tagged = Vec::with_capacity(line.len() + name.len() + 16);
    tagged.extend_from_slice(b"{\"stream\":");
    tagged.extend_from_slice(name.as_bytes());
    let text = line.trim_ascii();
    match text.strip_prefix(b"{") {
        Some(rest) if serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok() => {
            if !rest.trim_ascii_start().starts_with(b"}") {
                tagged.push(b',');
            }
            tagged.extend_from_slice(rest);
        }
        _ => {
            let payload = serde_json::to_string(&String::from_utf8_lossy(line))
                .unwrap_or_else(|_| "\"\"".into());
            tagged.extend_from_slice(b",\"payload\":");
            tagged.extend_from_slice(payload.as_bytes());
            tagged.push(b'}');
        }
    }
    o.body = Body::Line(tagged);
}

impl TailSegment {
    /// Runs one batch of rows; returns its records (the rows for the next
    /// segment) and the watermark after it. Late records and dead letters
    /// go to `out`.
    fn run(
        &mut self,
        rows: Vec<Row>,
        watermark: i64,
        source_name: &str,
        counters: Option<&SegmentCounters>,
        out: &mut Vec<Output>,
    ) -> (Vec<Row>, i64) {
        let width = self.names.len();
        let n = rows.len();
        let mut slots = vec![Value::Null; n * width];
        let mut ts = Vec::with_capacity(n);
        for (i, r) in rows.into_iter().enumerate() {
            for (j, v) in r
                .values
                .into_vec()
                .into_iter()
                .take(self.input_width)
                .enumerate()
            {
                slots[i * width + j] = v;
            }
            ts.push(r.ts);
        }
        let mut status = vec![Status::Live; n];
        let mut records = Records {
            slots: &mut slots,
            width,
            status: &mut status,
            removed: 0,
        };
        let mut live = n;
        for (i, s) in self.steps.iter_mut().enumerate() {
            records.removed = 0;
            s.process(&mut records);
            let pair = counters.and_then(|c| c.steps.get(i));
            live = count(pair, live, live.saturating_sub(records.removed));
        }
        // The JSON of each record, for late and dead-letter outputs.
        let input_schema = Schema {
            names: self.names.clone(),
        };
        let json = |row: &[Value]| {
            let mut b = Vec::new();
            input_schema.write_json(row, &mut b);
            b
        };
        let mut produced = Vec::new();
        let mut next = Vec::new();
        let Some(k) = &mut self.keyed else {
            for (i, &t) in ts.iter().enumerate() {
                if records.status[i] == Status::Live {
                    next.push(Row {
                        ts: t,
                        values: records.get(i).into(),
                    });
                }
            }
            dead_letters(&records, source_name, &json, &mut produced);
            out.extend(produced);
            return (next, watermark);
        };
        let mut kb = KeyedBatch {
            watermarks: Arc::new(Vec::new()),
            ..Default::default()
        };
        'rec: for (i, &t) in ts.iter().enumerate() {
            if records.status[i] != Status::Live {
                continue;
            }
            let row = records.get(i).to_vec();
            if let Some(f) = k.key_slots.iter().position(|&s| row[s].is_null()) {
                records.reject_as(
                    i,
                    reason::MISSING_KEY,
                    format!("key field `{}` is missing or null", k.key_names[f]),
                );
                continue;
            }
            let vals_start = kb.vals.len();
            for (e, numeric, label) in &k.inputs {
                let v = match e {
                    None => Value::Bool(true),
                    Some(e) => match e.eval(&row) {
                        Ok(v) => v,
                        Err(err) => {
                            kb.vals.truncate(vals_start);
                            records.reject(i, format!("{label}: {err}"));
                            continue 'rec;
                        }
                    },
                };
                if *numeric && !v.is_null() && v.as_f64().is_none() {
                    kb.vals.truncate(vals_start);
                    records.reject(
                        i,
                        format!("{label}: needs numbers, got a {} ({v})", v.type_name()),
                    );
                    continue 'rec;
                }
                kb.vals.push(v);
            }
            let kstart = kb.keys.len() as u32;
            for &s in &k.key_slots {
                encode_key(&row[s], &mut kb.keys);
            }
            let key = &kb.keys[kstart as usize..];
            let line = json(&row);
            kb.recs.push(KeyedRec {
                idx: i as u32,
                ts: t,
                hash: hash_key(key),
                position: xxhash_rust::xxh3::xxh3_64(&line),
                key: (kstart, kb.keys.len() as u32),
                vals: vals_start as u32,
            });
            if k.passes {
                // The row rides along as the "event", to come out as it is.
                kb.events.push(crate::msg::Event {
                    record: line.clone(),
                    fields: row.clone().into_boxed_slice(),
                    retain: false,
                });
            }
            kb.carry(&line, None);
        }
        dead_letters(&records, source_name, &json, &mut produced);
        let keyed_in = kb.recs.len();
        count(counters.and_then(|c| c.key_by.as_ref()), live, keyed_in);
        let mut keyed_out = Vec::new();
        k.op.process(&kb, 0..kb.recs.len(), &mut keyed_out);
        if watermark > k.op.watermark() {
            let order = if watermark == i64::MAX {
                Order::FLUSH
            } else {
                Order::END
            };
            k.op.advance(watermark, order, &mut keyed_out);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        k.op.tick(now, &mut keyed_out);
        keyed_out.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        for mut o in keyed_out {
            if let Body::Event(e) = o.body {
                o.body = Body::Row(e.fields);
            }
            if o.stream == Stream::Main {
                let ts = k.op.result_time(&o);
                if let Body::Row(values) = o.body {
                    next.push(Row { ts, values });
                }
            } else {
                produced.push(o);
            }
        }
        out.extend(produced);
        if let Some(c) = counters {
            count(c.keyed.as_ref(), keyed_in, next.len());
            if let Some(g) = &c.keys {
                g.set(k.op.keys() as i64);
            }
        }
        (next, k.op.watermark())
    }
}

/// The segment's dead letters (failed steps, missing keys, bad inputs).
fn dead_letters(
    records: &Records<'_>,
    source_name: &str,
    json: &dyn Fn(&[Value]) -> Vec<u8>,
    out: &mut Vec<Output>,
) {
    for i in 0..records.len() {
        if let Status::Dead(_, reason) = &records.status[i] {
            let payload = json(records.get(i));
            let from = crate::msg::DeadSource {
                source: source_name,
                position: 0,
                topic: None,
                payload: &payload,
                oversize: None,
            };
            out.push(Output::plain(
                i as u32,
                Stream::Dead,
                crate::msg::dead_letter_line(reason, &from),
            ));
        }
    }
}
