//! Golden tests of window semantics. Each expected output is derived by
//! hand from Flink's rules (see `operators::window`): watermark = max
//! timestamp seen − bound − 1 after every event; a window fires when the
//! watermark reaches end − 1; late-but-allowed events re-fire; later ones go
//! to the late output; a bounded input ends with a watermark at +infinity.

#![allow(clippy::unwrap_used)]

use rivulet::exec::RunStats;
use rivulet::operators::window::WindowDef;
use rivulet::plan::Pipeline;
use rivulet::sinks::MemorySink;
use rivulet::sources::memory::{MemorySource, QueueSource};
use rivulet::time::ManualClock;
use rivulet::RunOptions;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn ev(k: &str, ts: i64, v: i64) -> String {
    json!({"k": k, "ts": ts, "v": v}).to_string()
}

struct Out {
    main: Vec<Value>,
    late: Vec<Value>,
    dead: Vec<Value>,
    stats: RunStats,
}

fn parse_all(lines: Vec<String>) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("sinks get JSON"))
        .collect()
}

fn run_with(lines: &[String], bound: u64, window: WindowDef, workers: usize) -> Out {
    run_graph(
        lines,
        bound,
        |b| b.key_by(["k"]).window(window.clone()),
        workers,
    )
}

fn sum_count(w: WindowDef) -> WindowDef {
    w.aggregate("sum", "sum(v)").aggregate("n", "count()")
}

fn res(k: &str, start: i64, end: i64, sum: i64, n: i64) -> Value {
    json!({"k": k, "window_start": start, "window_end": end, "sum": sum, "n": n})
}

#[test]
fn tumbling_fires_on_watermark_and_sends_late_events_aside() {
    let input = [
        ev("a", 1000, 1),
        ev("a", 3000, 2),
        ev("b", 5000, 3),
        ev("a", 12000, 4), // watermark 11999 >= 9999: [0, 10000) fires for a and b
        ev("a", 9000, 5),  // its window is gone: late
    ];
    let out = run_with(&input, 0, sum_count(WindowDef::tumbling(ms(10_000))), 1);
    assert_eq!(
        out.main,
        vec![
            res("a", 0, 10000, 3, 2),
            res("b", 0, 10000, 3, 1),
            res("a", 10000, 20000, 4, 1), // fired by the end of input
        ]
    );
    assert_eq!(out.late, vec![json!({"k": "a", "ts": 9000, "v": 5})]);
    assert_eq!(out.stats.late, 1);
    assert_eq!(out.stats.events, 5);
}

#[test]
fn bounded_out_of_orderness_keeps_disordered_events_on_time() {
    let input = [
        ev("a", 1000, 1),
        ev("a", 11500, 2), // watermark 9499: [0,10000) still open
        ev("a", 9000, 3),  // on time
        ev("a", 12500, 4), // watermark 10499: fires [0,10000) with 1 + 3
    ];
    let out = run_with(&input, 2000, sum_count(WindowDef::tumbling(ms(10_000))), 1);
    assert_eq!(
        out.main,
        vec![res("a", 0, 10000, 4, 2), res("a", 10000, 20000, 6, 2)]
    );
    assert!(out.late.is_empty());
}

#[test]
fn allowed_lateness_refires_then_drops() {
    let w = sum_count(WindowDef::tumbling(ms(10_000)).allowed_lateness(ms(5000)));
    let input = [
        ev("a", 1000, 1),
        ev("a", 11000, 2), // watermark 10999: fires [0,10000) = 1
        ev("a", 2000, 3),  // late but allowed (9999 + 5000 > 10999): fires again = 4
        ev("a", 16000, 4), // watermark 15999 >= 14999: [0,10000) is cleaned up
        ev("a", 3000, 5),  // too late
    ];
    let out = run_with(&input, 0, w, 1);
    assert_eq!(
        out.main,
        vec![
            res("a", 0, 10000, 1, 1),
            res("a", 0, 10000, 4, 2),
            res("a", 10000, 20000, 6, 2),
        ]
    );
    assert_eq!(out.late, vec![json!({"k": "a", "ts": 3000, "v": 5})]);
}

#[test]
fn sliding_windows_overlap() {
    let w = sum_count(WindowDef::sliding(ms(10_000), ms(5000)));
    let input = [
        ev("a", 1000, 1), // [-5000,5000) and [0,10000)
        ev("a", 7000, 2), // [0,10000) and [5000,15000); watermark 6999 fires [-5000,5000)
    ];
    let out = run_with(&input, 0, w, 1);
    assert_eq!(
        out.main,
        vec![
            res("a", -5000, 5000, 1, 1),
            res("a", 0, 10000, 3, 2),
            res("a", 5000, 15000, 2, 1),
        ]
    );
}

#[test]
fn session_windows_merge_including_touching_and_bridging() {
    let w = sum_count(WindowDef::session(ms(3000)));
    let input = [
        ev("a", 1000, 1), // [1000,4000)
        ev("a", 8000, 1), // [8000,11000)
        ev("a", 4500, 1), // [4500,7500): touches neither
        ev("a", 5000, 1), // [5000,8000): bridges -> [4500,11000)
        ev("a", 3900, 1), // [3900,6900): bridges -> [1000,11000)
        ev("b", 1000, 2), // [1000,4000)
        ev("b", 4000, 2), // [4000,7000) touches end-to-start -> [1000,7000)
    ];
    // A large bound keeps everything open until the end of input.
    let out = run_with(&input, 60_000, w, 1);
    assert_eq!(
        out.main,
        vec![res("b", 1000, 7000, 4, 2), res("a", 1000, 11000, 5, 5)]
    );
}

#[test]
fn session_late_merge_refires_within_lateness() {
    let w = sum_count(WindowDef::session(ms(1000)).allowed_lateness(ms(10_000)));
    let input = [
        ev("a", 1000, 1),  // [1000,2000)
        ev("a", 5000, 1),  // watermark 4999: fires [1000,2000) = 1
        ev("a", 1500, 1),  // late but allowed: merges into [1000,2500), fires at once = 2
        ev("a", 30000, 1), // watermark 29999: fires [5000,6000), cleans everything up
        ev("a", 1200, 1),  // too late
    ];
    let out = run_with(&input, 0, w, 1);
    assert_eq!(
        out.main,
        vec![
            res("a", 1000, 2000, 1, 1),
            res("a", 1000, 2500, 2, 2),
            res("a", 5000, 6000, 1, 1),
            res("a", 30000, 31000, 1, 1),
        ]
    );
    assert_eq!(out.late.len(), 1);
}

#[test]
fn aggregates_first_last_min_max_avg() {
    let w = WindowDef::tumbling(ms(10_000))
        .aggregate("first", "first(v)")
        .aggregate("last", "last(v)")
        .aggregate("min", "min(v)")
        .aggregate("max", "max(v)")
        .aggregate("avg", "avg(v)")
        .aggregate("n", "count(missing)");
    let input = [
        ev("a", 5000, 7),
        ev("a", 2000, 3),
        ev("a", 9000, 5),
        ev("a", 2000, 4),
    ];
    let out = run_with(&input, 10_000, w, 1);
    assert_eq!(
        out.main,
        vec![json!({"k": "a", "window_start": 0, "window_end": 10000,
            "first": 3, "last": 5, "min": 3, "max": 7, "avg": 4.75, "n": 0})]
    );
}

/// The statistics of `vals` computed the plain way: two-pass variance,
/// sorted values for quantiles, a set for distinct counts.
struct Reference {
    var_sample: Option<f64>,
    var_pop: f64,
    /// Values sorted.
    sorted: Vec<f64>,
    distinct: usize,
}

