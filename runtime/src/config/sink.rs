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
                let home_assistant = m
                    .home_assistant
                    .as_ref()
                    .map(|h| home_assistant(c, n, h, &p, qos, &topic));
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
                    home_assistant,
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

/// Checks a sink's `home_assistant:` block.
fn home_assistant(
    c: &mut Checker,
    n: &Node,
    h: &HomeAssistantConfig,
    p: &str,
    qos: u8,
    topic: &Option<TopicTemplate>,
) -> crate::sinks::home_assistant::Discovery {
    use crate::sinks::home_assistant::{Discovery, FieldSpec, DEVICE_CLASSES, STATE_CLASSES};
    let p = format!("{p}.home_assistant");
    let prefix = match &h.discovery_prefix {
        Some(d) => {
            let v = d.value.trim().trim_end_matches('/');
            if v.is_empty()
                || v.contains(['+', '#'])
                || TopicTemplate::parse(v)
                    .map(|t| !t.is_static())
                    .unwrap_or(true)
            {
                c.sp(
                    d,
                    &format!("{p}.discovery_prefix"),
                    "must be a plain topic such as `homeassistant`",
                );
            }
            v.to_string()
        }
        None => "homeassistant".to_string(),
    };
    if h.fields.is_empty() {
        c.node(
            n,
            &format!("{p}.fields"),
            "needs at least one result field to announce",
        );
    }
    if topic.as_ref().is_some_and(|t| t.is_static()) {
        c.node(n, &p, "the sink's topic names no `{field}`: every key would be announced on one topic; put the key fields in the topic (e.g. `averages/{sensor_id}`)");
    }
    let mut fields = Vec::new();
    for (name, f) in &h.fields {
        let fp = format!("{p}.fields.{}", name.value);
        let one_of = |c: &mut Checker, v: &Option<Sp<String>>, list: &[&str], what: &str| {
            if let Some(v) = v {
                if !list.contains(&v.value.as_str()) {
                    let hint = suggest(&v.value, list.iter().copied())
                        .map(|s| format!("; did you mean `{s}`?"))
                        .unwrap_or_default();
                    c.sp(
                        v,
                        &format!("{fp}.{what}"),
                        format!("`{}` is not a Home Assistant sensor {what}{hint}", v.value),
                    );
                }
            }
        };
        one_of(c, &f.device_class, DEVICE_CLASSES, "device_class");
        one_of(c, &f.state_class, STATE_CLASSES, "state_class");
        fields.push(FieldSpec {
            field: name.value.clone(),
            name: f.name.clone(),
            unit: f.unit.clone(),
            device_class: f.device_class.as_ref().map(|v| v.value.clone()),
            state_class: f.state_class.as_ref().map(|v| v.value.clone()),
            icon: f.icon.clone(),
        });
    }
    Discovery {
        prefix,
        name: h.name.as_ref().map(|n| n.value.clone()),
        fields,
        availability: None,
        pipeline: String::new(),
        qos,
    }
}
