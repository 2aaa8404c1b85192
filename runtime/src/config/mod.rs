//! Pipeline files: YAML → raw structs ([`types`]) → [`ValidPipeline`] → [`Pipeline`].
//!
//! Validation never stops at the first problem: every section and every
//! step is read on its own, and each problem carries the line and column it
//! refers to, what was expected and, for misspellings, a suggestion.
//! `rivulet validate` prints them all; only a [`ValidPipeline`] can be run.

pub mod types;

use crate::mqtt::topic::{TopicPattern, TopicTemplate};
use crate::mqtt::Endpoint;
use crate::operators::window::{parse_aggregate, WindowDef, WindowKind};
use crate::plan::Format;
use crate::plan::{Pipeline, PipelineBuilder, DEFAULT_MAX_PAYLOAD};
use crate::sinks::mqtt::{BufferOptions, MqttSink, MqttSinkOptions, WhenFull};
use crate::sinks::{FileSink, Sink};
use crate::sources::file::FileSource;
use crate::sources::generator::{self, Generator, GeneratorOptions};
use crate::sources::mqtt::{MqttSource, MqttSourceOptions};
use crate::time::{parse_duration, parse_rfc3339};
use marked_yaml::Node;
use std::fmt;
use std::time::Duration;
use types::*;

/// One problem in a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based; 0 when the position is unknown.
    pub line: usize,
    pub column: usize,
    /// Where in the file's structure, like `steps[2].window`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: ", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {error}")]
    Read { file: String, error: std::io::Error },
    #[error("{}", render(.file, .problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
    #[error("{file}: {message}")]
    Build { file: String, message: String },
}

fn render(file: &str, problems: &[Problem]) -> String {
    let mut s = format!(
        "{file}: {} problem{}",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        s.push_str(&format!("\n  {file}:{p}"));
    }
    s
}

pub use crate::util::suggest::suggest;

const TOP_KEYS: &[&str] = &[
    "name",
    "source",
    "steps",
    "sink",
    "late",
    "dead_letter",
    "state",
    "workers",
];

/// The time settings of a valid pipeline (the plan's own type).
pub use crate::plan::TimeMode as TimeSpec;

/// A checked source.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceSpec {
    File { path: String },
    Generator(GeneratorSpec),
    Mqtt(MqttSourceSpec),
}

/// Where a password comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum PasswordSpec {
    None,
    Inline(String),
    Env(String),
    File(String),
}

