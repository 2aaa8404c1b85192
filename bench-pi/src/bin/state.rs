//! State benchmark: checkpoint duration and size for 10k and 100k keys,
//! recovery time, and engine throughput with checkpoints every second
//! against none (same events, same process kind, interleaved runs).
//!
//! `state checkpoint KEYS`: one full and one incremental (10 %) checkpoint.
//! `state recover KEYS`: write KEYS keys, then time opening and loading them.
//! `state engine EVERY_MS EVENTS`: the engine benchmark's pipeline with
//! checkpoints every EVERY_MS (0: no state). Each prints one JSON line.

use rivulet::operators::window::{Acc, AggFunc, KeySnapshot, WindowDef};
use rivulet::plan::Pipeline;
use rivulet::sinks::NullSink;
use rivulet::state::{Pending, StateStore};
use rivulet::value::{encode_key, Value};
use rivulet::RunOptions;
use rivulet_bench::{usage, SyntheticJson};
use std::time::{Duration, Instant};

fn snapshot(i: u64) -> KeySnapshot {
    let mut accs = vec![
        Acc::new(AggFunc::Avg),
        Acc::new(AggFunc::Max),
        Acc::new(AggFunc::Count),
    ];
    for (j, a) in accs.iter_mut().enumerate() {
        a.add(&Value::Float((i + j as u64) as f64 / 3.0), 0, 0);
    }
    KeySnapshot {
        windows: vec![(1_700_000_000_000, 1_700_000_005_000)],
        accs,
    }
}

fn decl() -> rivulet::operators::keyed::StateDecl {
    rivulet::operators::keyed::StateDecl {
        name: "window",
        version: 1,
        fingerprint: "bench".into(),
        layout: "{}".into(),
    }
}

fn key(i: u64) -> Box<[u8]> {
    let mut k = Vec::new();
    encode_key(&Value::Str(format!("sensor-{i:06}").into()), &mut k);
    k.into()
}

fn fill(keys: u64, step: u64) -> Pending {
    let mut p = Pending::default();
    for i in (0..keys).step_by(step as usize) {
        p.upsert(
            0,
            key(i),
            postcard::to_stdvec(&snapshot(i)).expect("a snapshot encodes"),
        );
    }
    p
}

fn checkpoint(keys: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut store, _) = StateStore::open(dir.path(), &[decl()], false).expect("open");
    let mut full = fill(keys, 1);
    let t = Instant::now();
    store.commit(&[], 0, 0, &mut full).expect("commit");
    let full_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut part = fill(keys, 10);
    let t = Instant::now();
    store.commit(&[], 0, 0, &mut part).expect("commit");
    let part_ms = t.elapsed().as_secs_f64() * 1000.0;
    let size = std::fs::metadata(store.path())
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({"bench": "checkpoint", "keys": keys, "full_ms": full_ms,
            "incremental_10pct_ms": part_ms, "file_mb": size as f64 / (1 << 20) as f64})
    );
}

fn recover(keys: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (mut store, _) = StateStore::open(dir.path(), &[decl()], false).expect("open");
        store.commit(&[], 0, 0, &mut fill(keys, 1)).expect("commit");
    }
    let t = Instant::now();
    let (_, restored) = StateStore::open(dir.path(), &[decl()], false).expect("open");
    let restored = restored.expect("state");
    let load_ms = t.elapsed().as_secs_f64() * 1000.0;
    let def = WindowDef::tumbling(Duration::from_secs(5))
        .aggregate("a", "avg(x)")
        .aggregate("m", "max(x)")
        .aggregate("n", "count()");
    let mut op = rivulet::operators::window::WindowStep::new(
        def,
        rivulet::operators::window::WindowStepOptions {
            key_names: vec!["sensor_id".into()],
            ..Default::default()
        },
    );
    let t = Instant::now();
    rivulet::operators::keyed::KeyedOperator::restore(&mut op, 0, restored.keys.concat())
        .expect("the records decode");
    let restore_ms = t.elapsed().as_secs_f64() * 1000.0;
    println!(
        "{}",
        serde_json::json!({"bench": "recover", "keys": keys, "load_ms": load_ms,
            "restore_ms": restore_ms, "total_ms": load_ms + restore_ms})
    );
}

fn engine(every_ms: u64, events: u64, keys: u32) {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = SyntheticJson::new(events, keys, 100_000);
    let mut b = Pipeline::builder("bench")
        .source(src)
        .event_time("ts", Duration::from_secs(1))
        .key_by(["sensor_id"])
        .window(
            WindowDef::tumbling(Duration::from_secs(5))
                .aggregate("avg_t", "avg(temperature)")
                .aggregate("max_t", "max(temperature)")
                .aggregate("n", "count()"),
        )
        .sink(NullSink)
        .workers(2);
    if every_ms > 0 {
        b = b.state(dir.path(), Duration::from_millis(every_ms));
    }
    let (cpu0, _) = usage();
    let t = Instant::now();
    let stats = b
        .build()
        .expect("valid")
        .run(RunOptions::default())
        .expect("runs");
    let wall = t.elapsed().as_secs_f64();
    let (cpu1, rss) = usage();
    println!(
        "{}",
        serde_json::json!({"bench": "engine", "checkpoint_every_ms": every_ms, "keys": keys, "events": stats.events,
            "events_per_s": events as f64 / wall, "cpu_us_per_event": (cpu1 - cpu0).as_secs_f64() * 1e6 / events as f64,
            "peak_rss_mb": rss as f64 / (1 << 20) as f64})
    );
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n = |i: usize, d: u64| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    match a.get(1).map(String::as_str) {
        Some("checkpoint") => checkpoint(n(2, 10_000)),
        Some("recover") => recover(n(2, 100_000)),
        Some("engine") => engine(n(2, 0), n(3, 3_000_000), n(4, 10_000) as u32),
        _ => eprintln!(
            "usage: state checkpoint KEYS | state recover KEYS | state engine EVERY_MS EVENTS [KEYS]"
        ),
    }
}
