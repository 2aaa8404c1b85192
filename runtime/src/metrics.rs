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

#[derive(Clone, Debug)]
enum Cell {
    Counter(Counter),
    Gauge(Gauge),
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

/// Every series of a run.
#[derive(Debug, Default)]
pub struct Registry {
    series: Mutex<Vec<Series>>,
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
            Cell::Gauge(_) => Counter::default(),
        }
    }

    /// The gauge with this name and labels (registered on first use).
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        match self.register(name, help, labels, Cell::Gauge(Gauge::default()), false) {
            Cell::Gauge(g) => g,
            Cell::Counter(_) => Gauge::default(),
        }
    }

    /// A gauge set in milliseconds and shown in seconds: timestamps and
    /// durations named `*_seconds`.
    pub fn gauge_ms(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        match self.register(name, help, labels, Cell::Gauge(Gauge::default()), true) {
            Cell::Gauge(g) => g,
            Cell::Counter(_) => Gauge::default(),
        }
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
        self.samples()
            .iter()
            .filter(|s| {
                s.name == name
                    && having
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Prometheus text exposition (version 0.0.4) of every series.
    pub fn render(&self) -> String {
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
            };
            let _ = writeln!(out, "# HELP {} {}", s.name, escape_help(&s.help));
            let _ = writeln!(out, "# TYPE {} {kind}", s.name);
            for t in all.iter().filter(|t| t.name == s.name) {
                out.push_str(&t.name);
                if !t.labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in t.labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
                    }
                    out.push('}');
                }
                match &t.cell {
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
