//! The dataflow builder: what a pipeline file compiles to, and what Rust
//! users write by hand.
//!
//! ```no_run
//! use rivulet::plan::Pipeline;
//! use rivulet::operators::window::WindowDef;
//! use rivulet::sources::generator::{Generator, GeneratorOptions};
//! use rivulet::sinks::FileSink;
//! use std::time::Duration;
//!
//! let pipeline = Pipeline::builder("sensor-averages")
//!     .source(Generator::new(GeneratorOptions { count: Some(10_000), ..Default::default() }))
//!     .event_time("ts", Duration::from_secs(2))
//!     .map([("celsius", "(temperature - 32) * 5 / 9")])
//!     .key_by(["sensor_id"])
//!     .window(WindowDef::tumbling(Duration::from_secs(5)).aggregate("avg_celsius", "avg(celsius)"))
//!     .sink(FileSink::stdout())
//!     .build()
//!     .expect("a valid pipeline");
//! let stats = pipeline.run(Default::default()).expect("runs");
//! eprintln!("{} events", stats.events);
//! ```

pub mod rules;

use crate::decode::FieldTree;
use crate::exec::tail::TailNode;
use crate::expr::{self, Ast, Expr};
use crate::operators::stateful::StatefulDef;
use crate::operators::window::{AggFunc, WindowDef};
use crate::operators::{Filter, Map, Step};
use crate::sinks::Sink;
use crate::sources::Source;
use crate::time::{Clock, SystemClock};
use rules::StepShape;
use std::sync::Arc;
use std::time::Duration;

/// How payloads are decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per event.
    #[default]
    Json,
    /// The payload is the field `value`: a number where it parses as one,
    /// else a string (many devices publish bare numbers).
    Text,
    /// The payload is not read: it is forwarded byte for byte (binary
    /// too). Only the topic's fields are there for steps.
    Raw,
}

/// How events are placed in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TimeMode {
    /// No windows: time does not matter.
    None,
    /// Event time from a field, with a bounded out-of-orderness watermark.
    Event {
        field: String,
        max_out_of_orderness: i64,
        idle_timeout: Option<i64>,
        /// How the field's timestamps are read (unit, layout, zone).
        stamps: crate::time::stamp::StampFormat,
    },
    /// Arrival time; windows fire as the wall clock passes their end.
    Processing,
    /// Event time taken from the arrival time the source stamps (and, for
    /// a journaled MQTT source, keeps with the message, so a replay windows
    /// it as the first time); quiet input moves event time on with the
    /// wall clock after [`INGESTION_IDLE_MS`].
    Ingestion,
}

impl TimeMode {
    /// Its name in messages.
    pub fn kind(&self) -> &'static str {
        match self {
            TimeMode::None => "no time",
            TimeMode::Event { .. } => "event time",
            TimeMode::Processing => "processing time",
            TimeMode::Ingestion => "ingestion time",
        }
    }
}

/// How long an ingestion-time input may be quiet before its event time
/// follows the wall clock (so the last windows fire).
pub const INGESTION_IDLE_MS: i64 = 200;

enum Entry {
    Step(Box<dyn Step>),
    KeyBy(Vec<String>),
    Window(WindowDef),
    /// A stateful step and its `max_keys`.
    Stateful(StatefulDef, Option<usize>),
}

impl Entry {
    /// What the shape rules ([`rules`]) need to know of it.
    fn shape(&self) -> StepShape {
        match self {
            Entry::Step(_) => StepShape::Step,
            Entry::KeyBy(k) => StepShape::KeyBy { fields: k.len() },
            Entry::Window(_) => StepShape::Window,
            Entry::Stateful(st, _) => StepShape::Stateful {
                passes: st.passes_events(),
            },
        }
    }
}

/// Builds a [`Pipeline`]; every problem is reported by [`PipelineBuilder::build`].
pub struct PipelineBuilder {
    name: String,
    source: Option<Box<dyn Source>>,
    time: TimeMode,
    entries: Vec<Entry>,
    problems: Vec<String>,
    sinks: Vec<Box<dyn Sink>>,
    late: Vec<Box<dyn Sink>>,
    dead_letter: Vec<Box<dyn Sink>>,
    workers: Option<usize>,
    max_payload: usize,
    clock: Arc<dyn Clock>,
    format: Format,
    state: Option<(std::path::PathBuf, Duration)>,
    /// A job graph: the name of the stream this builder's own steps form
    /// (the one the source feeds), and the further streams, each with the
    /// streams it reads and a builder holding its steps and sinks.
    head: Option<String>,
    streams: Vec<StreamDecl>,
    /// A union of sources: each one's time.
    union_times: Vec<TimeMode>,
}

/// The sinks of a further stream: its name, the fields its pass-through
/// events carry for their topics (a tee's), and the sinks.
pub(crate) struct GraphSinkDef {
    pub name: String,
    pub carried: Vec<String>,
    pub sinks: Vec<Box<dyn Sink>>,
}

/// A further stream of a job graph: its name, what it reads (`None`: the
/// pipeline's source, events as decoded), and a builder with its steps
/// and sinks.
type StreamDecl = (String, Option<Vec<String>>, PipelineBuilder);

/// Default largest payload: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// Why a pipeline could not be built: every problem found.
#[derive(Debug, thiserror::Error)]
#[error("invalid pipeline:\n  {}", .0.join("\n  "))]
pub struct BuildError(pub Vec<String>);

/// The event time of one source of a union.
pub(crate) struct PartTime {
    pub field: String,
    pub ts_slot: usize,
    pub bound: i64,
    pub stamps: crate::time::stamp::StampFormat,
}

