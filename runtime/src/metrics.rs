//! The metrics registry of a run: counters and gauges that stages update
//! per batch (never per event), read by the stats file and by whatever
//! serves metrics.
//!
//! A stage asks its [`crate::context::RunContext`] for a [`Counter`] or
//! [`Gauge`] once, at start, and keeps the handle: updating it is one
//! relaxed atomic add, with no lookup and no lock. Registering the same name
//! and labels twice returns the same series, so several workers may share
//! one. Names and labels follow Prometheus's conventions (`rivulet_` prefix,
//! `_total` for counters, base units); label values are small closed sets
//! (pipeline, operator, worker, result), never keys or payload text.
//!
//! ```
//! use rivulet::metrics::Registry;
//! let r = Registry::default();
//! let read = r.counter("rivulet_source_events_total", "events read", &[("source", "file")]);
//! read.add(1024);
//! assert_eq!(r.value("rivulet_source_events_total", &[("source", "file")]), Some(1024));
//! assert!(r.render().contains("rivulet_source_events_total{source=\"file\"} 1024"));
//! ```

/// Names of the series the runtime itself keeps: the names of the
/// observability issue's contract where it names them.
pub mod names {
    /// Events read from the source (label `source`).
    pub const SOURCE_EVENTS: &str = "rivulet_source_events_total";
    /// Input batches whose outputs are all written.
    pub const BATCHES_WRITTEN: &str = "rivulet_batches_written_total";
    /// Records written to a sink (`sink`=`main`, `late`, `dead_letter`).
    pub const SINK_RECORDS: &str = "rivulet_sink_records_total";
    /// Records sent to the dead-letter output.
    pub const DEAD_LETTERS: &str = "rivulet_dead_letters_total";
    /// Events too late for their windows.
    pub const LATE_EVENTS: &str = "rivulet_late_events_total";
    /// Events dropped on purpose by a filter.
    pub const FILTERED_EVENTS: &str = "rivulet_filtered_events_total";
    /// Records into or out of an operator (labels `stream`, `operator`,
    /// `direction`, and `worker` for keyed workers).
    pub const OPERATOR_RECORDS: &str = "rivulet_operator_records_total";
    /// A keyed worker's watermark (label `worker`), ms kept, s shown.
    pub const WATERMARK: &str = "rivulet_watermark_timestamp_seconds";
    /// Checkpoints by `result` (`ok`, `failed`).
    pub const CHECKPOINTS: &str = "rivulet_checkpoints_total";
    /// When the last checkpoint completed (ms kept, s shown).
    pub const LAST_CHECKPOINT: &str = "rivulet_last_checkpoint_timestamp_seconds";
    /// Messages in an MQTT sink's outbox or unconfirmed (label `sink`).
    pub const OUTBOX_MESSAGES: &str = "rivulet_outbox_messages";
    /// Messages held in the MQTT input journal.
    pub const JOURNAL_ENTRIES: &str = "rivulet_journal_entries";
    /// Id (epoch) of the last completed checkpoint.
    pub const CHECKPOINT_LAST_ID: &str = "rivulet_checkpoint_last_id";
    /// How long checkpoints take to commit (histogram).
    pub const CHECKPOINT_DURATION: &str = "rivulet_checkpoint_duration_seconds";
    /// How long the last checkpoint took (ms kept, s shown).
    pub const CHECKPOINT_LAST_DURATION: &str = "rivulet_checkpoint_last_duration_seconds";
    /// Bytes of keyed state the last checkpoint wrote (changed keys only).
    pub const CHECKPOINT_BYTES: &str = "rivulet_checkpoint_bytes";
    /// Keys with state in a keyed operator (labels `operator`, `worker`).
    pub const STATE_KEYS: &str = "rivulet_state_keys";
    /// Windows open in a keyed operator.
    pub const OPEN_WINDOWS: &str = "rivulet_windows_open";
    /// Wall clock minus the watermark, computed when read (label `stream`).
    pub const WATERMARK_LAG: &str = "rivulet_watermark_lag_seconds";
    /// Batches or frames waiting in a stage's queues, over their room
    /// (label `stage`), computed when read from the two gauges below.
    pub const QUEUE_FILL: &str = "rivulet_queue_fill_ratio";
    /// Batches (or frames) a stage has taken from its queues (labels
    /// `stage`, `worker`); the reader counts the batches it sent.
    pub const STAGE_BATCHES: &str = "rivulet_stage_batches_total";
    /// Items waiting in a stage's queues (label `stage`).
    pub const QUEUE_LENGTH: &str = "rivulet_queue_length";
    /// Room of a stage's queues (label `stage`).
    pub const QUEUE_CAPACITY: &str = "rivulet_queue_capacity";
    /// 1 while an MQTT connection is up (labels `broker`, `role`).
    pub const MQTT_CONNECTED: &str = "rivulet_mqtt_connected";
    /// Connections to a broker lost and made again (labels `broker`, `role`).
    pub const MQTT_RECONNECTS: &str = "rivulet_mqtt_reconnects_total";
    /// Peer mode: the membership view this peer is in, as the low 48 bits
    /// of its id (exact in a float; it changes when the members change).
    pub const PEER_VIEW: &str = "rivulet_peer_view_epoch";
    /// Peer mode: the epoch of the key-group assignment this peer runs
    /// (computed from the view, so it changes with it; low 48 bits).
    pub const PEER_ASSIGNMENT: &str = "rivulet_peer_assignment_epoch";
    /// Peer mode: views this peer has started.
    pub const PEER_VIEWS: &str = "rivulet_peer_views_total";
    /// Peer mode: members of the view.
    pub const PEER_MEMBERS: &str = "rivulet_peer_members";
    /// Peer mode: key groups this peer owns.
    pub const PEER_GROUPS: &str = "rivulet_peer_owned_key_groups";
}

