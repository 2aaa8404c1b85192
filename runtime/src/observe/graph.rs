//! The dataflow graph of a pipeline as the live page draws it: one node per
//! operator, with the operator ids its metrics carry.

use crate::config::{SinkSpec, SourceSpec, StepSpec, ValidPipeline};
use crate::operators::window::WindowKind;
use serde::Serialize;

/// One operator.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Node {
    /// The operator id of its metrics (`source`, `decode`, `map_1`,
    /// `key_by`, `window`, `sink_main`, `sink_late`, `sink_dead_letter`).
    pub id: String,
    /// `source`, `decode`, `map`, `filter`, `key_by`, `window`, `sink`.
    pub kind: String,
    /// What it does, in a few words.
    pub label: String,
}

/// Operators and the edges between them (`from`, `to`).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<(String, String)>,
}

/// A duration in the units a pipeline file would use.
fn ms(v: i64) -> String {
    match v {
        v if v > 0 && v % 3_600_000 == 0 => format!("{}h", v / 3_600_000),
        v if v > 0 && v % 60_000 == 0 => format!("{}m", v / 60_000),
        v if v > 0 && v % 1000 == 0 => format!("{}s", v / 1000),
        v => format!("{v}ms"),
    }
}

fn sink_label(s: &SinkSpec) -> String {
    match s {
        SinkSpec::File { path } => format!("file {path}"),
        SinkSpec::Stdout => "stdout".into(),
        SinkSpec::Mqtt(m) => format!("mqtt {}", m.conn.url),
    }
}