/// A stream of pass-through events beside the first (a tee): what its
/// events go out with. Its steps are [`Pipeline`]'s `tee_steps`.
pub(crate) struct TeePlan {
    pub name: String,
    /// Fields its steps write, overlaid on each event.
    pub writes: Vec<(String, usize)>,
    /// Fields its sinks fill their topics from.
    pub carry: Vec<(String, usize)>,
    /// Its sinks' [`crate::msg::Stream::Graph`] index.
    pub route: u16,
}

/// One source of a union (see [`PipelineBuilder::union`]).
pub struct UnionPart {
    pub name: String,
    pub source: Box<dyn Source>,
    /// Its time: each source of a union has its own event-time field and
    /// bound (and so its own watermark); all use the same kind of time.
    pub time: TimeMode,
    /// Its largest accepted payload.
    pub max_payload: usize,
}

/// What a pipeline compiles to; immutable and shared by all workers.
pub(crate) struct Plan {
    pub name: String,
    pub source_name: String,
    pub fields: FieldTree,
    pub format: Format,
    /// Slot of `value` for the text format.
    pub value_slot: usize,
    /// Topic bindings and the slot of each bound field.
    pub binder: Option<(crate::sources::TopicBinder, Vec<(String, usize)>)>,
    pub time: TimeMode,
    pub ts_slot: Option<usize>,
    /// A union of sources with event time: each source's timestamps (by
    /// [`crate::sources::RawItem::source`]); empty otherwise.
    pub parts: Vec<PartTime>,
    /// A job graph's further streams that read the sources: the slots of
    /// the fields they read, copied from each event as decoded (before
    /// the first stream's steps) into a [`crate::msg::Stream::Side`] row.
    pub side: Option<Vec<usize>>,
    /// A job graph's further streams of pass-through events that read the
    /// sources (a `map`/`filter` chain of their own, then their sinks).
    pub tees: Vec<TeePlan>,
    pub key_names: Vec<String>,
    pub key_slots: Vec<usize>,
    pub window: Option<WindowDef>,
    /// Aggregate function, compiled argument and name, per aggregate.
    pub aggs: Vec<(AggFunc, Option<Expr>, String)>,
    /// A stateful step after `key_by` (`deduplicate`, `deadband`, `alert`).
    pub stateful: Option<StatefulDef>,
    /// Its `max_keys`.
    pub stateful_max_keys: Option<usize>,
    /// Its inputs per record: compiled expression, whether it must be a
    /// number, and its label in dead letters.
    pub stateful_inputs: Vec<(Expr, bool, String)>,
    /// Fields written by steps, overlaid on pass-through outputs (never the
    /// topic's fields: those place an event, they are not part of it).
    pub writes: Vec<(String, usize)>,
    /// Fields the main sinks fill their topics from, carried with each
    /// pass-through output (see [`crate::sinks::Sink::topic_fields`]).
    pub carry: Vec<(String, usize)>,
    /// A main sink keeps each message's retain flag.
    pub carry_retain: bool,
    pub workers: usize,
    pub max_payload: usize,
    pub has_late_sink: bool,
    /// State directory and checkpoint interval.
    pub state: Option<(std::path::PathBuf, Duration)>,
}

impl Plan {
    /// Whether there is a keyed stage (a window or a stateful step).
    pub fn keyed(&self) -> bool {
        self.window.is_some() || self.stateful.is_some()
    }

    /// Names for reading saved state: key fields and aggregates.
    pub fn state_layout(&self) -> String {
        if let Some(st) = &self.stateful {
            return serde_json::json!({ "keys": self.key_names, "step": st.kind() }).to_string();
        }
        let aggs: Vec<&str> = self.aggs.iter().map(|a| a.2.as_str()).collect();
        serde_json::json!({ "keys": self.key_names, "aggregates": aggs }).to_string()
    }

    /// What saved state depends on: restoring state written under another
    /// fingerprint is refused.
    pub fn fingerprint(&self) -> String {
        let window = self.window.as_ref().map(|w| {
            let aggs: Vec<String> = w
                .aggregates
                .iter()
                .map(|a| format!("{}={:?}", a.name, a.func))
                .collect();
            format!(
                "{:?} lateness={} aggregates=[{}]",
                w.kind,
                w.allowed_lateness,
                aggs.join(",")
            )
        });
        if let Some(st) = &self.stateful {
            return format!("keys=[{}] step={st:?}", self.key_names.join(","));
        }
        format!(
            "keys=[{}] window={}",
            self.key_names.join(","),
            window.unwrap_or_else(|| "none".into())
        )
    }
}

/// A built pipeline, ready to [`run`](Pipeline::run).
pub struct Pipeline {
    pub(crate) plan: Arc<Plan>,
    pub(crate) source: Box<dyn Source>,
    /// Steps before `key_by`, then after it (bound, cloned per worker).
    pub(crate) steps_before_key: Vec<Box<dyn Step>>,
    pub(crate) steps_after_key: Vec<Box<dyn Step>>,
    /// Steps and keyed stages after the first window or stateful step,
    /// and a job graph's further streams (node 0 is this stream's rest).
    pub(crate) tail: Vec<TailNode>,
    /// A job graph: late records carry their stream's name.
    pub(crate) graph: bool,
    pub(crate) sinks: Vec<Box<dyn Sink>>,
    /// The sinks of a job graph's further streams, by [`crate::msg::Stream::Graph`] index.
    pub(crate) graph_sinks: Vec<GraphSinkDef>,
    /// The steps of each tee ([`Plan`]'s `tees`), bound, cloned per worker.
    pub(crate) tee_steps: Vec<Vec<Box<dyn Step>>>,
    pub(crate) late: Vec<Box<dyn Sink>>,
    pub(crate) dead_letter: Vec<Box<dyn Sink>>,
    pub(crate) clock: Arc<dyn Clock>,
}

