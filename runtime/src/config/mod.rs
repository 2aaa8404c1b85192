//! Pipeline files: YAML → raw structs ([`types`]) → [`ValidPipeline`] → [`Pipeline`].
//!
//! Validation never stops at the first problem: every section and every
//! step is read on its own, and each problem carries the line and column it
//! refers to, what was expected and, for misspellings, a suggestion.
//! `rivulet validate` prints them all; only a [`ValidPipeline`] can be run.
//!
//! - this file: reading the file, the top-level keys and the steps;
//! - [`diag`]: problems with line and column, and the checker;
//! - `source`, `sink`, `window`: the checks of each section;
//! - [`spec`]: what a checked file says; `build`: turning it into a
//!   [`Pipeline`], and the JSON Schema.
//!
//! The rules of the pipeline's shape (order and number of steps, workers)
//! are the plan's ([`crate::plan::rules`]); this module maps their problems
//! to positions in the file.

pub mod types;

use crate::mqtt::topic::{TopicPattern, TopicTemplate};
use crate::mqtt::Endpoint;
use crate::operators::window::{parse_aggregate, WindowDef, WindowKind, WindowPart};
use crate::plan::Format;
use crate::plan::{Pipeline, PipelineBuilder, DEFAULT_MAX_PAYLOAD};
use crate::sinks::mqtt::{BufferOptions, MqttSink, MqttSinkOptions, WhenFull};
use crate::sinks::{FileSink, Sink};
use crate::sources::file::FileSource;
use crate::sources::generator::{self, Generator, GeneratorOptions};
use crate::sources::mqtt::{MqttSource, MqttSourceOptions};
use crate::time::stamp::StampFormat;
use crate::time::{parse_duration, parse_rfc3339};
use marked_yaml::Node;
use std::fmt;
use std::time::Duration;
use types::*;

mod build;
pub mod diag;
mod graph;
mod http;
pub mod peers;
mod sink;
mod source;
pub mod spec;
mod status;
mod window;

pub use build::{json_schema, parse_size, Overrides};
use diag::*;
pub use diag::{ConfigError, Problem};
use http::http_spec;
use peers::check_peers;
use sink::*;
use source::*;
pub use spec::*;
use status::status_spec;
use window::*;

use crate::operators::stateful::StatefulDef;
use crate::plan::rules::{self, StepShape};
pub use crate::util::suggest::suggest;

const TOP_KEYS: &[&str] = &[
    "name",
    "source",
    "steps",
    "sink",
    "sources",
    "streams",
    "late",
    "dead_letter",
    "state",
    "workers",
    "peers",
    "status",
    "http",
];

/// The time settings of a valid pipeline (the plan's own type).
pub use crate::plan::TimeMode as TimeSpec;

/// Reads and validates a pipeline file.
pub fn load(path: &str) -> Result<ValidPipeline, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        file: path.to_string(),
        error,
    })?;
    validate(&text).map_err(|problems| ConfigError::Invalid {
        file: path.to_string(),
        problems,
    })
}

