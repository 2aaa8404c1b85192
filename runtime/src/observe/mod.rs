//! Looking into a running pipeline: the HTTP endpoint (`/metrics`, the live
//! page, `/api/*`, `/health`), what it computes from the run's metrics (rates,
//! history, health), log formats, and live state queries.
//! `docs/observe.md` tells what each figure means.
//!
//! Nothing here runs on the hot path: the stages count per batch into the
//! run's [`Registry`]; [`Observed::sample`] reads it once a second (rates,
//! the five-minute history, stuck or not), and the endpoint renders what
//! is asked from the registry and the last sample.

pub mod graph;
pub mod http;
pub mod logs;
pub mod process;
pub mod query;
pub mod top;

use crate::metrics::{has_labels as has, names, sum_of as sum, write_family, Registry, Sample};
use crate::time::Clock;
use graph::Graph;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Points of history kept: five minutes at one a second.
pub const HISTORY: usize = 300;

/// How long batches may wait without the pipeline writing any before it
/// counts as stuck (`/health` answers 503).
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// The lifecycle of the run, as `/health` and the page show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Starting,
            1 => Phase::Running,
            2 => Phase::Stopping,
            3 => Phase::Stopped,
            _ => Phase::Failed,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }
}

/// One point of the history the page plots.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Point {
    /// Wall clock, ms since 1970.
    pub t: i64,
    /// Events read per second.
    pub events_in: f64,
    /// Window results (or passed events) written per second.
    pub results_out: f64,
    /// Dead letters per second.
    pub dead_letters: f64,
    /// Wall clock minus the watermark, seconds (absent before a watermark).
    pub watermark_lag: Option<f64>,
}

/// A node's records in and out, and their rates over the last second.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct NodeFigures {
    pub id: String,
    pub records_in: i64,
    pub records_out: i64,
    pub in_rate: f64,
    pub out_rate: f64,
}

#[derive(Default)]
struct Sampled {
    at: Option<Instant>,
    nodes: Vec<NodeFigures>,
    events: i64,
    results: i64,
    dead: i64,
    history: VecDeque<Point>,
    merged: i64,
    last_progress: Option<Instant>,
    pending: i64,
}

/// What the endpoint shows of one run.
pub struct Observed {
    pub pipeline: String,
    /// This peer's id in peer mode.
    pub peer: Option<String>,
    pub metrics: Arc<Registry>,
    pub queries: Arc<query::Board>,
    pub graph: Graph,
    /// `state.dir`, for savepoints.
    pub state_dir: Option<std::path::PathBuf>,
    pub stall_after: Duration,
    started: Instant,
    phase: AtomicU8,
    sampled: Mutex<Sampled>,
}

fn now_ms() -> i64 {
    crate::time::SystemClock.now_ms()
}

fn label<'a>(s: &'a Sample, key: &str) -> Option<&'a str> {
    s.labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A stage's queue: waiting items, room, fill.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Queue {
    pub stage: &'static str,
    pub length: i64,
    pub capacity: i64,
    pub fill: f64,
}

/// The queues in front of each stage, from what each stage has taken: the
/// reader sent R batches, the parse workers took P, the keyed workers took K
/// frames (one per parse batch each), the merger wrote M.
fn queues(all: &[Sample]) -> Vec<Queue> {
    let taken = |stage: &str| sum(all, names::STAGE_BATCHES, &[("stage", stage)]);
    let (r, p, k) = (taken("read"), taken("parse"), taken("keyed"));
    let m = sum(all, names::BATCHES_WRITTEN, &[]);
    let keyed_workers = all
        .iter()
        .filter(|s| s.name == names::STAGE_BATCHES && has(s, &[("stage", "keyed")]))
        .count() as i64;
    let room = |stage: &str| sum(all, names::QUEUE_CAPACITY, &[("stage", stage)]);
    let q = |stage: &'static str, length: i64| {
        let capacity = room(stage);
        let length = length.max(0);
        Queue {
            stage,
            length,
            capacity,
            fill: if capacity > 0 {
                (length as f64 / capacity as f64).min(1.0)
            } else {
                0.0
            },
        }
    };
    vec![
        q("parse", r - p),
        q("keyed", p * keyed_workers - k),
        q("merge", (p - m) + (k - m * keyed_workers)),
    ]
}

