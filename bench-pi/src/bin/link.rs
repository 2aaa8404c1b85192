//! The cost of forwarding events between peers: one peer link on loopback
//! carrying frames of keyed records (postcard, length-prefixed, credits),
//! both ends in this process.
//!
//! `link EVENTS [BATCH]`: sends EVENTS records in frames of BATCH (default
//! 256) records with realistic keys and three aggregate inputs, to one
//! worker of the other end, which takes them. Prints one JSON line: CPU-µs
//! (user + system, both ends) and bytes on the wire per forwarded event.

use rivulet::cluster::link::{Identity, Link};
use rivulet::exec::exchange::Doorbell;
use rivulet::msg::{KeyedBatch, KeyedRec, Msg};
use rivulet::value::{encode_key, hash_key, Value};
use rivulet_bench::usage;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Instant;

fn batch(first: u64, n: u64) -> KeyedBatch {
    let mut b = KeyedBatch::default();
    for i in first..first + n {
        let k0 = b.keys.len() as u32;
        encode_key(
            &Value::Str(format!("sensor-{:05}", i % 10_000).into()),
            &mut b.keys,
        );
        let hash = hash_key(&b.keys[k0 as usize..]);
        let vals = b.vals.len() as u32;
        let t = Value::Float((i % 1000) as f64 / 10.0);
        b.vals.extend([t.clone(), t, Value::Bool(true)]);
        b.recs.push(KeyedRec {
            idx: (i - first) as u32,
            ts: 1_700_000_000_000 + i as i64 / 100,
            hash,
            position: i,
            key: (k0, b.keys.len() as u32),
            vals,
        });
    }
    b
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, d: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (events, size) = (num(1, 2_000_000), num(2, 256).max(1));
    let me = |peer: &str| Identity {
        cluster: "bench".into(),
        peer: peer.into(),
        fingerprint: "fp".into(),
        view: 1,
        tls: None,
        missing: Vec::new(),
        decision: Vec::new(),
        control: None,
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let addr = listener.local_addr().expect("an address").to_string();
    let bell = vec![Arc::new(Doorbell::default())];
    let accept = {
        let bell = bell.clone();
        std::thread::spawn(move || Link::accept(&listener, &me("b"), &bell, 8))
    };
    let a = Link::dial(&addr, &me("a"), &[Arc::new(Doorbell::default())], 8).expect("dial");
    let b = accept.join().expect("accept thread").expect("accept");
    let mut input = b.take_input(0).expect("worker 0");
    // Prepared outside the measurement: the parse stage builds them anyway.
    let frames: Vec<KeyedBatch> = (0..events.div_ceil(size))
        .map(|f| batch(f * size, size.min(events - f * size)))
        .collect();
    let bytes: usize = frames
        .iter()
        .map(|f| {
            postcard::to_stdvec(&vec![Msg::Data(f.clone())])
                .map(|v| v.len() + 4)
                .unwrap_or(0)
        })
        .sum();
    let (cpu0, _) = usage();
    let start = Instant::now();
    let receiver = std::thread::spawn(move || {
        let mut got = 0u64;
        while let Some(frame) = input.recv() {
            for m in &frame {
                if let Msg::Data(d) = m {
                    got += d.recs.len() as u64;
                }
            }
            if got >= events {
                break;
            }
        }
        got
    });
    for f in frames {
        a.send(0, vec![Msg::Data(f)]).expect("send");
    }
    let got = receiver.join().expect("receiver");
    let wall = start.elapsed();
    let (cpu1, rss) = usage();
    assert_eq!(got, events);
    println!(
        "{}",
        serde_json::json!({
            "bench": "link",
            "events": events,
            "batch": size,
            "events_per_s": events as f64 / wall.as_secs_f64(),
            "cpu_us_per_event": (cpu1 - cpu0).as_secs_f64() * 1e6 / events as f64,
            "bytes_per_event": bytes as f64 / events as f64,
            "peak_rss_mb": rss as f64 / (1 << 20) as f64,
        })
    );
    drop(a);
    drop(b);
}
