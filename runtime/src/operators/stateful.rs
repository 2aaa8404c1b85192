//! Stateful steps after `key_by`: `deduplicate`, `deadband` (report by
//! exception) and `alert`, as one [`KeyedOperator`].
//!
//! **Order.** With event time, each key's events reach the step in
//! event-time order: an event waits until the watermark passes it (as
//! Flink's CEP operator does), then events are taken in order of
//! timestamp, ties by source position. Out-of-order arrival within
//! `max_out_of_orderness` therefore does not change the output; the price
//! is that an event goes out (or an alert is raised) only once the
//! watermark passes it, which is up to the bound later. An event already
//! behind the watermark when it arrives is late: it goes to the late
//! output, as for windows. With processing time the step sees events as
//! they arrive, at once.
//!
//! **Timers** fire as the watermark passes them, even when no event comes:
//! an alert's `for`, and the end of a `deduplicate` horizon (which frees
//! the key's state). At the same time a timer fires before an event.
//!
//! Saved state (`deduplicate` / `deadband` / `alert`, record version 1):
//! per key, a postcard [`KeyState`], waiting events included.

use crate::expr::Ast;
use crate::msg::{Body, Event, KeyedBatch, Order, Output, Phase, Schema, Stream};
use crate::operators::keyed::{KeyChange, KeyedOperator, StateDecl};
use crate::value::Value;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Range;

/// Version of the per-key record these steps save.
pub const STATE_VERSION: u32 = 1;

/// A stateful step as written.
#[derive(Clone, Debug, PartialEq)]
pub enum StatefulDef {
    /// Drops an event whose `fields` equal those of an event of the same
    /// key that passed less than `within` ms before it.
    Deduplicate { fields: Vec<String>, within: i64 },
    /// Passes an event when it is the key's first, when `field` moved by at
    /// least `delta` from the last value passed, or when `max_silence` ms
    /// passed since the last event passed.
    Deadband {
        field: String,
        delta: f64,
        max_silence: Option<i64>,
    },
    /// Emits `raised` once `when` held for `for_ms`, then `cleared` when
    /// `clear` (default `!(when)`) holds.
    Alert {
        name: String,
        when: Ast,
        for_ms: i64,
        clear: Option<Ast>,
    },
    /// A keyed process function of your own ([`KeyedProcess`]).
    Process(ProcessFn),
}

/// A keyed process function written in Rust: what the YAML steps do, with
/// any logic. It sees each event of a key (in event-time order, as the
/// built-in steps do), keeps a value and a map per key, sets event-time
/// and processing-time timers, and emits records of its own fields. Its
/// state and timers are checkpointed and restored with the pipeline's.
///
/// The same instance serves every key and every worker (`&self`): what
/// must be remembered goes in the key's state ([`KeyContext`]), never in
/// the function. `runtime/examples/rate_of_change.rs` shows one.
pub trait KeyedProcess: Send + Sync + 'static {
    /// Its name, in metrics, the live page and the state's fingerprint
    /// (state saved under another name is refused).
    fn name(&self) -> &str;
    /// Fields it reads from each event: `values` of [`KeyedProcess::process`].
    fn fields(&self) -> Vec<String>;
    /// Fields of the records it emits, after the key fields.
    fn output(&self) -> Vec<String>;
    /// One event of the key.
    fn process(&self, ctx: &mut KeyContext<'_>, values: &[Value]);
    /// A timer set with [`KeyContext::timer`] or
    /// [`KeyContext::processing_timer`] fires.
    fn on_timer(&self, _ctx: &mut KeyContext<'_>, _timer: Timer) {}
}

/// A timer that fired: its time (event time, or wall-clock ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// Fires when the watermark passes it.
    EventTime(i64),
    /// Fires when the wall clock passes it (checked at least every 250 ms).
    ProcessingTime(i64),
}

/// What a [`KeyedProcess`] sees of one key while it handles an event or a
/// timer.
pub struct KeyContext<'a> {
    key: &'a [Value],
    time: i64,
    now_ms: i64,
    st: &'a mut KeyState,
    timers: Vec<i64>,
    processing_timers: Vec<i64>,
    emitted: Vec<Vec<Value>>,
}

impl KeyContext<'_> {
    /// The key's fields, in `key_by` order.
    pub fn key(&self) -> &[Value] {
        self.key
    }
    /// The event's time, or the timer's.
    pub fn time(&self) -> i64 {
        self.time
    }
    /// The wall clock (ms since 1970).
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }
    /// The key's value state.
    pub fn value(&self) -> Option<&Value> {
        self.st.value.as_ref()
    }
    pub fn set_value(&mut self, v: Value) {
        self.st.value = Some(v);
    }
    pub fn clear_value(&mut self) {
        self.st.value = None;
    }
    /// The key's map state.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.st.map.get(name)
    }
    pub fn insert(&mut self, name: &str, v: Value) {
        self.st.map.insert(name.to_string(), v);
    }
    pub fn remove(&mut self, name: &str) -> Option<Value> {
        self.st.map.remove(name)
    }
    /// Every entry of the map state, by name.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.st.map.iter().map(|(k, v)| (k.as_str(), v))
    }
    /// Drops the key's value and map state (its timers stay).
    pub fn clear(&mut self) {
        self.st.value = None;
        self.st.map.clear();
    }
    /// An event-time timer: fires when the watermark passes `at`.
    pub fn timer(&mut self, at: i64) {
        self.timers.push(at);
    }
    /// A processing-time timer: fires once the wall clock passes `at_ms`.
    pub fn processing_timer(&mut self, at_ms: i64) {
        self.processing_timers.push(at_ms);
    }
    /// Emits a record: the key fields, then `values` in the order of
    /// [`KeyedProcess::output`]; its event time is [`KeyContext::time`].
    pub fn emit(&mut self, values: Vec<Value>) {
        self.emitted.push(values);
    }
}