/// Checked connection settings of an MQTT source or sink.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnSpec {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// 4 (MQTT 3.1.1) or 5.
    pub version: u8,
    pub client_id: Option<String>,
    /// `None`: not set; a journaled source defaults to a persistent session.
    pub clean_session: Option<bool>,
    pub keep_alive_ms: i64,
    pub username: Option<String>,
    pub password: PasswordSpec,
    pub ca_file: Option<String>,
    pub client_cert: Option<(String, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MqttSourceSpec {
    pub conn: ConnSpec,
    pub topics: Vec<TopicPattern>,
    pub qos: u8,
    pub topic_field: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MqttSinkSpec {
    pub conn: ConnSpec,
    pub topic: TopicTemplate,
    pub qos: u8,
    pub retain: bool,
    pub memory: usize,
    pub disk: usize,
    pub dir: Option<String>,
    pub when_full: WhenFull,
    pub drain_timeout_ms: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GeneratorSpec {
    pub sensors: u32,
    pub rate: Option<f64>,
    pub disorder_ms: i64,
    pub seed: u64,
    pub count: Option<u64>,
    pub start_ms: Option<i64>,
}

/// A checked sink.
#[derive(Clone, Debug, PartialEq)]
pub enum SinkSpec {
    File { path: String },
    Stdout,
    Mqtt(Box<MqttSinkSpec>),
}

/// A checked step.
#[derive(Clone, Debug)]
pub enum StepSpec {
    Map(Vec<(String, String)>),
    Filter(String),
    KeyBy(Vec<String>),
    Window(WindowDef),
}

/// A pipeline file that passed validation.
#[derive(Clone, Debug)]
pub struct ValidPipeline {
    pub name: String,
    pub source: SourceSpec,
    pub format: Format,
    pub time: TimeSpec,
    pub max_payload: usize,
    pub steps: Vec<StepSpec>,
    pub sinks: Vec<SinkSpec>,
    pub late: Vec<SinkSpec>,
    pub dead_letter: Vec<SinkSpec>,
    pub state_dir: Option<String>,
    pub checkpoint_interval: Option<i64>,
    pub workers: Option<usize>,
}

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

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn at(&mut self, line: usize, column: usize, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            line,
            column,
            path: path.to_string(),
            message: message.into(),
        });
    }
    fn node(&mut self, node: &Node, path: &str, message: impl Into<String>) {
        let (l, c) = pos(node);
        self.at(l, c, path, message);
    }
    fn sp<T>(&mut self, v: &Sp<T>, path: &str, message: impl Into<String>) {
        self.at(v.line, v.column, path, message);
    }
    /// Deserializes one section, recording its problem.
    fn section<T: serde::de::DeserializeOwned>(&mut self, node: &Node, path: &str) -> Option<T> {
        match marked_yaml::from_node::<T>(node) {
            Ok(v) => Some(v),
            Err(e) => {
                let (line, column) = match &*e {
                    // Point at the misspelled key itself, not its mapping.
                    marked_yaml::Error::UnknownFieldError(field, _, _) => find_key(node, field),
                    _ => None,
                }
                .or_else(|| e.start_mark().map(|m| (m.line(), m.column())))
                .unwrap_or_else(|| pos(node));
                let message = match &*e {
                    marked_yaml::Error::UnknownFieldError(field, expected, _) => {
                        let hint = suggest(field, expected.iter().copied())
                            .map(|s| format!("did you mean `{s}`? "))
                            .unwrap_or_default();
                        format!(
                            "unknown key `{field}`; {hint}expected one of: {}",
                            expected.join(", ")
                        )
                    }
                    other => tidy_serde_message(&other.to_string()),
                };
                self.at(line, column, path, message);
                None
            }
        }
    }
    fn duration(&mut self, d: &DurationText, path: &str) -> Option<i64> {
        match parse_duration(d) {
            Ok(ms) => Some(ms),
            Err(e) => {
                self.sp(d, path, e);
                None
            }
        }
    }
    fn positive(&mut self, d: &DurationText, path: &str) -> Option<i64> {
        let ms = self.duration(d, path)?;
        if ms == 0 {
            self.sp(d, path, "must be greater than zero");
            return None;
        }
        Some(ms)
    }
    fn expr(&mut self, e: &Sp<Scalar>, path: &str) -> Option<crate::expr::Ast> {
        match crate::expr::parse(&e.0) {
            Ok(ast) => {
                let mut problems = Vec::new();
                ast.check_functions(&mut problems);
                for p in &problems {
                    self.sp(e, path, p.clone());
                }
                problems.is_empty().then_some(ast)
            }
            Err(err) => {
                self.at(
                    e.line,
                    e.column + err.column.saturating_sub(1),
                    path,
                    format!("bad expression `{}`: {}", e.0, err.message),
                );
                None
            }
        }
    }
}

/// Position of the first mapping key named `key` under `node`.
fn find_key(node: &Node, key: &str) -> Option<(usize, usize)> {
    match node {
        Node::Mapping(m) => m.iter().find_map(|(k, v)| {
            if k.as_str() == key {
                k.span().start().map(|m| (m.line(), m.column()))
            } else {
                find_key(v, key)
            }
        }),
        Node::Sequence(s) => s.iter().find_map(|n| find_key(n, key)),
        Node::Scalar(_) => None,
    }
}

fn pos(node: &Node) -> (usize, usize) {
    node.span()
        .start()
        .map(|m| (m.line(), m.column()))
        .unwrap_or((0, 0))
}