/// The first keyed stage's watermark, ms: the least of its workers' (none
/// before the first). The tail's watermarks carry a `stream` label.
fn watermark(all: &[Sample]) -> Option<i64> {
    all.iter()
        .filter(|s| s.name == names::WATERMARK && s.value > 0 && label(s, "stream").is_none())
        .map(|s| s.value)
        .min()
}

/// Each further stream's watermark, ms (one tail node each); the first
/// stream's later stages (`stream="main"`) are left to [`watermark`].
fn stream_watermarks(all: &[Sample]) -> Vec<(String, i64)> {
    all.iter()
        .filter(|s| s.name == names::WATERMARK && s.value > 0)
        .filter_map(|s| match label(s, "stream") {
            Some(name) if name != "main" => Some((name.to_string(), s.value)),
            _ => None,
        })
        .collect()
}

impl Observed {
    pub fn new(
        pipeline: &str,
        metrics: Arc<Registry>,
        queries: Arc<query::Board>,
        graph: Graph,
    ) -> Self {
        Observed {
            pipeline: pipeline.to_string(),
            peer: None,
            metrics,
            queries,
            graph,
            state_dir: None,
            stall_after: STALL_AFTER,
            started: Instant::now(),
            phase: AtomicU8::new(0),
            sampled: Mutex::default(),
        }
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::SeqCst);
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::SeqCst))
    }

    /// Figures of every node of the graph, from one read of the registry.
    fn node_totals(&self, all: &[Sample]) -> Vec<(String, i64, i64)> {
        self.graph
            .nodes
            .iter()
            .map(|n| {
                let id = n.id.as_str();
                let (i, o) = match id {
                    "source" => {
                        let e = sum(all, names::SOURCE_EVENTS, &[]);
                        (e, e)
                    }
                    s if s.starts_with("sink_") => {
                        let r = sum(all, names::SINK_RECORDS, &[("sink", &s[5..])]);
                        (r, r)
                    }
                    op => (
                        sum(
                            all,
                            names::OPERATOR_RECORDS,
                            &[("operator", op), ("direction", "in")],
                        ),
                        sum(
                            all,
                            names::OPERATOR_RECORDS,
                            &[("operator", op), ("direction", "out")],
                        ),
                    ),
                };
                (n.id.clone(), i, o)
            })
            .collect()
    }

    /// Reads the registry: rates since the last sample, a point of
    /// history, progress. Called once a second by the endpoint.
    pub fn sample(&self) {
        let all = self.metrics.samples();
        let now = Instant::now();
        let mut s = self.sampled.lock().unwrap_or_else(|e| e.into_inner());
        let dt =
            s.at.map(|t| now.duration_since(t).as_secs_f64())
                .filter(|d| *d > 0.0);
        let rate = |now: i64, before: i64| dt.map_or(0.0, |d| (now - before).max(0) as f64 / d);
        let totals = self.node_totals(&all);
        let nodes: Vec<NodeFigures> = totals
            .into_iter()
            .map(|(id, i, o)| {
                let before = s.nodes.iter().find(|n| n.id == id);
                NodeFigures {
                    in_rate: before.map_or(0.0, |b| rate(i, b.records_in)),
                    out_rate: before.map_or(0.0, |b| rate(o, b.records_out)),
                    id,
                    records_in: i,
                    records_out: o,
                }
            })
            .collect();
        let events = sum(&all, names::SOURCE_EVENTS, &[]);
        let results = sum(&all, names::SINK_RECORDS, &[("sink", "main")]);
        let dead = sum(&all, names::DEAD_LETTERS, &[]);
        if s.at.is_some() {
            let point = Point {
                t: now_ms(),
                events_in: rate(events, s.events),
                results_out: rate(results, s.results),
                dead_letters: rate(dead, s.dead),
                watermark_lag: watermark(&all).map(|w| (now_ms() - w) as f64 / 1000.0),
            };
            if s.history.len() >= HISTORY {
                s.history.pop_front();
            }
            s.history.push_back(point);
        }
        // Progress: the merger wrote batches, or nothing waits.
        let merged = sum(&all, names::BATCHES_WRITTEN, &[]);
        let pending = queues(&all).iter().map(|q| q.length).sum::<i64>();
        if merged != s.merged || pending == 0 || s.last_progress.is_none() {
            s.last_progress = Some(now);
        }
        s.merged = merged;
        s.pending = pending;
        s.at = Some(now);
        s.nodes = nodes;
        s.events = events;
        s.results = results;
        s.dead = dead;
    }

    /// Whether the pipeline is stuck: batches wait and none was written for
    /// [`Observed::stall_after`]; with the reason.
    pub fn health(&self) -> Health {
        let phase = self.phase();
        let s = self.sampled.lock().unwrap_or_else(|e| e.into_inner());
        let since = s.last_progress.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let (healthy, reason) = match phase {
            Phase::Failed => (false, "the pipeline failed".to_string()),
            Phase::Stopped => (false, "the pipeline has stopped".to_string()),
            _ if s.pending > 0 && since >= self.stall_after.as_secs_f64() => (
                false,
                format!(
                    "stuck: {} batches wait and none was written for {:.0} s",
                    s.pending, since
                ),
            ),
            _ if s.pending > 0 => (true, "processing".to_string()),
            _ => (true, "idle or keeping up".to_string()),
        };
        Health {
            healthy,
            phase: phase.name(),
            reason,
            waiting_batches: s.pending,
            seconds_since_progress: (since * 10.0).round() / 10.0,
        }
    }

    /// The Prometheus exposition: the registry's series, then the ones
    /// computed now.
    pub fn render_metrics(&self) -> String {
        let mut out = self.metrics.render();
        let all = self.metrics.samples();
        let constant = self.metrics.constant_labels();
        let with = |extra: &[(&str, &str)]| -> Vec<(String, String)> {
            constant
                .iter()
                .cloned()
                .chain(
                    std::iter::once(("pipeline".to_string(), self.pipeline.clone()))
                        .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string()))),
                )
                .collect()
        };
        write_family(
            &mut out,
            "rivulet_build_info",
            "gauge",
            "the build of rivulet, as labels",
            &[(
                with(&[
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("target", std::env::consts::ARCH),
                ]),
                1.0,
            )],
        );
        let health = self.health();
        write_family(
            &mut out,
            "rivulet_healthy",
            "gauge",
            "1 while the pipeline makes progress or is idle by design (GET /health)",
            &[(with(&[]), if health.healthy { 1.0 } else { 0.0 })],
        );
        let now = now_ms();
        let lags: Vec<(Vec<(String, String)>, f64)> = watermark(&all)
            .map(|w| ("main".to_string(), w))
            .into_iter()
            .chain(stream_watermarks(&all))
            .map(|(stream, w)| (with(&[("stream", &stream)]), (now - w) as f64 / 1000.0))
            .collect();
        if !lags.is_empty() {
            write_family(
                &mut out,
                names::WATERMARK_LAG,
                "gauge",
                "wall clock minus the watermark",
                &lags,
            );
        }
        let queues = queues(&all);
        let per = |f: &dyn Fn(&Queue) -> f64| -> Vec<(Vec<(String, String)>, f64)> {
            queues
                .iter()
                .map(|q| (with(&[("stage", q.stage)]), f(q)))
                .collect()
        };
        write_family(
            &mut out,
            names::QUEUE_FILL,
            "gauge",
            "items waiting in a stage's queues over their room",
            &per(&|q| q.fill),
        );
        write_family(
            &mut out,
            names::QUEUE_LENGTH,
            "gauge",
            "items waiting in a stage's queues",
            &per(&|q| q.length as f64),
        );
        let conns = crate::mqtt::connections();
        let conn =
            |f: &dyn Fn(&crate::mqtt::ConnState) -> f64| -> Vec<(Vec<(String, String)>, f64)> {
                conns
                    .iter()
                    .map(|c| (with(&[("broker", &c.broker), ("role", c.role)]), f(c)))
                    .collect()
            };
        write_family(
            &mut out,
            names::MQTT_CONNECTED,
            "gauge",
            "1 while the MQTT connection is up",
            &conn(&|c| {
                if c.connected.load(Ordering::Relaxed) {
                    1.0
                } else {
                    0.0
                }
            }),
        );
        write_family(
            &mut out,
            names::MQTT_RECONNECTS,
            "counter",
            "MQTT connections lost and made again",
            &conn(&|c| c.reconnects.load(Ordering::Relaxed) as f64),
        );
        if let Some(p) = process::stats() {
            let plain = |v: f64| vec![(constant.clone(), v)];
            for (name, kind, help, v) in [
                (
                    "process_cpu_seconds_total",
                    "counter",
                    "user and system CPU time",
                    p.cpu_seconds,
                ),
                (
                    "process_resident_memory_bytes",
                    "gauge",
                    "resident memory",
                    p.resident_bytes as f64,
                ),
                (
                    "process_start_time_seconds",
                    "gauge",
                    "when the process started, since 1970",
                    p.start_time_seconds,
                ),
                ("process_threads", "gauge", "threads", p.threads as f64),
                (
                    "process_open_fds",
                    "gauge",
                    "open file descriptors",
                    p.open_fds as f64,
                ),
            ] {
                write_family(&mut out, name, kind, help, &plain(v));
            }
        }
        out
    }

    /// Everything the page shows (`GET /api/status`).
    pub fn status(&self) -> serde_json::Value {
        use serde_json::json;
        let all = self.metrics.samples();
        let health = self.health();
        let s = self.sampled.lock().unwrap_or_else(|e| e.into_inner());
        let history = &s.history;
        let series = |f: &dyn Fn(&Point) -> serde_json::Value| -> Vec<serde_json::Value> {
            history.iter().map(f).collect()
        };
        let last = history.back();
        let by_reason: serde_json::Map<String, serde_json::Value> = crate::metrics::reason::ALL
            .iter()
            .map(|r| {
                (
                    r.to_string(),
                    json!(sum(&all, names::DEAD_LETTERS, &[("reason", r)])),
                )
            })
            .collect();
        let recent = self.metrics.recent();
        let recent_of = |kind: &str| -> Vec<serde_json::Value> {
            recent
                .iter()
                .filter(|r| r.kind == kind)
                .rev()
                .map(|r| json!({"at_ms": r.at_ms, "text": r.text}))
                .collect()
        };
        let outbox: serde_json::Map<String, serde_json::Value> = all
            .iter()
            .filter(|x| x.name == names::OUTBOX_MESSAGES)
            .map(|x| (label(x, "sink").unwrap_or("?").to_string(), json!(x.value)))
            .collect();
        let last_cp = sum(&all, names::LAST_CHECKPOINT, &[]);
        let conns: Vec<serde_json::Value> = crate::mqtt::connections()
            .iter()
            .map(|c| {
                json!({
                    "broker": c.broker,
                    "role": c.role,
                    "connected": c.connected.load(Ordering::Relaxed),
                    "since_ms": c.since_ms.load(Ordering::Relaxed),
                    "reconnects": c.reconnects.load(Ordering::Relaxed),
                })
            })
            .collect();
        let wm = watermark(&all);
        let nodes: Vec<serde_json::Value> = self
            .graph
            .nodes
            .iter()
            .map(|n| {
                let f = s
                    .nodes
                    .iter()
                    .find(|f| f.id == n.id)
                    .cloned()
                    .unwrap_or_default();
                json!({
                    "id": n.id, "kind": n.kind, "label": n.label,
                    "records_in": f.records_in, "records_out": f.records_out,
                    "in_rate": f.in_rate, "out_rate": f.out_rate,
                })
            })
            .collect();
        let edges: Vec<serde_json::Value> = self
            .graph
            .edges
            .iter()
            .map(|(a, b)| {
                let rate = s.nodes.iter().find(|f| &f.id == a).map_or(0.0, |f| {
                    if b == "sink_dead_letter" || b == "sink_late" {
                        0.0
                    } else {
                        f.out_rate
                    }
                });
                json!({"from": a, "to": b, "rate": rate})
            })
            .collect();
        let process = process::stats();
        json!({
            "pipeline": self.pipeline,
            "peer": self.peer,
            "version": env!("CARGO_PKG_VERSION"),
            "phase": self.phase().name(),
            "health": health,
            "uptime_s": self.started.elapsed().as_secs(),
            "now_ms": now_ms(),
            "graph": {"nodes": nodes, "edges": edges},
            "totals": {
                "events": sum(&all, names::SOURCE_EVENTS, &[]),
                "results": sum(&all, names::SINK_RECORDS, &[("sink", "main")]),
                "dead_letters": sum(&all, names::DEAD_LETTERS, &[]),
                "late": sum(&all, names::LATE_EVENTS, &[]),
                "filtered": sum(&all, names::FILTERED_EVENTS, &[]),
            },
            "rates": {
                "events_in": last.map_or(0.0, |p| p.events_in),
                "results_out": last.map_or(0.0, |p| p.results_out),
            },
            "watermark": {
                "ms": wm,
                "lag_s": wm.map(|w| (now_ms() - w) as f64 / 1000.0),
            },
            "state_keys": sum(&all, names::STATE_KEYS, &[]),
            "open_windows": sum(&all, names::OPEN_WINDOWS, &[]),
            "checkpoints": {
                "ok": sum(&all, names::CHECKPOINTS, &[("result", "ok")]),
                "failed": sum(&all, names::CHECKPOINTS, &[("result", "failed")]),
                "last_id": sum(&all, names::CHECKPOINT_LAST_ID, &[]),
                "last_at_ms": (last_cp > 0).then_some(last_cp),
                "last_age_s": (last_cp > 0).then(|| (now_ms() - last_cp) as f64 / 1000.0),
                "last_bytes": sum(&all, names::CHECKPOINT_BYTES, &[]),
                "last_duration_s": sum(&all, names::CHECKPOINT_LAST_DURATION, &[]) as f64 / 1000.0,
                "recent": recent_of("checkpoint"),
            },
            "dead_letters": {
                "total": sum(&all, names::DEAD_LETTERS, &[]),
                "by_reason": by_reason,
                "recent": recent_of("dead_letter"),
            },
            "late": {
                "total": sum(&all, names::LATE_EVENTS, &[]),
                "recent": recent_of("late"),
            },
            "mqtt": conns,
            "outbox": outbox,
            "journal_entries": sum(&all, names::JOURNAL_ENTRIES, &[]),
            "queues": queues(&all),
            "process": process.map(|p| json!({
                "cpu_seconds": p.cpu_seconds,
                "resident_bytes": p.resident_bytes,
                "threads": p.threads,
            })),
            "history": {
                "t": series(&|p| json!(p.t)),
                "events_in": series(&|p| json!(p.events_in)),
                "results_out": series(&|p| json!(p.results_out)),
                "dead_letters": series(&|p| json!(p.dead_letters)),
                "watermark_lag": series(&|p| json!(p.watermark_lag)),
            },
        })
    }
}

