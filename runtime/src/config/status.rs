//! Checks of the `status` section: the status topic and which broker
//! connection carries it.

#[allow(unused_imports)]
use super::*;

/// The status topic of a checked pipeline: on by default when the source
/// or a sink is MQTT (on the source's broker, else the first MQTT sink's).
pub(super) fn status_spec(
    c: &mut Checker,
    node: Option<&Node>,
    name: &str,
    source: &SourceSpec,
    sinks: &[SinkSpec],
    peers: &Option<PeersSpec>,
) -> Result<Option<StatusSpec>, Vec<Problem>> {
    let cfg = match node {
        Some(n) => match c.section::<StatusConfig>(n, "status") {
            Some(s) => Some(s),
            None => return Err(std::mem::take(&mut c.problems)),
        },
        None => None,
    };
    if cfg.as_ref().and_then(|s| s.enabled) == Some(false) {
        return Ok(None);
    }
    let conn = match source {
        SourceSpec::Mqtt(m) => Some(m.conn.clone()),
        _ => sinks.iter().find_map(|s| match s {
            SinkSpec::Mqtt(m) => Some(m.conn.clone()),
            _ => None,
        }),
    };
    let topic = match cfg.as_ref().and_then(|s| s.topic.as_ref()) {
        Some(t) => {
            let v = t.value.trim();
            // The rules of every publish topic, and no `{field}`: the status
            // speaks for the pipeline, not for a record.
            let problem = match TopicTemplate::parse(v) {
                Err(e) => Some(e),
                Ok(tpl) if !tpl.is_static() => Some(format!(
                    "`{v}` names fields; a status topic is one fixed topic"
                )),
                Ok(_) if v.starts_with('$') => Some(format!(
                    "`{v}` starts with `$`, which brokers keep for themselves"
                )),
                Ok(_) => None,
            };
            if let Some(p) = problem {
                c.sp(t, "status.topic", p);
                return Err(std::mem::take(&mut c.problems));
            }
            if conn.is_none() {
                c.sp(
                    t,
                    "status.topic",
                    "a status topic needs an mqtt source or sink to publish it through",
                );
                return Err(std::mem::take(&mut c.problems));
            }
            v.to_string()
        }
        None => match peers {
            Some(p) => format!("rivulet/{name}/{}/status", p.id),
            None => format!("rivulet/{name}/status"),
        },
    };
    Ok(conn.map(|conn| StatusSpec { conn, topic }))
}