/// serde's messages name Rust types; say what the file should hold instead.
fn tidy_serde_message(m: &str) -> String {
    m.replace("unknown variant", "unknown kind")
        .replace("variant identifier", "kind")
        .replace("struct ", "")
        .replace(
            "data did not match any variant of untagged enum OneOrMany",
            "expected one item or a list",
        )
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
    let source = match get("source") {
        Some(n) => c.section::<SourceConfig>(n, "source").map(|s| (s, n)),
        None => {
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

    // Steps, each on its own so one bad step does not hide the others.
    let mut steps: Vec<(StepConfig, &Node)> = Vec::new();
    if let Some(n) = get("steps") {
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

    let sinks = match get("sink") {
        Some(n) => sink_list(&mut c, n, "sink"),
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
            state_dir = Some(s.dir.value.clone());
            if let Some(d) = &s.checkpoint_interval {
                checkpoint_interval = c.positive(d, "state.checkpoint_interval");
            }
        }
    }
    let workers = get("workers").and_then(|n| {
        let w = c.section::<usize>(n, "workers")?;
        if w == 0 || w > 256 {
            c.node(n, "workers", format!("must be between 1 and 256, got {w}"));
            return None;
        }
        Some(w)
    });

    // Steps: meaning and order.
    // Generated events have fixed fields, so misspellings can be caught.
    let mut known: Option<Vec<String>> = source
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
    let mut specs = Vec::new();
    let mut seen_key: Option<usize> = None;
    let mut seen_window: Option<usize> = None;
    for (i, (step, node)) in steps.iter().enumerate() {
        let path = format!("steps[{i}]");
        if let Some(w) = seen_window {
            c.node(node, &path, format!("steps after the window (steps[{w}]) are not supported; the window must be the last step"));
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
                                check_field(&mut c, fields, &f, v.line, v.column, &p);
                            }
                        }
                    }
                    if !valid_field_name(k) {
                        c.sp(k, &p, "a field name is letters, digits and `_`, with `.` between nested names");
                    }
                    if let Some(fields) = &mut known {
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
                            check_field(&mut c, fields, &f, e.line, e.column, &p);
                        }
                    }
                }
                specs.push(StepSpec::Filter(e.0.clone()));
            }
            StepConfig::KeyBy(k) => {
                let p = format!("{path}.key_by");
                if let Some(first) = seen_key {
                    c.node(
                        node,
                        &p,
                        format!("only one key_by is allowed (already at steps[{first}])"),
                    );
                }
                seen_key = Some(i);
                let fields: Vec<String> = k.value.0.clone();
                if fields.is_empty() {
                    c.node(node, &p, "key_by needs at least one field");
                }
                for f in &fields {
                    if !valid_field_name(f) {
                        c.sp(k, &p, format!("`{f}` is not a field name"));
                    } else if let Some(known) = &known {
                        check_field(&mut c, known, f, k.line, k.column, &p);
                    }
                }
                specs.push(StepSpec::KeyBy(fields));
            }
            StepConfig::Window(w) => {
                if let Some(first) = seen_window {
                    c.node(
                        node,
                        &path,
                        format!("only one window is allowed (already at steps[{first}])"),
                    );
                }
                seen_window = Some(i);
                if let Some(def) =
                    check_window(&mut c, w, node, &format!("{path}.window"), known.as_deref())
                {
                    specs.push(StepSpec::Window(def));
                }
                if time == TimeSpec::None && checked_source.is_some() {
                    c.node(node, &path, "a window needs time: set `source.event_time` (or `source.time: processing`)");
                }
            }
        }
    }
    if let (Some(k), None) = (seen_key, seen_window) {
        c.node(
            steps[k].1,
            &format!("steps[{k}].key_by"),
            "key_by without a window has no effect; add a `window` step after it",
        );
    }

    // A window's results have known fields: check the MQTT topics that use them.
    if let Some(StepSpec::Window(w)) = specs.iter().find(|s| matches!(s, StepSpec::Window(_))) {
        let mut fields: Vec<String> = specs
            .iter()
            .find_map(|s| match s {
                StepSpec::KeyBy(k) => Some(k.clone()),
                _ => None,
            })
            .unwrap_or_default();
        fields.push("window_start".into());
        fields.push("window_end".into());
        fields.extend(w.aggregates.iter().map(|a| a.name.clone()));
        for (i, sink) in sinks.iter().enumerate() {
            if let SinkSpec::Mqtt(m) = sink {
                for f in m.topic.fields() {
                    if let (false, Some(node)) = (fields.contains(&f), get("sink")) {
                        let hint = suggest(&f, fields.iter().map(String::as_str))
                            .map(|s| format!("; did you mean `{s}`?"))
                            .unwrap_or_default();
                        c.node(node, &format!("sink[{i}].mqtt.topic"), format!(
                            "the topic uses `{{{f}}}`, which window results lack{hint} (they have: {})",
                            fields.join(", ")
                        ));
                    }
                }
            }
        }
    }

    if !c.problems.is_empty() {
        c.problems.sort_by_key(|p| (p.line == 0, p.line, p.column));
        return Err(c.problems);
    }
    let (Some(name), Some((source, time, max_payload))) = (name, checked_source) else {
        return Err(c.problems);
    };
    let format = match source_cfg_format.as_deref() {
        Some("text") => Format::Text,
        _ => Format::Json,
    };
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
    })
}