/// Validates pipeline text; returns every problem found.
pub fn validate(text: &str) -> Result<ValidPipeline, Vec<Problem>> {
    let mut c = Checker {
        problems: Vec::new(),
    };
    let root = match marked_yaml::parse_yaml_with_options(
        0,
        text,
        marked_yaml::LoaderOptions::default().error_on_duplicate_keys(true),
    ) {
        Ok(n) => n,
        Err(e) => {
            let (line, column, msg) = load_error(&e);
            c.at(line, column, "", msg);
            return Err(c.problems);
        }
    };
    let Some(map) = root.as_mapping() else {
        c.node(
            &root,
            "",
            "a pipeline file is a mapping with `name`, `source`, `steps` and `sink`",
        );
        return Err(c.problems);
    };
    for (k, _) in map.iter() {
        if !TOP_KEYS.contains(&k.as_str()) {
            let hint = suggest(k.as_str(), TOP_KEYS.iter().copied())
                .map(|s| format!("did you mean `{s}`? "))
                .unwrap_or_default();
            let (l, col) = k
                .span()
                .start()
                .map(|m| (m.line(), m.column()))
                .unwrap_or((0, 0));
            c.at(
                l,
                col,
                "",
                format!(
                    "unknown key `{}`; {hint}expected one of: {}",
                    k.as_str(),
                    TOP_KEYS.join(", ")
                ),
            );
        }
    }
    let get = |k: &str| map.get_node(k);

    let name = match get("name") {
        Some(n) => c.section::<String>(n, "name"),
        None => {
            c.node(&root, "", "missing `name`");
            None
        }
    };
    // The general form: named sources and streams (a job graph).
    let graph_form = get("sources").is_some() || get("streams").is_some();
    let mut graph = None;
    if graph_form {
        for k in ["source", "steps", "sink"] {
            if let Some(n) = get(k) {
                c.node(n, k, format!("`{k}` belongs to a pipeline of one stream; with `sources` and `streams`, each stream has its own `from`, `steps` and `sink`"));
            }
        }
        graph = graph::read(&mut c, &root, get("sources"), get("streams"));
    }
    // A union of several sources: each checked on its own; they share a
    // format and a kind of time (each has its own event-time field and
    // bound, and so its own watermark).
    let mut union = Vec::new();
    if let Some(g) = graph.as_ref().filter(|g| g.sources.len() > 1) {
        let first_format = g.sources[0].1.format.as_ref().map(|f| f.value.clone());
        for (name, s, n) in &g.sources[1..] {
            let format = s.format.as_ref().map(|f| f.value.clone());
            if format.as_deref().unwrap_or("json") != first_format.as_deref().unwrap_or("json") {
                c.node(
                    n,
                    &format!("sources.{name}.format"),
                    format!(
                        "the sources of a union share a format: `{}` reads `{}`",
                        g.sources[0].0,
                        first_format.as_deref().unwrap_or("json")
                    ),
                );
            }
            if let Some((spec, time, max_payload)) = check_source(&mut c, s, n) {
                union.push(UnionSpec {
                    name: name.clone(),
                    source: spec,
                    time,
                    max_payload,
                });
            }
        }
        if let Some(n) = get("peers") {
            c.node(
                n,
                "peers",
                "a union of several sources is not supported in peer mode yet",
            );
        }
    }
    let source = match (&mut graph, get("source")) {
        (Some(g), _) => match g.sources.len() {
            0 => None,
            _ => Some((g.sources[0].1.clone(), g.sources[0].2)),
        },
        (None, _) if graph_form => None,
        (None, Some(n)) => c.section::<SourceConfig>(n, "source").map(|s| (s, n)),
        (None, None) => {
            c.node(&root, "", "missing `source`");
            None
        }
    };
    let checked_source = source
        .as_ref()
        .and_then(|(s, n)| check_source(&mut c, s, n));
    let source_cfg_format = source
        .as_ref()
        .and_then(|(s, _)| s.format.as_ref().map(|f| f.value.clone()));
    if let (Some(g), Some((spec, time, max_payload))) = (
        graph.as_ref().filter(|g| g.sources.len() > 1),
        &checked_source,
    ) {
        union.insert(
            0,
            UnionSpec {
                name: g.sources[0].0.clone(),
                source: spec.clone(),
                time: time.clone(),
                max_payload: *max_payload,
            },
        );
        if let Some(first) = union.first() {
            for u in &union[1..] {
                if std::mem::discriminant(&u.time) != std::mem::discriminant(&first.time) {
                    if let Some((_, _, n)) = g.sources.iter().find(|(name, _, _)| *name == u.name) {
                        c.node(
                            n,
                            &format!("sources.{}", u.name),
                            format!(
                            "the sources of a union share a kind of time: `{}` has {}, this one {}",
                            first.name, first.time.kind(), u.time.kind()
                        ),
                        );
                    }
                }
            }
        }
    }

    // Steps, each on its own so one bad step does not hide the others.
    let mut steps: Vec<(StepConfig, &Node)> = Vec::new();
    if let Some(g) = &mut graph {
        steps = std::mem::take(&mut g.head.steps);
    } else if let Some(n) = get("steps") {
        match n.as_sequence() {
            Some(seq) => {
                for (i, item) in seq.iter().enumerate() {
                    if let Some(s) = c.section::<StepConfig>(item, &format!("steps[{i}]")) {
                        steps.push((s, item));
                    }
                }
            }
            None => c.node(n, "steps", "expected a list of steps (`- map: ...`, `- filter: ...`, `- key_by: ...`, `- window: ...`)"),
        }
    }

    // The sinks of the (first) stream: where they are, and their path.
    let (sink_node, sink_path) = match &graph {
        Some(g) => (g.head.sink, format!("streams.{}.sink", g.head.name)),
        None => (get("sink"), "sink".to_string()),
    };
    let sinks = match sink_node {
        Some(n) => sink_list(&mut c, n, &sink_path),
        None if graph_form => Vec::new(),
        None => {
            c.node(
                &root,
                "",
                "missing `sink` (for example `sink: { stdout: {} }`)",
            );
            Vec::new()
        }
    };
    let late = get("late")
        .map(|n| sink_list(&mut c, n, "late"))
        .unwrap_or_default();
    let dead_letter = get("dead_letter")
        .map(|n| sink_list(&mut c, n, "dead_letter"))
        .unwrap_or_default();

    let mut state_dir = None;
    let mut checkpoint_interval = None;
    if let Some(n) = get("state") {
        if let Some(s) = c.section::<StateConfig>(n, "state") {
            if s.dir.trim().is_empty() {
                c.sp(&s.dir, "state.dir", "must not be empty");
            }
            // `{host}` stands for the host name: several peers (Swarm
            // replicas) may share one volume, each in its own directory.
            state_dir = Some(if s.dir.contains("{host}") {
                let host = crate::util::host_name().unwrap_or_default();
                if host.is_empty() {
                    c.sp(
                        &s.dir,
                        "state.dir",
                        "`{host}`: this machine has no host name",
                    );
                }
                s.dir.replace("{host}", &host)
            } else {
                s.dir.value.clone()
            });
            if let Some(d) = &s.checkpoint_interval {
                checkpoint_interval = c.positive(d, "state.checkpoint_interval");
            }
        }
    }
    let workers = get("workers").and_then(|n| {
        let w = c.section::<usize>(n, "workers")?;
        if let Some(p) = rules::check_workers(w) {
            c.node(n, "workers", p.message);
            return None;
        }
        Some(w)
    });
    let windowed = steps
        .iter()
        .any(|(s, _)| matches!(s, StepConfig::Window(_)));
    // The field holding the whole topic: writing it rewrites the topic.
    let whole_topic = match &checked_source {
        Some((SourceSpec::Mqtt(m), _, _)) => m.topic_field.clone(),
        _ => None,
    };
    // `retain: keep` needs the flag as it was published: MQTT 5's Retain
    // As Published (3.1.1 brokers clear it on the way to a subscriber).
    if sinks
        .iter()
        .any(|s| matches!(s, SinkSpec::Mqtt(m) if m.keep_retain))
    {
        let v5 =
            matches!(&checked_source, Some((SourceSpec::Mqtt(m), _, _)) if m.conn.version == 5);
        if let Some(n) = sink_node {
            let path = format!("{sink_path}.mqtt.retain");
            if windowed {
                c.node(n, &path, "`keep` keeps the flag of forwarded messages; window results have none (use `true` or `false`)");
            } else if checked_source.is_some() && !v5 {
                c.node(n, &path, "`keep` needs an MQTT source with `version: 5`: MQTT 3.1.1 brokers clear the retain flag of the messages they forward to a subscriber");
            }
        }
    }
    let source_is_mqtt = matches!(checked_source, Some((SourceSpec::Mqtt(_), _, _)));
    let source_qos0 = matches!(&checked_source, Some((SourceSpec::Mqtt(m), _, _)) if m.qos == 0);
    let peers = get("peers").and_then(|n| {
        let p = c.section::<PeersConfig>(n, "peers")?;
        if source_qos0 {
            c.node(
                n,
                "peers",
                "peer mode needs `qos: 1` on the mqtt source: a peer's input is journaled and acknowledged, so a restarted peer loses nothing",
            );
        }
        check_peers(&mut c, &p, n, source_is_mqtt, state_dir.is_some())
    });

    // Steps: meaning and order.
    // Generated events have fixed fields, so misspellings can be caught.
    let known: Option<Vec<String>> = source
        .as_ref()
        .filter(|(s, _)| s.generator.is_some() && s.mqtt.is_none() && s.file.is_none())
        .map(|_| generator::FIELDS.iter().map(|s| s.to_string()).collect());
    let time = checked_source
        .as_ref()
        .map(|s| s.1.clone())
        .unwrap_or(TimeSpec::None);
    if let (Some(fields), TimeSpec::Event { field, .. }, Some((src, _))) = (&known, &time, &source)
    {
        if let Some(et) = &src.event_time {
            check_field(
                &mut c,
                fields,
                field,
                et.field.line,
                et.field.column,
                "source.event_time.field",
            );
        }
    }
    let has_time = checked_source.as_ref().map(|_| time != TimeSpec::None);
    let rules_ctx = StepRules {
        peers: peers.is_some(),
        raw: source_cfg_format.as_deref() == Some("raw"),
        windowed,
        whole_topic: whole_topic.as_deref(),
        has_time,
    };
    let steps_path = match &graph {
        Some(g) => format!("streams.{}.steps", g.head.name),
        None => "steps".to_string(),
    };
    let source_known = known.clone();
    let head_path = |i: usize| step_path(graph.as_ref().map(|g| &g.head), &steps_path, i);
    let (specs, results, known_after) =
        check_step_list(&mut c, &steps, &head_path, known, &rules_ctx);
    if let (Some(fields), Some(node)) = (&results, sink_node) {
        check_sink_fields(&mut c, &sinks, node, &sink_path, fields);
    }
    let graph_spec = graph.as_ref().map(|g| {
        // The first stream's records have known fields when they are
        // results (a window's or an alert's).
        let head_out = results.as_ref().and(known_after.clone());
        let inputs = StreamInputs {
            head: head_out,
            events: source_known,
            has_time,
            raw: source_cfg_format.as_deref() == Some("raw"),
            source_v5: matches!(&checked_source, Some((SourceSpec::Mqtt(m), _, _)) if m.conn.version == 5),
        };
        check_streams(&mut c, g, inputs, peers.is_some(), get("streams"))
    });

    if !c.problems.is_empty() {
        c.problems.sort_by_key(|p| (p.line == 0, p.line, p.column));
        // A shared preparation's steps are checked in each stream that
        // reads it: one problem per place in the file.
        c.problems.dedup_by(|a, b| {
            a.line != 0 && (a.line, a.column, &a.message) == (b.line, b.column, &b.message)
        });
        return Err(c.problems);
    }
    let (Some(name), Some((source, time, max_payload))) = (name, checked_source) else {
        return Err(c.problems);
    };
    let format = match source_cfg_format.as_deref() {
        Some("text") => Format::Text,
        Some("raw") => Format::Raw,
        _ => Format::Json,
    };
    let status = status_spec(&mut c, get("status"), &name, &source, &sinks, &peers)?;
    let http = http_spec(&mut c, get("http"))?;
    Ok(ValidPipeline {
        name,
        source,
        format,
        time,
        max_payload,
        steps: specs,
        sinks,
        late,
        dead_letter,
        state_dir,
        checkpoint_interval,
        workers,
        peers,
        status,
        http,
        graph: graph_spec,
        union,
    })
}