impl Graph {
    /// The graph of a checked pipeline file.
    pub fn of(p: &ValidPipeline) -> Graph {
        let mut g = Graph::default();
        let node = |g: &mut Graph, id: &str, kind: &str, label: String| {
            if let Some(last) = g.nodes.last() {
                if !last.id.starts_with("sink_") {
                    g.edges.push((last.id.clone(), id.to_string()));
                }
            }
            g.nodes.push(Node {
                id: id.into(),
                kind: kind.into(),
                label,
            });
        };
        let source = match &p.source {
            SourceSpec::File { path } => format!("file {path}"),
            SourceSpec::Generator(gen) => format!("generator, {} sensors", gen.sensors),
            SourceSpec::Mqtt(m) => format!(
                "mqtt {} {}",
                m.conn.url,
                m.topics
                    .iter()
                    .map(|t| t.filter.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        };
        let source = match p.union.len() {
            0 | 1 => source,
            _ => format!(
                "union of {}",
                p.union
                    .iter()
                    .map(|u| u.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        node(&mut g, "source", "source", source);
        let format = match p.format {
            crate::plan::Format::Json => "json",
            crate::plan::Format::Text => "text",
            crate::plan::Format::Raw => "raw",
        };
        node(&mut g, "decode", "decode", format.into());
        // The first keyed operator's id, when there is one; later stages
        // (after a window) get ids with their stage number.
        let mut window: Option<String> = None;
        let (mut n, mut stage) = (0, 1);
        for s in &p.steps {
            let (id, kind, label, keyed) = describe_step(s, &mut n, &mut stage);
            node(&mut g, &id, kind, label);
            if keyed {
                window = window.or(Some(id));
            }
        }
        let sinks = |list: &[SinkSpec]| list.iter().map(sink_label).collect::<Vec<_>>().join(", ");
        let main = if p.sinks.is_empty() {
            "none".to_string()
        } else {
            sinks(&p.sinks)
        };
        // The last operator of the stream the source feeds, before its sink.
        let head_last = g.nodes.last().map(|n| n.id.clone()).unwrap_or_default();
        if p.graph.is_none() || !p.sinks.is_empty() {
            node(&mut g, "sink_main", "sink", main);
        }
        let mut keyed_ids: Vec<String> = window.into_iter().collect();
        if let Some(graph) = &p.graph {
            // Each further stream: its steps (ids prefixed with its name),
            // from the last operator of each stream it reads; its sink.
            let mut last: Vec<(String, String)> = vec![(graph.head.clone(), head_last)];
            for st in &graph.streams {
                // A stream that reads the sources reads the decoded events.
                let mut prev: Vec<String> = match st.reads_sources {
                    true => vec!["decode".to_string()],
                    false => st
                        .from
                        .iter()
                        .filter_map(|f| last.iter().find(|(n, _)| n == f).map(|(_, id)| id.clone()))
                        .collect(),
                };
                let (mut n, mut stage) = (0, 1);
                let push = |g: &mut Graph,
                            prev: &mut Vec<String>,
                            id: String,
                            kind: &str,
                            label: String| {
                    for p in prev.drain(..) {
                        g.edges.push((p, id.clone()));
                    }
                    g.nodes.push(Node {
                        id: id.clone(),
                        kind: kind.into(),
                        label,
                    });
                    prev.push(id);
                };
                for s in &st.steps {
                    let (id, kind, label, keyed) = describe_step(s, &mut n, &mut stage);
                    let id = format!("{}/{id}", st.name);
                    if keyed {
                        keyed_ids.push(id.clone());
                    }
                    push(&mut g, &mut prev, id, kind, label);
                }
                let end = prev.first().cloned().unwrap_or_default();
                if !st.sinks.is_empty() {
                    let mut prev = prev.clone();
                    push(
                        &mut g,
                        &mut prev,
                        format!("sink_{}", st.name),
                        "sink",
                        sinks(&st.sinks),
                    );
                }
                // A stream without steps passes its inputs' records on.
                let end = match st.steps.is_empty() {
                    true => st
                        .from
                        .first()
                        .and_then(|f| last.iter().find(|(n, _)| n == f).map(|(_, id)| id.clone()))
                        .unwrap_or(end),
                    false => end,
                };
                last.push((st.name.clone(), end));
            }
        }
        if !p.late.is_empty() && !keyed_ids.is_empty() {
            g.nodes.push(Node {
                id: "sink_late".into(),
                kind: "sink".into(),
                label: format!("late: {}", sinks(&p.late)),
            });
            for keyed in keyed_ids {
                g.edges.push((keyed, "sink_late".into()));
            }
        }
        if !p.dead_letter.is_empty() {
            g.nodes.push(Node {
                id: "sink_dead_letter".into(),
                kind: "sink".into(),
                label: format!("dead letters: {}", sinks(&p.dead_letter)),
            });
            g.edges.push(("decode".into(), "sink_dead_letter".into()));
        }
        g
    }
}

/// A step's node: id (as its metrics name it), kind, label, and whether it
/// is keyed (it may put out late records). `n` counts stateless steps,
/// `stage` keyed ones.
fn describe_step(
    s: &StepSpec,
    n: &mut usize,
    stage: &mut usize,
) -> (String, &'static str, String, bool) {
    let id = |base: &str, stage: usize| {
        if stage == 1 {
            base.to_string()
        } else {
            format!("{base}_{stage}")
        }
    };
    match s {
        StepSpec::Map(a) => {
            *n += 1;
            let label = a
                .iter()
                .map(|(k, v)| format!("{k} = {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            (format!("map_{n}"), "map", label, false)
        }
        StepSpec::Filter(e) => {
            *n += 1;
            (format!("filter_{n}"), "filter", e.clone(), false)
        }
        StepSpec::KeyBy(k) => (id("key_by", *stage), "key_by", k.join(", "), false),
        StepSpec::Window(w) => {
            let shape = match w.kind {
                WindowKind::Tumbling { size } => format!("tumbling {}", ms(size)),
                WindowKind::Sliding { size, slide } => {
                    format!("sliding {} every {}", ms(size), ms(slide))
                }
                WindowKind::Session { gap } => format!("session gap {}", ms(gap)),
            };
            let aggs = w
                .aggregates
                .iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let out = (
                id("window", *stage),
                "window",
                format!("{shape}: {aggs}"),
                true,
            );
            *stage += 1;
            out
        }
        StepSpec::Stateful(st, _) => {
            use crate::operators::stateful::StatefulDef;
            let label = match st {
                StatefulDef::Deduplicate { fields, within } => {
                    format!("{} within {}", fields.join(", "), ms(*within))
                }
                StatefulDef::Deadband { field, delta, .. } => format!("{field} ±{delta}"),
                StatefulDef::Alert { name, for_ms, .. } => {
                    format!("{name} for {}", ms(*for_ms))
                }
                StatefulDef::Process(p) => p.0.name().to_string(),
            };
            let out = (id(st.kind(), *stage), st.kind(), label, true);
            *stage += 1;
            out
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_job_graph_draws_each_stream_from_the_streams_it_reads() {
        let p = crate::config::validate(include_str!("../../../configs/plant-graph.yaml"))
            .map_err(|e| format!("{e:?}"))
            .expect("valid");
        let g = Graph::of(&p);
        let ids: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
        for want in [
            "window",
            "sink_main",
            "hot/filter_1",
            "sink_hot",
            "per_site/window",
            "site_alarm/alert",
            "sink_site_alarm",
            "sink_late",
        ] {
            assert!(ids.contains(&want), "{want} in {ids:?}");
        }
        let edge = |a: &str, b: &str| g.edges.iter().any(|(x, y)| x == a && y == b);
        assert!(edge("window", "hot/filter_1"), "{:?}", g.edges);
        assert!(edge("window", "per_site/filter_1"));
        assert!(edge("per_site/window", "site_alarm/key_by"));
        assert!(edge("hot/filter_1", "sink_hot"));
        assert!(edge("per_site/window", "sink_late"));
        assert!(!ids.contains(&"sink_per_site"), "per_site has no sink");
        for (from, to) in &g.edges {
            assert!(ids.contains(&from.as_str()) && ids.contains(&to.as_str()));
        }
    }

    use super::*;

    #[test]
    fn the_demo_is_a_chain_from_source_to_sink_with_step_ids_of_the_metrics() {
        let p = crate::config::validate(include_str!("../../../configs/demo.yaml"))
            .map_err(|e| format!("{e:?}"))
            .expect("valid");
        let g = Graph::of(&p);
        let ids: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids.first(), Some(&"source"));
        assert!(
            ids.contains(&"window") && ids.contains(&"sink_main"),
            "{ids:?}"
        );
        for (from, to) in &g.edges {
            assert!(ids.contains(&from.as_str()) && ids.contains(&to.as_str()));
        }
        assert_eq!(g.edges.len() + 1, g.nodes.len(), "a chain: {g:?}");
    }

    #[test]
    fn later_stages_get_ids_of_their_own() {
        let yaml = "name: stages\nsource: { generator: { sensors: 2 }, time: processing }\nsteps:\n  - key_by: sensor_id\n  - window: { tumbling: 1s, aggregate: { t: avg(temperature) } }\n  - filter: t > 0\n  - key_by: sensor_id\n  - window: { tumbling: 10s, aggregate: { hi: max(t) } }\n  - key_by: sensor_id\n  - alert: { name: hot, when: hi > 90 }\nsink: { stdout: {} }\n";
        let p = crate::config::validate(yaml)
            .map_err(|e| format!("{e:?}"))
            .expect("valid");
        let ids: Vec<String> = Graph::of(&p).nodes.iter().map(|n| n.id.clone()).collect();
        for want in [
            "key_by", "window", "key_by_2", "window_2", "key_by_3", "alert_3",
        ] {
            assert!(ids.iter().any(|i| i == want), "{want} in {ids:?}");
        }
        let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "{ids:?}");
    }

    #[test]
    fn the_graph_names_steps_as_the_running_pipeline_counts_them() {
        // Steps before and after the key: the ids come from the file here
        // and from the built steps in the parse stage; they must agree.
        let yaml = "name: ids\nsource: { generator: { sensors: 2, count: 1 }, time: processing }\nsteps:\n  - map: { a: temperature * 2 }\n  - filter: a > 0\n  - key_by: sensor_id\n  - map: { b: a + 1 }\n  - window: { tumbling: 1s, aggregate: { n: count() } }\nsink: { stdout: {} }\n";
        let valid = crate::config::validate(yaml)
            .map_err(|e| format!("{e:?}"))
            .expect("valid");
        let pipeline = valid
            .build("ids.yaml", &crate::config::Overrides::default())
            .expect("builds")
            .build()
            .expect("builds");
        let counted =
            crate::exec::operator_ids(&pipeline.steps_before_key, &pipeline.steps_after_key);
        let drawn: Vec<String> = Graph::of(&valid)
            .nodes
            .iter()
            .filter(|n| matches!(n.kind.as_str(), "decode" | "map" | "filter"))
            .map(|n| n.id.clone())
            .collect();
        assert_eq!(drawn, counted);
        assert_eq!(counted, ["decode", "map_1", "filter_2", "map_3"]);
    }
}