fn load_error(e: &marked_yaml::LoadError) -> (usize, usize, String) {
    use marked_yaml::LoadError as E;
    let (m, msg) = match e {
        E::TopLevelMustBeMapping(m) => (
            Some(*m),
            "a pipeline file is a mapping with `name`, `source`, `steps` and `sink`".to_string(),
        ),
        E::TopLevelMustBeSequence(m) => (Some(*m), "expected a list".into()),
        E::UnexpectedAnchor(m) => (
            Some(*m),
            "YAML anchors and aliases are not supported".into(),
        ),
        E::MappingKeyMustBeScalar(m) => (Some(*m), "keys must be plain words".into()),
        E::UnexpectedTag(m) => (Some(*m), "YAML tags are not supported".into()),
        E::ScanError(m, err) => (Some(*m), format!("not valid YAML: {err}")),
        E::DuplicateKey(d) => (
            d.key.span().start().copied(),
            format!("duplicate key `{}`", d.key.as_str()),
        ),
    };
    let (l, c) = m.map(|m| (m.line(), m.column())).unwrap_or((0, 0));
    (l, c, msg)
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

impl SourceSpec {
    /// The fields every event has, where the source says.
    pub fn known_fields(&self) -> Option<Vec<String>> {
        match self {
            SourceSpec::Generator(_) => {
                Some(generator::FIELDS.iter().map(|s| s.to_string()).collect())
            }
            _ => None,
        }
    }
}

fn check_source(
    c: &mut Checker,
    s: &SourceConfig,
    node: &Node,
) -> Option<(SourceSpec, TimeSpec, usize)> {
    let kinds = [s.mqtt.is_some(), s.file.is_some(), s.generator.is_some()];
    let count = kinds.iter().filter(|k| **k).count();
    if count != 1 {
        c.node(
            node,
            "source",
            format!(
                "a source needs exactly one of `mqtt`, `file`, `generator`; found {}",
                if count == 0 {
                    "none".to_string()
                } else {
                    count.to_string()
                }
            ),
        );
    }
    let mut ok = count == 1;
    if let Some(f) = &s.format {
        if f.value != "json" && f.value != "text" {
            c.sp(
                f,
                "source.format",
                format!("unknown format `{}`; expected `json` or `text`", f.value),
            );
            ok = false;
        }
    }
    let max_payload = match &s.max_payload {
        Some(m) => match parse_size(&m.value.0) {
            Ok(n) => n,
            Err(e) => {
                c.sp(m, "source.max_payload", e);
                ok = false;
                DEFAULT_MAX_PAYLOAD
            }
        },
        None => DEFAULT_MAX_PAYLOAD,
    };
    let time = match (&s.event_time, &s.time) {
        (Some(_), Some(t)) if t.value == "processing" => {
            c.sp(
                t,
                "source.time",
                "`time: processing` and `event_time` exclude each other; keep one",
            );
            ok = false;
            TimeSpec::None
        }
        (_, Some(t)) if t.value != "processing" && t.value != "event" => {
            c.sp(
                t,
                "source.time",
                format!(
                    "unknown time `{}`; expected `processing` (or set `event_time`)",
                    t.value
                ),
            );
            ok = false;
            TimeSpec::None
        }
        (None, Some(t)) if t.value == "processing" => TimeSpec::Processing,
        (None, Some(t)) => {
            c.sp(
                t,
                "source.time",
                "`time: event` needs an `event_time` section",
            );
            ok = false;
            TimeSpec::None
        }
        (Some(et), _) => {
            if !valid_field_name(&et.field) {
                c.sp(
                    &et.field,
                    "source.event_time.field",
                    format!("`{}` is not a field name", et.field.value),
                );
                ok = false;
            }
            let bound = et
                .max_out_of_orderness
                .as_ref()
                .and_then(|d| c.duration(d, "source.event_time.max_out_of_orderness"));
            let idle = et
                .idle_timeout
                .as_ref()
                .and_then(|d| c.positive(d, "source.event_time.idle_timeout"));
            if et.max_out_of_orderness.is_some() && bound.is_none()
                || et.idle_timeout.is_some() && idle.is_none()
            {
                ok = false;
            }
            TimeSpec::Event {
                field: et.field.value.clone(),
                max_out_of_orderness: bound.unwrap_or(0),
                idle_timeout: idle,
            }
        }
        (None, None) => TimeSpec::None,
    };
    let spec = if let Some(f) = &s.file {
        if f.path.trim().is_empty() {
            c.sp(
                &f.path,
                "source.file.path",
                "must not be empty (use `-` for standard input)",
            );
            ok = false;
        }
        SourceSpec::File {
            path: f.path.value.clone(),
        }
    } else if let Some(g) = &s.generator {
        let rate = match &g.rate {
            None => Some(1000.0),
            Some(r) if r.value.0 == "unlimited" => None,
            Some(r) => match r.value.0.parse::<f64>() {
                Ok(x) if x > 0.0 && x.is_finite() => Some(x),
                _ => {
                    c.sp(r, "source.generator.rate", format!("bad rate `{}`: expected events per second (a positive number) or `unlimited`", r.value.0));
                    ok = false;
                    None
                }
            },
        };
        let disorder_ms = g
            .disorder
            .as_ref()
            .map(|d| c.duration(d, "source.generator.disorder"))
            .unwrap_or(Some(0));
        let start_ms = match &g.start {
            None => None,
            Some(st) => match st
                .value
                .0
                .parse::<i64>()
                .map_err(|_| ())
                .or_else(|_| parse_rfc3339(&st.value.0).map_err(|_| ()))
            {
                Ok(ms) => Some(ms),
                Err(()) => {
                    c.sp(
                        st,
                        "source.generator.start",
                        format!(
                            "bad start `{}`: expected epoch milliseconds or an RFC 3339 time",
                            st.value.0
                        ),
                    );
                    ok = false;
                    None
                }
            },
        };
        if g.sensors == Some(0) {
            c.node(node, "source.generator.sensors", "must be at least 1");
            ok = false;
        }
        ok &= disorder_ms.is_some();
        SourceSpec::Generator(GeneratorSpec {
            sensors: g.sensors.unwrap_or(10),
            rate,
            disorder_ms: disorder_ms.unwrap_or(0),
            seed: g.seed.unwrap_or(1),
            count: g.count,
            start_ms,
        })
    } else if let Some(m) = &s.mqtt {
        let conn = check_conn(c, &m.connection(), &m.url, "source.mqtt");
        if m.topics.is_empty() {
            c.node(
                node,
                "source.mqtt.topics",
                "needs at least one topic filter",
            );
            ok = false;
        }
        let mut topics = Vec::new();
        for t in &m.topics {
            match TopicPattern::parse(t) {
                Ok(p) => topics.push(p),
                Err(e) => {
                    c.sp(t, "source.mqtt.topics", e);
                    ok = false;
                }
            }
        }
        let qos = check_qos(c, m.qos.as_ref(), "source.mqtt.qos", &mut ok);
        let topic_field = match m.topic_field.as_deref() {
            None => Some("topic".to_string()),
            Some("") => None,
            Some(f) if valid_field_name(f) => Some(f.to_string()),
            Some(f) => {
                c.node(
                    node,
                    "source.mqtt.topic_field",
                    format!("`{f}` is not a field name"),
                );
                ok = false;
                None
            }
        };
        let conn = conn?;
        SourceSpec::Mqtt(MqttSourceSpec {
            conn,
            topics,
            qos,
            topic_field,
        })
    } else {
        return None;
    };
    ok.then_some((spec, time, max_payload))
}

fn check_qos(c: &mut Checker, q: Option<&Sp<u8>>, path: &str, ok: &mut bool) -> u8 {
    match q {
        Some(q) if q.value > 1 => {
            c.sp(
                q,
                path,
                format!("qos {} is not supported; expected 0 or 1", q.value),
            );
            *ok = false;
            0
        }
        Some(q) => q.value,
        None => 0,
    }
}

/// Checks the connection settings shared by MQTT sources and sinks.
fn check_conn(
    c: &mut Checker,
    cc: &types::ConnectionConfig,
    url: &Sp<String>,
    path: &str,
) -> Option<ConnSpec> {
    let before = c.problems.len();
    let parsed = match Endpoint::parse_url(url) {
        Ok(p) => Some(p),
        Err(e) => {
            c.sp(url, &format!("{path}.url"), e);
            None
        }
    };
    let version = match &cc.version {
        None => 4,
        Some(v) if v.value == 3 || v.value == 4 => 4,
        Some(v) if v.value == 5 => 5,
        Some(v) => {
            c.sp(
                v,
                &format!("{path}.version"),
                format!("unknown MQTT version {}; expected 3 or 5", v.value),
            );
            4
        }
    };
    let keep_alive_ms = match &cc.keep_alive {
        None => 30_000,
        Some(d) => match c.duration(d, &format!("{path}.keep_alive")) {
            Some(ms) if ms >= 1000 => ms,
            Some(_) => {
                c.sp(d, &format!("{path}.keep_alive"), "must be at least 1s");
                30_000
            }
            None => 30_000,
        },
    };
    let password = match (&cc.password, &cc.password_env, &cc.password_file) {
        (None, None, None) => PasswordSpec::None,
        (Some(p), None, None) => PasswordSpec::Inline(p.clone()),
        (None, Some(e), None) => PasswordSpec::Env(e.value.clone()),
        (None, None, Some(f)) => PasswordSpec::File(f.value.clone()),
        _ => {
            c.sp(
                url,
                path,
                "set only one of `password`, `password_env`, `password_file`",
            );
            PasswordSpec::None
        }
    };
    if !matches!(password, PasswordSpec::None) && cc.username.is_none() {
        c.sp(url, path, "a password needs a `username`");
    }
    let tls = parsed.as_ref().is_some_and(|p| p.2);
    for (name, v) in [
        ("ca_file", &cc.ca_file),
        ("client_cert", &cc.client_cert),
        ("client_key", &cc.client_key),
    ] {
        if let (Some(v), false, Some(_)) = (v, tls, &parsed) {
            c.sp(
                v,
                &format!("{path}.{name}"),
                "TLS settings need an `mqtts://` URL",
            );
        }
    }
    let client_cert = match (&cc.client_cert, &cc.client_key) {
        (Some(cert), Some(key)) => Some((cert.value.clone(), key.value.clone())),
        (None, None) => None,
        (Some(v), None) | (None, Some(v)) => {
            c.sp(v, path, "`client_cert` and `client_key` go together");
            None
        }
    };
    let (host, port, tls) = parsed?;
    (c.problems.len() == before).then(|| ConnSpec {
        url: url.value.clone(),
        host,
        port,
        tls,
        version,
        client_id: cc.client_id.clone(),
        clean_session: cc.clean_session,
        keep_alive_ms,
        username: cc.username.clone(),
        password,
        ca_file: cc.ca_file.as_ref().map(|f| f.value.clone()),
        client_cert,
    })
}

fn sink_list(c: &mut Checker, node: &Node, path: &str) -> Vec<SinkSpec> {
    let items: Vec<(&Node, String)> = match node.as_sequence() {
        Some(seq) => seq
            .iter()
            .enumerate()
            .map(|(i, n)| (n, format!("{path}[{i}]")))
            .collect(),
        None => vec![(node, path.to_string())],
    };
    let mut out = Vec::new();
    for (n, p) in items {
        let Some(s) = c.section::<SinkConfig>(n, &p) else {
            continue;
        };
        out.push(match s {
            SinkConfig::File(f) => {
                if f.path.trim().is_empty() {
                    c.sp(
                        &f.path,
                        &format!("{p}.file.path"),
                        "must not be empty (use `-` for standard output)",
                    );
                }
                SinkSpec::File { path: f.path.value }
            }
            SinkConfig::Stdout(_) => SinkSpec::Stdout,
            SinkConfig::Mqtt(m) => {
                let p = format!("{p}.mqtt");
                let conn = check_conn(c, &m.connection(), &m.url, &p);
                let mut ok = true;
                let qos = check_qos(c, m.qos.as_ref(), &format!("{p}.qos"), &mut ok);
                let topic = match TopicTemplate::parse(&m.topic) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        c.sp(&m.topic, &format!("{p}.topic"), e);
                        None
                    }
                };
                let b = m.buffer.clone();
                let when_full = match b.as_ref().and_then(|b| b.when_full.as_ref()) {
                    None => WhenFull::Block,
                    Some(w) if w.value == "block" => WhenFull::Block,
                    Some(w) if w.value == "drop_oldest" => WhenFull::DropOldest,
                    Some(w) => {
                        c.sp(
                            w,
                            &format!("{p}.buffer.when_full"),
                            format!(
                                "unknown policy `{}`; expected `block` or `drop_oldest`",
                                w.value
                            ),
                        );
                        WhenFull::Block
                    }
                };
                let drain_timeout_ms = b
                    .as_ref()
                    .and_then(|b| b.drain_timeout.as_ref())
                    .and_then(|d| c.duration(d, &format!("{p}.buffer.drain_timeout")))
                    .unwrap_or(10_000);
                let memory = b.as_ref().and_then(|b| b.memory).unwrap_or(10_000);
                if memory == 0 {
                    c.node(n, &format!("{p}.buffer.memory"), "must be at least 1");
                }
                let (Some(conn), Some(topic), true) = (conn, topic, ok) else {
                    continue;
                };
                SinkSpec::Mqtt(Box::new(MqttSinkSpec {
                    conn,
                    topic,
                    qos,
                    retain: m.retain.unwrap_or(false),
                    memory: memory.max(1),
                    disk: b.as_ref().and_then(|b| b.disk).unwrap_or(1_000_000),
                    dir: b
                        .as_ref()
                        .and_then(|b| b.dir.as_ref())
                        .map(|d| d.value.clone()),
                    when_full,
                    drain_timeout_ms,
                }))
            }
        });
    }
    out
}