/// A shared [`KeyedProcess`] in a [`StatefulDef`].
#[derive(Clone)]
pub struct ProcessFn(pub std::sync::Arc<dyn KeyedProcess>);

impl std::fmt::Debug for ProcessFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Process({})", self.0.name())
    }
}

impl PartialEq for ProcessFn {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name()
    }
}

impl StatefulDef {
    /// The step's name in a pipeline file.
    pub fn kind(&self) -> &'static str {
        match self {
            StatefulDef::Deduplicate { .. } => "deduplicate",
            StatefulDef::Deadband { .. } => "deadband",
            StatefulDef::Alert { .. } => "alert",
            StatefulDef::Process(_) => "process",
        }
    }

    /// Whether the events themselves go out (`deduplicate`, `deadband`),
    /// not new records (`alert`).
    pub fn passes_events(&self) -> bool {
        matches!(
            self,
            StatefulDef::Deduplicate { .. } | StatefulDef::Deadband { .. }
        )
    }

    /// What each record carries to the step: `(expression, needs a number,
    /// label for errors)`.
    pub fn inputs(&self) -> Vec<(Ast, bool, String)> {
        match self {
            StatefulDef::Deduplicate { fields, .. } => fields
                .iter()
                .map(|f| (Ast::Field(f.clone()), false, format!("deduplicate `{f}`")))
                .collect(),
            StatefulDef::Deadband { field, .. } => {
                vec![(
                    Ast::Field(field.clone()),
                    true,
                    format!("deadband `{field}`"),
                )]
            }
            StatefulDef::Alert { when, clear, .. } => {
                let clear = clear
                    .clone()
                    .unwrap_or_else(|| Ast::Unary(crate::expr::UnOp::Not, Box::new(when.clone())));
                vec![
                    (when.clone(), false, "alert `when`".into()),
                    (clear, false, "alert `clear`".into()),
                ]
            }
            StatefulDef::Process(p) => {
                p.0.fields()
                    .into_iter()
                    .map(|f| {
                        (
                            Ast::Field(f.clone()),
                            false,
                            format!("{} `{f}`", p.0.name()),
                        )
                    })
                    .collect()
            }
        }
    }

    /// The fields of `alert` records.
    pub fn output_schema(&self, key_names: &[String]) -> Schema {
        let mut names = key_names.to_vec();
        match self {
            StatefulDef::Alert { .. } => names.extend(["alert", "state", "at"].map(String::from)),
            StatefulDef::Process(p) => names.extend(p.0.output()),
            _ => {}
        }
        Schema { names }
    }

    /// Problems with the step's settings.
    pub fn check(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self {
            StatefulDef::Deduplicate { fields, within } => {
                if fields.is_empty() {
                    out.push("`deduplicate` needs at least one field in `fields`".into());
                }
                if *within <= 0 {
                    out.push("`within` must be longer than 0".into());
                }
            }
            StatefulDef::Deadband {
                delta, max_silence, ..
            } => {
                if !(delta.is_finite() && *delta >= 0.0) {
                    out.push(format!(
                        "`delta` must be a number of at least 0, got {delta}"
                    ));
                }
                if max_silence.is_some_and(|m| m <= 0) {
                    out.push("`max_silence` must be longer than 0".into());
                }
            }
            StatefulDef::Alert { name, for_ms, .. } => {
                if name.is_empty() {
                    out.push("`name` must not be empty".into());
                }
                if *for_ms < 0 {
                    out.push("`for` must not be negative".into());
                }
            }
            StatefulDef::Process(p) => {
                if p.0.name().is_empty() {
                    out.push("a process function needs a name".into());
                }
            }
        }
        out
    }
}

/// An event waiting for the watermark.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Waiting {
    ts: i64,
    position: u64,
    seq: u64,
    vals: Vec<Value>,
    /// The event as it goes out (`deduplicate`, `deadband`).
    event: Option<Event>,
}

/// One key's state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyState {
    /// Events not yet passed by the watermark, in arrival order (mostly
    /// their release order, so a release takes one from near the front).
    waiting: std::collections::VecDeque<Waiting>,
    /// `deduplicate`: hashes of the fields of events passed, with their
    /// time, oldest first (events go through in time order).
    seen: std::collections::VecDeque<(u64, i64)>,
    /// `deduplicate`: hash → time of the last event passed with it (built
    /// again from `seen` after a restore).
    #[serde(skip)]
    seen_index: HashMap<u64, i64>,
    /// `deadband`: the last value passed and its time.
    last: Option<(f64, i64)>,
    /// `alert`: since when `when` holds (not raised yet).
    since: Option<i64>,
    /// `alert`: raised and not cleared.
    raised: bool,
    /// Timers of this key (event time, ms).
    timers: Vec<i64>,
    /// A process function's value and map state.
    value: Option<Value>,
    map: std::collections::BTreeMap<String, Value>,
    /// A process function's processing-time timers (wall-clock ms).
    processing_timers: Vec<i64>,
}