/// The answer of `GET /health`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Health {
    pub healthy: bool,
    pub phase: &'static str,
    pub reason: String,
    pub waiting_batches: i64,
    pub seconds_since_progress: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> Observed {
        let p = crate::config::validate(include_str!("../../../configs/demo.yaml"))
            .map_err(|e| format!("{e:?}"))
            .expect("valid");
        Observed::new("demo", Arc::default(), Arc::default(), Graph::of(&p))
    }

    #[test]
    fn waiting_batches_without_progress_are_stuck_and_idle_is_healthy() {
        let mut o = observed();
        o.stall_after = Duration::ZERO;
        o.set_phase(Phase::Running);
        let m = o.metrics.clone();
        o.sample();
        assert!(o.health().healthy, "nothing waits: idle");
        m.counter(names::STAGE_BATCHES, "", &[("stage", "read")])
            .add(3);
        m.gauge(names::QUEUE_CAPACITY, "", &[("stage", "parse")])
            .set(8);
        o.sample();
        o.sample();
        let h = o.health();
        assert!(!h.healthy, "{h:?}");
        assert_eq!(h.waiting_batches, 3);
        // The stages catch up: healthy again.
        m.counter(names::STAGE_BATCHES, "", &[("stage", "parse")])
            .add(3);
        m.counter(names::BATCHES_WRITTEN, "", &[]).add(3);
        o.sample();
        assert!(o.health().healthy, "{:?}", o.health());
        let text = o.render_metrics();
        assert!(
            text.contains("rivulet_queue_fill_ratio{pipeline=\"demo\",stage=\"parse\"} 0\n"),
            "{text}"
        );
        o.set_phase(Phase::Failed);
        assert!(!o.health().healthy);
    }

    #[test]
    fn rates_come_from_counter_deltas_and_history_grows_per_sample() {
        let o = observed();
        let read = o
            .metrics
            .counter(names::SOURCE_EVENTS, "", &[("source", "source")]);
        o.sample();
        read.add(500);
        std::thread::sleep(Duration::from_millis(50));
        o.sample();
        let st = o.status();
        assert_eq!(st["totals"]["events"], 500);
        assert!(st["rates"]["events_in"].as_f64().expect("a rate") > 500.0);
        assert_eq!(st["history"]["t"].as_array().map(|a| a.len()), Some(1));
        let source = &st["graph"]["nodes"][0];
        assert_eq!(source["id"], "source");
        assert_eq!(source["records_out"], 500);
    }
}