fn check_window(
    c: &mut Checker,
    w: &WindowConfig,
    node: &Node,
    path: &str,
    known: Option<&[String]>,
) -> Option<WindowDef> {
    let kinds = [
        w.tumbling.is_some(),
        w.sliding.is_some(),
        w.session.is_some(),
    ];
    let count = kinds.iter().filter(|k| **k).count();
    if count != 1 {
        c.node(
            node,
            path,
            format!(
                "a window needs exactly one of `tumbling`, `sliding`, `session`; found {}",
                if count == 0 {
                    "none".to_string()
                } else {
                    count.to_string()
                }
            ),
        );
    }
    let kind = if let Some(t) = &w.tumbling {
        c.positive(t, &format!("{path}.tumbling"))
            .map(|size| WindowKind::Tumbling { size })
    } else if let Some(s) = &w.sliding {
        let size = c.positive(&s.size, &format!("{path}.sliding.size"));
        let slide = c.positive(&s.slide, &format!("{path}.sliding.slide"));
        match (size, slide) {
            (Some(size), Some(slide)) => Some(WindowKind::Sliding { size, slide }),
            _ => None,
        }
    } else if let Some(s) = &w.session {
        c.positive(&s.gap, &format!("{path}.session.gap"))
            .map(|gap| WindowKind::Session { gap })
    } else {
        None
    };
    let lateness = match &w.allowed_lateness {
        Some(d) => c.duration(d, &format!("{path}.allowed_lateness")),
        None => Some(0),
    };
    let mut aggregates = Vec::new();
    let mut ok = true;
    match &w.aggregate {
        None => {
            c.node(node, path, "a window needs `aggregate:` with at least one result field, like `readings: count()`");
            ok = false;
        }
        Some(a) if a.is_empty() => {
            c.node(
                node,
                path,
                "`aggregate:` is empty; add at least one result field, like `readings: count()`",
            );
            ok = false;
        }
        Some(a) => {
            for (name, call) in a {
                let p = format!("{path}.aggregate.{}", name.value);
                if ["window_start", "window_end"].contains(&name.as_str()) {
                    c.sp(
                        name,
                        &p,
                        format!("`{}` is a reserved result field", name.value),
                    );
                    ok = false;
                }
                match parse_aggregate(&call.0) {
                    Ok((func, arg)) => {
                        if let (Some(known), Some(arg)) = (known, &arg) {
                            let mut used = Vec::new();
                            arg.fields(&mut used);
                            for f in used {
                                check_field(c, known, &f, call.line, call.column, &p);
                            }
                        }
                        aggregates.push(crate::operators::window::Aggregate {
                            name: name.value.clone(),
                            func,
                            arg,
                        });
                    }
                    Err(e) => {
                        c.sp(call, &p, e);
                        ok = false;
                    }
                }
            }
        }
    }
    let (Some(kind), Some(allowed_lateness), true) = (kind, lateness, ok) else {
        return None;
    };
    if w.max_keys == Some(0) {
        c.node(node, &format!("{path}.max_keys"), "must be at least 1");
        return None;
    }
    Some(WindowDef {
        kind,
        allowed_lateness,
        aggregates,
        errors: Vec::new(),
        max_keys: w.max_keys,
    })
}

