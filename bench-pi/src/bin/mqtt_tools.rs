//! Load generator, counting subscriber and minimal relay for the MQTT
//! benchmark (`bench-pi/mqtt_bench.py` drives them).
//!
//! - `load PORT QOS COUNT RATE SENSORS`: publishes COUNT readings of about
//!   100 bytes to `sensors/<id>/t` at RATE per second (0: as fast as the
//!   broker takes them); each carries its send time in µs (`sent_us`).
//! - `count PORT FILTER COUNT TIMEOUT_S`: subscribes and counts until COUNT
//!   arrived or nothing came for TIMEOUT_S; prints rate and latency.
//! - `relay PORT FILTER QOS`: republishes every message to `out/<topic>` unchanged.

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn qos(q: u64) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(format!("{id}-{}", std::process::id()), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(1000);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// A client with Nagle's delay off (it adds tens of ms per small packet).
fn new_client(o: MqttOptions, cap: usize) -> (Client, rumqttc::Connection) {
    let (c, mut conn) = Client::new(o, cap);
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    conn.eventloop.set_network_options(n);
    (c, conn)
}

fn load(port: u16, q: u64, count: u64, rate: u64, sensors: u64) {
    let (client, mut conn) = new_client(options("load", port), 10_000);
    let t0 = Instant::now();
    let pacer = std::thread::spawn(move || {
        for i in 0..count {
            if rate > 0 {
                let due = Duration::from_secs_f64(i as f64 / rate as f64);
                let now = t0.elapsed();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            let s = i % sensors;
            let payload = format!(
                r#"{{"sensor_id":"sensor-{s:05}","ts":{},"temperature":{:.2},"seq":{i},"sent_us":{}}}"#,
                1_700_000_000_000u64 + i / 10,
                50.0 + (i % 400) as f64 / 10.0,
                now_us()
            );
            if client
                .publish(format!("sensors/{s}/t"), qos(q), false, payload)
                .is_err()
            {
                return client;
            }
        }
        client
    });
    let mut acked = 0u64;
    let mut sent = 0u64;
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) => sent += 1,
            Err(e) => {
                eprintln!("load: {e}");
                break;
            }
            _ => {}
        }
        if (q == 0 && sent == count) || (q > 0 && acked == count) {
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let client = pacer.join().ok();
    // Let the last QoS 0 packets leave the socket before disconnecting.
    std::thread::sleep(Duration::from_millis(200));
    if let Some(c) = client {
        let _ = c.disconnect();
    }
    println!(
        "{}",
        serde_json::json!({"tool": "load", "sent": count, "secs": secs, "rate": count as f64 / secs})
    );
}

fn count(port: u16, filter: &str, want: u64, timeout_s: u64) {
    let mut o = options("count", port);
    o.set_clean_session(true);
    let (client, mut conn) = new_client(o, 100);
    let mut got = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut lat: Vec<u64> = Vec::new();
    loop {
        match conn.recv_timeout(Duration::from_secs(timeout_s)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                let _ = client.subscribe(filter, QoS::AtLeastOnce);
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                println!("{}", serde_json::json!({"tool": "count", "ready": true}));
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                got += 1;
                if let Some(pos) = p.payload.windows(10).position(|w| w == b"\"sent_us\":") {
                    let digits: Vec<u8> = p.payload[pos + 10..]
                        .iter()
                        .take_while(|c| c.is_ascii_digit())
                        .copied()
                        .collect();
                    if let Ok(sent) = String::from_utf8_lossy(&digits).parse::<u64>() {
                        lat.push(now_us().saturating_sub(sent));
                    }
                }
                if got >= want {
                    break;
                }
            }
            Ok(Err(e)) => {
                eprintln!("count: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(_) => break,
            _ => {}
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    let secs = first.map(|f| (last - f).as_secs_f64()).unwrap_or(0.0);
    println!(
        "{}",
        serde_json::json!({
            "tool": "count", "received": got, "secs": secs,
            "last_unix_ms": now_us() / 1000 - last.elapsed().as_millis() as u64,
            "rate": if secs > 0.0 { got as f64 / secs } else { 0.0 },
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
        })
    );
}

fn relay(port: u16, filter: &str, q: u64) {
    let (client, mut conn) = new_client(options("relay-in", port), 10_000);
    // A second connection publishes, on its own thread, so neither event
    // loop ever waits for the other (rivulet is built the same way).
    let (out, mut out_conn) = new_client(options("relay-out", port), 10_000);
    std::thread::spawn(move || for _ in out_conn.iter() {});
    let (tx, rx) = std::sync::mpsc::sync_channel::<(String, bytes::Bytes)>(10_000);
    std::thread::spawn(move || {
        for (topic, payload) in rx {
            let _ = out.publish(format!("out/{topic}"), qos(q), false, payload.to_vec());
        }
    });
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client.subscribe(filter, qos(q));
            }
            Ok(Event::Incoming(Packet::Publish(p)))
                if tx.send((p.topic.clone(), p.payload.clone())).is_err() =>
            {
                return
            }
            Err(e) => {
                eprintln!("relay: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            _ => {}
        }
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n = |i: usize| a.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    let port = n(2) as u16;
    match a.get(1).map(String::as_str) {
        Some("load") => load(port, n(3), n(4), n(5), n(6).max(1)),
        Some("count") => count(
            port,
            a.get(3).map(String::as_str).unwrap_or("#"),
            n(4),
            n(5).max(1),
        ),
        Some("relay") => relay(port, a.get(3).map(String::as_str).unwrap_or("#"), n(4)),
        _ => eprintln!("usage: mqtt_tools load|count|relay ..."),
    }
}