impl KeyState {
    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
            && self.seen.is_empty()
            && self.last.is_none()
            && self.since.is_none()
            && !self.raised
            && self.timers.is_empty()
            && self.value.is_none()
            && self.map.is_empty()
            && self.processing_timers.is_empty()
    }
}

/// What comes next for the watermark: a timer, or a waiting event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// Timers sort before events of the same time.
    Timer { at: i64, key: Box<[u8]> },
    Event {
        ts: i64,
        position: u64,
        seq: u64,
        key: Box<[u8]>,
    },
}

/// A stateful step on one worker (see the module docs).
pub struct StatefulStep {
    def: StatefulDef,
    key_names: Vec<String>,
    /// Event time: events wait for the watermark.
    ordered: bool,
    width: usize,
    state: StateDecl,
    keys: HashMap<Box<[u8]>, KeyState>,
    /// Every waiting event and timer, in the order they come due.
    due: BTreeSet<(i64, u8, Due)>,
    /// Processing-time timers: (wall-clock ms, key).
    processing: BTreeSet<(i64, Box<[u8]>)>,
    watermark: i64,
    seq: u64,
    tracking: bool,
    changed: HashSet<Box<[u8]>>,
    /// At most this many keys with state (this worker's share of
    /// `max_keys`): events of new keys beyond it are dead letters.
    key_limit: Option<usize>,
    max_keys: Option<usize>,
    source_name: String,
    state_full: crate::metrics::Counter,
}

/// What a [`StatefulStep`] needs besides its definition.
#[derive(Clone, Debug, Default)]
pub struct StatefulOptions {
    pub key_names: Vec<String>,
    /// This worker's share of `max_keys`, and `max_keys` itself.
    pub key_limit: Option<usize>,
    pub max_keys: Option<usize>,
    /// Named in dead letters.
    pub source_name: String,
    /// Event time (events wait for the watermark) or processing time.
    pub ordered: bool,
    pub fingerprint: String,
    pub layout: String,
}

/// A saved key record of a stateful step as JSON, for `rivulet state
/// inspect`; `None` when it does not read as one.
pub fn describe(record: &[u8]) -> Option<serde_json::Value> {
    let st: KeyState = postcard::from_bytes(record).ok()?;
    let mut out = serde_json::Map::new();
    if !st.waiting.is_empty() {
        let times: Vec<i64> = st.waiting.iter().map(|w| w.ts).collect();
        out.insert("waiting_events".into(), serde_json::json!(times));
    }
    if !st.seen.is_empty() {
        let times: Vec<i64> = st.seen.iter().map(|s| s.1).collect();
        out.insert("seen_at".into(), serde_json::json!(times));
    }
    if let Some((v, t)) = st.last {
        out.insert(
            "last_passed".into(),
            serde_json::json!({ "value": v, "at": t }),
        );
    }
    if let Some(t) = st.since {
        out.insert("holding_since".into(), serde_json::json!(t));
    }
    if st.raised {
        out.insert("raised".into(), serde_json::json!(true));
    }
    if !st.timers.is_empty() {
        out.insert("timers".into(), serde_json::json!(st.timers));
    }
    if let Some(v) = &st.value {
        out.insert("value".into(), v.to_json());
    }
    if !st.map.is_empty() {
        let map: serde_json::Map<String, serde_json::Value> = st
            .map
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect();
        out.insert("map".into(), map.into());
    }
    if !st.processing_timers.is_empty() {
        out.insert(
            "processing_timers".into(),
            serde_json::json!(st.processing_timers),
        );
    }
    Some(out.into())
}

/// The wall clock, ms since 1970.
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A hash of the values of a `deduplicate` record.
fn fields_hash(vals: &[Value]) -> u64 {
    let mut buf = Vec::with_capacity(32);
    for v in vals {
        crate::value::encode_key(v, &mut buf);
    }
    xxhash_rust::xxh3::xxh3_64(&buf)
}

impl StatefulStep {
    pub fn new(def: StatefulDef, o: StatefulOptions) -> Self {
        let width = def.inputs().len();
        StatefulStep {
            state: StateDecl {
                name: def.kind(),
                version: STATE_VERSION,
                fingerprint: o.fingerprint,
                layout: o.layout,
            },
            def,
            key_names: o.key_names,
            ordered: o.ordered,
            width,
            keys: HashMap::new(),
            due: BTreeSet::new(),
            processing: BTreeSet::new(),
            watermark: i64::MIN,
            seq: 0,
            tracking: false,
            changed: HashSet::new(),
            key_limit: o.key_limit,
            max_keys: o.max_keys,
            source_name: o.source_name,
            state_full: Default::default(),
        }
    }

    fn touch(&mut self, key: &[u8]) {
        if self.tracking && !self.changed.contains(key) {
            self.changed.insert(key.into());
        }
    }

    fn schedule(&mut self, key: &[u8], at: i64) {
        let st = self.keys.entry(key.into()).or_default();
        if !st.timers.contains(&at) {
            st.timers.push(at);
            self.due.insert((
                at,
                0,
                Due::Timer {
                    at,
                    key: key.into(),
                },
            ));
        }
    }

