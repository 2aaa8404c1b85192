//! The window operator alone: a [`KeyedOperator`] fed prepared
//! [`KeyedBatch`]es, as the keyed stage feeds it, with no decoding, no
//! channels and no sinks. Guards refactors of the operator: run it before
//! and after a change, in one script (`window.sh`).
//!
//! `window EVENTS [KEYS]`: 5 s tumbling `avg`, `max`, `count` over KEYS
//! keys (default 10,000), 100,000 events per second of event time with up
//! to 500 ms of disorder, 1 s bound; batches of 1,024 with the watermark
//! raised where the running maximum rises. Prints one JSON line: ns and
//! CPU-ns per event, results.

use rivulet::msg::{KeyedBatch, KeyedRec, Order, Output};
use rivulet::operators::keyed::KeyedOperator;
use rivulet::operators::window::{WindowDef, WindowStep, WindowStepOptions};
use rivulet::time::valve::WatermarkValve;
use rivulet::value::{encode_key, hash_key, Value};
use rivulet_bench::usage;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCH: u64 = 1024;

fn batches(events: u64, keys: u64) -> Vec<KeyedBatch> {
    let mut out = Vec::new();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut running = i64::MIN;
    for start in (0..events).step_by(BATCH as usize) {
        let mut b = KeyedBatch::default();
        let mut wms = Vec::new();
        for i in start..(start + BATCH).min(events) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ts = 1_700_000_000_000 + (i / 100) as i64 - (x % 500) as i64;
            let k0 = b.keys.len() as u32;
            encode_key(
                &Value::Str(format!("sensor-{}", x % keys).into()),
                &mut b.keys,
            );
            let key = &b.keys[k0 as usize..];
            let vals = b.vals.len() as u32;
            let t = Value::Float((x % 1000) as f64 / 10.0);
            b.vals.extend([t.clone(), t, Value::Bool(true)]);
            let idx = (i - start) as u32;
            b.recs.push(KeyedRec {
                idx,
                ts,
                hash: hash_key(key),
                position: i,
                key: (k0, b.keys.len() as u32),
                vals,
            });
            if ts > running {
                running = ts;
                wms.push((idx, ts - 1001));
            }
        }
        b.watermarks = Arc::new(wms);
        out.push(b);
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, d: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (events, keys) = (num(1, 5_000_000), num(2, 10_000));
    let input = batches(events, keys);
    let def = WindowDef::tumbling(Duration::from_secs(5))
        .aggregate("avg_t", "avg(temperature)")
        .aggregate("max_t", "max(temperature)")
        .aggregate("n", "count()");
    let mut op = WindowStep::new(
        def,
        WindowStepOptions {
            key_names: vec!["sensor_id".into()],
            ..Default::default()
        },
    );
    let mut out: Vec<Output> = Vec::with_capacity(4096);
    let mut results = 0u64;
    let (cpu0, _) = usage();
    let start = Instant::now();
    let mut valve = WatermarkValve::new(1);
    for b in &input {
        op.feed(&mut valve, 0, b, i64::MAX, false, &mut out);
        results += out.len() as u64;
        out.clear();
    }
    op.advance(i64::MAX, Order::FLUSH, &mut out);
    results += out.len() as u64;
    let wall = start.elapsed();
    let (cpu1, rss) = usage();
    println!(
        "{}",
        serde_json::json!({
            "bench": "window",
            "events": events,
            "keys": keys,
            "results": results,
            "ns_per_event": wall.as_nanos() as f64 / events as f64,
            "cpu_ns_per_event": (cpu1 - cpu0).as_nanos() as f64 / events as f64,
            "peak_rss_mb": rss as f64 / (1 << 20) as f64,
        })
    );
}