/// Parses a byte size: `4096`, `64KiB`, `1MiB`, `1MB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "bad size `{s}`: expected bytes, or a number with B, KiB, MiB, KB or MB"
            ))
        }
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("bad size `{s}`: expected a positive number of bytes, like `64KiB`"))
}

/// Run-time choices that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub workers: Option<usize>,
}

impl ValidPipeline {
    /// Opens the source and sinks and builds the dataflow.
    pub fn build(&self, file: &str, overrides: &Overrides) -> Result<PipelineBuilder, ConfigError> {
        let err = |message: String| ConfigError::Build {
            file: file.to_string(),
            message,
        };
        let mut b = Pipeline::builder(&self.name).max_payload(self.max_payload);
        b = match &self.source {
            SourceSpec::File { path } => {
                b.source(FileSource::open(path).map_err(|e| err(e.to_string()))?)
            }
            SourceSpec::Generator(g) => b.source(Generator::new(GeneratorOptions {
                sensors: g.sensors,
                rate: g.rate,
                disorder_ms: g.disorder_ms,
                seed: g.seed,
                count: g.count,
                start_ms: g
                    .start_ms
                    .unwrap_or_else(|| crate::time::Clock::now_ms(&crate::time::SystemClock)),
            })),
            SourceSpec::Mqtt(m) => b.source(
                MqttSource::start(MqttSourceOptions {
                    // With state, input is journaled and the broker keeps
                    // a session for us while we are away.
                    endpoint: endpoint(
                        &m.conn,
                        &self.name,
                        "in",
                        self.max_payload,
                        self.state_dir.is_none(),
                    )
                    .map_err(err)?,
                    patterns: m.topics.clone(),
                    qos: m.qos,
                    topic_field: m.topic_field.clone(),
                    journal_dir: self.state_dir.as_ref().map(std::path::PathBuf::from),
                })
                .map_err(|e| err(e.to_string()))?,
            ),
        };
        b = match &self.time {
            TimeSpec::None => b,
            TimeSpec::Processing => b.processing_time(),
            TimeSpec::Event {
                field,
                max_out_of_orderness,
                idle_timeout,
            } => {
                let b = b.event_time(field, Duration::from_millis(*max_out_of_orderness as u64));
                match idle_timeout {
                    Some(ms) => b.idle_timeout(Duration::from_millis(*ms as u64)),
                    None => b,
                }
            }
        };
        for s in &self.steps {
            b = match s {
                StepSpec::Map(a) => b.map(a.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
                StepSpec::Filter(f) => b.filter(f),
                StepSpec::KeyBy(k) => b.key_by(k),
                StepSpec::Window(w) => b.window(w.clone()),
            };
        }
        let open = |s: &SinkSpec, role: &str, i: usize| -> Result<Box<dyn Sink>, ConfigError> {
            match s {
                SinkSpec::File { path } => Ok(Box::new(
                    FileSink::open(path).map_err(|e| err(e.to_string()))?,
                )),
                SinkSpec::Stdout => Ok(Box::new(FileSink::stdout())),
                SinkSpec::Mqtt(m) => {
                    let name = format!("{role}-{i}");
                    let dir = m.dir.clone().map(std::path::PathBuf::from).or_else(|| {
                        self.state_dir
                            .as_ref()
                            .map(|d| std::path::Path::new(d).join("outbox"))
                    });
                    let sink = MqttSink::start(MqttSinkOptions {
                        endpoint: endpoint(&m.conn, &self.name, &name, 1 << 28, true)
                            .map_err(err)?,
                        topic: m.topic.clone(),
                        qos: m.qos,
                        retain: m.retain,
                        buffer: BufferOptions {
                            memory: m.memory,
                            disk: dir.map(|d| (d, m.disk)),
                            when_full: m.when_full,
                            drain_timeout: Duration::from_millis(m.drain_timeout_ms as u64),
                        },
                        name,
                    })
                    .map_err(|e| err(e.to_string()))?;
                    Ok(Box::new(sink))
                }
            }
        };
        for (i, s) in self.sinks.iter().enumerate() {
            b = b.boxed_sink(open(s, "sink", i)?);
        }
        for (i, s) in self.late.iter().enumerate() {
            b = b.late(open(s, "late", i)?);
        }
        for (i, s) in self.dead_letter.iter().enumerate() {
            b = b.dead_letter(open(s, "dead_letter", i)?);
        }
        b = b.format(self.format);
        if let Some(dir) = &self.state_dir {
            let every = self.checkpoint_interval.unwrap_or(10_000);
            b = b.state(dir, Duration::from_millis(every as u64));
        }
        if let Some(w) = overrides.workers.or(self.workers) {
            b = b.workers(w);
        }
        Ok(b)
    }
}

/// The client's endpoint: the checked settings, the password read from
/// where it is kept, and a default client id.
fn endpoint(
    c: &ConnSpec,
    pipeline: &str,
    role: &str,
    max_payload: usize,
    default_clean: bool,
) -> Result<Endpoint, String> {
    let password = match &c.password {
        PasswordSpec::None => None,
        PasswordSpec::Inline(p) => Some(p.clone()),
        PasswordSpec::Env(var) => Some(std::env::var(var).map_err(|_| {
            format!(
                "{}: the environment variable `{var}` (password_env) is not set",
                c.url
            )
        })?),
        PasswordSpec::File(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| format!("{}: cannot read password_file {f}: {e}", c.url))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
    };
    let client_id = c.client_id.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| {
                if !default_clean && c.clean_session != Some(true) {
                    tracing::warn!(
                        broker = %c.url,
                        "no host name to build a stable MQTT client id from: the broker cannot find this client's session after a restart; set `client_id`"
                    );
                }
                format!("{:08x}", fastrand::u32(..))
            });
        format!("rivulet-{pipeline}-{host}-{role}")
    });
    Ok(Endpoint {
        url: c.url.clone(),
        host: c.host.clone(),
        port: c.port,
        tls: c.tls,
        version: c.version,
        client_id,
        clean_session: c.clean_session.unwrap_or(default_clean),
        keep_alive: Duration::from_millis(c.keep_alive_ms as u64),
        username: c.username.clone(),
        password,
        ca_file: c.ca_file.clone(),
        client_cert: c.client_cert.clone(),
        // Room for the payload and the packet's own headers.
        max_packet: max_payload.saturating_add(64 << 10),
    })
}

/// The JSON Schema of pipeline files.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(PipelineFile)).unwrap_or_default()
}