impl Reference {
    fn of(vals: &[f64]) -> Reference {
        let n = vals.len() as f64;
        let mean = vals.iter().sum::<f64>() / n;
        let ss: f64 = vals.iter().map(|x| (x - mean).powi(2)).sum();
        let mut sorted = vals.to_vec();
        sorted.sort_by(f64::total_cmp);
        let distinct = sorted
            .iter()
            .map(|x| x.to_bits())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        Reference {
            var_sample: (vals.len() > 1).then(|| ss / (n - 1.0)),
            var_pop: ss / n,
            sorted,
            distinct,
        }
    }

    /// Linear interpolation between the closest ranks.
    fn quantile(&self, p: f64) -> f64 {
        let h = p * (self.sorted.len() - 1) as f64;
        let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
        self.sorted[lo] + (h - lo as f64) * (self.sorted[hi] - self.sorted[lo])
    }

    /// The value of rank ⌊p·(n−1)⌋ (what the sketch approximates).
    fn rank(&self, p: f64) -> f64 {
        self.sorted[(p * (self.sorted.len() - 1) as f64).floor() as usize]
    }
}

fn close(got: &Value, want: f64, rel: f64) -> bool {
    got.as_f64()
        .is_some_and(|g| (g - want).abs() <= rel * want.abs().max(1e-9))
}

fn statistics(w: WindowDef) -> WindowDef {
    w.aggregate("var", "variance(v)")
        .aggregate("var_pop", "variance_pop(v)")
        .aggregate("sd", "stddev(v)")
        .aggregate("sd_pop", "stddev_pop(v)")
        .aggregate("median", "median(v)")
        .aggregate("p90", "percentile(v, 0.9)")
        .aggregate("kinds", "count_distinct(v)")
        .aggregate("n", "count()")
}

#[test]
fn statistical_aggregates_match_a_reference_in_any_order_and_worker_count() {
    // Keys with 1, 3, 100 and 1,000 readings per window: sample variance
    // of one value is null; quantiles are exact up to 128 values and from
    // the sketch above; out-of-order arrival within the bound.
    let mut rng = fastrand::Rng::with_seed(5);
    let mut input = Vec::new();
    let mut by_window: BTreeMap<(String, i64), Vec<f64>> = BTreeMap::new();
    for (key, per) in [
        ("one", 1),
        ("three", 3),
        ("hundred", 100),
        ("thousand", 1000),
    ] {
        for w in 0..3i64 {
            for i in 0..per {
                let ts = w * 10_000 + rng.i64(0..10_000);
                let v = match key {
                    "thousand" => rng.i64(-500..5_000),
                    _ => rng.i64(0..40) + i % 3,
                };
                input.push((ts, ev(key, ts, v)));
                by_window
                    .entry((key.to_string(), w * 10_000))
                    .or_default()
                    .push(v as f64);
            }
        }
    }
    // Sorted by time, then each event moved back by up to 2 s.
    input.sort_by_key(|(ts, _)| *ts);
    let mut shuffled: Vec<(i64, String)> = input
        .into_iter()
        .enumerate()
        .map(|(i, (_, e))| (i as i64 * 4 + rng.i64(0..800), e))
        .collect();
    shuffled.sort_by_key(|(o, _)| *o);
    let lines: Vec<String> = shuffled.into_iter().map(|(_, e)| e).collect();
    let out = run_with(
        &lines,
        10_000,
        statistics(WindowDef::tumbling(ms(10_000))),
        1,
    );
    assert!(out.late.is_empty() && out.dead.is_empty());
    assert_eq!(out.main.len(), by_window.len());
    for r in &out.main {
        let key = (
            r["k"].as_str().unwrap().to_string(),
            r["window_start"].as_i64().unwrap(),
        );
        let vals = &by_window[&key];
        let want = Reference::of(vals);
        assert_eq!(r["n"], json!(vals.len()), "{key:?}");
        match want.var_sample {
            Some(v) => {
                assert!(close(&r["var"], v, 1e-9), "{key:?}: {r}");
                assert!(close(&r["sd"], v.sqrt(), 1e-9), "{key:?}: {r}");
            }
            None => assert!(r["var"].is_null() && r["sd"].is_null(), "{key:?}: {r}"),
        }
        assert!(close(&r["var_pop"], want.var_pop, 1e-9), "{key:?}: {r}");
        assert!(
            close(&r["sd_pop"], want.var_pop.sqrt(), 1e-9),
            "{key:?}: {r}"
        );
        if want.distinct <= 512 {
            assert_eq!(r["kinds"], json!(want.distinct), "{key:?}");
        } else {
            // The HyperLogLog: within three standard errors (1.6 % each).
            assert!(
                close(&r["kinds"], want.distinct as f64, 0.05),
                "{key:?}: {r}"
            );
        }
        if vals.len() <= 128 {
            assert!(
                close(&r["median"], want.quantile(0.5), 1e-12),
                "{key:?}: {r}"
            );
            assert!(close(&r["p90"], want.quantile(0.9), 1e-12), "{key:?}: {r}");
        } else {
            assert!(close(&r["median"], want.rank(0.5), 0.01), "{key:?}: {r}");
            assert!(close(&r["p90"], want.rank(0.9), 0.01), "{key:?}: {r}");
        }
    }
    let two = run_with(
        &lines,
        10_000,
        statistics(WindowDef::tumbling(ms(10_000))),
        2,
    );
    assert_eq!(two.main, out.main, "identical with two workers");
}

#[test]
fn statistical_aggregates_merge_with_sessions() {
    // Two sessions of 100 readings each, bridged by one reading: the merged
    // session holds 201 values (its two halves were exact; together they
    // pass to the sketch).
    let mut lines = Vec::new();
    let mut vals = Vec::new();
    for i in 0..100i64 {
        let v = (i * 37) % 101;
        lines.push(ev("a", 1_000 + i * 10, v));
        vals.push(v as f64);
    }
    for i in 0..100i64 {
        let v = (i * 53) % 103 - 20;
        lines.push(ev("a", 5_000 + i * 10, v));
        vals.push(v as f64);
    }
    lines.push(ev("a", 3_500, 7));
    vals.push(7.0);
    let out = run_with(&lines, 60_000, statistics(WindowDef::session(ms(2_000))), 1);
    assert_eq!(out.main.len(), 1, "{:?}", out.main);
    let r = &out.main[0];
    assert_eq!(
        (r["window_start"].clone(), r["window_end"].clone()),
        (json!(1000), json!(7990))
    );
    let want = Reference::of(&vals);
    assert_eq!(r["n"], json!(201));
    assert!(close(&r["var"], want.var_sample.unwrap(), 1e-9), "{r}");
    assert!(close(&r["sd_pop"], want.var_pop.sqrt(), 1e-9), "{r}");
    assert!(close(&r["median"], want.rank(0.5), 0.01), "{r}");
    assert!(close(&r["p90"], want.rank(0.9), 0.01), "{r}");
    assert_eq!(r["kinds"], json!(want.distinct));
}

#[test]
fn percentile_arguments_are_checked() {
    for (call, says) in [
        ("percentile(v)", "two arguments"),
        ("percentile(v, 95)", "write 0.95"),
        ("percentile(v, x)", "must be a number"),
        ("median()", "needs one argument"),
        ("stdev(v)", "did you mean `stddev`"),
    ] {
        let err = Pipeline::builder("test")
            .source(MemorySource::from_lines(Vec::<String>::new()))
            .event_time("ts", ms(0))
            .key_by(["k"])
            .window(WindowDef::tumbling(ms(1000)).aggregate("x", call))
            .sink(MemorySink::new())
            .build()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(says), "{call}: {err}");
    }
}