/// Checks the steps and sinks of a job graph's further streams, each
/// reading the records of streams before it (the first stream's fields:
/// `head_out`, `None` when they are not results); and that every
/// stream's records go somewhere.
/// The path of step `i` of a stream (`prefix[i]`): a shared preparation's
/// steps, folded in first, are named where they are written.
fn step_path(stream: Option<&graph::StreamRead<'_>>, prefix: &str, i: usize) -> String {
    match stream.and_then(|s| s.prepared.iter().find(|(_, at, n)| i >= *at && i < at + n)) {
        Some((name, at, _)) => format!("streams.{name}.steps[{}]", i - at),
        None => {
            let shift = stream.map_or(0, |s| s.prepared.iter().map(|p| p.2).sum::<usize>());
            format!("{prefix}[{}]", i - shift.min(i))
        }
    }
}

/// What the streams of a job graph read.
struct StreamInputs {
    /// The first stream's output fields (`None`: not results).
    head: Option<Vec<String>>,
    /// The events' fields, when the source knows them.
    events: Option<Vec<String>>,
    has_time: Option<bool>,
    /// The sources' format is `raw` (events are not decoded).
    raw: bool,
    /// The (first) source is MQTT 5 (it can keep retain flags).
    source_v5: bool,
}

fn check_streams(
    c: &mut Checker,
    g: &graph::GraphRead<'_>,
    inputs: StreamInputs,
    peers: bool,
    streams_node: Option<&Node>,
) -> GraphSpec {
    let StreamInputs {
        head: head_out,
        events,
        has_time,
        raw,
        source_v5,
    } = inputs;
    if let (true, false, Some(n)) = (peers, g.streams.is_empty(), streams_node) {
        c.node(
            n,
            "streams",
            "job graphs of several streams are not supported in peer mode yet",
        );
    }
    let tee = |s: &graph::StreamRead<'_>| {
        s.reads_sources
            && s.steps
                .iter()
                .all(|(st, _)| matches!(st, StepConfig::Map(_) | StepConfig::Filter(_)))
    };
    if g.streams.iter().any(|s| s.reads_sources && !tee(s)) {
        let h = &g.head;
        if raw {
            c.at(h.at.0, h.at.1, &format!("streams.{}", h.name), "several streams read the sources: they read decoded events, which `format: raw` does not decode (use `json` or `text`)");
        }
    }
    // Each stream's output fields (`None`: not results, or not known).
    let mut outputs: Vec<(&str, Option<Vec<String>>)> = vec![(&g.head.name, head_out)];
    let mut read: Vec<&str> = Vec::new();
    let mut streams = Vec::new();
    for s in &g.streams {
        let path = format!("streams.{}", s.name);
        let mut input: Option<Vec<String>> = Some(Vec::new());
        if tee(s) {
            // Pass-through events, with steps of its own: checked against
            // the events' fields; its sinks get the events.
            input = events.clone();
        } else if s.reads_sources {
            input = events.clone();
            let first_keyed = s.steps.iter().find_map(|(st, _)| match st {
                StepConfig::Window(_) | StepConfig::Alert(_) => Some(true),
                StepConfig::Deduplicate(_) | StepConfig::Deadband(_) => Some(false),
                _ => None,
            });
            if first_keyed != Some(true) {
                c.at(s.at.0, s.at.1, &path, format!(
                    "`{}` reads the sources, so this stream (which reads them too) needs a window or an `alert`: it reads the events' fields by name, and what it puts out are results",
                    g.head.name
                ));
            }
        }
        for f in s.from.iter().filter(|_| !s.reads_sources) {
            read.push(f);
            match outputs.iter().find(|(n, _)| n == f) {
                Some((_, Some(fields))) => {
                    if let Some(input) = input.as_mut() {
                        for field in fields {
                            if !input.contains(field) {
                                input.push(field.clone());
                            }
                        }
                    }
                }
                Some((_, None)) if *f == g.head.name => {
                    let msg = format!("stream `{f}` has no window or `alert`, so other streams cannot read it yet (they read results, whose fields are known)");
                    match s.from_node {
                        Some(n) => c.node(n, &format!("{path}.from"), msg),
                        None => c.at(s.at.0, s.at.1, &path, msg),
                    }
                    input = None;
                }
                _ => input = None,
            }
        }
        let rules = StepRules {
            peers: false,
            raw: false,
            windowed: true,
            whole_topic: None,
            has_time,
        };
        let steps_path = format!("{path}.steps");
        let (specs, _, out) = check_step_list(
            c,
            &s.steps,
            &|i| step_path(Some(s), &steps_path, i),
            input,
            &rules,
        );
        let sink_path = format!("{path}.sink");
        let sinks = s
            .sink
            .map(|n| sink_list(c, n, &sink_path))
            .unwrap_or_default();
        if let Some(n) = s.sink {
            // A tee's sinks get events, whose fields are not all known.
            if let (false, Some(fields)) = (tee(s), &out) {
                check_sink_fields(c, &sinks, n, &sink_path, fields);
            }
            if sinks
                .iter()
                .any(|s| matches!(s, SinkSpec::Mqtt(m) if m.keep_retain))
            {
                let msg = match (tee(s), source_v5) {
                    (true, true) => None,
                    (true, false) => Some("`keep` needs an MQTT source with `version: 5`: MQTT 3.1.1 brokers clear the retain flag of the messages they forward to a subscriber"),
                    (false, _) => Some("`keep` keeps the flag of forwarded messages; this stream's records have none (use `true` or `false`)"),
                };
                if let Some(msg) = msg {
                    c.node(n, &format!("{sink_path}.mqtt.retain"), msg);
                }
            }
        }
        outputs.push((&s.name, out));
        streams.push(StreamSpec {
            name: s.name.clone(),
            from: s.from.clone(),
            reads_sources: s.reads_sources,
            steps: specs,
            sinks,
        });
    }
    let heads_sinks = g.head.sink.is_some();
    for (name, at, has_sink) in std::iter::once((&g.head.name, g.head.at, heads_sinks))
        .chain(g.streams.iter().map(|s| (&s.name, s.at, s.sink.is_some())))
    {
        if !has_sink && !read.contains(&name.as_str()) {
            c.at(
                at.0,
                at.1,
                &format!("streams.{name}"),
                "this stream's records go nowhere: give it a `sink`, or read it in another stream's `from`",
            );
        }
    }
    GraphSpec {
        head: g.head.name.clone(),
        streams,
    }
}

