//! Checks of the `sink`, `late` and `dead_letter` sections.

#[allow(unused_imports)]
use super::*;

pub(super) fn sink_list(c: &mut Checker, node: &Node, path: &str) -> Vec<SinkSpec> {
    let items: Vec<(&Node, String)> = match node.as_sequence() {
        Some(seq) => seq
            .iter()
            .enumerate()
            .map(|(i, n)| (n, format!("{path}[{i}]")))
            .collect(),
        None => vec![(node, path.to_string())],
    };
    let mut out = Vec::new();
    for (n, p) in items {
        let Some(s) = c.section::<SinkConfig>(n, &p) else {
            continue;
        };
        out.push(match s {
            SinkConfig::File(f) => {
                if f.path.trim().is_empty() {
                    c.sp(
                        &f.path,
                        &format!("{p}.file.path"),
                        "must not be empty (use `-` for standard output)",
                    );
                }
                SinkSpec::File { path: f.path.value }
            }
            SinkConfig::Stdout(_) => SinkSpec::Stdout,
            SinkConfig::Mqtt(m) => {
                let p = format!("{p}.mqtt");
                let conn = check_conn(c, &m.connection(), &m.url, &p);
                let mut ok = true;
                let qos = check_qos(c, m.qos.as_ref(), &format!("{p}.qos"), &mut ok);
                let topic = match TopicTemplate::parse(&m.topic) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        c.sp(&m.topic, &format!("{p}.topic"), e);
                        None
                    }
                };
                let (retain, keep_retain) = match m.retain.as_ref().map(|r| &r.value) {
                    None => (false, false),
                    Some(RetainConfig::Flag(f)) => (*f, false),
                    // YAML scalars may arrive as words.
                    Some(RetainConfig::Word(w)) if w == "true" => (true, false),
                    Some(RetainConfig::Word(w)) if w == "false" => (false, false),
                    Some(RetainConfig::Word(w)) if w == "keep" => (false, true),
                    Some(RetainConfig::Word(w)) => {
                        if let Some(r) = &m.retain {
                            c.sp(
                                r,
                                &format!("{p}.retain"),
                                format!("unknown value `{w}`; expected `true`, `false` or `keep`"),
                            );
                        }
                        ok = false;
                        (false, false)
                    }
                };
                let b = m.buffer.clone();
                let when_full = match b.as_ref().and_then(|b| b.when_full.as_ref()) {
                    None => WhenFull::Block,
                    Some(w) if w.value == "block" => WhenFull::Block,
                    Some(w) if w.value == "drop_oldest" => WhenFull::DropOldest,
                    Some(w) => {
                        c.sp(
                            w,
                            &format!("{p}.buffer.when_full"),
                            format!(
                                "unknown policy `{}`; expected `block` or `drop_oldest`",
                                w.value
                            ),
                        );
                        WhenFull::Block
                    }
                };
                let drain_timeout_ms = b
                    .as_ref()
                    .and_then(|b| b.drain_timeout.as_ref())
                    .and_then(|d| c.duration(d, &format!("{p}.buffer.drain_timeout")))
                    .unwrap_or(10_000);
                let memory = b.as_ref().and_then(|b| b.memory).unwrap_or(10_000);
                if memory == 0 {
                    c.node(n, &format!("{p}.buffer.memory"), "must be at least 1");
                }
                let (Some(conn), Some(topic), true) = (conn, topic, ok) else {
                    continue;
                };
                SinkSpec::Mqtt(Box::new(MqttSinkSpec {
                    conn,
                    topic,
                    qos,
                    retain,
                    keep_retain,
                    memory: memory.max(1),
                    disk: b.as_ref().and_then(|b| b.disk).unwrap_or(1_000_000),
                    dir: b
                        .as_ref()
                        .and_then(|b| b.dir.as_ref())
                        .map(|d| d.value.clone()),
                    when_full,
                    drain_timeout_ms,
                }))
            }
        });
    }
    out
}