#[test]
fn dead_letters_carry_reason_and_payload_and_the_pipeline_goes_on() {
    let input: Vec<String> = vec![
        ev("a", 1000, 1),
        "{not json".into(),
        r#"{"k":"a","v":1}"#.into(),
        r#"{"k":"a","ts":"yesterday","v":1}"#.into(),
        r#"{"k":"a","ts":2000,"v":"seven"}"#.into(),
        r#"{"ts":2000,"v":1}"#.into(),
        "[1,2]".into(),
        ev("a", 3000, 2),
    ];
    let out = run_with(&input, 0, sum_count(WindowDef::tumbling(ms(10_000))), 2);
    assert_eq!(out.main, vec![res("a", 0, 10000, 3, 2)]);
    assert_eq!(out.stats.dead_letters, 6);
    let reasons: Vec<&str> = out
        .dead
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert!(reasons[0].starts_with("invalid JSON"), "{reasons:?}");
    assert!(reasons[1].contains("missing or null"), "{reasons:?}");
    assert!(reasons[2].contains("not RFC 3339"), "{reasons:?}");
    assert!(reasons[3].contains("sum needs numbers"), "{reasons:?}");
    assert!(reasons[4].contains("key field `k`"), "{reasons:?}");
    assert!(reasons[5].contains("array"), "{reasons:?}");
    assert_eq!(out.dead[0]["payload"], "{not json");
    assert_eq!(out.dead[0]["position"], 2);
}

#[test]
fn oversized_and_type_errors_in_steps_go_to_dead_letter() {
    let dead = MemorySink::new();
    let main = MemorySink::new();
    let big = format!(r#"{{"k":"a","ts":1,"pad":"{}"}}"#, "x".repeat(500));
    let stats = Pipeline::builder("t")
        .source(MemorySource::from_lines([
            big.as_str(),
            r#"{"k":"a","ts":1,"t":"hot"}"#,
            r#"{"k":"a","ts":1,"t":5}"#,
        ]))
        .max_payload(200)
        .map([("c", "t * 2")])
        .filter("c > 1")
        .sink(main.clone())
        .dead_letter(Box::new(dead.clone()))
        .build()
        .unwrap()
        .run(RunOptions::default())
        .unwrap();
    let dead = parse_all(dead.records());
    assert_eq!(stats.dead_letters, 2);
    assert!(dead[0]["reason"]
        .as_str()
        .unwrap()
        .contains("exceeds max_payload"));
    assert_eq!(dead[0]["payload_size"], big.len());
    assert!(dead[1]["reason"].as_str().unwrap().contains("map `c`"));
    // A pipeline without a window passes events through, with mapped fields.
    assert_eq!(
        parse_all(main.records()),
        vec![json!({"k": "a", "ts": 1, "t": 5, "c": 10})]
    );
}

/// A simple, independent model of tumbling windows without lateness.
fn reference_tumbling(
    events: &[(String, i64, i64)],
    size: i64,
    bound: i64,
) -> BTreeMap<(String, i64), (i64, i64)> {
    let mut max = i64::MIN;
    let mut groups = BTreeMap::new();
    for (k, ts, v) in events {
        let wm = if max == i64::MIN {
            i64::MIN
        } else {
            max - bound - 1
        };
        let start = ts - ts.rem_euclid(size);
        if start + size - 1 > wm {
            let e = groups.entry((k.clone(), start)).or_insert((0, 0));
            e.0 += v;
            e.1 += 1;
        }
        max = max.max(*ts);
    }
    groups
}

#[test]
fn many_keys_identical_for_1_2_and_4_workers_and_match_a_reference() {
    let mut rng = 42u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let events: Vec<(String, i64, i64)> = (0..60_000)
        .map(|i| {
            let k = format!("key-{}", next() % 700);
            let ts = i as i64 * 3 - (next() % 4000) as i64;
            (k, ts, (next() % 100) as i64)
        })
        .collect();
    let lines: Vec<String> = events.iter().map(|(k, t, v)| ev(k, *t, *v)).collect();
    let w = || sum_count(WindowDef::tumbling(ms(5000)));
    let one = run_with(&lines, 1000, w(), 1);
    let two = run_with(&lines, 1000, w(), 2);
    let four = run_with(&lines, 1000, w(), 4);
    assert_eq!(one.main, two.main);
    assert_eq!(one.main, four.main);
    assert_eq!(one.late, four.late);
    assert!(!one.late.is_empty(), "the input has late events");
    let expected = reference_tumbling(&events, 5000, 1000);
    let got: BTreeMap<(String, i64), (i64, i64)> = one
        .main
        .iter()
        .map(|r| {
            (
                (
                    r["k"].as_str().unwrap().to_string(),
                    r["window_start"].as_i64().unwrap(),
                ),
                (r["sum"].as_i64().unwrap(), r["n"].as_i64().unwrap()),
            )
        })
        .collect();
    assert_eq!(got.len(), one.main.len(), "each window fires once");
    assert_eq!(got, expected);
    assert_eq!(
        one.stats.late as usize + expected.values().map(|v| v.1 as usize).sum::<usize>(),
        events.len()
    );
}

/// Waits (bounded) until `f` holds; the assertion is on the outcome, not the time.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(ms(10));
    }
}

#[test]
fn idle_source_stops_holding_back_the_watermark() {
    let clock = ManualClock::new(100_000);
    let (source, feed) = QueueSource::new();
    let main = MemorySink::new();
    let opts = RunOptions::default();
    let pipeline = Pipeline::builder("idle")
        .source(source)
        .event_time("ts", ms(1000))
        .idle_timeout(ms(30_000))
        .key_by(["k"])
        .window(sum_count(WindowDef::tumbling(ms(5000))))
        .sink(main.clone())
        .clock(Arc::new(clock.clone()))
        .workers(2)
        .build()
        .unwrap();
    let shutdown = opts.shutdown.clone();
    let metrics = opts.metrics.clone();
    let run = std::thread::spawn(move || pipeline.run(opts).unwrap());
    feed.push(ev("a", 1000, 1));
    feed.push(ev("a", 2000, 2));
    eventually("both events to be read", || {
        metrics.total(rivulet::metrics::names::SOURCE_EVENTS) == 2
    });
    // Quiet for 31 s of (injected) wall clock: watermark = 2000 + 31000 - 1000 - 1.
    clock.advance(31_000);
    eventually("the idle watermark to fire the window", || {
        !main.records().is_empty()
    });
    shutdown.store(true, Ordering::SeqCst);
    let stats = run.join().unwrap();
    assert!(stats.stopped);
    assert_eq!(parse_all(main.records()), vec![res("a", 0, 5000, 3, 2)]);
}

#[test]
fn without_idle_timeout_a_quiet_source_keeps_windows_open() {
    let clock = ManualClock::new(100_000);
    let (source, feed) = QueueSource::new();
    let main = MemorySink::new();
    let opts = RunOptions::default();
    let pipeline = Pipeline::builder("quiet")
        .source(source)
        .event_time("ts", ms(1000))
        .key_by(["k"])
        .window(sum_count(WindowDef::tumbling(ms(5000))))
        .sink(main.clone())
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let shutdown = opts.shutdown.clone();
    let metrics = opts.metrics.clone();
    let run = std::thread::spawn(move || pipeline.run(opts).unwrap());
    feed.push(ev("a", 1000, 1));
    eventually("the event to be read", || {
        metrics.total(rivulet::metrics::names::SOURCE_EVENTS) == 1
    });
    clock.advance(3_600_000);
    shutdown.store(true, Ordering::SeqCst);
    let stats = run.join().unwrap();
    assert!(stats.stopped);
    assert_eq!(stats.events, 1);
    assert_eq!(stats.open_windows, 1);
    assert!(main.records().is_empty());
}

