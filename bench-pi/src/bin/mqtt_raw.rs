//! A plain batched MQTT 3.1.1 publisher and reader over `std::net`, the
//! baselines of `bench-pi/mqtt_bench.py`: no event loop, no per-message
//! hand-over, one `write` for many packets and one `read` for many
//! messages. What they cost per message is the floor an MQTT client can
//! reach on this machine; the load generator must never be the limit.
//!
//! - `pub PORT QOS COUNT RATE SENSORS`: publishes COUNT readings (the same
//!   ~100-byte JSON as `mqtt_tools load`, with `sent_us`) to
//!   `sensors/<id>/t`, at RATE per second (0: as fast as the socket takes
//!   them). QoS 1 keeps at most 30,000 unacknowledged.
//! - `sub PORT FILTER QOS COUNT TIMEOUT_S`: subscribes, prints
//!   `{"ready":true}` after the SUBACK, reads until COUNT messages arrived
//!   or nothing came for TIMEOUT_S, acknowledging QoS 1 messages in
//!   batches; prints rate and latency like `mqtt_tools count`.
//! - `relay PORT_A PORT_B FILTER QOS`: the floor of a bridge in its own
//!   process. One thread sleeps in `poll` on both brokers, forwards every
//!   message read from A to B with its topic and payload unchanged (one
//!   `write` per read), acknowledges A at once and only reads B's PUBACKs.
//!   Not a safe bridge (a message is acknowledged before B has it): a
//!   measure of what reading, writing and waking cost, nothing more. Runs
//!   until killed. With a last argument `lazy-acks`, B's PUBACKs are left
//!   in the socket until 64 messages went out (one wake-up per message, as
//!   rivulet's sink does while its QoS 1 window has room).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn connect(port: u16, id: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(4); // 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&0u16.to_be_bytes()); // no keep-alive
    string(id.as_bytes(), &mut body);
    let mut p = vec![0x10];
    remaining_length(body.len(), &mut p);
    p.extend_from_slice(&body);
    s.write_all(&p)?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)?;
    if ack[0] != 0x20 || ack[3] != 0 {
        return Err(std::io::Error::other(format!("CONNACK refused: {ack:?}")));
    }
    Ok(s)
}

/// SUBSCRIBE to one filter (packet id 1); the SUBACK is left to the reader.
fn subscribe(s: &mut TcpStream, filter: &str, qos: u8) -> std::io::Result<()> {
    let mut sub = Vec::new();
    sub.extend_from_slice(&1u16.to_be_bytes());
    string(filter.as_bytes(), &mut sub);
    sub.push(qos);
    let mut p = vec![0x82];
    remaining_length(sub.len(), &mut p);
    p.extend_from_slice(&sub);
    s.write_all(&p)
}