    /// Runs one event through the step's logic (its turn has come).
    fn apply(&mut self, key: &[u8], w: Waiting, order: (u32, Phase), out: &mut Vec<Output>) {
        let (idx, phase) = order;
        let st = self.keys.entry(key.into()).or_default();
        // What the event does: pass, emit an alert record, set a timer,
        // or go to a process function.
        let mut emit = None;
        let mut timer = None;
        let mut call = false;
        let pass = match &self.def {
            StatefulDef::Deduplicate { within, .. } => {
                let h = fields_hash(&w.vals);
                if st.seen_index.is_empty() && !st.seen.is_empty() {
                    st.seen_index = st.seen.iter().copied().collect();
                }
                let dup = st
                    .seen_index
                    .get(&h)
                    .is_some_and(|&t| w.ts >= t && w.ts - t < *within);
                if !dup {
                    st.seen.push_back((h, w.ts));
                    st.seen_index.insert(h, w.ts);
                    // One timer per key: the oldest entry's end.
                    if st.timers.is_empty() {
                        timer = Some(w.ts.saturating_add(*within));
                    }
                }
                !dup
            }
            StatefulDef::Deadband {
                delta, max_silence, ..
            } => {
                let v = w.vals.first().and_then(Value::as_f64).unwrap_or(f64::NAN);
                let pass = match st.last {
                    None => true,
                    Some((last, t)) => {
                        (v - last).abs() >= *delta
                            || max_silence.is_some_and(|m| w.ts.saturating_sub(t) >= m)
                    }
                };
                if pass {
                    st.last = Some((v, w.ts));
                }
                pass
            }
            StatefulDef::Alert { for_ms, .. } => {
                let truthy = |i: usize| matches!(w.vals.get(i), Some(Value::Bool(true)));
                let (when, clear) = (truthy(0), truthy(1));
                if st.raised {
                    if clear {
                        st.raised = false;
                        st.since = None;
                        emit = Some(("cleared", w.ts));
                    }
                } else if when {
                    if st.since.is_none() {
                        if *for_ms == 0 {
                            st.raised = true;
                            emit = Some(("raised", w.ts));
                        } else {
                            st.since = Some(w.ts);
                            timer = Some(w.ts.saturating_add(*for_ms));
                        }
                    }
                } else {
                    st.since = None;
                }
                false
            }
            StatefulDef::Process(_) => {
                call = true;
                false
            }
        };
        if call {
            self.run_process(key, w.ts, order, out, &|p, ctx| p.process(ctx, &w.vals));
            return;
        }
        if let Some(at) = timer {
            self.schedule(key, at);
        }
        if let Some((state, at)) = emit {
            out.push(self.alert_output(key, state, at, idx, phase));
        }
        if pass {
            if let Some(event) = w.event {
                out.push(Output {
                    idx,
                    phase,
                    end: w.ts,
                    start: w.position as i64,
                    key: key.into(),
                    stream: Stream::Main,
                    body: Body::Event(Box::new(event)),
                });
            }
        }
        self.touch(key);
        self.forget_if_empty(key);
    }

    fn alert_output(&self, key: &[u8], state: &str, at: i64, idx: u32, phase: Phase) -> Output {
        let mut row: Vec<Value> = crate::value::decode_key(key).unwrap_or_default();
        row.resize(self.key_names.len(), Value::Null);
        let name = match &self.def {
            StatefulDef::Alert { name, .. } => name.as_str(),
            _ => "",
        };
        row.push(Value::Str(name.into()));
        row.push(Value::Str(state.into()));
        row.push(Value::Int(at));
        Output {
            idx,
            phase,
            end: at,
            start: 0,
            key: key.into(),
            stream: Stream::Main,
            body: Body::Row(row.into_boxed_slice()),
        }
    }

    /// A timer of `key` at `at` fires.
    fn fire(&mut self, key: &[u8], at: i64, order: (u32, Phase), out: &mut Vec<Output>) {
        let Some(st) = self.keys.get_mut(key) else {
            return;
        };
        st.timers.retain(|&t| t != at);
        let mut raise = false;
        let mut next = None;
        if let StatefulDef::Process(_) = &self.def {
            self.run_process(key, at, order, out, &|p, ctx| {
                p.on_timer(ctx, Timer::EventTime(at))
            });
            return;
        }
        match &self.def {
            StatefulDef::Deduplicate { within, .. } => {
                if st.seen_index.is_empty() && !st.seen.is_empty() {
                    st.seen_index = st.seen.iter().copied().collect();
                }
                while let Some(&(h, t)) = st.seen.front() {
                    if t.saturating_add(*within) > at {
                        break;
                    }
                    st.seen.pop_front();
                    if st.seen_index.get(&h) == Some(&t) {
                        st.seen_index.remove(&h);
                    }
                }
                next = st.seen.front().map(|&(_, t)| t.saturating_add(*within));
            }
            StatefulDef::Alert { for_ms, .. } => {
                if !st.raised && st.since.is_some_and(|s| s.saturating_add(*for_ms) == at) {
                    st.raised = true;
                    st.since = None;
                    raise = true;
                }
            }
            StatefulDef::Deadband { .. } | StatefulDef::Process(_) => {}
        }
        if raise {
            out.push(self.alert_output(key, "raised", at, order.0, order.1));
        }
        if let Some(at) = next {
            self.schedule(key, at);
        }
        self.touch(key);
        self.forget_if_empty(key);
    }

