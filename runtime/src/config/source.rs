//! Checks of the `source` section and of MQTT connection settings.

#[allow(unused_imports)]
use super::*;

pub(super) fn check_source(
    c: &mut Checker,
    s: &SourceConfig,
    node: &Node,
) -> Option<(SourceSpec, TimeSpec, usize)> {
    let kinds = [s.mqtt.is_some(), s.file.is_some(), s.generator.is_some()];
    let count = kinds.iter().filter(|k| **k).count();
    if count != 1 {
        c.node(
            node,
            "source",
            format!(
                "a source needs exactly one of `mqtt`, `file`, `generator`; found {}",
                if count == 0 {
                    "none".to_string()
                } else {
                    count.to_string()
                }
            ),
        );
    }
    let mut ok = count == 1;
    if let Some(f) = &s.format {
        if !["json", "text", "raw"].contains(&f.value.as_str()) {
            c.sp(
                f,
                "source.format",
                format!(
                    "unknown format `{}`; expected `json`, `text` or `raw`",
                    f.value
                ),
            );
            ok = false;
        }
    }
    let max_payload = match &s.max_payload {
        Some(m) => match parse_size(&m.value.0) {
            Ok(n) => n,
            Err(e) => {
                c.sp(m, "source.max_payload", e);
                ok = false;
                DEFAULT_MAX_PAYLOAD
            }
        },
        None => DEFAULT_MAX_PAYLOAD,
    };
    let time = match (&s.event_time, &s.time) {
        (Some(_), Some(t)) if t.value == "processing" || t.value == "ingestion" => {
            c.sp(
                t,
                "source.time",
                format!(
                    "`time: {}` and `event_time` exclude each other; keep one",
                    t.value
                ),
            );
            ok = false;
            TimeSpec::None
        }
        (_, Some(t)) if !["processing", "ingestion", "event"].contains(&t.value.as_str()) => {
            c.sp(
                t,
                "source.time",
                format!(
                    "unknown time `{}`; expected `processing` or `ingestion` (or set `event_time`)",
                    t.value
                ),
            );
            ok = false;
            TimeSpec::None
        }
        (None, Some(t)) if t.value == "processing" => TimeSpec::Processing,
        (None, Some(t)) if t.value == "ingestion" => TimeSpec::Ingestion,
        (None, Some(t)) => {
            c.sp(
                t,
                "source.time",
                "`time: event` needs an `event_time` section",
            );
            ok = false;
            TimeSpec::None
        }
        (Some(et), _) => {
            if !valid_field_name(&et.field) {
                c.sp(
                    &et.field,
                    "source.event_time.field",
                    format!("`{}` is not a field name", et.field.value),
                );
                ok = false;
            }
            let bound = et
                .max_out_of_orderness
                .as_ref()
                .and_then(|d| c.duration(d, "source.event_time.max_out_of_orderness"));
            let idle = et
                .idle_timeout
                .as_ref()
                .and_then(|d| c.positive(d, "source.event_time.idle_timeout"));
            if et.max_out_of_orderness.is_some() && bound.is_none()
                || et.idle_timeout.is_some() && idle.is_none()
            {
                ok = false;
            }
            let stamps = check_stamps(c, et);
            ok &= stamps.is_some();
            TimeSpec::Event {
                field: et.field.value.clone(),
                max_out_of_orderness: bound.unwrap_or(0),
                idle_timeout: idle,
                stamps: stamps.unwrap_or_default(),
            }
        }
        (None, None) => TimeSpec::None,
    };
    let spec = if let Some(f) = &s.file {
        if f.path.trim().is_empty() {
            c.sp(
                &f.path,
                "source.file.path",
                "must not be empty (use `-` for standard input)",
            );
            ok = false;
        }
        SourceSpec::File {
            path: f.path.value.clone(),
        }
    } else if let Some(g) = &s.generator {
        let rate = match &g.rate {
            None => Some(1000.0),
            Some(r) if r.value.0 == "unlimited" => None,
            Some(r) => match r.value.0.parse::<f64>() {
                Ok(x) if x > 0.0 && x.is_finite() => Some(x),
                _ => {
                    c.sp(r, "source.generator.rate", format!("bad rate `{}`: expected events per second (a positive number) or `unlimited`", r.value.0));
                    ok = false;
                    None
                }
            },
        };
        let disorder_ms = g
            .disorder
            .as_ref()
            .map(|d| c.duration(d, "source.generator.disorder"))
            .unwrap_or(Some(0));
        let start_ms = match &g.start {
            None => None,
            Some(st) => match st
                .value
                .0
                .parse::<i64>()
                .map_err(|_| ())
                .or_else(|_| parse_rfc3339(&st.value.0).map_err(|_| ()))
            {
                Ok(ms) => Some(ms),
                Err(()) => {
                    c.sp(
                        st,
                        "source.generator.start",
                        format!(
                            "bad start `{}`: expected epoch milliseconds or an RFC 3339 time",
                            st.value.0
                        ),
                    );
                    ok = false;
                    None
                }
            },
        };
        if g.sensors == Some(0) {
            c.node(node, "source.generator.sensors", "must be at least 1");
            ok = false;
        }
        ok &= disorder_ms.is_some();
        SourceSpec::Generator(GeneratorSpec {
            sensors: g.sensors.unwrap_or(10),
            rate,
            disorder_ms: disorder_ms.unwrap_or(0),
            seed: g.seed.unwrap_or(1),
            count: g.count,
            start_ms,
        })
    } else if let Some(m) = &s.mqtt {
        let conn = check_conn(c, &m.connection(), &m.url, "source.mqtt");
        if m.topics.is_empty() {
            c.node(
                node,
                "source.mqtt.topics",
                "needs at least one topic filter",
            );
            ok = false;
        }
        let mut topics = Vec::new();
        for t in &m.topics {
            match TopicPattern::parse(t) {
                Ok(p) => topics.push(p),
                Err(e) => {
                    c.sp(t, "source.mqtt.topics", e);
                    ok = false;
                }
            }
        }
        let qos = check_qos(c, m.qos.as_ref(), "source.mqtt.qos", &mut ok);
        let topic_field = match m.topic_field.as_deref() {
            None => Some("topic".to_string()),
            Some("") => None,
            Some(f) if valid_field_name(f) => Some(f.to_string()),
            Some(f) => {
                c.node(
                    node,
                    "source.mqtt.topic_field",
                    format!("`{f}` is not a field name"),
                );
                ok = false;
                None
            }
        };
        let conn = conn?;
        SourceSpec::Mqtt(MqttSourceSpec {
            conn,
            topics,
            qos,
            topic_field,
        })
    } else {
        return None;
    };
    ok.then_some((spec, time, max_payload))
}