/// The reason classes of dead letters (label `reason` of
/// [`names::DEAD_LETTERS`]): a small closed set, never the free text.
pub mod reason {
    /// The payload is not the JSON the pipeline reads.
    pub const INVALID_JSON: &str = "invalid_json";
    /// The event-time field is missing or not a timestamp.
    pub const BAD_TIMESTAMP: &str = "bad_timestamp";
    /// A key field is missing or null.
    pub const MISSING_KEY: &str = "missing_key";
    /// A payload over `max_payload`.
    pub const OVERSIZED: &str = "oversized";
    /// A step or an aggregate's expression failed on the record.
    pub const EXPRESSION: &str = "expression_error";
    /// A new key while the window state holds `max_keys`.
    pub const STATE_FULL: &str = "state_full";
    /// Every class, in the order they are reported.
    pub const ALL: [&str; 6] = [
        INVALID_JSON,
        BAD_TIMESTAMP,
        MISSING_KEY,
        OVERSIZED,
        EXPRESSION,
        STATE_FULL,
    ];
}

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A monotonically increasing count.
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    #[inline]
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, d: i64) {
        self.0.fetch_add(d, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A distribution of durations (kept in microseconds), observed per
/// checkpoint or per batch, never per event.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<HistogramCells>);

#[derive(Debug)]
struct HistogramCells {
    /// Upper bounds, in microseconds.
    bounds: Vec<u64>,
    /// Observations at or under each bound (not cumulative).
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds_s: &[f64]) -> Self {
        Histogram(Arc::new(HistogramCells {
            bounds: bounds_s.iter().map(|b| (b * 1e6) as u64).collect(),
            counts: bounds_s.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, d: std::time::Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let c = &self.0;
        if let Some(i) = c.bounds.iter().position(|&b| us <= b) {
            c.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        c.sum_us.fetch_add(us, Ordering::Relaxed);
        c.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }

    /// The sum of the observations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.0.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    }
}

/// Buckets of checkpoint durations: 1 ms to 10 s.
pub const CHECKPOINT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Clone, Debug)]
enum Cell {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

#[derive(Debug)]
struct Series {
    name: String,
    help: String,
    labels: Vec<(String, String)>,
    cell: Cell,
    /// Kept in milliseconds, shown in seconds (`*_seconds` gauges).
    millis: bool,
}

/// One series' value, for readers.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: i64,
    pub counter: bool,
}

/// Something that happened, kept for the live page: a dead letter, a late
/// event, a failed checkpoint.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Recent {
    /// Wall clock, ms since 1970.
    pub at_ms: i64,
    /// `dead_letter`, `late` or `checkpoint`.
    pub kind: &'static str,
    /// What it was (a dead letter's record, cut to [`RECENT_TEXT`] bytes).
    pub text: String,
}

/// How many of each kind [`Registry::note`] keeps.
pub const RECENT_KEPT: usize = 10;
/// How much of each text it keeps, in bytes.
pub const RECENT_TEXT: usize = 300;

/// Every series of a run.
#[derive(Debug, Default)]
pub struct Registry {
    series: Mutex<Vec<Series>>,
    recent: Mutex<std::collections::VecDeque<Recent>>,
    /// Labels every rendered series carries (a peer's id in peer mode).
    constant: Mutex<Vec<(String, String)>>,
}

fn same_labels(a: &[(String, String)], b: &[(&str, &str)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && x.1 == y.1)
}

impl Registry {
    fn register(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        make: Cell,
        millis: bool,
    ) -> Cell {
        // A poisoned lock only means a panic elsewhere while registering;
        // the list itself is still whole.
        let mut all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = all
            .iter()
            .find(|s| s.name == name && same_labels(&s.labels, labels))
        {
            return s.cell.clone();
        }
        all.push(Series {
            name: name.to_string(),
            help: help.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cell: make.clone(),
            millis,
        });
        make
    }

    /// The counter with this name and labels (registered on first use).
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        match self.register(name, help, labels, Cell::Counter(Counter::default()), false) {
            Cell::Counter(c) => c,
            // The name is already a gauge: a programming error; count
            // into a detached cell rather than fail the run.
            _ => Counter::default(),
        }
    }

    /// The gauge with this name and labels (registered on first use).
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        match self.register(name, help, labels, Cell::Gauge(Gauge::default()), false) {
            Cell::Gauge(g) => g,
            _ => Gauge::default(),
        }
    }

    /// The histogram with this name and labels, with `bounds` in seconds
    /// (the bounds of its first registration stay).
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        bounds: &[f64],
    ) -> Histogram {
        match self.register(
            name,
            help,
            labels,
            Cell::Histogram(Histogram::new(bounds)),
            false,
        ) {
            Cell::Histogram(h) => h,
            _ => Histogram::new(bounds),
        }
    }

    /// A gauge set in milliseconds and shown in seconds: timestamps and
    /// durations named `*_seconds`.
    pub fn gauge_ms(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        match self.register(name, help, labels, Cell::Gauge(Gauge::default()), true) {
            Cell::Gauge(g) => g,
            _ => Gauge::default(),
        }
    }

    /// Labels every series carries when rendered, first (`peer`).
    pub fn set_constant_labels(&self, labels: &[(&str, &str)]) {
        *self.constant.lock().unwrap_or_else(|e| e.into_inner()) = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// The labels of [`Registry::set_constant_labels`].
    pub fn constant_labels(&self) -> Vec<(String, String)> {
        self.constant
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Keeps `text` as the newest of its kind (the oldest of that kind
    /// beyond [`RECENT_KEPT`] goes).
    pub fn note(&self, kind: &'static str, text: &str) {
        let mut cut = text.len().min(RECENT_TEXT);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let at_ms = crate::time::Clock::now_ms(&crate::time::SystemClock);
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if r.iter().filter(|e| e.kind == kind).count() >= RECENT_KEPT {
            if let Some(i) = r.iter().position(|e| e.kind == kind) {
                r.remove(i);
            }
        }
        r.push_back(Recent {
            at_ms,
            kind,
            text: text[..cut].to_string(),
        });
    }

    /// What [`Registry::note`] kept, oldest first.
    pub fn recent(&self) -> Vec<Recent> {
        let r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.iter().cloned().collect()
    }

    /// Every series now, in registration order.
    pub fn samples(&self) -> Vec<Sample> {
        let all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        all.iter()
            .map(|s| Sample {
                name: s.name.clone(),
                labels: s.labels.clone(),
                value: match &s.cell {
                    Cell::Counter(c) => c.get() as i64,
                    Cell::Gauge(g) => g.get(),
                    Cell::Histogram(h) => h.count() as i64,
                },
                counter: matches!(s.cell, Cell::Counter(_)),
            })
            .collect()
    }

    /// The value of one series, if registered.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<i64> {
        self.samples()
            .into_iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && s.labels
                        .iter()
                        .zip(labels)
                        .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
            })
            .map(|s| s.value)
    }

    /// The sum of a name over all its label sets (0 when unregistered).
    pub fn total(&self, name: &str) -> i64 {
        self.sum(name, &[])
    }

    /// The sum of a name over the label sets that have every label of
    /// `having`.
    pub fn sum(&self, name: &str, having: &[(&str, &str)]) -> i64 {
        sum_of(&self.samples(), name, having)
    }

    /// Prometheus text exposition (version 0.0.4) of every series.
    pub fn render(&self) -> String {
        let constant = self.constant_labels();
        let all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let mut done: Vec<&str> = Vec::new();
        for s in all.iter() {
            if done.contains(&s.name.as_str()) {
                continue;
            }
            done.push(&s.name);
            let kind = match s.cell {
                Cell::Counter(_) => "counter",
                Cell::Gauge(_) => "gauge",
                Cell::Histogram(_) => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", s.name, escape_help(&s.help));
            let _ = writeln!(out, "# TYPE {} {kind}", s.name);
            for t in all.iter().filter(|t| t.name == s.name) {
                let labels: Vec<(String, String)> =
                    constant.iter().chain(&t.labels).cloned().collect();
                if let Cell::Histogram(h) = &t.cell {
                    render_histogram(&mut out, &t.name, &labels, h);
                    continue;
                }
                out.push_str(&t.name);
                write_labels(&mut out, &labels, None);
                match &t.cell {
                    Cell::Histogram(_) => {}
                    Cell::Counter(c) => {
                        let _ = writeln!(out, " {}", c.get());
                    }
                    Cell::Gauge(g) if t.millis => {
                        let _ = writeln!(out, " {}", g.get() as f64 / 1000.0);
                    }
                    Cell::Gauge(g) => {
                        let _ = writeln!(out, " {}", g.get());
                    }
                }
            }
        }
        out
    }
}

