//! `rivulet top`: the endpoint's `/api/status`, fetched with a plain
//! HTTP/1.0 GET over a socket, and shown as a small table.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// `host:port` of a URL or address (`http://h:p/...`, `h:p`).
fn host_port(base: &str) -> Result<String, String> {
    let rest = base.strip_prefix("http://").unwrap_or(base);
    if base.starts_with("https://") {
        return Err("https is not supported; put a TLS proxy's plain side here".into());
    }
    let hp = rest.split('/').next().unwrap_or("");
    super::http::check_listen(hp)?;
    Ok(hp.to_string())
}

/// GET `path` from the endpoint at `base`: the status code and the body.
pub fn get(base: &str, path: &str) -> Result<(u16, String), String> {
    let hp = host_port(base)?;
    let addr = hp
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| format!("{hp} resolves to nothing"))?;
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {hp}\r\n");
    if let Ok(token) = std::env::var("RIVULET_HTTP_TOKEN") {
        req.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.take(16 << 20)
        .read_to_end(&mut raw)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the answer is not HTTP")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("the answer has no status code")?;
    Ok((code, body.to_string()))
}

/// The endpoint's `/api/status`.
pub fn fetch_status(base: &str) -> Result<serde_json::Value, String> {
    let (code, body) = get(base, "/api/status")?;
    if code != 200 {
        return Err(format!("/api/status answered {code}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("/api/status is not JSON: {e}"))
}

fn rate(v: &serde_json::Value) -> String {
    let r = v.as_f64().unwrap_or(0.0);
    if r >= 10_000.0 {
        format!("{:.1}k/s", r / 1000.0)
    } else {
        format!("{r:.0}/s")
    }
}

/// The table of one status.
pub fn render(st: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "rivulet {} — {} {} — up {} s — {}",
        st["version"].as_str().unwrap_or("?"),
        st["pipeline"].as_str().unwrap_or("?"),
        st["phase"].as_str().unwrap_or("?"),
        st["uptime_s"],
        st["health"]["reason"].as_str().unwrap_or("")
    );
    let lag = st["watermark"]["lag_s"]
        .as_f64()
        .map_or("-".to_string(), |l| format!("{l:.1} s"));
    let _ = writeln!(
        o,
        "events {}  results {}  dead letters {}  late {}  watermark lag {lag}",
        st["totals"]["events"],
        st["totals"]["results"],
        st["totals"]["dead_letters"],
        st["totals"]["late"]
    );
    let _ = writeln!(
        o,
        "\n{:<18} {:>12} {:>12} {:>12} {:>12}",
        "operator", "in", "out", "in rate", "out rate"
    );
    for n in st["graph"]["nodes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "{:<18} {:>12} {:>12} {:>12} {:>12}",
            n["id"].as_str().unwrap_or("?"),
            n["records_in"],
            n["records_out"],
            rate(&n["in_rate"]),
            rate(&n["out_rate"])
        );
    }
    let queues: Vec<String> = st["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| {
            format!(
                "{} {:.0}%",
                q["stage"].as_str().unwrap_or("?"),
                q["fill"].as_f64().unwrap_or(0.0) * 100.0
            )
        })
        .collect();
    let _ = writeln!(o, "\nqueues: {}", queues.join(", "));
    let cp = &st["checkpoints"];
    let age = cp["last_age_s"]
        .as_f64()
        .map_or("never".to_string(), |a| format!("{a:.0} s ago"));
    let _ = writeln!(
        o,
        "checkpoints: {} ok, {} failed, last {age}",
        cp["ok"], cp["failed"]
    );
    for c in st["mqtt"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "mqtt {:<10} {:<24} {} ({} reconnects)",
            c["role"].as_str().unwrap_or("?"),
            c["broker"].as_str().unwrap_or("?"),
            if c["connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "DISCONNECTED"
            },
            c["reconnects"]
        );
    }
    if let Some(m) = st["outbox"].as_object() {
        for (sink, n) in m {
            let _ = writeln!(o, "outbox {sink}: {n} messages");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_urls_name_the_same_endpoint() {
        assert_eq!(
            host_port("http://127.0.0.1:9464/").as_deref(),
            Ok("127.0.0.1:9464")
        );
        assert_eq!(host_port("127.0.0.1:9464").as_deref(), Ok("127.0.0.1:9464"));
        assert!(host_port("https://h:1").is_err());
        assert!(host_port("http://nohost").is_err());
    }

    #[test]
    fn the_table_shows_operators_and_connections() {
        let st = serde_json::json!({
            "version": "0.1.0", "pipeline": "demo", "phase": "running", "uptime_s": 3,
            "health": {"reason": "idle or keeping up"},
            "totals": {"events": 10, "results": 2, "dead_letters": 0, "late": 0},
            "watermark": {"lag_s": 1.5},
            "graph": {"nodes": [{"id": "window", "records_in": 10, "records_out": 2, "in_rate": 12000.0, "out_rate": 1.0}]},
            "queues": [{"stage": "parse", "fill": 0.25}],
            "checkpoints": {"ok": 1, "failed": 0, "last_age_s": 2.0},
            "mqtt": [{"role": "source", "broker": "localhost:1883", "connected": false, "reconnects": 3}],
            "outbox": {"main": 7},
        });
        let t = render(&st);
        assert!(t.contains("window") && t.contains("12.0k/s"), "{t}");
        assert!(t.contains("parse 25%"), "{t}");
        assert!(t.contains("DISCONNECTED (3 reconnects)"), "{t}");
        assert!(t.contains("outbox main: 7"), "{t}");
        assert!(t.contains("watermark lag 1.5 s"), "{t}");
    }
}