#[test]
fn processing_time_windows_fire_as_the_clock_passes_their_end() {
    let clock = ManualClock::new(10_000);
    let (source, feed) = QueueSource::new();
    let main = MemorySink::new();
    let pipeline = Pipeline::builder("proc")
        .source(source)
        .processing_time()
        .key_by(["k"])
        .window(WindowDef::tumbling(ms(5000)).aggregate("n", "count()"))
        .sink(main.clone())
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let opts = RunOptions::default();
    let metrics = opts.metrics.clone();
    let run = std::thread::spawn(move || pipeline.run(opts).unwrap());
    feed.push(r#"{"k":"a"}"#);
    feed.push(r#"{"k":"a"}"#);
    eventually("both events to be read", || {
        metrics.total(rivulet::metrics::names::SOURCE_EVENTS) == 2
    });
    clock.set(15_000);
    eventually("the window [10000,15000) to fire", || {
        !main.records().is_empty()
    });
    drop(feed); // ends the input
    let stats = run.join().unwrap();
    assert!(!stats.stopped);
    assert_eq!(
        parse_all(main.records()),
        vec![json!({"k": "a", "window_start": 10000, "window_end": 15000, "n": 2})]
    );
}

/// A user-defined step, plugged in through the builder.
#[derive(Clone, Default)]
struct Double {
    slots: Vec<usize>,
}

impl rivulet::operators::Step for Double {
    fn fields(&self) -> Vec<String> {
        vec!["v".into(), "v2".into()]
    }
    fn bind(&mut self, slots: &[usize]) {
        self.slots = slots.to_vec();
    }
    fn process(&mut self, records: &mut rivulet::operators::Records<'_>) {
        for i in records.live() {
            match records.get(i)[self.slots[0]] {
                rivulet::value::Value::Int(v) if v < 0 => records.reject(i, "negative"),
                rivulet::value::Value::Int(v) => {
                    records.get_mut(i)[self.slots[1]] = rivulet::value::Value::Int(v * 2)
                }
                _ => records.drop_record(i),
            }
        }
    }
}

#[test]
fn a_custom_step_runs_on_every_worker() {
    let main = MemorySink::new();
    let dead = MemorySink::new();
    let lines: Vec<String> = (0..5000)
        .map(|i| ev(&format!("k{}", i % 50), i, if i == 7 { -1 } else { 1 }))
        .collect();
    let stats = Pipeline::builder("custom")
        .source(MemorySource::from_lines(&lines))
        .event_time("ts", ms(0))
        .step(Double::default())
        .key_by(["k"])
        .window(WindowDef::tumbling(ms(100_000)).aggregate("s", "sum(v2)"))
        .sink(main.clone())
        .dead_letter(Box::new(dead.clone()))
        .workers(3)
        .build()
        .unwrap()
        .run(RunOptions::default())
        .unwrap();
    assert_eq!(stats.dead_letters, 1);
    let total: i64 = parse_all(main.records())
        .iter()
        .map(|r| r["s"].as_i64().unwrap())
        .sum();
    assert_eq!(total, 2 * 4999);
    assert_eq!(parse_all(dead.records())[0]["reason"], "negative");
}

#[test]
fn nested_fields_and_compound_keys() {
    let lines = [
        r#"{"loc":{"site":"north","room":1},"ts":1,"m":{"v":2}}"#,
        r#"{"loc":{"site":"north","room":2},"ts":2,"m":{"v":3}}"#,
        r#"{"loc":{"site":"north","room":1},"ts":3,"m":{"v":4}}"#,
    ];
    let main = MemorySink::new();
    Pipeline::builder("nested")
        .source(MemorySource::from_lines(lines))
        .event_time("ts", ms(0))
        .key_by(["loc.site", "loc.room"])
        .window(WindowDef::tumbling(ms(1000)).aggregate("total", "sum(m.v)"))
        .sink(main.clone())
        .build()
        .unwrap()
        .run(RunOptions::default())
        .unwrap();
    assert_eq!(
        parse_all(main.records()),
        vec![
            json!({"loc.site":"north","loc.room":1,"window_start":0,"window_end":1000,"total":6}),
            json!({"loc.site":"north","loc.room":2,"window_start":0,"window_end":1000,"total":3}),
        ]
    );
}

#[test]
fn max_keys_bounds_state_and_dead_letters_new_keys() {
    // 10 keys, a bound of 4: the first keys seen keep their windows, events
    // of keys beyond the bound go to the dead-letter output with the reason.
    let lines: Vec<String> = (0..100)
        .map(|i| ev(&format!("k{}", i % 10), i, 1))
        .collect();
    let out = run_with(
        &lines,
        0,
        WindowDef::tumbling(ms(10_000))
            .aggregate("n", "count()")
            .max_keys(4),
        1,
    );
    let kept: std::collections::BTreeSet<&str> =
        out.main.iter().map(|r| r["k"].as_str().unwrap()).collect();
    assert_eq!(kept.len(), 4, "{kept:?}");
    assert_eq!(out.stats.dead_letters, 60);
    assert!(
        out.dead[0]["reason"]
            .as_str()
            .unwrap()
            .contains("max_keys (4)"),
        "{}",
        out.dead[0]
    );
    assert_eq!(
        out.main
            .iter()
            .map(|r| r["n"].as_i64().unwrap())
            .sum::<i64>(),
        40
    );
}

#[test]
fn the_run_context_counts_what_the_run_reports() {
    let lines: Vec<String> = vec![
        ev("a", 1000, 1),
        ev("b", 1500, 2),
        "not json".into(),
        ev("a", 9000, 3),
        ev("a", 1200, 4), // late: the watermark is at 8999 by now
        json!({"k": "c", "ts": 9100, "v": -5}).to_string(),
    ];
    let main = MemorySink::new();
    let opts = RunOptions::default();
    let metrics = opts.metrics.clone();
    let stats = Pipeline::builder("counted")
        .source(MemorySource::from_lines(&lines))
        .event_time("ts", ms(0))
        .filter("v >= 0")
        .key_by(["k"])
        .window(sum_count(WindowDef::tumbling(ms(1000))))
        .sink(main.clone())
        .workers(2)
        .build()
        .expect("valid pipeline")
        .run(opts)
        .expect("runs");
    use rivulet::metrics::names;
    assert_eq!(metrics.total(names::SOURCE_EVENTS), 6);
    assert_eq!(stats.events, 6);
    assert_eq!(
        metrics.total(names::DEAD_LETTERS) as u64,
        stats.dead_letters
    );
    assert_eq!(stats.dead_letters, 1);
    assert_eq!(metrics.total(names::LATE_EVENTS) as u64, stats.late);
    assert_eq!(stats.late, 1);
    assert_eq!(metrics.total(names::FILTERED_EVENTS) as u64, stats.filtered);
    assert_eq!(stats.filtered, 1);
    assert_eq!(
        metrics.sum(names::SINK_RECORDS, &[("sink", "main")]) as u64,
        stats.results
    );
    assert_eq!(stats.results, main.records().len() as u64);
    // Records into the window: all but the dead, filtered one.
    assert_eq!(
        metrics.sum(
            names::OPERATOR_RECORDS,
            &[("operator", "window"), ("direction", "in")]
        ),
        4
    );
    // Into the filter: every decoded event; out of it, one fewer.
    let filter = |dir: &str| {
        metrics.sum(
            names::OPERATOR_RECORDS,
            &[("operator", "filter_1"), ("direction", dir)],
        )
    };
    assert_eq!(filter("in") - filter("out"), 1);
    let into = |worker: &str| {
        metrics.sum(
            names::OPERATOR_RECORDS,
            &[
                ("pipeline", "counted"),
                ("operator", "window"),
                ("stream", "main"),
                ("direction", "in"),
                ("worker", worker),
            ],
        )
    };
    assert_eq!(into("0") + into("1"), 4);
    let text = metrics.render();
    assert!(
        text.contains("# TYPE rivulet_source_events_total counter"),
        "{text}"
    );
}

/// Runs `key_by(k)` then `step` over `lines` with event time (`bound` ms).
fn run_step(
    lines: &[String],
    bound: u64,
    step: impl Fn(rivulet::plan::PipelineBuilder) -> rivulet::plan::PipelineBuilder,
    workers: usize,
) -> Out {
    run_graph(lines, bound, |b| step(b.key_by(["k"])), workers)
}

/// `(k, ts)` of each output event.
fn stamps(v: &[Value]) -> Vec<(String, i64)> {
    v.iter()
        .map(|e| {
            (
                e["k"].as_str().unwrap().to_string(),
                e["ts"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn deadband_reports_by_exception_in_event_time_order() {
    // Key a, by time: 20.0 pass (first), 20.2 no, 20.6 pass (+0.6),
    // 20.7 no, 21.0 no (+0.4 from 20.6), 21.2 pass (+0.6); 21.3 after 6 s of
    // silence passes (max_silence 5 s). Key b: its first passes, a drop of
    // exactly delta passes. Arrival is out of order within the 2 s bound.
    let input = [
        ev_f("a", 2000, 20.2),
        ev_f("a", 1000, 20.0),
        ev_f("b", 1500, 5.0),
        ev_f("a", 4000, 20.7),
        ev_f("a", 3000, 20.6),
        ev_f("b", 2500, 4.5),
        ev_f("a", 5000, 21.0),
        ev_f("a", 6000, 21.2),
        ev_f("a", 12_000, 21.3),
        ev_f("a", 1000, 30.0), // behind the watermark by now: late
    ];
    let out = run_step(&input, 2000, |b| b.deadband("v", 0.5, Some(ms(5000))), 1);
    assert_eq!(
        stamps(&out.main),
        [
            ("a".into(), 1000),
            ("b".into(), 1500),
            ("b".into(), 2500),
            ("a".into(), 3000),
            ("a".into(), 6000),
            ("a".into(), 12_000),
        ]
    );
    assert_eq!(
        out.main[0],
        serde_json::from_str::<Value>(&input[1]).unwrap(),
        "the event as it came"
    );
    assert_eq!(out.late.len(), 1);
    let two = run_step(&input, 2000, |b| b.deadband("v", 0.5, Some(ms(5000))), 2);
    assert_eq!(two.main, out.main, "identical with two workers");
}

fn ev_f(k: &str, ts: i64, v: f64) -> String {
    json!({"k": k, "ts": ts, "v": v}).to_string()
}

fn ev_id(k: &str, ts: i64, id: i64) -> String {
    json!({"k": k, "ts": ts, "id": id}).to_string()
}

#[test]
fn deduplicate_drops_repeats_within_the_horizon_in_event_time() {
    // Within 1 s of the first (by time) of each id and key.
    let input = [
        ev_id("a", 1500, 7), // a repeat of 1000 (arrives first)
        ev_id("a", 1000, 7),
        ev_id("b", 1200, 7), // another key
        ev_id("a", 1300, 8),
        ev_id("a", 2000, 7), // 1000 after the first: passes
        ev_id("a", 2900, 7), // 900 after 2000: a repeat
        ev_id("a", 9000, 7),
    ];
    let out = run_step(&input, 1000, |b| b.deduplicate(["id"], ms(1000)), 1);
    assert_eq!(
        stamps(&out.main),
        [
            ("a".into(), 1000),
            ("b".into(), 1200),
            ("a".into(), 1300),
            ("a".into(), 2000),
            ("a".into(), 9000),
        ]
    );
    let two = run_step(&input, 1000, |b| b.deduplicate(["id"], ms(1000)), 2);
    assert_eq!(two.main, out.main, "identical with two workers");
}

#[test]
fn alert_raises_after_its_duration_even_without_events_and_clears_with_hysteresis() {
    // when v > 80 for 30 s, clear below 75.
    let input = [
        ev_f("a", 0, 85.0),      // holds from 0
        ev_f("a", 10_000, 78.0), // not hot: resets (not raised yet)
        ev_f("a", 20_000, 81.0), // holds from 20 s
        ev_f("b", 21_000, 90.0), // b: holds from 21 s, never cleared
        ev_f("a", 40_000, 82.0),
        ev_f("a", 55_000, 79.0),  // raised at 50 s; 79 is not below 75: stays
        ev_f("a", 60_000, 74.0),  // cleared
        ev_f("a", 200_000, 50.0), // moves the watermark past everything
    ];
    let alert = |b: rivulet::plan::PipelineBuilder| {
        b.alert("overheat", "v > 80", ms(30_000), Some("v < 75"))
    };
    let out = run_step(&input, 1000, alert, 1);
    let want = vec![
        json!({"k": "a", "alert": "overheat", "state": "raised", "at": 50_000}),
        json!({"k": "b", "alert": "overheat", "state": "raised", "at": 51_000}),
        json!({"k": "a", "alert": "overheat", "state": "cleared", "at": 60_000}),
    ];
    assert_eq!(out.main, want);
    // Out of order within the bound: the same alerts.
    let mut shuffled = input.to_vec();
    shuffled.swap(0, 1);
    shuffled.swap(4, 5);
    let out = run_step(&shuffled, 20_000, alert, 2);
    assert_eq!(out.main, want);
    // `clear` defaults to !(when), `for` to 0: raised at once.
    let out = run_step(&input, 1000, |b| b.alert("hot", "v > 80", ms(0), None), 1);
    let states: Vec<(String, String, i64)> = out
        .main
        .iter()
        .map(|r| {
            (
                r["k"].as_str().unwrap().into(),
                r["state"].as_str().unwrap().into(),
                r["at"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("a".into(), "raised".into(), 0),
            ("a".into(), "cleared".into(), 10_000),
            ("a".into(), "raised".into(), 20_000),
            ("b".into(), "raised".into(), 21_000),
            ("a".into(), "cleared".into(), 55_000),
        ]
    );
}

/// A pipeline of several stages over `lines` (event time, bound `bound`).
fn run_graph(
    lines: &[String],
    bound: u64,
    stages: impl Fn(rivulet::plan::PipelineBuilder) -> rivulet::plan::PipelineBuilder,
    workers: usize,
) -> Out {
    let (main, late, dead) = (MemorySink::new(), MemorySink::new(), MemorySink::new());
    let b = Pipeline::builder("test")
        .source(MemorySource::from_lines(lines))
        .event_time("ts", ms(bound));
    let stats = stages(b)
        .sink(main.clone())
        .late(Box::new(late.clone()))
        .dead_letter(Box::new(dead.clone()))
        .workers(workers)
        .build()
        .expect("valid pipeline")
        .run(RunOptions::default())
        .expect("runs");
    Out {
        main: parse_all(main.records()),
        late: parse_all(late.records()),
        dead: parse_all(dead.records()),
        stats,
    }
}

#[test]
fn a_window_of_windows_follows_flinks_rules() {
    // Stage 1: per key, 1 s sums. a: [0,1000) 1+2, [1000,2000) 3,
    // [2000,3000) 4, [3000,4000) 5, [5000,6000) 6; b: [0,1000) 10,
    // [2000,3000) 20. Each result's event time is its end − 1.
    // Stage 2: per key, 3 s windows of those: a [0,3000) = 3 windows,
    // total 10, max 4; a [3000,6000) = 2 windows (3999, 5999), total 11,
    // max 6; b [0,3000) = 2 windows, total 30, max 20.
    let input = [
        ev("a", 900, 2),
        ev("a", 100, 1), // out of order, within the 500 ms bound
        ev("b", 200, 10),
        ev("a", 1500, 3),
        ev("b", 2200, 20),
        ev("a", 2500, 4),
        ev("a", 3200, 5),
        ev("a", 5000, 6),
    ];
    let stages = |b: rivulet::plan::PipelineBuilder| {
        b.key_by(["k"])
            .window(WindowDef::tumbling(ms(1000)).aggregate("s", "sum(v)"))
            .key_by(["k"])
            .window(
                WindowDef::tumbling(ms(3000))
                    .aggregate("windows", "count()")
                    .aggregate("total", "sum(s)")
                    .aggregate("max", "max(s)"),
            )
    };
    let out = run_graph(&input, 500, stages, 1);
    let r = |k: &str, start: i64, windows: i64, total: i64, max: i64| {
        json!({"k": k, "window_start": start, "window_end": start + 3000,
               "windows": windows, "total": total, "max": max})
    };
    assert_eq!(
        out.main,
        vec![
            r("a", 0, 3, 10, 4),
            r("b", 0, 2, 30, 20),
            r("a", 3000, 2, 11, 6)
        ]
    );
    for workers in [2, 4] {
        assert_eq!(
            run_graph(&input, 500, stages, workers).main,
            out.main,
            "{workers} workers"
        );
    }
}

#[test]
fn steps_after_a_window_read_its_results_and_an_alert_watches_an_average() {
    // 10 s averages per sensor; keep those above 30 (map adds a field);
    // and, separately, an alert when the average stays above 30 for two
    // windows (20 s), cleared below 25.
    let mut input = Vec::new();
    for (w, a, b) in [
        (0, 20.0, 31.0),
        (1, 35.0, 33.0),
        (2, 36.0, 24.0),
        (3, 20.0, 40.0),
    ] {
        for i in 0..4 {
            let ts = w * 10_000 + i * 2_000 + 500;
            input.push(ev_f("a", ts, a));
            input.push(ev_f("b", ts + 100, b));
        }
    }
    input.push(ev_f("z", 100_000, 0.0)); // moves the watermark on
    let hot = run_graph(
        &input,
        1000,
        |b| {
            b.key_by(["k"])
                .window(WindowDef::tumbling(ms(10_000)).aggregate("avg", "avg(v)"))
                .filter("avg > 30")
                .map([("over", "avg - 30")])
        },
        2,
    );
    let kept: Vec<(String, i64, f64)> = hot
        .main
        .iter()
        .map(|r| {
            (
                r["k"].as_str().unwrap().to_string(),
                r["window_start"].as_i64().unwrap(),
                r["over"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kept,
        [
            ("b".into(), 0, 1.0),
            ("a".into(), 10_000, 5.0),
            ("b".into(), 10_000, 3.0),
            ("a".into(), 20_000, 6.0),
            ("b".into(), 30_000, 10.0),
        ]
    );
    // Average events are at 9999, 19999, 29999, 39999: a 20, 35, 36, 20;
    // b 31, 33, 24, 40.
    // With `for: 10s`: b raised at 19999, cleared at 29999 (24 < 25);
    // a raised at 29999, cleared at 39999; b above again from 39999 and
    // nothing says otherwise when the watermark passes 49999: raised.
    let alerts = run_graph(
        &input,
        1000,
        |b| {
            b.key_by(["k"])
                .window(WindowDef::tumbling(ms(10_000)).aggregate("avg", "avg(v)"))
                .key_by(["k"])
                .alert("warm", "avg > 30", ms(10_000), Some("avg < 25"))
        },
        1,
    );
    assert_eq!(
        alerts.main,
        vec![
            json!({"k": "b", "alert": "warm", "state": "raised", "at": 19_999}),
            json!({"k": "a", "alert": "warm", "state": "raised", "at": 29_999}),
            json!({"k": "b", "alert": "warm", "state": "cleared", "at": 29_999}),
            json!({"k": "a", "alert": "warm", "state": "cleared", "at": 39_999}),
            json!({"k": "b", "alert": "warm", "state": "raised", "at": 49_999}),
        ]
    );
}

/// Emits, per event, the change since the key's previous event (in event
/// time), from value state; and "gone" 10 s after the key's last event.
struct Delta;

impl rivulet::operators::stateful::KeyedProcess for Delta {
    fn name(&self) -> &str {
        "delta"
    }
    fn fields(&self) -> Vec<String> {
        vec!["v".into()]
    }
    fn output(&self) -> Vec<String> {
        vec!["delta".into(), "at".into()]
    }
    fn process(
        &self,
        ctx: &mut rivulet::operators::stateful::KeyContext<'_>,
        values: &[rivulet::value::Value],
    ) {
        use rivulet::value::Value;
        let v = values[0].as_f64().unwrap_or(0.0);
        if let Some(prev) = ctx.value().and_then(Value::as_f64) {
            ctx.emit(vec![Value::Float(v - prev), Value::Int(ctx.time())]);
        }
        ctx.set_value(Value::Float(v));
        ctx.insert("last", Value::Int(ctx.time()));
        ctx.timer(ctx.time() + 10_000);
    }
    fn on_timer(
        &self,
        ctx: &mut rivulet::operators::stateful::KeyContext<'_>,
        timer: rivulet::operators::stateful::Timer,
    ) {
        use rivulet::value::Value;
        if let rivulet::operators::stateful::Timer::EventTime(at) = timer {
            if ctx.get("last") == Some(&Value::Int(at - 10_000)) {
                ctx.emit(vec![Value::Str("gone".into()), Value::Int(at)]);
                ctx.clear();
            }
        }
    }
}

#[test]
fn a_process_function_sees_each_keys_events_in_event_time_order() {
    let input = [
        ev_f("a", 2000, 12.0),
        ev_f("a", 1000, 10.0), // out of order: by time 10, 12, 15.5
        ev_f("b", 1500, 1.0),
        ev_f("a", 3000, 15.5),
        ev_f("b", 20_000, 4.0), // after 18.5 s: a and b were gone
        ev_f("z", 60_000, 0.0),
    ];
    let run = |workers| run_step(&input, 2000, |b| b.process(Delta), workers);
    let out = run(1);
    assert_eq!(
        out.main,
        vec![
            json!({"k": "a", "delta": 2.0, "at": 2000}),
            json!({"k": "a", "delta": 3.5, "at": 3000}),
            json!({"k": "b", "delta": "gone", "at": 11_500}),
            json!({"k": "a", "delta": "gone", "at": 13_000}),
            json!({"k": "b", "delta": "gone", "at": 30_000}),
            json!({"k": "z", "delta": "gone", "at": 70_000}),
        ]
    );
    assert_eq!(run(2).main, out.main, "identical with two workers");
}

#[test]
fn max_keys_bounds_a_stateful_steps_state_and_dead_letters_new_keys() {
    use rivulet::operators::stateful::StatefulDef;
    let input: Vec<String> = (0..6)
        .map(|i| ev_f(&format!("k{i}"), 1000 + i, 1.0))
        .collect();
    for workers in [1, 2] {
        let out = run_step(
            &input,
            0,
            |b| {
                b.stateful_limited(
                    StatefulDef::Deadband {
                        field: "v".into(),
                        delta: 1.0,
                        max_silence: None,
                    },
                    Some(4),
                )
            },
            workers,
        );
        // Each worker holds its share of the 4 keys; the others' events
        // are dead letters that say why.
        assert_eq!(out.main.len() + out.dead.len(), 6, "{workers} workers");
        assert!(out.main.len() <= 4 && out.main.len() >= 2, "{:?}", out.main);
        for d in &out.dead {
            assert!(
                d["reason"]
                    .as_str()
                    .unwrap()
                    .contains("deadband state is full"),
                "{d}"
            );
        }
    }
    // One worker: exactly the first four keys pass.
    let out = run_step(
        &input,
        0,
        |b| {
            b.stateful_limited(
                StatefulDef::Deduplicate {
                    fields: vec!["v".into()],
                    within: 1000,
                },
                Some(4),
            )
        },
        1,
    );
    assert_eq!(
        stamps(&out.main)
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>(),
        ["k0", "k1", "k2", "k3"]
    );
    assert_eq!(out.dead.len(), 2);
}

#[test]
fn a_job_graph_fans_out_unions_and_windows_results_with_late_records_named() {
    // The stream `per_second` (1 s sums per key, as in
    // `a_window_of_windows_follows_flinks_rules`) feeds `big` (sums of 5
    // and more) and `per_3s` (a global 3 s window of every key's sums);
    // `both` is the union of those two.
    let input = [
        ev("a", 900, 2),
        ev("a", 100, 1),
        ev("b", 200, 10),
        ev("a", 1500, 3),
        ev("b", 2200, 20),
        ev("a", 2500, 4),
        ev("a", 3200, 5),
        ev("a", 5000, 6),
        ev("a", 50, 100), // the watermark is at 4499: late for [0, 1000)
    ];
    let run = |workers: usize| {
        let sinks: Vec<MemorySink> = (0..5).map(|_| MemorySink::new()).collect();
        Pipeline::builder("graph")
            .source(MemorySource::from_lines(&input))
            .event_time("ts", ms(500))
            .stream_name("per_second")
            .key_by(["k"])
            .window(WindowDef::tumbling(ms(1000)).aggregate("s", "sum(v)"))
            .sink(sinks[0].clone())
            .stream(
                "big",
                &["per_second"],
                Pipeline::builder("big")
                    .filter("s >= 5")
                    .sink(sinks[1].clone()),
            )
            .stream(
                "per_3s",
                &["per_second"],
                Pipeline::builder("per_3s")
                    .window(
                        WindowDef::tumbling(ms(3000))
                            .aggregate("windows", "count()")
                            .aggregate("total", "sum(s)"),
                    )
                    .sink(sinks[2].clone()),
            )
            .stream(
                "both",
                &["big", "per_3s"],
                Pipeline::builder("both").sink(sinks[3].clone()),
            )
            .late(Box::new(sinks[4].clone()))
            .workers(workers)
            .build()
            .expect("valid pipeline")
            .run(RunOptions::default())
            .expect("runs");
        sinks
            .iter()
            .map(|s| parse_all(s.records()))
            .collect::<Vec<_>>()
    };
    let out = run(1);
    let s = |k: &str, start: i64, s: i64| json!({"k": k, "window_start": start, "window_end": start + 1000, "s": s});
    let mut per_second = out[0].clone();
    per_second.sort_by_key(|r| {
        (
            r["window_start"].as_i64(),
            r["k"].as_str().map(String::from),
        )
    });
    assert_eq!(
        per_second,
        [
            s("a", 0, 3),
            s("b", 0, 10),
            s("a", 1000, 3),
            s("a", 2000, 4),
            s("b", 2000, 20),
            s("a", 3000, 5),
            s("a", 5000, 6),
        ]
    );
    let big: Vec<&Value> = out[0]
        .iter()
        .filter(|r| r["s"].as_i64() >= Some(5))
        .collect();
    assert_eq!(
        out[1].iter().collect::<Vec<_>>(),
        big,
        "big keeps the order of per_second"
    );
    let w = |start: i64, windows: i64, total: i64| json!({"window_start": start, "window_end": start + 3000, "windows": windows, "total": total});
    assert_eq!(out[2], [w(0, 5, 40), w(3000, 2, 11)]);
    // The union has the fields of both; each record those of its own.
    let mut both: Vec<Value> = out[3]
        .iter()
        .map(|r| {
            let o = r.as_object().expect("records are objects");
            Value::Object(
                o.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )
        })
        .collect();
    let mut want: Vec<Value> = out[1].iter().chain(&out[2]).cloned().collect();
    both.sort_by_key(|v| v.to_string());
    want.sort_by_key(|v| v.to_string());
    assert_eq!(both, want);
    assert_eq!(
        out[4],
        [json!({"stream": "per_second", "k": "a", "ts": 50, "v": 100})]
    );
    for workers in [2, 3] {
        assert_eq!(run(workers), out, "{workers} workers");
    }
}

#[test]
fn a_job_graph_reports_streams_it_cannot_run() {
    let build = |b: rivulet::plan::PipelineBuilder| match b.build() {
        Ok(_) => panic!("builds"),
        Err(e) => e.0.join("\n"),
    };
    let base = || {
        Pipeline::builder("g")
            .source(MemorySource::from_lines(&[ev("a", 1, 1)]))
            .event_time("ts", ms(0))
            .stream_name("head")
    };
    // Read without a window: events have no known fields.
    let e = build(base().filter("v > 0").stream(
        "x",
        &["head"],
        Pipeline::builder("x").sink(MemorySink::new()),
    ));
    assert!(
        e.contains("stream `head` is read by other streams, so it needs a window"),
        "{e}"
    );
    let windowed = || {
        base()
            .key_by(["k"])
            .window(WindowDef::tumbling(ms(1000)).aggregate("n", "count()"))
    };
    let e = build(windowed().stream(
        "x",
        &["nope"],
        Pipeline::builder("x").sink(MemorySink::new()),
    ));
    assert!(
        e.contains("stream `x`: reads `nope`, which is not a stream before it"),
        "{e}"
    );
    assert!(e.contains("stream `head`: its records go nowhere"), "{e}");
    let e = build(windowed().sink(MemorySink::new()).stream(
        "x",
        &["head"],
        Pipeline::builder("x").deadband("n", 1.0, None),
    ));
    assert!(
        e.contains("stream `x`: steps[0]: a stateful step keeps state per key"),
        "{e}"
    );
    assert!(e.contains("stream `x`: its records go nowhere"), "{e}");
}

#[test]
fn a_union_of_sources_keeps_a_watermark_per_source() {
    // `live` is far ahead of `backlog` (which names its time `at`, and is
    // out of order within its own 500 ms bound). One watermark over both
    // would make every backlog event late; one per source makes none late.
    let live = [ev("a", 5000, 1), ev("a", 5500, 2), ev("a", 9000, 3)];
    let backlog: Vec<String> = [(100, 10), (1200, 20), (800, 5)]
        .iter()
        .map(|(at, v)| json!({"k": "b", "at": at, "v": v}).to_string())
        .collect();
    let run = |workers: usize| {
        let (main, late) = (MemorySink::new(), MemorySink::new());
        let event = |field: &str, bound: i64| rivulet::plan::TimeMode::Event {
            field: field.into(),
            max_out_of_orderness: bound,
            idle_timeout: None,
            stamps: Default::default(),
        };
        let part = |name: &str, lines: &[String], time| rivulet::plan::UnionPart {
            name: name.into(),
            source: Box::new(MemorySource::from_lines(lines)),
            time,
            max_payload: 1 << 20,
        };
        let stats = Pipeline::builder("union")
            .union(vec![
                part("live", &live, event("ts", 0)),
                part("backlog", &backlog, event("at", 500)),
            ])
            .key_by(["k"])
            .window(sum_count(WindowDef::tumbling(ms(1000))))
            .sink(main.clone())
            .late(Box::new(late.clone()))
            .workers(workers)
            .build()
            .expect("valid pipeline")
            .run(RunOptions::default())
            .expect("runs");
        assert_eq!(stats.late, 0);
        assert!(late.records().is_empty());
        let mut got = parse_all(main.records());
        got.sort_by_key(|v| v.to_string());
        got
    };
    let mut want = vec![
        res("a", 5000, 6000, 3, 2),
        res("a", 9000, 10000, 3, 1),
        res("b", 0, 1000, 15, 2),
        res("b", 1000, 2000, 20, 1),
    ];
    want.sort_by_key(|v| v.to_string());
    assert_eq!(run(1), want);
    assert_eq!(run(3), want);
}

#[test]
fn several_streams_read_the_source_each_as_its_own_pipeline_would() {
    // `per_key` (after a filter of its own) and two more streams over the
    // same events: a global 2 s count, and per-key 1 s maxima then 3 s
    // sums of those (a window of windows). Each equals a one-stream
    // pipeline with the same steps, for any number of workers.
    let mut input = Vec::new();
    let mut x = 11u64;
    for i in 0..3000i64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = ["a", "b", "c", "d"][(x % 4) as usize];
        input.push(ev(k, i * 7 - (x % 400) as i64, (x % 50) as i64));
    }
    let per_key = |b: rivulet::plan::PipelineBuilder| {
        b.filter("v > 10")
            .key_by(["k"])
            .window(sum_count(WindowDef::tumbling(ms(1000))))
    };
    let global = |b: rivulet::plan::PipelineBuilder| {
        b.window(WindowDef::tumbling(ms(2000)).aggregate("n", "count()"))
    };
    let maxima = |b: rivulet::plan::PipelineBuilder| {
        b.key_by(["k"])
            .window(WindowDef::tumbling(ms(1000)).aggregate("hi", "max(v)"))
            .key_by(["k"])
            .window(WindowDef::tumbling(ms(3000)).aggregate("total", "sum(hi)"))
    };
    for workers in [1, 3] {
        let sinks: Vec<MemorySink> = (0..3).map(|_| MemorySink::new()).collect();
        let late = MemorySink::new();
        let stats = per_key(
            Pipeline::builder("g")
                .source(MemorySource::from_lines(&input))
                .event_time("ts", ms(300))
                .stream_name("per_key"),
        )
        .sink(sinks[0].clone())
        .source_stream(
            "global",
            global(Pipeline::builder("global")).sink(sinks[1].clone()),
        )
        .source_stream(
            "maxima",
            maxima(Pipeline::builder("maxima")).sink(sinks[2].clone()),
        )
        .late(Box::new(late.clone()))
        .workers(workers)
        .build()
        .expect("valid pipeline")
        .run(RunOptions::default())
        .expect("runs");
        assert_eq!(stats.events, 3000);
        let alone =
            |stages: &dyn Fn(rivulet::plan::PipelineBuilder) -> rivulet::plan::PipelineBuilder| {
                run_graph(&input, 300, stages, 1)
            };
        let want = [alone(&per_key), alone(&global), alone(&maxima)];
        for (i, (sink, want)) in sinks.iter().zip(&want).enumerate() {
            assert!(
                want.main.len() > 3,
                "stream {i}: {} results",
                want.main.len()
            );
            assert_eq!(
                parse_all(sink.records()),
                want.main,
                "stream {i}, {workers} workers"
            );
        }
        // Late events are named by the stream they were late for.
        let mut late_per_stream: BTreeMap<String, usize> = BTreeMap::new();
        for r in parse_all(late.records()) {
            *late_per_stream
                .entry(r["stream"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        let want_late: BTreeMap<String, usize> = [
            ("per_key", &want[0]),
            ("global", &want[1]),
            ("maxima", &want[2]),
        ]
        .iter()
        .filter(|(_, w)| !w.late.is_empty())
        .map(|(n, w)| (n.to_string(), w.late.len()))
        .collect();
        assert_eq!(
            want_late.len(),
            3,
            "each stream has late events: {want_late:?}"
        );
        assert_eq!(late_per_stream, want_late);
    }
}

#[test]
fn a_window_after_deduplicate_counts_each_message_once() {
    // QoS 1 redeliveries: some messages come twice (same `id`, possibly
    // out of order within the bound). Deduplicated per key, then 1 s
    // windows: the same results as windows over the input without its
    // duplicates.
    let mut input = Vec::new();
    let mut unique = Vec::new();
    let mut x = 5u64;
    for i in 0..2000i64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = ["a", "b", "c"][(x % 3) as usize];
        let line = json!({"k": k, "id": i, "ts": i * 5 - (x % 200) as i64, "v": (x % 9) as i64})
            .to_string();
        unique.push(line.clone());
        input.push(line.clone());
        if x % 4 == 0 {
            input.push(line); // a redelivery
        }
    }
    assert!(input.len() > unique.len() + 300);
    let window = || sum_count(WindowDef::tumbling(ms(1000)));
    let want = run_graph(&unique, 300, |b| b.key_by(["k"]).window(window()), 1);
    assert!(want.main.len() > 20);
    for workers in [1, 3] {
        let got = run_graph(
            &input,
            300,
            |b| {
                b.key_by(["k"])
                    .deduplicate(["id"], ms(60_000))
                    .filter("v >= 0")
                    .key_by(["k"])
                    .window(window())
            },
            workers,
        );
        assert_eq!(got.main, want.main, "{workers} workers");
        assert_eq!(got.late, want.late);
    }
}

#[test]
fn a_tee_forwards_events_beside_a_window_as_a_pass_through_pipeline_would() {
    // `per_key` windows the events; `forward` (a tee: a filter and a map
    // of its own, no window) writes the events it keeps, with its field
    // added, exactly as a one-stream pass-through pipeline does. Neither
    // sees the other's steps.
    let mut input = Vec::new();
    let mut x = 9u64;
    for i in 0..2000i64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        input.push(ev(
            ["a", "b", "c"][(x % 3) as usize],
            i * 10 - (x % 100) as i64,
            (x % 40) as i64,
        ));
    }
    input.push("{not json".to_string());
    let forward = |b: rivulet::plan::PipelineBuilder| b.filter("v > 30").map([("double", "v * 2")]);
    let alone = {
        let sink = MemorySink::new();
        forward(Pipeline::builder("alone").source(MemorySource::from_lines(&input)))
            .sink(sink.clone())
            .build()
            .expect("valid")
            .run(RunOptions::default())
            .expect("runs");
        sink.records()
    };
    assert!(alone.len() > 100, "{} forwarded", alone.len());
    let windows = run_graph(
        &input,
        100,
        |b| {
            b.filter("v < 35")
                .key_by(["k"])
                .window(sum_count(WindowDef::tumbling(ms(1000))))
        },
        1,
    );
    for workers in [1, 3] {
        let (main, tee, dead) = (MemorySink::new(), MemorySink::new(), MemorySink::new());
        Pipeline::builder("tee")
            .source(MemorySource::from_lines(&input))
            .event_time("ts", ms(100))
            .stream_name("per_key")
            .filter("v < 35")
            .key_by(["k"])
            .window(sum_count(WindowDef::tumbling(ms(1000))))
            .sink(main.clone())
            .source_stream(
                "forward",
                forward(Pipeline::builder("forward")).sink(tee.clone()),
            )
            .dead_letter(Box::new(dead.clone()))
            .workers(workers)
            .build()
            .expect("valid pipeline")
            .run(RunOptions::default())
            .expect("runs");
        assert_eq!(tee.records(), alone, "{workers} workers");
        assert_eq!(parse_all(main.records()), windows.main, "{workers} workers");
        assert_eq!(dead.records().len(), 1, "the bad line, once");
    }
}

#[test]
fn a_bridge_with_two_tees_forwards_each_its_own_events() {
    let input: Vec<String> = (0..500)
        .map(|i| ev(["a", "b"][i % 2], i as i64, (i % 10) as i64))
        .collect();
    let (low, high, all) = (MemorySink::new(), MemorySink::new(), MemorySink::new());
    let (bad, dead) = (MemorySink::new(), MemorySink::new());
    let stats = Pipeline::builder("bridge")
        .source(MemorySource::from_lines(&input))
        .stream_name("all")
        .sink(all.clone())
        // Its filter fails on every event: each is a dead letter, named.
        .source_stream(
            "bad",
            Pipeline::builder("bad")
                .filter("k * 2 > 1")
                .sink(bad.clone()),
        )
        .dead_letter(Box::new(dead.clone()))
        .source_stream(
            "low",
            Pipeline::builder("low").filter("v < 3").sink(low.clone()),
        )
        .source_stream(
            "high",
            Pipeline::builder("high")
                .filter("v >= 7")
                .sink(high.clone()),
        )
        .build()
        .expect("valid pipeline")
        .run(RunOptions::default())
        .expect("runs");
    assert_eq!(stats.events, 500);
    assert_eq!(all.records(), input);
    let pick = |keep: &dyn Fn(i64) -> bool| -> Vec<String> {
        input
            .iter()
            .filter(|l| {
                keep(
                    serde_json::from_str::<Value>(l).unwrap()["v"]
                        .as_i64()
                        .unwrap(),
                )
            })
            .cloned()
            .collect()
    };
    assert_eq!(low.records(), pick(&|v| v < 3));
    assert_eq!(high.records(), pick(&|v| v >= 7));
    assert!(bad.records().is_empty());
    let dead = parse_all(dead.records());
    assert_eq!(dead.len(), 500);
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("stream `bad`: "),
        "{}",
        dead[0]
    );
}