/// Whether a sample has every label of `having`.
pub fn has_labels(s: &Sample, having: &[(&str, &str)]) -> bool {
    having
        .iter()
        .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
}

/// [`Registry::sum`] over samples already read (one read of the registry
/// for many sums).
pub fn sum_of(samples: &[Sample], name: &str, having: &[(&str, &str)]) -> i64 {
    samples
        .iter()
        .filter(|s| s.name == name && has_labels(s, having))
        .map(|s| s.value)
        .sum()
}

/// Writes `{k="v",...}` (nothing for no labels), values escaped.
pub fn write_labels(out: &mut String, labels: &[(String, String)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
    }
    if let Some(le) = le {
        if !labels.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "le=\"{le}\"");
    }
    out.push('}');
}

fn render_histogram(out: &mut String, name: &str, labels: &[(String, String)], h: &Histogram) {
    let c = &h.0;
    let mut cumulative = 0u64;
    for (bound, n) in c.bounds.iter().zip(&c.counts) {
        cumulative += n.load(Ordering::Relaxed);
        let _ = write!(out, "{name}_bucket");
        write_labels(out, labels, Some(&(*bound as f64 / 1e6).to_string()));
        let _ = writeln!(out, " {cumulative}");
    }
    let _ = write!(out, "{name}_bucket");
    write_labels(out, labels, Some("+Inf"));
    let _ = writeln!(out, " {}", h.count());
    let _ = write!(out, "{name}_sum");
    write_labels(out, labels, None);
    let _ = writeln!(out, " {}", h.sum_seconds());
    let _ = write!(out, "{name}_count");
    write_labels(out, labels, None);
    let _ = writeln!(out, " {}", h.count());
}

