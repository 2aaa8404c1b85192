//! Engine benchmark: JSON Lines in memory → parse → key_by → 5 s tumbling
//! avg/max/count over 10,000 keys → discard.
//!
//! `engine rivulet WORKERS EVENTS` runs rivulet; `engine baseline EVENTS`
//! runs a hand-written single-threaded loop (serde_json into a struct, a
//! HashMap of windows) on the same events. Each prints one JSON line with
//! events/s, CPU-µs per event and peak RSS. Run one configuration per
//! process (peak RSS is per process): see `engine.sh`.

use rivulet::operators::window::WindowDef;
use rivulet::plan::Pipeline;
use rivulet::sinks::NullSink;
use rivulet::RunOptions;
use rivulet_bench::{usage, SyntheticJson};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const KEYS: u32 = 10_000;
const EVENTS_PER_SECOND: u64 = 100_000;

fn report(
    mode: &str,
    workers: usize,
    events: u64,
    results: u64,
    wall: Duration,
    cpu: Duration,
    rss: u64,
) {
    println!(
        "{}",
        serde_json::json!({
            "mode": mode,
            "workers": workers,
            "events": events,
            "results": results,
            "wall_s": wall.as_secs_f64(),
            "events_per_s": events as f64 / wall.as_secs_f64(),
            "cpu_us_per_event": cpu.as_secs_f64() * 1e6 / events as f64,
            "peak_rss_mb": rss as f64 / (1 << 20) as f64,
        })
    );
}

#[derive(serde::Deserialize)]
struct Reading<'a> {
    sensor_id: &'a str,
    ts: i64,
    temperature: f64,
}

fn baseline(events: u64) {
    let src = SyntheticJson::new(events, KEYS, EVENTS_PER_SECOND);
    let (cpu0, _) = usage();
    let start = Instant::now();
    let mut windows: HashMap<(String, i64), (f64, f64, u64)> = HashMap::new();
    let mut max_ts = i64::MIN;
    let mut results = 0u64;
    let mut line = Vec::with_capacity(128);
    for i in 0..events {
        src.render(i, &mut line);
        let r: Reading = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(_) => continue,
        };
        let w = r.ts - r.ts.rem_euclid(5000);
        let e = windows
            .entry((r.sensor_id.to_string(), w))
            .or_insert((0.0, f64::MIN, 0));
        e.0 += r.temperature;
        e.1 = e.1.max(r.temperature);
        e.2 += 1;
        if r.ts > max_ts + 5000 {
            // Fire closed windows now and then (watermark = max - 1 s).
            max_ts = r.ts;
            let wm = max_ts - 1001;
            let before = windows.len();
            windows.retain(|(_, s), v| {
                let keep = s + 4999 > wm;
                if !keep {
                    std::hint::black_box((v.0 / v.2 as f64, v.1, v.2));
                }
                keep
            });
            results += (before - windows.len()) as u64;
        }
    }
    results += windows.len() as u64;
    let wall = start.elapsed();
    let (cpu1, rss) = usage();
    report("baseline", 1, events, results, wall, cpu1 - cpu0, rss);
}

/// The first stage of both rivulet cases: 5 s averages, maxima and counts
/// per sensor.
fn first_stage(b: rivulet::plan::PipelineBuilder) -> rivulet::plan::PipelineBuilder {
    b.event_time("ts", Duration::from_secs(1))
        .key_by(["sensor_id"])
        .window(
            WindowDef::tumbling(Duration::from_secs(5))
                .aggregate("avg_t", "avg(temperature)")
                .aggregate("max_t", "max(temperature)")
                .aggregate("n", "count()"),
        )
}

/// Runs the pipeline `stages` builds over `events` synthetic events and
/// reports it as `mode`.
fn measure(
    mode: &str,
    workers: usize,
    events: u64,
    stages: impl FnOnce(rivulet::plan::PipelineBuilder) -> rivulet::plan::PipelineBuilder,
) {
    let src = SyntheticJson::new(events, KEYS, EVENTS_PER_SECOND);
    let (cpu0, _) = usage();
    let start = Instant::now();
    let stats = stages(Pipeline::builder("bench").source(src))
        .sink(NullSink)
        .workers(workers)
        .build()
        .expect("valid pipeline")
        .run(RunOptions::default())
        .expect("runs");
    let wall = start.elapsed();
    let (cpu1, rss) = usage();
    assert_eq!(stats.events, events);
    report(mode, workers, events, stats.results, wall, cpu1 - cpu0, rss);
}