    /// Calls the process function for `key` at `time`, then sets the
    /// timers it asked for and puts out what it emitted.
    fn run_process(
        &mut self,
        key: &[u8],
        time: i64,
        order: (u32, Phase),
        out: &mut Vec<Output>,
        call: &dyn Fn(&dyn KeyedProcess, &mut KeyContext<'_>),
    ) {
        let StatefulDef::Process(p) = &self.def else {
            return;
        };
        let p = p.0.clone();
        let width = p.output().len();
        let key_values = crate::value::decode_key(key).unwrap_or_default();
        let st = self.keys.entry(key.into()).or_default();
        let mut ctx = KeyContext {
            key: &key_values,
            time,
            now_ms: wall_ms(),
            st,
            timers: Vec::new(),
            processing_timers: Vec::new(),
            emitted: Vec::new(),
        };
        call(p.as_ref(), &mut ctx);
        let KeyContext {
            timers,
            processing_timers,
            emitted,
            ..
        } = ctx;
        for at in timers {
            self.schedule(key, at);
        }
        for at in processing_timers {
            let st = self.keys.entry(key.into()).or_default();
            if !st.processing_timers.contains(&at) {
                st.processing_timers.push(at);
                self.processing.insert((at, key.into()));
            }
        }
        for mut values in emitted {
            values.resize(width, Value::Null);
            let mut row = key_values.clone();
            row.resize(self.key_names.len(), Value::Null);
            row.extend(values);
            out.push(Output {
                idx: order.0,
                phase: order.1,
                end: time,
                start: 0,
                key: key.into(),
                stream: Stream::Main,
                body: Body::Row(row.into_boxed_slice()),
            });
        }
        self.touch(key);
        self.forget_if_empty(key);
    }

    fn forget_if_empty(&mut self, key: &[u8]) {
        if self.keys.get(key).is_some_and(KeyState::is_empty) {
            self.keys.remove(key);
        }
    }

    /// Takes every event and timer up to `watermark`, in order.
    fn release(&mut self, watermark: i64, order: Order, out: &mut Vec<Output>) {
        while let Some(first) = self.due.first() {
            if first.0 > watermark {
                break;
            }
            let Some((_, _, due)) = self.due.pop_first() else {
                break;
            };
            match due {
                Due::Timer { at, key } => self.fire(&key, at, (order.idx, order.phase), out),
                Due::Event { seq, key, .. } => {
                    let taken = self.keys.get_mut(&key).and_then(|st| {
                        let i = st.waiting.iter().position(|w| w.seq == seq)?;
                        st.waiting.remove(i)
                    });
                    if let Some(w) = taken {
                        self.apply(&key, w, (order.idx, order.phase), out);
                    }
                }
            }
        }
    }

    fn index_key(&mut self, key: &[u8]) {
        let Some(st) = self.keys.get(key) else { return };
        let mut items = Vec::new();
        for w in &st.waiting {
            items.push((
                w.ts,
                1,
                Due::Event {
                    ts: w.ts,
                    position: w.position,
                    seq: w.seq,
                    key: key.into(),
                },
            ));
            self.seq = self.seq.max(w.seq + 1);
        }
        for &at in &st.timers {
            items.push((
                at,
                0,
                Due::Timer {
                    at,
                    key: key.into(),
                },
            ));
        }
        let processing: Vec<(i64, Box<[u8]>)> = st
            .processing_timers
            .iter()
            .map(|&at| (at, key.into()))
            .collect();
        self.due.extend(items);
        self.processing.extend(processing);
    }
}

impl KeyedOperator for StatefulStep {
    fn state(&self) -> StateDecl {
        self.state.clone()
    }

    fn output_schema(&self) -> Schema {
        self.def.output_schema(&self.key_names)
    }

    fn process(&mut self, batch: &KeyedBatch, recs: Range<usize>, out: &mut Vec<Output>) {
        let first = recs.start;
        for (n, rec) in batch.recs[recs].iter().enumerate() {
            let i = first + n;
            let key = batch.key(rec);
            if self
                .key_limit
                .is_some_and(|l| self.keys.len() >= l && !self.keys.contains_key(key))
            {
                self.state_full.add(1);
                let reason = format!(
                    "the {} state is full: a new key beyond max_keys ({})",
                    self.def.kind(),
                    self.max_keys.unwrap_or(0)
                );
                let from = crate::msg::DeadSource {
                    source: &self.source_name,
                    position: rec.position,
                    topic: batch.topic(i),
                    payload: batch.payload(i),
                    oversize: None,
                };
                out.push(Output::plain(
                    rec.idx,
                    Stream::Dead,
                    crate::msg::dead_letter_line(&reason, &from),
                ));
                continue;
            }
            let w = Waiting {
                ts: rec.ts,
                position: rec.position,
                seq: self.seq,
                vals: batch.vals(rec, self.width).to_vec(),
                event: batch.events.get(i).cloned(),
            };
            self.seq += 1;
            if !self.ordered {
                self.apply(key, w, (rec.idx, Phase::During), out);
                continue;
            }
            if rec.ts <= self.watermark {
                // Behind the watermark: its turn has passed.
                out.push(Output::plain(
                    rec.idx,
                    Stream::Late,
                    batch.payload(i).to_vec(),
                ));
                continue;
            }
            self.due.insert((
                w.ts,
                1,
                Due::Event {
                    ts: w.ts,
                    position: w.position,
                    seq: w.seq,
                    key: key.into(),
                },
            ));
            self.keys
                .entry(key.into())
                .or_default()
                .waiting
                .push_back(w);
            self.touch(key);
        }
    }