/// What the checks of a step list need to know of the pipeline.
struct StepRules<'a> {
    peers: bool,
    /// The source's `format` is `raw`.
    raw: bool,
    /// The pipeline has a window (its sinks get results, not events).
    windowed: bool,
    /// The field holding the whole topic (writing it rewrites the topic).
    whole_topic: Option<&'a str>,
    /// Whether records have a time; `None` when not known.
    has_time: Option<bool>,
}

/// Checks the steps named by `prefix` (`steps[i]`, `streams.<name>.steps[i]`), whose
/// input has the fields `known` (when known); returns their specs, the
/// fields of the last keyed step's results (when there is one), and the
/// fields known after the last step.
fn check_step_list(
    c: &mut Checker,
    steps: &[(StepConfig, &Node)],
    prefix: &dyn Fn(usize) -> String,
    mut known: Option<Vec<String>>,
    r: &StepRules<'_>,
) -> (Vec<StepSpec>, Option<Vec<String>>, Option<Vec<String>>) {
    let mut specs = Vec::new();
    // The shape rules (order and number of steps) are the plan's.
    let shapes: Vec<StepShape> = steps
        .iter()
        .map(|(s, _)| match s {
            StepConfig::Map(_) | StepConfig::Filter(_) => StepShape::Step,
            StepConfig::KeyBy(k) => StepShape::KeyBy {
                fields: k.value.0.len(),
            },
            StepConfig::Window(_) => StepShape::Window,
            StepConfig::Deduplicate(_) | StepConfig::Deadband(_) => {
                StepShape::Stateful { passes: true }
            }
            StepConfig::Alert(_) => StepShape::Stateful { passes: false },
        })
        .collect();
    for p in rules::check_steps(&shapes, r.has_time) {
        if let rules::Subject::Step { index, part } = p.subject {
            let path = match part {
                Some(part) => format!("{}.{part}", prefix(index)),
                None => prefix(index),
            };
            c.node(steps[index].1, &path, p.message);
        }
    }
    // The key_by of the current segment; the fields of the records the
    // last keyed step puts out (and the steps after it); where the first
    // keyed step is.
    let mut segment_key: Vec<String> = Vec::new();
    let mut results: Option<Vec<String>> = None;
    let mut first_keyed: Option<usize> = None;
    for (i, (step, node)) in steps.iter().enumerate() {
        let path = prefix(i);
        if let (Some(k), true) = (first_keyed, r.peers) {
            c.node(
                node,
                &path,
                format!("steps after steps[{k}] (a window or stateful step) are not supported in peer mode yet"),
            );
        }
        match step {
            StepConfig::Map(assign) => {
                let mut out = Vec::new();
                for (k, v) in assign {
                    let p = format!("{path}.map.{}", k.value);
                    if let Some(ast) = c.expr(v, &p) {
                        if let Some(fields) = &known {
                            let mut used = Vec::new();
                            ast.fields(&mut used);
                            for f in used {
                                check_field(c, fields, &f, v.line, v.column, &p);
                            }
                        }
                    }
                    if !valid_field_name(k) {
                        c.sp(k, &p, "a field name is letters, digits and `_`, with `.` between nested names");
                    }
                    if r.raw && !r.windowed && r.whole_topic != Some(k.value.as_str()) {
                        c.sp(k, &p, "`format: raw` forwards payloads unchanged, so a step cannot add fields to them; use `format: json` or `text`, or write only `topic`");
                    }
                    if let Some(fields) = &mut known {
                        fields.push(k.value.clone());
                    }
                    if let Some(fields) = results.as_mut().filter(|f| !f.contains(&k.value)) {
                        fields.push(k.value.clone());
                    }
                    out.push((k.value.clone(), v.0.clone()));
                }
                if assign.is_empty() {
                    c.node(node, &path, "`map` needs at least one `field: expression`");
                }
                specs.push(StepSpec::Map(out));
            }
            StepConfig::Filter(e) => {
                let p = format!("{path}.filter");
                if let Some(ast) = c.expr(e, &p) {
                    if let Some(fields) = &known {
                        let mut used = Vec::new();
                        ast.fields(&mut used);
                        for f in used {
                            check_field(c, fields, &f, e.line, e.column, &p);
                        }
                    }
                }
                specs.push(StepSpec::Filter(e.0.clone()));
            }
            StepConfig::KeyBy(k) => {
                let p = format!("{path}.key_by");
                let fields: Vec<String> = k.value.0.clone();
                for f in &fields {
                    if !valid_field_name(f) {
                        c.sp(k, &p, format!("`{f}` is not a field name"));
                    } else if let Some(known) = &known {
                        check_field(c, known, f, k.line, k.column, &p);
                    }
                }
                segment_key = fields.clone();
                specs.push(StepSpec::KeyBy(fields));
            }
            StepConfig::Window(w) => {
                first_keyed.get_or_insert(i);
                if let Some(def) =
                    check_window(c, w, node, &format!("{path}.window"), known.as_deref())
                {
                    // Steps after a window read its results, which have
                    // exactly these fields.
                    let fields = def.output_schema(&segment_key).names;
                    known = Some(fields.clone());
                    results = Some(fields);
                    specs.push(StepSpec::Window(def));
                }
                segment_key.clear();
            }
            StepConfig::Deduplicate(d) => {
                first_keyed.get_or_insert(i);
                let p = format!("{path}.deduplicate");
                if d.max_keys == Some(0) {
                    c.node(
                        node,
                        &format!("{p}.max_keys"),
                        "must be at least 1 (or left out: no bound)",
                    );
                }
                for f in &d.fields.value.0 {
                    if !valid_field_name(f) {
                        c.sp(
                            &d.fields,
                            &format!("{p}.fields"),
                            format!("`{f}` is not a field name"),
                        );
                    } else if let Some(known) = &known {
                        check_field(
                            c,
                            known,
                            f,
                            d.fields.line,
                            d.fields.column,
                            &format!("{p}.fields"),
                        );
                    }
                }
                if d.fields.value.0.is_empty() {
                    c.sp(
                        &d.fields,
                        &format!("{p}.fields"),
                        "needs at least one field",
                    );
                }
                if let Some(within) = c.positive(&d.within, &format!("{p}.within")) {
                    specs.push(StepSpec::Stateful(
                        StatefulDef::Deduplicate {
                            fields: d.fields.value.0.clone(),
                            within,
                        },
                        d.max_keys,
                    ));
                }
            }
            StepConfig::Deadband(d) => {
                first_keyed.get_or_insert(i);
                let p = format!("{path}.deadband");
                if d.max_keys == Some(0) {
                    c.node(
                        node,
                        &format!("{p}.max_keys"),
                        "must be at least 1 (or left out: no bound)",
                    );
                }
                if !valid_field_name(&d.field) {
                    c.sp(
                        &d.field,
                        &format!("{p}.field"),
                        format!("`{}` is not a field name", d.field.value),
                    );
                } else if let Some(known) = &known {
                    check_field(
                        c,
                        known,
                        &d.field.value,
                        d.field.line,
                        d.field.column,
                        &format!("{p}.field"),
                    );
                }
                if !(d.delta.value.is_finite() && d.delta.value >= 0.0) {
                    c.sp(
                        &d.delta,
                        &format!("{p}.delta"),
                        "must be a number of at least 0",
                    );
                }
                let silence = match &d.max_silence {
                    Some(m) => c.positive(m, &format!("{p}.max_silence")).map(Some),
                    None => Some(None),
                };
                if let Some(max_silence) = silence {
                    specs.push(StepSpec::Stateful(
                        StatefulDef::Deadband {
                            field: d.field.value.clone(),
                            delta: d.delta.value,
                            max_silence,
                        },
                        d.max_keys,
                    ));
                }
            }
            StepConfig::Alert(a) => {
                first_keyed.get_or_insert(i);
                let p = format!("{path}.alert");
                if a.max_keys == Some(0) {
                    c.node(
                        node,
                        &format!("{p}.max_keys"),
                        "must be at least 1 (or left out: no bound)",
                    );
                }
                if a.name.value.trim().is_empty() {
                    c.sp(&a.name, &format!("{p}.name"), "must not be empty");
                }
                let mut exprs = Vec::new();
                for (e, part) in
                    std::iter::once((&a.when, "when")).chain(a.clear.iter().map(|e| (e, "clear")))
                {
                    let ep = format!("{p}.{part}");
                    if let Some(ast) = c.expr(e, &ep) {
                        if let Some(fields) = &known {
                            let mut used = Vec::new();
                            ast.fields(&mut used);
                            for f in used {
                                check_field(c, fields, &f, e.line, e.column, &ep);
                            }
                        }
                        exprs.push(ast);
                    }
                }
                let for_ms = match &a.for_ {
                    Some(d) => c.duration(d, &format!("{p}.for")),
                    None => Some(0),
                };
                let want = 1 + a.clear.is_some() as usize;
                if let (Some(for_ms), true) = (for_ms, exprs.len() == want) {
                    let mut exprs = exprs.into_iter();
                    if let Some(when) = exprs.next() {
                        specs.push(StepSpec::Stateful(
                            StatefulDef::Alert {
                                name: a.name.value.clone(),
                                when,
                                for_ms,
                                clear: exprs.next(),
                            },
                            a.max_keys,
                        ));
                    }
                }
                let mut fields = std::mem::take(&mut segment_key);
                fields.extend(["alert", "state", "at"].map(String::from));
                known = Some(fields.clone());
                results = Some(fields);
            }
        }
    }

    (specs, results, known)
}