pub(super) fn check_qos(c: &mut Checker, q: Option<&Sp<u8>>, path: &str, ok: &mut bool) -> u8 {
    match q {
        Some(q) if q.value > 1 => {
            c.sp(
                q,
                path,
                format!("qos {} is not supported; expected 0 or 1", q.value),
            );
            *ok = false;
            0
        }
        Some(q) => q.value,
        None => 0,
    }
}

/// Checks the connection settings shared by MQTT sources and sinks.
pub(super) fn check_conn(
    c: &mut Checker,
    cc: &types::ConnectionConfig,
    url: &Sp<String>,
    path: &str,
) -> Option<ConnSpec> {
    let before = c.problems.len();
    let parsed = match Endpoint::parse_url(url) {
        Ok(p) => Some(p),
        Err(e) => {
            c.sp(url, &format!("{path}.url"), e);
            None
        }
    };
    let version = match &cc.version {
        None => 4,
        Some(v) if v.value == 3 || v.value == 4 => 4,
        Some(v) if v.value == 5 => 5,
        Some(v) => {
            c.sp(
                v,
                &format!("{path}.version"),
                format!("unknown MQTT version {}; expected 3 or 5", v.value),
            );
            4
        }
    };
    let keep_alive_ms = match &cc.keep_alive {
        None => 30_000,
        Some(d) => match c.duration(d, &format!("{path}.keep_alive")) {
            Some(ms) if ms >= 1000 => ms,
            Some(_) => {
                c.sp(d, &format!("{path}.keep_alive"), "must be at least 1s");
                30_000
            }
            None => 30_000,
        },
    };
    let password = match (&cc.password, &cc.password_env, &cc.password_file) {
        (None, None, None) => PasswordSpec::None,
        (Some(p), None, None) => PasswordSpec::Inline(p.clone()),
        (None, Some(e), None) => PasswordSpec::Env(e.value.clone()),
        (None, None, Some(f)) => PasswordSpec::File(f.value.clone()),
        _ => {
            c.sp(
                url,
                path,
                "set only one of `password`, `password_env`, `password_file`",
            );
            PasswordSpec::None
        }
    };
    if !matches!(password, PasswordSpec::None) && cc.username.is_none() {
        c.sp(url, path, "a password needs a `username`");
    }
    let tls = parsed.as_ref().is_some_and(|p| p.2);
    for (name, v) in [
        ("ca_file", &cc.ca_file),
        ("client_cert", &cc.client_cert),
        ("client_key", &cc.client_key),
    ] {
        if let (Some(v), false, Some(_)) = (v, tls, &parsed) {
            c.sp(
                v,
                &format!("{path}.{name}"),
                "TLS settings need an `mqtts://` URL",
            );
        }
    }
    let client_cert = match (&cc.client_cert, &cc.client_key) {
        (Some(cert), Some(key)) => Some((cert.value.clone(), key.value.clone())),
        (None, None) => None,
        (Some(v), None) | (None, Some(v)) => {
            c.sp(v, path, "`client_cert` and `client_key` go together");
            None
        }
    };
    let (host, port, tls) = parsed?;
    (c.problems.len() == before).then(|| ConnSpec {
        url: url.value.clone(),
        host,
        port,
        tls,
        version,
        client_id: cc.client_id.clone(),
        clean_session: cc.clean_session,
        keep_alive_ms,
        username: cc.username.clone(),
        password,
        ca_file: cc.ca_file.as_ref().map(|f| f.value.clone()),
        client_cert,
    })
}