    fn result_time(&self, o: &Output) -> i64 {
        // An alert's `at`, an event's own time.
        o.end
    }

    fn start(&mut self, ctx: &crate::context::RunContext, _worker: usize) {
        self.state_full = ctx.counter(
            crate::metrics::names::DEAD_LETTERS,
            "records sent to the dead-letter output, by reason class",
            &[("reason", crate::metrics::reason::STATE_FULL)],
        );
    }

    fn advance(&mut self, watermark: i64, order: Order, out: &mut Vec<Output>) {
        if watermark <= self.watermark {
            return;
        }
        self.watermark = watermark;
        self.release(watermark, order, out);
    }

    fn watermark(&self) -> i64 {
        self.watermark
    }

    fn tick(&mut self, now_ms: i64, out: &mut Vec<Output>) {
        while let Some((at, _)) = self.processing.first() {
            if *at > now_ms {
                break;
            }
            let Some((at, key)) = self.processing.pop_first() else {
                break;
            };
            if let Some(st) = self.keys.get_mut(&key) {
                st.processing_timers.retain(|&t| t != at);
            }
            let end = (Order::END.idx, Order::END.phase);
            self.run_process(&key, at, end, out, &|p, ctx| {
                p.on_timer(ctx, Timer::ProcessingTime(at))
            });
        }
    }

    fn track_changes(&mut self) {
        self.tracking = true;
    }

    fn snapshot(&mut self, out: &mut Vec<KeyChange>) {
        for k in std::mem::take(&mut self.changed) {
            match self.keys.get(&k) {
                None => out.push((k, None)),
                Some(st) => match postcard::to_stdvec(st) {
                    Ok(bytes) => out.push((k, Some(bytes))),
                    // Encoding into a Vec fails only for types serde cannot
                    // describe, which KeyState is not.
                    Err(e) => tracing::error!(error = %e, "cannot encode a key's step state"),
                },
            }
        }
    }

    fn restore(&mut self, watermark: i64, keys: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), String> {
        self.watermark = watermark;
        for (key, bytes) in keys {
            let st: KeyState = postcard::from_bytes(&bytes)
                .map_err(|e| format!("unreadable {} state of a key: {e}", self.def.kind()))?;
            self.keys.insert(key.clone().into_boxed_slice(), st);
            self.index_key(&key);
        }
        Ok(())
    }

    fn open_windows(&self) -> u64 {
        self.keys.values().map(|k| k.waiting.len() as u64).sum()
    }