fn publish(topic: &[u8], payload: &[u8], qos: u8, pkid: u16, out: &mut Vec<u8>) {
    out.push(0x30 | (qos << 1));
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    remaining_length(len, out);
    string(topic, out);
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

fn run_pub(port: u16, qos: u8, count: u64, rate: u64, sensors: u64) -> std::io::Result<()> {
    let mut s = connect(port, &format!("raw-pub-{}", std::process::id()))?;
    let acked = Arc::new(AtomicU64::new(0));
    let reader = {
        let mut r = s.try_clone()?;
        let acked = acked.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut carry = 0usize;
            loop {
                let n = match r.read(&mut buf[carry..]) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let end = carry + n;
                // PUBACKs are 4 bytes each; nothing else comes.
                let whole = end / 4 * 4;
                acked.fetch_add((whole / 4) as u64, Ordering::Relaxed);
                buf.copy_within(whole..end, 0);
                carry = end - whole;
            }
        })
    };
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(128 << 10);
    let mut i = 0u64;
    let mut pkid = 0u16;
    let mut topic = Vec::with_capacity(32);
    let mut payload = Vec::with_capacity(160);
    while i < count {
        // Everything due now (all of it at rate 0), up to 64 KiB per write.
        let due = if rate == 0 {
            count
        } else {
            ((t0.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(count)
        };
        if due <= i {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        while i < due && out.len() < (64 << 10) {
            if qos > 0 {
                while i - acked.load(Ordering::Relaxed) >= 30_000 {
                    if !out.is_empty() {
                        s.write_all(&out)?;
                        out.clear();
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                pkid = pkid.checked_add(1).unwrap_or(1);
            }
            let sensor = i % sensors;
            topic.clear();
            write!(topic, "sensors/{sensor}/t")?;
            payload.clear();
            write!(
                payload,
                r#"{{"sensor_id":"sensor-{sensor:05}","ts":{},"temperature":{:.2},"seq":{i},"sent_us":{}}}"#,
                1_700_000_000_000u64 + i / 10,
                50.0 + (i % 400) as f64 / 10.0,
                now_us()
            )?;
            publish(&topic, &payload, qos, pkid, &mut out);
            i += 1;
        }
        s.write_all(&out)?;
        out.clear();
    }
    if qos > 0 {
        while acked.load(Ordering::Relaxed) < count {
            std::thread::sleep(Duration::from_millis(1));
        }
    } else {
        std::thread::sleep(Duration::from_millis(200));
    }
    let secs = t0.elapsed().as_secs_f64();
    s.write_all(&[0xE0, 0x00])?;
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    println!(
        "{}",
        serde_json::json!({"tool": "raw-pub", "sent": count, "secs": secs, "rate": count as f64 / secs})
    );
    Ok(())
}

/// With `coalesce_us` > 0 the reader, like rivulet's MQTT source, reads a
/// busy stream in slices: when its last read waited less than that long,
/// it sleeps that long before the next one, so one wake-up takes many
/// messages.
fn run_sub(
    port: u16,
    filter: &str,
    qos: u8,
    want: u64,
    timeout_s: u64,
    coalesce_us: u64,
) -> std::io::Result<()> {
    let coalesce = Duration::from_micros(coalesce_us);
    let mut busy = false;
    let mut s = connect(port, &format!("raw-sub-{}", std::process::id()))?;
    subscribe(&mut s, filter, qos)?;
    s.set_read_timeout(Some(Duration::from_secs(timeout_s.max(1))))?;
    let mut buf = vec![0u8; 256 << 10];
    let (mut start, mut end) = (0usize, 0usize);
    let mut acks = Vec::with_capacity(16 << 10);
    let (mut got, mut first, mut last) = (0u64, None::<Instant>, Instant::now());
    let mut lat: Vec<u64> = Vec::with_capacity(want as usize);
    while got < want {
        (start, end) = (0, compact(&mut buf, start, end));
        if busy {
            std::thread::sleep(coalesce);
        }
        let waited = Instant::now();
        let n = match s.read(&mut buf[end..]) {
            Ok(0) => break,
            Ok(n) => {
                busy = !coalesce.is_zero() && waited.elapsed() < coalesce;
                n
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => return Err(e),
        };
        end += n;
        let now = Instant::now();
        let now_wall = now_us();
        // Every whole packet in the buffer.
        while let Some((at, len)) = whole_packet(&buf[start..end]) {
            let avail = &buf[start..end];
            let body = &avail[at..at + len];
            match avail[0] >> 4 {
                3 => {
                    let q = (avail[0] >> 1) & 3;
                    let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
                    let mut off = 2 + tlen;
                    if q > 0 {
                        acks.extend_from_slice(&[0x40, 0x02, body[off], body[off + 1]]);
                        off += 2;
                    }
                    let payload = &body[off..];
                    first.get_or_insert(now);
                    last = now;
                    got += 1;
                    if let Some(pos) = sent_us_at(payload) {
                        let sent = payload[pos..]
                            .iter()
                            .take_while(|c| c.is_ascii_digit())
                            .fold(0u64, |v, c| v * 10 + (c - b'0') as u64);
                        lat.push(now_wall.saturating_sub(sent));
                    }
                }
                9 => println!("{}", serde_json::json!({"tool": "raw-sub", "ready": true})),
                _ => {}
            }
            start += at + len;
        }
        if !acks.is_empty() {
            s.write_all(&acks)?;
            acks.clear();
        }
    }
    let _ = s.write_all(&[0xE0, 0x00]);
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
            "tool": "raw-sub", "received": got, "secs": secs,
            "last_unix_ms": now_us() / 1000 - last.elapsed().as_millis() as u64,
            "rate": if secs > 0.0 { got as f64 / secs } else { 0.0 },
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
        })
    );
    Ok(())
}

fn run_relay(
    port_a: u16,
    port_b: u16,
    filter: &str,
    qos: u8,
    lazy_acks: bool,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut a = connect(port_a, &format!("raw-relay-in-{}", std::process::id()))?;
    let mut b = connect(port_b, &format!("raw-relay-out-{}", std::process::id()))?;
    subscribe(&mut a, filter, qos)?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    let mut buf = vec![0u8; 256 << 10];
    let (mut start, mut end) = (0usize, 0usize);
    let mut scratch = vec![0u8; 64 << 10];
    let (mut acks, mut out) = (Vec::new(), Vec::new());
    let mut pkid = 0u16;
    let mut unread = 0usize;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: a.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: b.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // With LAZY_ACKS, B's PUBACKs wait in its socket until 64 messages
        // went out since the last read of them: one wake-up per message.
        let watch = if lazy_acks && unread < 64 { 1 } else { 2 };
        // SAFETY: a valid array of pollfd, `watch` ≤ its length.
        if unsafe { libc::poll(fds.as_mut_ptr(), watch, -1) } < 0 {
            continue;
        }
        if watch == 2 && fds[1].revents != 0 {
            unread = 0;
        }
        if fds[1].revents != 0 {
            // B's PUBACKs (and SUBACK-free chatter): read and dropped.
            match b.read(&mut scratch) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if fds[0].revents == 0 {
            continue;
        }
        (start, end) = (0, compact(&mut buf, start, end));
        match a.read(&mut buf[end..]) {
            Ok(0) => return Ok(()),
            Ok(n) => end += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        while let Some((at, len)) = whole_packet(&buf[start..end]) {
            let avail = &buf[start..end];
            let body = &avail[at..at + len];
            if avail[0] >> 4 == 3 {
                let q = (avail[0] >> 1) & 3;
                let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
                let topic = &body[2..2 + tlen];
                let mut off = 2 + tlen;
                if q > 0 {
                    acks.extend_from_slice(&[0x40, 0x02, body[off], body[off + 1]]);
                    off += 2;
                }
                pkid = pkid.checked_add(1).unwrap_or(1);
                unread += 1;
                publish(topic, &body[off..], q, pkid, &mut out);
            }
            start += at + len;
        }
        // Blocking writes are fine for a measure (the sockets rarely fill).
        for (s, data) in [(&mut b, &mut out), (&mut a, &mut acks)] {
            let mut rest = &data[..];
            while !rest.is_empty() {
                match s.write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(50))
                    }
                    Err(e) => return Err(e),
                }
            }
            data.clear();
        }
    }
}