/// Checks that the MQTT topics and Home Assistant fields of `sinks` name
/// fields of the results they get (`fields`).
fn check_sink_fields(
    c: &mut Checker,
    sinks: &[SinkSpec],
    node: &Node,
    path: &str,
    fields: &[String],
) {
    let hint = |f: &str| {
        suggest(f, fields.iter().map(String::as_str))
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default()
    };
    for (i, sink) in sinks.iter().enumerate() {
        let SinkSpec::Mqtt(m) = sink else {
            continue;
        };
        for f in m.topic.fields() {
            if !fields.contains(&f) {
                c.node(
                    node,
                    &format!("{path}[{i}].mqtt.topic"),
                    format!(
                        "the topic uses `{{{f}}}`, which window results lack{} (they have: {})",
                        hint(&f),
                        fields.join(", ")
                    ),
                );
            }
        }
        // Home Assistant announces result fields, and names devices by them.
        let announced = m.home_assistant.iter().flat_map(|d| {
            d.fields
                .iter()
                .map(|f| f.field.clone())
                .chain(d.name_fields())
        });
        for f in announced {
            if !fields.contains(&f) {
                c.node(
                    node,
                    &format!("{path}[{i}].mqtt.home_assistant"),
                    format!(
                        "`{f}` is not a field of the results{} (they have: {})",
                        hint(&f),
                        fields.join(", ")
                    ),
                );
            }
        }
    }
}

fn valid_field_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            let mut ch = part.chars();
            ch.next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && ch.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

fn check_field(
    c: &mut Checker,
    known: &[String],
    field: &str,
    line: usize,
    column: usize,
    path: &str,
) {
    if known.iter().any(|k| k == field) {
        return;
    }
    let hint = suggest(field, known.iter().map(String::as_str))
        .map(|s| format!("; did you mean `{s}`?"))
        .unwrap_or_default();
    c.at(
        line,
        column,
        path,
        format!(
            "unknown field `{field}`{hint} (fields known here: {})",
            known.join(", ")
        ),
    );
}