    fn keys(&self) -> u64 {
        self.keys.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::KeyedRec;
    use std::sync::Arc;

    fn step(def: StatefulDef, ordered: bool) -> StatefulStep {
        StatefulStep::new(
            def,
            StatefulOptions {
                key_names: vec!["k".into()],
                ordered,
                ..Default::default()
            },
        )
    }

    fn key(k: &str) -> Vec<u8> {
        let mut b = Vec::new();
        crate::value::encode_key(&Value::Str(k.into()), &mut b);
        b
    }

    /// A batch of `(key, ts, vals)` records; each event's record is its index.
    fn batch(recs: &[(&str, i64, Vec<Value>)]) -> KeyedBatch {
        let mut b = KeyedBatch {
            watermarks: Arc::new(Vec::new()),
            ..Default::default()
        };
        for (i, (k, ts, vals)) in recs.iter().enumerate() {
            let start = b.keys.len() as u32;
            b.keys.extend_from_slice(&key(k));
            b.recs.push(KeyedRec {
                idx: i as u32,
                ts: *ts,
                hash: 0,
                position: i as u64,
                key: (start, b.keys.len() as u32),
                vals: b.vals.len() as u32,
            });
            b.vals.extend(vals.iter().cloned());
            b.events.push(Event {
                record: format!("{k}@{ts}").into_bytes(),
                fields: Box::new([]),
                retain: false,
            });
            b.carry(format!("{k}@{ts}").as_bytes(), None);
        }
        b
    }

    fn texts(out: &[Output], stream: Stream) -> Vec<String> {
        out.iter()
            .filter(|o| o.stream == stream)
            .map(|o| match &o.body {
                Body::Event(e) => String::from_utf8_lossy(&e.record).into_owned(),
                Body::Line(l) => String::from_utf8_lossy(l).into_owned(),
                Body::Row(r) => format!("{}:{}", r[2].to_json(), r[3].to_json()),
            })
            .collect()
    }

    fn feed(s: &mut StatefulStep, b: &KeyedBatch, wm: i64, out: &mut Vec<Output>) {
        s.process(b, 0..b.recs.len(), out);
        s.advance(wm, Order::END, out);
    }

    #[test]
    fn deadband_passes_changes_in_event_time_order() {
        let def = StatefulDef::Deadband {
            field: "t".into(),
            delta: 0.5,
            max_silence: Some(10_000),
        };
        let f = Value::Float;
        let mut s = step(def, true);
        let mut out = Vec::new();
        // Out of order: by time the values are 20.0, 20.2, 20.6, 20.7, 21.5.
        let b = batch(&[
            ("a", 3000, vec![f(20.6)]),
            ("a", 1000, vec![f(20.0)]),
            ("a", 2000, vec![f(20.2)]),
            ("a", 5000, vec![f(21.5)]),
            ("a", 4000, vec![f(20.7)]),
        ]);
        s.process(&b, 0..5, &mut out);
        assert!(out.is_empty(), "nothing before the watermark passes");
        s.advance(4500, Order::END, &mut out);
        assert_eq!(texts(&out, Stream::Main), ["a@1000", "a@3000"]);
        out.clear();
        // 21.5 passes; then 21.6 after 12 s of silence passes too.
        let b = batch(&[("a", 17_000, vec![f(21.6)]), ("a", 17_500, vec![f(21.7)])]);
        feed(&mut s, &b, i64::MAX, &mut out);
        assert_eq!(texts(&out, Stream::Main), ["a@5000", "a@17000"]);
        // A late event goes to the late output.
        out.clear();
        let b = batch(&[("a", 100, vec![f(99.0)])]);
        s.process(&b, 0..1, &mut out);
        assert_eq!(texts(&out, Stream::Late), ["a@100"]);
    }

    #[test]
    fn deduplicate_drops_repeats_within_the_horizon_and_forgets_after_it() {
        let def = StatefulDef::Deduplicate {
            fields: vec!["id".into()],
            within: 1000,
        };
        let id = |n: i64| vec![Value::Int(n)];
        let mut s = step(def, true);
        let mut out = Vec::new();
        let b = batch(&[
            ("a", 500, id(1)),
            ("a", 100, id(1)),  // first by time: passes; 500 is its repeat
            ("b", 300, id(1)),  // another key
            ("a", 1100, id(1)), // 1000 after 100: passes again
            ("a", 1200, id(2)),
        ]);
        feed(&mut s, &b, 1500, &mut out);
        assert_eq!(
            texts(&out, Stream::Main),
            ["a@100", "b@300", "a@1100", "a@1200"]
        );
        // The horizon's timers free the state once it has passed.
        s.advance(10_000, Order::END, &mut out);
        assert_eq!(s.keys(), 0);
    }

    #[test]
    fn deduplicate_keeps_one_timer_per_key_and_its_index_survives_a_restore() {
        let def = StatefulDef::Deduplicate {
            fields: vec!["id".into()],
            within: 1_000_000,
        };
        let mut s = step(def.clone(), true);
        s.track_changes();
        let mut out = Vec::new();
        // Many different ids of one key inside the horizon, each twice.
        let recs: Vec<(&str, i64, Vec<Value>)> = (0..4000)
            .flat_map(|i| [("a", i, vec![Value::Int(i)]), ("a", i, vec![Value::Int(i)])])
            .collect();
        feed(&mut s, &batch(&recs), 5000, &mut out);
        assert_eq!(texts(&out, Stream::Main).len(), 4000, "each id once");
        assert_eq!(s.keys.get(&key("a")[..]).map(|k| k.timers.len()), Some(1));
        let mut saved = Vec::new();
        s.snapshot(&mut saved);
        let keys = saved
            .into_iter()
            .map(|(k, v)| (k.into_vec(), v.unwrap()))
            .collect();
        let mut back = step(def, true);
        back.restore(5000, keys).unwrap();
        let mut out = Vec::new();
        // Still repeats after the restore; a new id passes.
        let again = batch(&[
            ("a", 6000, vec![Value::Int(17)]),
            ("a", 6001, vec![Value::Int(9999)]),
        ]);
        feed(&mut back, &again, 7000, &mut out);
        assert_eq!(texts(&out, Stream::Main), ["a@6001"]);
        // Past the horizon of everything: the key is gone.
        back.advance(2_000_000, Order::END, &mut out);
        assert_eq!(back.keys(), 0);
    }

    #[test]
    fn alert_raises_on_a_timer_and_clears_with_hysteresis() {
        let def = StatefulDef::Alert {
            name: "hot".into(),
            when: Ast::Const(Value::Null),
            for_ms: 30_000,
            clear: None,
        };
        let b = Value::Bool;
        // vals: [when, clear]
        let mut s = step(def, true);
        let mut out = Vec::new();
        let input = batch(&[
            ("a", 1_000, vec![b(true), b(false)]),
            ("a", 10_000, vec![b(false), b(false)]), // hysteresis: not clear, not hot: resets
            ("a", 20_000, vec![b(true), b(false)]),
            ("a", 40_000, vec![b(true), b(false)]),
        ]);
        feed(&mut s, &input, 45_000, &mut out);
        assert!(texts(&out, Stream::Main).is_empty(), "held 25 s of 30");
        // No event comes, but the watermark passes 50 s: the timer fires.
        s.advance(50_000, Order::END, &mut out);
        assert_eq!(texts(&out, Stream::Main), ["\"raised\":50000"]);
        out.clear();
        let input = batch(&[
            ("a", 60_000, vec![b(false), b(false)]), // between: stays raised
            ("a", 61_000, vec![b(false), b(true)]),
        ]);
        feed(&mut s, &input, 70_000, &mut out);
        assert_eq!(texts(&out, Stream::Main), ["\"cleared\":61000"]);
    }

    #[test]
    fn state_with_waiting_events_and_timers_survives_a_restore() {
        let def = StatefulDef::Alert {
            name: "hot".into(),
            when: Ast::Const(Value::Null),
            for_ms: 5_000,
            clear: None,
        };
        let b = Value::Bool;
        let mut s = step(def.clone(), true);
        s.track_changes();
        let mut out = Vec::new();
        let input = batch(&[
            ("a", 1_000, vec![b(true), b(false)]),
            ("a", 9_000, vec![b(true), b(false)]), // still waiting at 3 s
        ]);
        feed(&mut s, &input, 3_000, &mut out);
        let mut saved = Vec::new();
        s.snapshot(&mut saved);
        assert_eq!(saved.len(), 1);
        let keys: Vec<(Vec<u8>, Vec<u8>)> = saved
            .into_iter()
            .map(|(k, v)| (k.into_vec(), v.unwrap()))
            .collect();
        let mut back = step(def, true);
        back.restore(3_000, keys).unwrap();
        let mut out = Vec::new();
        back.advance(20_000, Order::END, &mut out);
        assert_eq!(texts(&out, Stream::Main), ["\"raised\":6000"]);
        assert_eq!(back.open_windows(), 0);
    }

    #[test]
    fn processing_time_steps_see_arrival_order_at_once() {
        let def = StatefulDef::Deadband {
            field: "t".into(),
            delta: 1.0,
            max_silence: None,
        };
        let mut s = step(def, false);
        let mut out = Vec::new();
        let b = batch(&[
            ("a", 3000, vec![Value::Int(5)]),
            ("a", 1000, vec![Value::Int(7)]),
            ("a", 2000, vec![Value::Int(5)]),
        ]);
        s.process(&b, 0..3, &mut out);
        assert_eq!(texts(&out, Stream::Main), ["a@3000", "a@1000", "a@2000"]);
    }

    /// Counts a key's events in map state, keeps the last value, emits
    /// every second event and a "quiet" record 1 s (event time) after the
    /// key's last event, and a "ping" on a processing-time timer.
    struct Counter;

    impl KeyedProcess for Counter {
        fn name(&self) -> &str {
            "counter"
        }
        fn fields(&self) -> Vec<String> {
            vec!["v".into()]
        }
        fn output(&self) -> Vec<String> {
            vec!["what".into(), "n".into(), "last".into()]
        }
        fn process(&self, ctx: &mut KeyContext<'_>, values: &[Value]) {
            let n = match ctx.get("n") {
                Some(Value::Int(n)) => n + 1,
                _ => 1,
            };
            ctx.insert("n", Value::Int(n));
            ctx.set_value(values[0].clone());
            if n % 2 == 0 {
                ctx.emit(vec![
                    Value::Str("count".into()),
                    Value::Int(n),
                    values[0].clone(),
                ]);
            }
            ctx.insert("last_at", Value::Int(ctx.time()));
            ctx.timer(ctx.time() + 1000);
            if n == 1 {
                ctx.processing_timer(5_000);
            }
        }
        fn on_timer(&self, ctx: &mut KeyContext<'_>, timer: Timer) {
            let last = ctx.value().cloned().unwrap_or_default();
            match timer {
                Timer::EventTime(at) => {
                    if ctx.get("last_at") == Some(&Value::Int(at - 1000)) {
                        ctx.emit(vec![Value::Str("quiet".into()), Value::Null, last]);
                        ctx.clear();
                    }
                }
                Timer::ProcessingTime(_) => {
                    ctx.emit(vec![Value::Str("ping".into()), Value::Null, last]);
                }
            }
        }
    }

    fn rows(out: &[Output]) -> Vec<String> {
        out.iter()
            .filter_map(|o| match &o.body {
                Body::Row(r) => Some(format!(
                    "{}:{}:{}@{}",
                    r[1].to_json(),
                    r[2].to_json(),
                    r[3].to_json(),
                    o.end
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_process_function_keeps_value_and_map_state_and_fires_both_kinds_of_timers() {
        let def = StatefulDef::Process(ProcessFn(std::sync::Arc::new(Counter)));
        let mut s = step(def.clone(), true);
        s.track_changes();
        assert_eq!(
            s.output_schema().names,
            ["k", "what", "n", "last"].map(String::from)
        );
        let mut out = Vec::new();
        let i = Value::Int;
        // By time: 100 (1), 200 (2: count), 300 (3); then quiet at 1300.
        let b = batch(&[
            ("a", 300, vec![i(3)]),
            ("a", 100, vec![i(1)]),
            ("a", 200, vec![i(2)]),
        ]);
        feed(&mut s, &b, 250, &mut out);
        assert_eq!(rows(&out), ["\"count\":2:2@200"]);
        // A checkpoint here holds an event waiting and both timers.
        let mut saved = Vec::new();
        s.snapshot(&mut saved);
        let keys: Vec<(Vec<u8>, Vec<u8>)> = saved
            .into_iter()
            .map(|(k, v)| (k.into_vec(), v.unwrap()))
            .collect();
        let mut back = step(def, true);
        back.restore(250, keys).unwrap();
        let mut out = Vec::new();
        back.advance(2_000, Order::END, &mut out);
        assert_eq!(
            rows(&out),
            ["\"quiet\":null:3@1300"],
            "restored: the 3rd event and its timer"
        );
        out.clear();
        back.tick(4_999, &mut out);
        assert!(out.is_empty());
        back.tick(5_000, &mut out);
        assert_eq!(
            rows(&out),
            ["\"ping\":null:null@5000"],
            "state was cleared at quiet"
        );
        assert_eq!(back.keys(), 0, "nothing left for the key");
    }
}