impl Pipeline {
    pub fn builder(name: &str) -> PipelineBuilder {
        PipelineBuilder {
            name: name.to_string(),
            source: None,
            time: TimeMode::None,
            entries: Vec::new(),
            problems: Vec::new(),
            sinks: Vec::new(),
            late: Vec::new(),
            dead_letter: Vec::new(),
            workers: None,
            max_payload: DEFAULT_MAX_PAYLOAD,
            clock: Arc::new(SystemClock),
            format: Format::Json,
            state: None,
            head: None,
            streams: Vec::new(),
            union_times: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.plan.name
    }

    pub fn workers(&self) -> usize {
        self.plan.workers
    }
}

impl PipelineBuilder {
    pub fn source(mut self, s: impl Source + 'static) -> Self {
        self.source = Some(Box::new(s));
        self
    }
    pub fn boxed_source(mut self, s: Box<dyn Source>) -> Self {
        self.source = Some(s);
        self
    }
    /// Reads several sources as one (a union), each with its own time:
    /// with event time, each source keeps its own watermark and the
    /// pipeline's is the least of them (a source that ends stops counting).
    /// The first source's idle timeout applies to the union as a whole.
    /// Replaces [`Self::source`] and the time settings.
    pub fn union(mut self, parts: Vec<UnionPart>) -> Self {
        let Some(first) = parts.first() else {
            self.problems
                .push("a union needs at least one source".into());
            return self;
        };
        self.time = first.time.clone();
        if parts
            .iter()
            .any(|p| std::mem::discriminant(&p.time) != std::mem::discriminant(&self.time))
        {
            self.problems.push(format!(
                "the sources of a union need the same kind of time (event time in all, or processing time in all): {}",
                parts
                    .iter()
                    .map(|p| format!("{} has {}", p.name, p.time.kind()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if parts.len() > u16::MAX as usize {
            self.problems
                .push("a union has at most 65535 sources".into());
        }
        self.union_times = parts.iter().map(|p| p.time.clone()).collect();
        self.max_payload = parts
            .iter()
            .map(|p| p.max_payload)
            .max()
            .unwrap_or(self.max_payload);
        let parts = parts
            .into_iter()
            .map(|p| crate::sources::union::Part {
                name: p.name,
                source: p.source,
                max_payload: p.max_payload,
            })
            .collect();
        self.source = Some(Box::new(crate::sources::union::UnionSource::new(parts)));
        self
    }
    /// Event time from `field`, tolerating `max_out_of_orderness`.
    pub fn event_time(mut self, field: &str, max_out_of_orderness: Duration) -> Self {
        self.time = TimeMode::Event {
            field: field.to_string(),
            max_out_of_orderness: max_out_of_orderness.as_millis() as i64,
            idle_timeout: None,
            stamps: Default::default(),
        };
        self
    }
    /// How event timestamps are read (after [`Self::event_time`]): the unit
    /// of numeric epochs, a layout for strings, the zone of local times,
    /// the plausible years. Default: epoch milliseconds or RFC 3339, any
    /// year.
    pub fn timestamps(mut self, format: crate::time::stamp::StampFormat) -> Self {
        if let TimeMode::Event { stamps, .. } = &mut self.time {
            *stamps = format;
        } else {
            self.problems
                .push("timestamps needs event_time to be set first".into());
        }
        self
    }
    /// After `d` without events the watermark follows the wall clock.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        if let TimeMode::Event { idle_timeout, .. } = &mut self.time {
            *idle_timeout = Some(d.as_millis() as i64);
        } else {
            self.problems
                .push("idle_timeout needs event_time to be set first".into());
        }
        self
    }
    /// Ingestion time: each event's time is when the source received it
    /// (see [`TimeMode::Ingestion`]).
    pub fn ingestion_time(mut self) -> Self {
        self.time = TimeMode::Ingestion;
        self
    }
    pub fn processing_time(mut self) -> Self {
        self.time = TimeMode::Processing;
        self
    }
    /// `map`: `(field, expression)` pairs, evaluated in order.
    pub fn map<I, K, V>(mut self, assignments: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut parsed = Vec::new();
        for (k, v) in assignments {
            match parse_expr(v.as_ref()) {
                Ok(ast) => parsed.push((k.as_ref().to_string(), ast)),
                Err(e) => self.problems.push(format!("map `{}`: {e}", k.as_ref())),
            }
        }
        self.entries.push(Entry::Step(Box::new(Map::new(parsed))));
        self
    }
    /// `filter`: keep events for which `condition` is true.
    pub fn filter(mut self, condition: &str) -> Self {
        match parse_expr(condition) {
            Ok(ast) => self.entries.push(Entry::Step(Box::new(Filter::new(ast)))),
            Err(e) => self.problems.push(format!("filter: {e}")),
        }
        self
    }
    /// A step of your own (see [`crate::operators::Step`]).
    pub fn step(mut self, step: impl Step + 'static) -> Self {
        self.entries.push(Entry::Step(Box::new(step)));
        self
    }
    pub fn key_by<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, fields: I) -> Self {
        self.entries.push(Entry::KeyBy(
            fields.into_iter().map(|f| f.as_ref().to_string()).collect(),
        ));
        self
    }
    pub fn window(mut self, w: WindowDef) -> Self {
        self.entries.push(Entry::Window(w));
        self
    }
    /// A stateful step after `key_by` (see [`crate::operators::stateful`]).
    pub fn stateful(self, def: StatefulDef) -> Self {
        self.stateful_limited(def, None)
    }
    /// A stateful step keeping state for at most `max_keys` keys: events of
    /// new keys beyond them go to the dead-letter output.
    pub fn stateful_limited(mut self, def: StatefulDef, max_keys: Option<usize>) -> Self {
        self.entries.push(Entry::Stateful(def, max_keys));
        self
    }
    /// `deduplicate`: drops an event whose `fields` equal those of an
    /// event of the same key that passed less than `within` before it.
    pub fn deduplicate<I: IntoIterator<Item = S>, S: AsRef<str>>(
        self,
        fields: I,
        within: Duration,
    ) -> Self {
        self.stateful(StatefulDef::Deduplicate {
            fields: fields.into_iter().map(|f| f.as_ref().to_string()).collect(),
            within: within.as_millis() as i64,
        })
    }
    /// `deadband` (report by exception): passes an event when it is the
    /// key's first, when `field` moved by at least `delta` since the last
    /// one passed, or after `max_silence` without one.
    pub fn deadband(self, field: &str, delta: f64, max_silence: Option<Duration>) -> Self {
        self.stateful(StatefulDef::Deadband {
            field: field.to_string(),
            delta,
            max_silence: max_silence.map(|d| d.as_millis() as i64),
        })
    }
    /// A keyed process function of your own (see
    /// [`crate::operators::stateful::KeyedProcess`]), after `key_by`.
    pub fn process(self, f: impl crate::operators::stateful::KeyedProcess) -> Self {
        self.stateful(StatefulDef::Process(crate::operators::stateful::ProcessFn(
            Arc::new(f),
        )))
    }
    /// `alert`: `raised` once `when` held for `for_`, `cleared` when
    /// `clear` (default `!(when)`) holds after that.
    pub fn alert(mut self, name: &str, when: &str, for_: Duration, clear: Option<&str>) -> Self {
        let when = match parse_expr(when) {
            Ok(a) => a,
            Err(e) => {
                self.problems.push(format!("alert `when`: {e}"));
                return self;
            }
        };
        let clear = match clear.map(parse_expr) {
            Some(Err(e)) => {
                self.problems.push(format!("alert `clear`: {e}"));
                return self;
            }
            Some(Ok(a)) => Some(a),
            None => None,
        };
        self.stateful(StatefulDef::Alert {
            name: name.to_string(),
            when,
            for_ms: for_.as_millis() as i64,
            clear,
        })
    }
    /// Names the stream this builder's steps form, the one the source
    /// feeds, for [`PipelineBuilder::stream`] to read (default: the
    /// pipeline's name).
    pub fn stream_name(mut self, name: &str) -> Self {
        self.head = Some(name.to_string());
        self
    }

    /// Adds a stream of a job graph: it reads the records of the streams
    /// named in `from` (this builder's own stream, see
    /// [`PipelineBuilder::stream_name`], or streams added before it; several
    /// are a union), runs the steps of `steps` on them and writes them to
    /// its sinks. Only the steps and sinks of `steps` are used. The stream
    /// this builder forms needs a window or an `alert` to be read: its
    /// records are then results, with known fields.
    pub fn stream(mut self, name: &str, from: &[&str], steps: PipelineBuilder) -> Self {
        self.streams.push((
            name.to_string(),
            Some(from.iter().map(|s| s.to_string()).collect()),
            steps,
        ));
        self
    }

    /// Adds a stream of a job graph that reads the pipeline's source too:
    /// each event as decoded (before the steps of this builder's own
    /// stream), by the fields its steps name. It needs a window or an
    /// `alert` (what it puts out are results, with known fields); it runs
    /// on one thread after the first stream, like the streams that read
    /// streams.
    pub fn source_stream(mut self, name: &str, steps: PipelineBuilder) -> Self {
        self.streams.push((name.to_string(), None, steps));
        self
    }

    pub fn sink(mut self, s: impl Sink + 'static) -> Self {
        self.sinks.push(Box::new(s));
        self
    }
    pub fn boxed_sink(mut self, s: Box<dyn Sink>) -> Self {
        self.sinks.push(s);
        self
    }
    /// Where late events go.
    pub fn late(mut self, s: Box<dyn Sink>) -> Self {
        self.late.push(s);
        self
    }
    /// Where undecodable or failing events go, with the reason.
    pub fn dead_letter(mut self, s: Box<dyn Sink>) -> Self {
        self.dead_letter.push(s);
        self
    }
    /// Worker threads (default: the number of cores).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }
    /// Keep state in `dir`, checkpointed every `interval`; a restart resumes
    /// from the last checkpoint (see [`crate::state`]).
    pub fn state(mut self, dir: impl Into<std::path::PathBuf>, interval: Duration) -> Self {
        self.state = Some((dir.into(), interval));
        self
    }
    pub fn format(mut self, f: Format) -> Self {
        self.format = f;
        self
    }
    /// The clock for processing time and idleness (tests inject one).
    pub fn clock(mut self, c: Arc<dyn Clock>) -> Self {
        self.clock = c;
        self
    }

    pub fn build(self) -> Result<Pipeline, BuildError> {
        let mut problems = self.problems;
        let mut fields = FieldTree::new();
        let value_slot = match self.format {
            Format::Text => fields.slot("value"),
            Format::Json | Format::Raw => usize::MAX,
        };
        let binder = self
            .source
            .as_ref()
            .and_then(|s| s.topic_binder())
            .map(|b| {
                let slots = b.fields().into_iter().map(|f| {
                    let slot = fields.slot(&f);
                    (f, slot)
                });
                let slots: Vec<(String, usize)> = slots.collect();
                (b, slots)
            });
        let ts_slot = match &self.time {
            TimeMode::Event { field, .. } => Some(fields.slot(field)),
            _ => None,
        };
        let parts = match (&self.time, self.union_times.len() > 1) {
            (TimeMode::Event { .. }, true) => self
                .union_times
                .iter()
                .filter_map(|t| match t {
                    TimeMode::Event {
                        field,
                        max_out_of_orderness,
                        stamps,
                        ..
                    } => Some(PartTime {
                        field: field.clone(),
                        ts_slot: fields.slot(field),
                        bound: *max_out_of_orderness,
                        stamps: stamps.clone(),
                    }),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut before = Vec::new();
        let mut after = Vec::new();
        let mut key: Option<Vec<String>> = None;
        let mut window: Option<WindowDef> = None;
        let mut stateful: Option<StatefulDef> = None;
        let mut stateful_max_keys = None;
        let mut writes: Vec<(String, usize)> = Vec::new();
        let shapes: Vec<StepShape> = self.entries.iter().map(Entry::shape).collect();
        for p in rules::check_steps(&shapes, Some(self.time != TimeMode::None)) {
            problems.push(match p.subject {
                rules::Subject::Step { index, .. } => format!("steps[{index}]: {}", p.message),
                rules::Subject::Workers => format!("workers {}", p.message),
            });
        }
        let mut tail_entries = Vec::new();
        for entry in self.entries {
            // After the first window (or stateful step): the tail.
            if window.is_some() || stateful.is_some() {
                tail_entries.push(entry);
                continue;
            }
            match entry {
                Entry::Step(mut s) => {
                    bind_event_step(&mut s, &mut fields, &mut writes);
                    if key.is_some() {
                        &mut after
                    } else {
                        &mut before
                    }
                    .push(s);
                }
                Entry::KeyBy(k) => {
                    key.get_or_insert(k);
                }
                Entry::Window(w) => {
                    problems.extend(w.problems());
                    window.get_or_insert(w);
                }
                Entry::Stateful(st, max_keys) => {
                    problems.extend(
                        st.check()
                            .into_iter()
                            .map(|p| format!("{}: {p}", st.kind())),
                    );
                    if max_keys == Some(0) {
                        problems.push(format!("{}: max_keys must be at least 1", st.kind()));
                    }
                    stateful_max_keys = max_keys;
                    stateful.get_or_insert(st);
                }
            }
        }
        let source = match self.source {
            Some(s) => Some(s),
            None => {
                problems.push("no source".into());
                None
            }
        };
        if self.sinks.is_empty() && self.streams.is_empty() {
            problems.push("no sink".into());
        }
        let workers = self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        if let Some(p) = rules::check_workers(workers) {
            problems.push(format!("workers {}", p.message));
        }
        // Writing the whole-topic field changes where an event goes, not
        // the event.
        let topic_field = binder.as_ref().and_then(|b| b.0.topic_field.clone());
        writes.retain(|(w, _)| Some(w) != topic_field.as_ref());
        if passes_events(&window, &stateful) {
            problems.extend(raw_writes_problem(self.format, &writes));
        }
        // Events go out as they came: without a window, or through
        // `deduplicate` and `deadband`.
        let passes = passes_events(&window, &stateful);
        let (mut carry, carry_retain) = if passes {
            (
                topic_carry(&self.sinks, &mut fields),
                self.sinks.iter().any(|s| s.keeps_retain()),
            )
        } else {
            (Vec::new(), false)
        };
        let key_names = key.unwrap_or_default();
        let key_slots = key_names.iter().map(|k| fields.slot(k)).collect();
        let stateful_inputs = stateful
            .as_ref()
            .map(|st| {
                st.inputs()
                    .into_iter()
                    .map(|(ast, numeric, label)| {
                        (ast.compile(&mut |f| fields.slot(f)), numeric, label)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let aggs = window
            .as_ref()
            .map(|w| {
                w.aggregates
                    .iter()
                    .map(|a| {
                        let arg = a
                            .arg
                            .as_ref()
                            .map(|ast| ast.compile(&mut |f| fields.slot(f)));
                        (a.func, arg, a.name.clone())
                    })
                    .collect()
            })
            .unwrap_or_default();
        // The first stage's results: a window's or a stateful step's.
        let first_results = match (&window, &stateful) {
            (Some(w), _) => Some(w.output_schema(&key_names)),
            (None, Some(st)) => Some(st.output_schema(&key_names)),
            (None, None) => None,
        };
        let head_name = self.head.clone().unwrap_or_else(|| self.name.clone());
        let mut tail = Vec::new();
        // Steps after `deduplicate` or `deadband` read the events' fields by
        // name (the rules make them end in results).
        let after_passing = passes && !tail_entries.is_empty();
        // What this stream puts out are results (a window's, an alert's).
        let head_results = first_results.is_some() && (!passes || after_passing);
        if let Some(schema) = &first_results {
            let mut segments = match (tail_entries.is_empty(), after_passing) {
                (true, _) => Vec::new(),
                (false, false) => build_tail(tail_entries, schema.clone(), &mut problems, None),
                (false, true) => build_tail(tail_entries, Default::default(), &mut problems, None),
            };
            let mut event_fields = None;
            let mut input = schema.clone();
            if let (true, Some(first)) = (after_passing, segments.first_mut()) {
                // Its input is every field its first segment names, carried
                // with each event the stateful step passes on.
                first.input_width = first.names.len();
                input.names = first.names.clone();
                let mut at = Vec::new();
                for name in &first.names {
                    match carry.iter().position(|(n, _)| n == name) {
                        Some(i) => at.push(i),
                        None => {
                            carry.push((name.clone(), fields.slot(name)));
                            at.push(carry.len() - 1);
                        }
                    }
                }
                event_fields = Some(at);
            }
            let mut head = TailNode::head(&head_name, input, segments);
            head.event_fields = event_fields;
            if self.sinks.is_empty() {
                head.route = None;
            }
            tail.push(head);
        }
        let graph = !self.streams.is_empty();
        let mut graph_sinks = Vec::new();
        let mut side = None;
        // Streams of pass-through events beside the first (tees): a chain
        // of `map`/`filter` steps of their own on each decoded event.
        let (tee_decls, streams): (Vec<StreamDecl>, Vec<StreamDecl>) =
            self.streams.into_iter().partition(|(_, from, b)| {
                from.is_none() && b.entries.iter().all(|e| matches!(e, Entry::Step(_)))
            });
        let tee_names: Vec<String> = tee_decls.iter().map(|(n, _, _)| n.clone()).collect();
        let mut tees = Vec::new();
        let mut tee_steps = Vec::new();
        for (name, _, b) in tee_decls {
            let (tee, steps) = build_tee(
                &name,
                b,
                &mut fields,
                topic_field.as_deref(),
                self.format,
                &mut graph_sinks,
                &mut problems,
            );
            tees.push(tee);
            tee_steps.push(steps);
        }
        for (name, from, _) in &streams {
            for t in from.iter().flatten().filter(|f| tee_names.contains(f)) {
                problems.push(format!(
                    "stream `{name}`: `{t}` passes events on (it has no window or `alert`), so other streams cannot read it yet; read what it reads, with its steps"
                ));
            }
        }
        if !streams.is_empty() {
            let read = streams
                .iter()
                .any(|(_, from, _)| from.as_ref().is_some_and(|f| f.contains(&head_name)));
            match head_results {
                true => {
                    side = build_streams(
                        streams,
                        &mut tail,
                        &mut graph_sinks,
                        &mut fields,
                        &mut problems,
                    )
                }
                _ if read => problems.push(format!(
                    "stream `{head_name}` is read by other streams, so it needs a window or an `alert`: streams read results, whose fields are known"
                )),
                _ => problems.push(format!(
                    "stream `{head_name}`, the first to read the sources, needs a window or an `alert` when other streams read the sources too"
                )),
            }
        }
        if side.is_some() && self.format == Format::Raw {
            problems.push("streams that read the sources besides the first need decoded events: `format: raw` does not decode them".into());
        }
        if self.sinks.is_empty() && graph && !tail.first().is_some_and(|h| h.read) {
            problems.push(format!(
                "stream `{head_name}`: its records go nowhere; give it a sink, or read it from another stream"
            ));
        }
        let (Some(source), true) = (source, problems.is_empty()) else {
            return Err(BuildError(problems));
        };
        let plan = Plan {
            name: self.name,
            source_name: source.describe(),
            fields,
            format: self.format,
            value_slot,
            binder,
            time: self.time,
            ts_slot,
            parts,
            side,
            tees,
            key_names,
            key_slots,
            window,
            aggs,
            stateful,
            stateful_max_keys,
            stateful_inputs,
            writes,
            carry,
            carry_retain,
            workers,
            max_payload: self.max_payload,
            has_late_sink: !self.late.is_empty(),
            state: self.state,
        };
        Ok(Pipeline {
            plan: Arc::new(plan),
            source,
            steps_before_key: before,
            steps_after_key: after,
            tail,
            graph,
            sinks: self.sinks,
            graph_sinks,
            tee_steps,
            late: self.late,
            dead_letter: self.dead_letter,
            clock: self.clock,
        })
    }
}

/// The segments after the first keyed stage, whose results (fields
/// `input`) they take (see [`crate::exec::tail`]).
fn build_tail(
    entries: Vec<Entry>,
    input: crate::msg::Schema,
    problems: &mut Vec<String>,
    stream: Option<&str>,
) -> Vec<crate::exec::tail::TailSegment> {
    use crate::exec::tail::{TailKeyed, TailSegment};
    use crate::operators::keyed::KeyedOperator as _;
    use crate::operators::stateful::{StatefulOptions, StatefulStep};
    use crate::operators::window::{WindowStep, WindowStepOptions};
    let new_segment = |names: Vec<String>| TailSegment {
        input_width: names.len(),
        names,
        steps: Vec::new(),
        keyed: None,
    };
    let mut segments = Vec::new();
    let mut cur = new_segment(input.names);
    let mut key: Option<Vec<String>> = None;
    fn slot(names: &mut Vec<String>, f: &str) -> usize {
        match names.iter().position(|n| n == f) {
            Some(i) => i,
            None => {
                names.push(f.to_string());
                names.len() - 1
            }
        }
    }
    for entry in entries {
        let n = segments.len() + 1;
        match entry {
            Entry::Step(mut s) => {
                let slots: Vec<usize> =
                    s.fields().iter().map(|f| slot(&mut cur.names, f)).collect();
                s.bind(&slots);
                cur.steps.push(s);
            }
            Entry::KeyBy(k) => key = Some(k),
            Entry::Window(w) => {
                problems.extend(w.problems());
                let key_names = key.take().unwrap_or_default();
                let key_slots = key_names.iter().map(|k| slot(&mut cur.names, k)).collect();
                let inputs = w
                    .aggregates
                    .iter()
                    .map(|a| {
                        let arg = a
                            .arg
                            .as_ref()
                            .map(|ast| ast.compile(&mut |f| slot(&mut cur.names, f)));
                        (arg, a.func.numeric(), format!("aggregate `{}`", a.name))
                    })
                    .collect();
                let op = WindowStep::new(
                    w.clone(),
                    WindowStepOptions {
                        key_names: key_names.clone(),
                        source_name: results_name("window results", n, stream),
                        key_limit: w.max_keys,
                        fingerprint: format!(
                            "{}stage {} keys=[{}] {:?}",
                            in_stream(stream),
                            n + 1,
                            key_names.join(","),
                            w
                        ),
                        layout: layout(
                            serde_json::json!({
                                "keys": key_names,
                                "aggregates": w.aggregates.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
                                "stage": n + 1,
                            }),
                            stream,
                        ),
                    },
                );
                let out = op.output_schema().names;
                cur.keyed = Some(TailKeyed {
                    key_names,
                    key_slots,
                    inputs,
                    op: Box::new(op),
                    passes: false,
                });
                segments.push(std::mem::replace(&mut cur, new_segment(out)));
            }
            Entry::Stateful(st, max_keys) => {
                problems.extend(
                    st.check()
                        .into_iter()
                        .map(|p| format!("{}: {p}", st.kind())),
                );
                let key_names = key.take().unwrap_or_default();
                let key_slots = key_names.iter().map(|k| slot(&mut cur.names, k)).collect();
                let inputs = st
                    .inputs()
                    .into_iter()
                    .map(|(ast, numeric, label)| {
                        (
                            Some(ast.compile(&mut |f| slot(&mut cur.names, f))),
                            numeric,
                            label,
                        )
                    })
                    .collect();
                let op = StatefulStep::new(
                    st.clone(),
                    StatefulOptions {
                        key_names: key_names.clone(),
                        key_limit: max_keys,
                        max_keys,
                        source_name: results_name("results", n, stream),
                        ordered: true,
                        fingerprint: format!(
                            "{}stage {} keys=[{}] {:?}",
                            in_stream(stream),
                            n + 1,
                            key_names.join(","),
                            st
                        ),
                        layout: layout(
                            serde_json::json!({ "keys": key_names, "step": st.kind(), "stage": n + 1 }),
                            stream,
                        ),
                    },
                );
                let passes = st.passes_events();
                let out = if passes {
                    cur.names.clone()
                } else {
                    op.output_schema().names
                };
                cur.keyed = Some(TailKeyed {
                    key_names,
                    key_slots,
                    inputs,
                    op: Box::new(op),
                    passes,
                });
                segments.push(std::mem::replace(&mut cur, new_segment(out)));
            }
        }
    }
    if !cur.steps.is_empty() {
        segments.push(cur);
    }
    segments
}

/// A tail operator's state layout: `l`, with the stream's name in a job graph.
fn layout(mut l: serde_json::Value, stream: Option<&str>) -> String {
    if let Some(s) = stream {
        l["stream"] = s.into();
    }
    l.to_string()
}

/// What a tail operator's dead letters say they came from.
fn results_name(what: &str, stage: usize, stream: Option<&str>) -> String {
    match stream {
        None => format!("{what} (stage {stage})"),
        Some(s) => format!("stream {s}"),
    }
}

/// The prefix of a further stream's state fingerprints.
fn in_stream(stream: Option<&str>) -> String {
    stream.map(|s| format!("stream {s} ")).unwrap_or_default()
}

/// Adds a job graph's further streams to `nodes` (whose node 0 is the
/// stream the source feeds), in their order: a stream reads streams
/// before it. Returns the slots of the event fields the streams that read
/// the source read (`None` when there are none).
fn build_streams(
    streams: Vec<StreamDecl>,
    nodes: &mut Vec<TailNode>,
    graph_sinks: &mut Vec<GraphSinkDef>,
    fields: &mut FieldTree,
    problems: &mut Vec<String>,
) -> Option<Vec<usize>> {
    // The event fields the streams that read the source read.
    let mut side: Option<Vec<String>> = None;
    for (name, from, b) in streams {
        let at = |p: &dyn std::fmt::Display| format!("stream `{name}`: {p}");
        if nodes.iter().any(|n| n.name == name) {
            problems.push(at(&"another stream has this name"));
        }
        check_stream_decl(&name, &b, problems);
        let shapes: Vec<StepShape> = b.entries.iter().map(Entry::shape).collect();
        for p in rules::check_steps(&shapes, Some(true)) {
            problems.push(at(&match p.subject {
                rules::Subject::Step { index, .. } => format!("steps[{index}]: {}", p.message),
                rules::Subject::Workers => p.message,
            }));
        }
        let mut input_names: Vec<String> = Vec::new();
        let mut inputs = Vec::new();
        if let Some(from) = &from {
            if from.is_empty() {
                problems.push(at(&"`from` names no stream"));
            }
            for f in from {
                let Some(i) = nodes.iter().position(|n| n.name == *f) else {
                    problems.push(at(&format!("reads `{f}`, which is not a stream before it")));
                    continue;
                };
                let slots = nodes[i]
                    .output_schema()
                    .names
                    .into_iter()
                    .map(|n| match input_names.iter().position(|m| *m == n) {
                        Some(s) => s,
                        None => {
                            input_names.push(n);
                            input_names.len() - 1
                        }
                    })
                    .collect();
                nodes[i].read = true;
                inputs.push((i, slots));
            }
        } else {
            // Reading events: what it puts out must be results.
            let first_keyed = b.entries.iter().find_map(|e| match e {
                Entry::Window(_) => Some(true),
                Entry::Stateful(st, _) => Some(!st.passes_events()),
                _ => None,
            });
            if first_keyed != Some(true) {
                problems.push(at(&"a stream that reads the sources besides the first needs a window or an `alert` (it reads the events' fields by name; what it puts out are results)"));
            }
        }
        let mut segments = match b.entries.is_empty() {
            true => Vec::new(),
            false => {
                let mut found = Vec::new();
                let input = crate::msg::Schema {
                    names: input_names.clone(),
                };
                let segments = build_tail(b.entries, input, &mut found, Some(&name));
                problems.extend(found.iter().map(|p| at(p)));
                segments
            }
        };
        let mut side_map = None;
        if from.is_none() {
            // Its input is every field its first segment names, taken from
            // the event.
            if let Some(first) = segments.first_mut() {
                first.input_width = first.names.len();
                input_names = first.names.clone();
            }
            let side = side.get_or_insert_with(Vec::new);
            side_map = Some(
                input_names
                    .iter()
                    .map(|n| match side.iter().position(|m| m == n) {
                        Some(i) => i,
                        None => {
                            side.push(n.clone());
                            side.len() - 1
                        }
                    })
                    .collect(),
            );
        }
        let route = match b.sinks.is_empty() {
            true => None,
            false => {
                graph_sinks.push(GraphSinkDef {
                    name: name.clone(),
                    carried: Vec::new(),
                    sinks: b.sinks,
                });
                Some(crate::msg::Stream::Graph(graph_sinks.len() as u16 - 1))
            }
        };
        nodes.push(TailNode {
            name,
            inputs,
            side: side_map,
            event_fields: None,
            input_names,
            segments,
            route,
            read: false,
            watermark: i64::MIN,
        });
    }
    for n in nodes.iter().skip(1) {
        if n.route.is_none() && !n.read {
            problems.push(format!(
                "stream `{}`: its records go nowhere; give it a sink, or read it from another stream",
                n.name
            ));
        }
    }
    side.map(|names| names.iter().map(|n| fields.slot(n)).collect())
}

/// Binds a step to the event fields, and notes the fields it writes (a
/// later write of a field replaces an earlier one).
fn bind_event_step(
    s: &mut Box<dyn Step>,
    fields: &mut FieldTree,
    writes: &mut Vec<(String, usize)>,
) {
    let slots: Vec<usize> = s.fields().iter().map(|f| fields.slot(f)).collect();
    s.bind(&slots);
    for w in s.writes() {
        let slot = fields.slot(&w);
        writes.retain(|(n, _)| *n != w);
        writes.push((w, slot));
    }
}

/// `format: raw` cannot take the fields steps write into forwarded events.
fn raw_writes_problem(format: Format, writes: &[(String, usize)]) -> Option<String> {
    match (format, writes.first()) {
        (Format::Raw, Some((w, _))) => Some(format!(
            "a step writes `{w}`, but `format: raw` forwards payloads unchanged; use `format: json` or `text` to add fields"
        )),
        _ => None,
    }
}

/// The fields `sinks` fill their topics from, with their slots, each once.
fn topic_carry(sinks: &[Box<dyn Sink>], fields: &mut FieldTree) -> Vec<(String, usize)> {
    let mut carry: Vec<(String, usize)> = Vec::new();
    for f in sinks.iter().flat_map(|s| s.topic_fields()) {
        if !carry.iter().any(|(n, _)| *n == f) {
            let slot = fields.slot(&f);
            carry.push((f, slot));
        }
    }
    carry
}

/// What holds for the builder of any further stream: no source of its
/// own; its own problems (bad expressions) under its name.
fn check_stream_decl(name: &str, b: &PipelineBuilder, problems: &mut Vec<String>) {
    if b.source.is_some() {
        problems.push(format!(
            "stream `{name}`: a stream of a job graph has no source of its own"
        ));
    }
    problems.extend(b.problems.iter().map(|p| format!("stream `{name}`: {p}")));
}

/// A stream of pass-through events beside the first (a tee): its steps,
/// bound to the event fields, and what its events go out with.
fn build_tee(
    name: &str,
    b: PipelineBuilder,
    fields: &mut FieldTree,
    topic_field: Option<&str>,
    format: Format,
    graph_sinks: &mut Vec<GraphSinkDef>,
    problems: &mut Vec<String>,
) -> (TeePlan, Vec<Box<dyn Step>>) {
    let at = |p: &dyn std::fmt::Display| format!("stream `{name}`: {p}");
    check_stream_decl(name, &b, problems);
    let mut steps = Vec::new();
    let mut writes: Vec<(String, usize)> = Vec::new();
    for entry in b.entries {
        if let Entry::Step(mut s) = entry {
            bind_event_step(&mut s, fields, &mut writes);
            steps.push(s);
        }
    }
    // Writing the whole-topic field changes where an event goes.
    writes.retain(|(w, _)| Some(w.as_str()) != topic_field);
    problems.extend(raw_writes_problem(format, &writes).map(|p| at(&p)));
    let carry = topic_carry(&b.sinks, fields);
    if b.sinks.is_empty() {
        problems.push(at(&"its events go nowhere; give it a sink"));
    }
    graph_sinks.push(GraphSinkDef {
        name: name.to_string(),
        carried: carry.iter().map(|(n, _)| n.clone()).collect(),
        sinks: b.sinks,
    });
    let tee = TeePlan {
        name: name.to_string(),
        writes,
        carry,
        route: graph_sinks.len() as u16 - 1,
    };
    (tee, steps)
}

/// Whether events go out as they came (no window, no `alert`).
fn passes_events(window: &Option<WindowDef>, stateful: &Option<StatefulDef>) -> bool {
    window.is_none() && stateful.as_ref().is_none_or(|s| s.passes_events())
}

/// Parses an expression and checks its functions; the error is one line.
pub fn parse_expr(src: &str) -> Result<Ast, String> {
    let ast = expr::parse(src)
        .map_err(|e| format!("{} (at column {} of `{src}`)", e.message, e.column))?;
    let mut problems = Vec::new();
    ast.check_functions(&mut problems);
    match problems.is_empty() {
        true => Ok(ast),
        false => Err(problems.join("; ")),
    }
}