/// `event_time.unit`, `format`, `timezone` and `plausible_years`; `None`
/// when one of them is wrong (each problem reported at its position).
fn check_stamps(c: &mut Checker, et: &EventTimeConfig) -> Option<StampFormat> {
    use crate::time::stamp::{EpochUnit, Plausible, Zone};
    let mut ok = true;
    let unit = match &et.unit {
        Some(u) => EpochUnit::parse(&u.value).unwrap_or_else(|| {
            c.sp(
                u,
                "source.event_time.unit",
                format!(
                    "unknown unit `{}`; expected `s`, `ms`, `us` or `ns`",
                    u.value
                ),
            );
            ok = false;
            EpochUnit::Ms
        }),
        None => EpochUnit::Ms,
    };
    let layout = et
        .format
        .as_ref()
        .and_then(|f| match StampFormat::check_layout(&f.value) {
            Ok(()) => Some(f.value.clone()),
            Err(e) => {
                c.sp(f, "source.event_time.format", e);
                ok = false;
                None
            }
        });
    let zone = et
        .timezone
        .as_ref()
        .and_then(|z| match Zone::named(&z.value) {
            Ok(zone) => Some(zone),
            Err(e) => {
                c.sp(z, "source.event_time.timezone", e);
                ok = false;
                None
            }
        });
    let plausible = match &et.plausible_years {
        Some(p) if p.value.trim() == "any" => None,
        Some(p) => match Plausible::parse(&p.value) {
            Ok(r) => Some(r),
            Err(e) => {
                c.sp(p, "source.event_time.plausible_years", e);
                ok = false;
                None
            }
        },
        None => Plausible::parse(Plausible::DEFAULT).ok(),
    };
    ok.then_some(StampFormat {
        unit,
        layout,
        zone,
        plausible,
    })
}