/// Moves the unread bytes `start..end` to the front of `buf`, growing it
/// when full: where they end now.
fn compact(buf: &mut Vec<u8>, start: usize, end: usize) -> usize {
    buf.copy_within(start..end, 0);
    let end = end - start;
    if end == buf.len() {
        buf.resize(buf.len() * 2, 0);
    }
    end
}

/// A whole packet at the start of `b`: (header length, body length).
fn whole_packet(b: &[u8]) -> Option<(usize, usize)> {
    let (mut len, mut mult, mut at) = (0usize, 1usize, 1usize);
    loop {
        let &byte = b.get(at)?;
        len += (byte & 0x7f) as usize * mult;
        mult *= 128;
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    (b.len() >= at + len).then_some((at, len))
}

/// Where the digits of `"sent_us":` start in a payload.
fn sent_us_at(p: &[u8]) -> Option<usize> {
    const KEY: &[u8] = b"\"sent_us\":";
    p.windows(KEY.len())
        .rposition(|w| w == KEY)
        .map(|i| i + KEY.len())
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n = |i: usize| a.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    let result = match a.get(1).map(String::as_str) {
        Some("pub") => run_pub(n(2) as u16, n(3) as u8, n(4), n(5), n(6).max(1)),
        Some("sub") => run_sub(
            n(2) as u16,
            a.get(3).map(String::as_str).unwrap_or("#"),
            n(4) as u8,
            n(5),
            n(6),
            n(7),
        ),
        Some("relay") => run_relay(
            n(2) as u16,
            n(3) as u16,
            a.get(4).map(String::as_str).unwrap_or("#"),
            n(5) as u8,
            a.get(6).is_some_and(|s| s == "lazy-acks"),
        ),
        _ => {
            eprintln!("usage: mqtt_raw pub PORT QOS COUNT RATE SENSORS | sub PORT FILTER QOS COUNT TIMEOUT_S [COALESCE_US] | relay PORT_A PORT_B FILTER QOS [lazy-acks]");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("mqtt_raw: {e}");
        std::process::exit(1);
    }
}