fn rivulet(workers: usize, events: u64) {
    measure("rivulet", workers, events, first_stage);
}

/// The same first stage, then two more: a filter, 1-minute maxima of the
/// 5 s averages per sensor, and an alert on those (a three-stage graph:
/// what steps after a window cost against the one-window pipeline).
fn graph(workers: usize, events: u64) {
    measure("graph", workers, events, |b| {
        first_stage(b)
            .filter("n > 0")
            .key_by(["sensor_id"])
            .window(
                WindowDef::tumbling(Duration::from_secs(60))
                    .aggregate("hi", "max(avg_t)")
                    .aggregate("windows", "count()"),
            )
            .key_by(["sensor_id"])
            .alert("warm", "hi > 75", Duration::from_secs(60), Some("hi < 70"))
    });
}

/// A job graph of three streams: the same first stage, whose results go
/// to a sink and feed two more streams, the warm ones (a filter) and
/// 1-minute maxima per sensor (a window of its windows), each with its
/// own sink: what fan-out and per-stream sinks cost against the
/// one-window pipeline.
fn streams(workers: usize, events: u64) {
    measure("streams", workers, events, |b| {
        first_stage(b)
            .stream_name("per_sensor")
            .stream(
                "warm",
                &["per_sensor"],
                Pipeline::builder("warm")
                    .filter("avg_t > 75")
                    .sink(NullSink),
            )
            .stream(
                "per_minute",
                &["per_sensor"],
                Pipeline::builder("per_minute")
                    .key_by(["sensor_id"])
                    .window(
                        WindowDef::tumbling(Duration::from_secs(60))
                            .aggregate("hi", "max(avg_t)")
                            .aggregate("windows", "count()"),
                    )
                    .sink(NullSink),
            )
    });
}

/// The one-window pipeline with a tee beside it: every event, through a
/// filter of its own, forwarded as it came (bridge and window in one
/// process): what a tee costs per event.
fn tee(workers: usize, events: u64) {
    measure("tee", workers, events, |b| {
        first_stage(b).stream_name("per_sensor").source_stream(
            "forward",
            Pipeline::builder("forward")
                .filter("temperature > -40")
                .sink(NullSink),
        )
    });
}

/// What the source alone costs: rendering the lines the others consume.
fn source_only(events: u64) {
    let src = SyntheticJson::new(events, KEYS, EVENTS_PER_SECOND);
    let (cpu0, _) = usage();
    let start = Instant::now();
    let mut line = Vec::with_capacity(128);
    let mut sum = 0usize;
    for i in 0..events {
        src.render(i, &mut line);
        sum += line.len();
    }
    std::hint::black_box(sum);
    let wall = start.elapsed();
    let (cpu1, rss) = usage();
    report("source-only", 1, events, 0, wall, cpu1 - cpu0, rss);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, d: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    match args.get(1).map(String::as_str) {
        Some("baseline") => baseline(num(2, 10_000_000)),
        Some("rivulet") => rivulet(num(2, 1) as usize, num(3, 10_000_000)),
        Some("source") => source_only(num(2, 10_000_000)),
        Some("graph") => graph(num(2, 1) as usize, num(3, 10_000_000)),
        Some("streams") => streams(num(2, 1) as usize, num(3, 10_000_000)),
        Some("tee") => tee(num(2, 1) as usize, num(3, 10_000_000)),
        Some("line-length") => println!("{:.1}", SyntheticJson::new(1, KEYS, 1).avg_len()),
        _ => eprintln!(
            "usage: engine baseline EVENTS | engine rivulet WORKERS EVENTS | engine graph WORKERS EVENTS | engine streams WORKERS EVENTS | engine tee WORKERS EVENTS"
        ),
    }
}