/// A `# HELP` and `# TYPE` header and one sample per label set, for series
/// computed when read (rates, ratios, process figures).
pub fn write_family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: &[(Vec<(String, String)>, f64)],
) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        out.push_str(name);
        write_labels(out, labels, None);
        let _ = writeln!(out, " {v}");
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_name_and_labels_share_one_series() {
        let r = Registry::default();
        let a = r.counter("x_total", "x", &[("worker", "0")]);
        let b = r.counter("x_total", "x", &[("worker", "0")]);
        let c = r.counter("x_total", "x", &[("worker", "1")]);
        a.add(2);
        b.add(3);
        c.add(10);
        assert_eq!(r.value("x_total", &[("worker", "0")]), Some(5));
        assert_eq!(r.total("x_total"), 15);
        assert_eq!(r.total("missing"), 0);
        assert_eq!(r.sum("x_total", &[("worker", "1")]), 10);
    }

    #[test]
    fn the_exposition_groups_series_under_one_help_and_type() {
        let r = Registry::default();
        r.counter("a_total", "things\nseen", &[("k", "q\"x")])
            .add(1);
        r.gauge("b", "level", &[]).set(-4);
        r.counter("a_total", "things", &[("k", "y")]).add(7);
        let text = r.render();
        assert_eq!(
            text,
            "# HELP a_total things\\nseen\n# TYPE a_total counter\na_total{k=\"q\\\"x\"} 1\na_total{k=\"y\"} 7\n# HELP b level\n# TYPE b gauge\nb -4\n"
        );
    }

    #[test]
    fn histograms_show_cumulative_buckets_a_sum_and_a_count() {
        let r = Registry::default();
        let h = r.histogram("d_seconds", "took", &[("p", "x")], &[0.01, 1.0]);
        h.observe(std::time::Duration::from_millis(5));
        h.observe(std::time::Duration::from_millis(500));
        h.observe(std::time::Duration::from_secs(5));
        let text = r.render();
        assert!(text.contains("# TYPE d_seconds histogram\n"), "{text}");
        assert!(
            text.contains("d_seconds_bucket{p=\"x\",le=\"0.01\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{p=\"x\",le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{p=\"x\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("d_seconds_sum{p=\"x\"} 5.505\n"), "{text}");
        assert!(text.contains("d_seconds_count{p=\"x\"} 3\n"), "{text}");
    }

    #[test]
    fn recent_events_keep_the_newest_of_each_kind_cut_short() {
        let r = Registry::default();
        for i in 0..(RECENT_KEPT + 5) {
            r.note("dead_letter", &format!("d{i}"));
        }
        r.note("late", &"é".repeat(RECENT_TEXT));
        let all = r.recent();
        let dead: Vec<_> = all.iter().filter(|e| e.kind == "dead_letter").collect();
        assert_eq!(dead.len(), RECENT_KEPT);
        assert_eq!(dead[0].text, "d5");
        let late = all.iter().find(|e| e.kind == "late").expect("kept");
        assert!(late.text.len() <= RECENT_TEXT && late.text.starts_with('é'));
    }

    #[test]
    fn millisecond_gauges_show_seconds() {
        let r = Registry::default();
        r.gauge_ms("t_seconds", "when", &[]).set(1_500);
        assert!(r.render().ends_with("t_seconds 1.5\n"));
        assert_eq!(r.value("t_seconds", &[]), Some(1_500));
    }

    #[test]
    fn a_name_of_the_other_kind_does_not_corrupt_the_first() {
        let r = Registry::default();
        r.counter("m", "", &[]).add(1);
        r.gauge("m", "", &[]).set(99);
        assert_eq!(r.value("m", &[]), Some(1));
    }
}
