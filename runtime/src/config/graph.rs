//! The general form of a pipeline file: `sources` (named sources) and
//! `streams` (named streams, each reading sources or other streams), a
//! job graph. This module reads both sections and checks the graph's
//! shape: unknown names in `from`, cycles, which stream reads the
//! sources; the steps and sinks of each stream are checked like those of
//! the one-stream form (in [`super::validate`]).

use super::diag::Checker;
use super::types::{SourceConfig, StepConfig};
use crate::util::suggest::suggest;
use marked_yaml::Node;

/// A stream as written.
pub(super) struct StreamRead<'a> {
    pub name: String,
    /// Where the stream's name is.
    pub at: (usize, usize),
    pub from: Vec<String>,
    pub from_node: Option<&'a Node>,
    /// It reads the sources (besides the first stream that does).
    pub reads_sources: bool,
    /// Shared preparations folded in before its steps: each one's name,
    /// where its own steps (not its preparations') start, and how many.
    pub prepared: Vec<(String, usize, usize)>,
    pub steps: Vec<(StepConfig, &'a Node)>,
    pub sink: Option<&'a Node>,
}

/// What `sources` and `streams` say, checked for shape.
pub(super) struct GraphRead<'a> {
    /// Each source: name, settings, node.
    pub sources: Vec<(String, SourceConfig, &'a Node)>,
    /// The stream that reads the sources.
    pub head: StreamRead<'a>,
    /// The other streams, each after the streams it reads.
    pub streams: Vec<StreamRead<'a>>,
}

const STREAM_KEYS: &[&str] = &["from", "steps", "sink"];

fn key_pos(k: &marked_yaml::types::MarkedScalarNode) -> (usize, usize) {
    k.span()
        .start()
        .map(|m| (m.line(), m.column()))
        .unwrap_or((0, 0))
}

/// Reads the two sections; `None` when they are too broken to go on (the
/// problems are in `c`).
pub(super) fn read<'a>(
    c: &mut Checker,
    root: &'a Node,
    sources: Option<&'a Node>,
    streams: Option<&'a Node>,
) -> Option<GraphRead<'a>> {
    let mut out_sources = Vec::new();
    match sources.map(|n| (n, n.as_mapping())) {
        None => c.node(
            root,
            "",
            "missing `sources` (the named sources the streams read, for example `sources: { events: { file: { path: events.jsonl } } }`)",
        ),
        Some((n, None)) => c.node(n, "sources", "expected a mapping of source names to sources"),
        Some((n, Some(map))) => {
            for (k, v) in map.iter() {
                let path = format!("sources.{}", k.as_str());
                if !valid_name(k.as_str()) {
                    let (l, col) = key_pos(k);
                    c.at(l, col, &path, "a source's name is letters, digits, `_` and `-`");
                }
                if let Some(s) = c.section::<SourceConfig>(v, &path) {
                    out_sources.push((k.as_str().to_string(), s, v));
                }
            }
            if map.is_empty() {
                c.node(n, "sources", "needs at least one source");
            }
        }
    }
    let mut all = Vec::new();
    match streams.map(|n| (n, n.as_mapping())) {
        None => c.node(
            root,
            "",
            "missing `streams` (the named streams: each has `from`, `steps` and optionally `sink`)",
        ),
        Some((n, None)) => c.node(
            n,
            "streams",
            "expected a mapping of stream names to streams",
        ),
        Some((n, Some(map))) => {
            for (k, v) in map.iter() {
                if let Some(s) = read_stream(c, k, v) {
                    all.push(s);
                }
            }
            if map.is_empty() {
                c.node(n, "streams", "needs at least one stream");
            }
        }
    }
    for s in &all {
        if out_sources.iter().any(|(n, _, _)| *n == s.name) {
            c.at(
                s.at.0,
                s.at.1,
                &format!("streams.{}", s.name),
                "a source has this name too; give the stream another",
            );
        }
    }
    // Every name in `from` is a source or a stream.
    let is_source = |n: &str| out_sources.iter().any(|(s, _, _)| s == n);
    let is_stream = |n: &str| all.iter().any(|s: &StreamRead| s.name == n);
    for s in &all {
        let path = format!("streams.{}.from", s.name);
        let at = |c: &mut Checker, msg: String| match s.from_node {
            Some(n) => c.node(n, &path, msg),
            None => c.at(s.at.0, s.at.1, &path, msg),
        };
        for f in &s.from {
            if is_source(f) || is_stream(f) {
                continue;
            }
            let names = out_sources
                .iter()
                .map(|(n, _, _)| n.as_str())
                .chain(all.iter().map(|s| s.name.as_str()).filter(|n| *n != s.name));
            let hint = suggest(f, names.clone())
                .map(|n| format!("did you mean `{n}`? "))
                .unwrap_or_default();
            let known: Vec<&str> = names.collect();
            at(
                c,
                format!(
                    "unknown `{f}`: `from` names sources and streams; {hint}known: {}",
                    known.join(", ")
                ),
            );
        }
        if s.from.contains(&s.name) {
            at(c, format!("stream `{}` reads itself", s.name));
        }
        let reads_sources = s.from.iter().any(|f| is_source(f));
        if reads_sources && s.from.iter().any(|f| is_stream(f)) {
            at(
                c,
                "a stream reads sources or streams, not both (read the sources in a stream of their own, then union the streams)".into(),
            );
        }
    }
    // A stream of `map` and `filter` steps without a sink (a preparation
    // several streams share) is folded into each stream that reads it.
    inline_preparations(c, &mut all);
    let is_stream = |n: &str| all.iter().any(|s: &StreamRead| s.name == n);
    let mut heads: Vec<usize> = (0..all.len())
        .filter(|&i| all[i].from.iter().any(|f| is_source(f)))
        .collect();
    // Several streams may read the sources, all the same ones. The first
    // whose first keyed step is a window or an alert runs on the workers;
    // the others (reading events by field) after it.
    if let Some(&first) = heads.first() {
        let mut want = all[first].from.clone();
        want.sort();
        for &i in &heads[1..] {
            let mut theirs = all[i].from.clone();
            theirs.sort();
            if theirs != want {
                let s = &all[i];
                c.at(
                    s.at.0,
                    s.at.1,
                    &format!("streams.{}.from", s.name),
                    format!(
                        "streams that read sources read the same ones for now (`{}` reads {}); read a stream of them in a union instead",
                        all[first].name,
                        all[first].from.join(", ")
                    ),
                );
            }
        }
        let results_first = |s: &StreamRead| {
            s.steps.iter().find_map(|(st, _)| match st {
                StepConfig::Window(_) | StepConfig::Alert(_) => Some(true),
                StepConfig::Deduplicate(_) | StepConfig::Deadband(_) => Some(false),
                _ => None,
            }) == Some(true)
        };
        if heads.len() > 1 {
            if let Some(at) = heads.iter().position(|&i| results_first(&all[i])) {
                let h = heads.remove(at);
                heads.insert(0, h);
            }
        }
    }
    for (name, _, n) in &out_sources {
        let read = heads.iter().any(|&h| all[h].from.contains(name));
        if !read {
            c.node(
                n,
                &format!("sources.{name}"),
                format!("no stream reads source `{name}`; name it in a `from`"),
            );
        }
    }
    if heads.is_empty() && !all.is_empty() && !out_sources.is_empty() {
        c.node(
            streams?,
            "streams",
            "no stream reads a source: name a source in one stream's `from`",
        );
    }
    // Each stream after the streams it reads (file order among equals);
    // what is left is on a cycle or reads one.
    let mut placed: Vec<usize> = heads.first().copied().into_iter().collect();
    loop {
        let next = (0..all.len()).find(|i| {
            !placed.contains(i)
                && heads.first() != Some(i)
                && all[*i]
                    .from
                    .iter()
                    .filter(|f| is_stream(f))
                    .all(|f| placed.iter().any(|&p| all[p].name == *f))
        });
        match next {
            Some(i) => placed.push(i),
            None => break,
        }
    }
    let mut reported: Vec<usize> = Vec::new();
    for start in 0..all.len() {
        if placed.contains(&start) || reported.contains(&start) {
            continue;
        }
        // Walk back through unplaced inputs until a stream repeats.
        let mut path = vec![start];
        let cycle = loop {
            let cur = path[path.len() - 1];
            let Some(prev) = all[cur].from.iter().find_map(|f| {
                (0..all.len()).find(|&j| all[j].name == *f && !placed.contains(&j) && j != cur)
            }) else {
                break None;
            };
            if let Some(at) = path.iter().position(|&p| p == prev) {
                break Some(path[at..].to_vec());
            }
            path.push(prev);
        };
        let Some(cycle) = cycle else { continue };
        if cycle.iter().any(|i| reported.contains(i)) {
            continue;
        }
        reported.extend(&cycle);
        let first = cycle[0];
        let mut names: Vec<&str> = cycle.iter().rev().map(|&i| all[i].name.as_str()).collect();
        names.insert(0, &all[first].name);
        names.pop();
        names.push(&all[first].name);
        let s = &all[first];
        let path = format!("streams.{}.from", s.name);
        let msg = format!(
            "a cycle: {} (a stream reads only streams before it)",
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(" → ")
        );
        match s.from_node {
            Some(n) => c.node(n, &path, msg),
            None => c.at(s.at.0, s.at.1, &path, msg),
        }
    }
    // The streams on a cycle (reported) are left out; the others are
    // checked on.
    let head = *heads.first()?;
    let mut slots: Vec<Option<StreamRead>> = all.into_iter().map(Some).collect();
    let head_read = slots[head].take()?;
    let streams = placed[1..]
        .iter()
        .filter_map(|&i| {
            let mut s = slots[i].take()?;
            s.reads_sources = heads.contains(&i);
            Some(s)
        })
        .collect();
    Some(GraphRead {
        sources: out_sources,
        head: head_read,
        streams,
    })
}

/// Folds each stream of only `map` and `filter` steps, without a sink, into
/// the streams that read it: they read what it reads, its steps first.
/// (Stateless steps give the same records wherever they run, so this is
/// the graph the file describes.) A union cannot read such a stream: its
/// steps would apply to the union's other inputs too.
fn inline_preparations(c: &mut Checker, all: &mut Vec<StreamRead<'_>>) {
    let stateless = |s: &StreamRead| {
        s.steps
            .iter()
            .all(|(st, _)| matches!(st, StepConfig::Map(_) | StepConfig::Filter(_)))
    };
    // Whether stream `i` reads itself through other streams (a cycle,
    // reported later).
    let on_cycle = |all: &[StreamRead], i: usize| {
        let mut seen = vec![false; all.len()];
        let mut todo: Vec<usize> = vec![i];
        while let Some(j) = todo.pop() {
            for f in &all[j].from {
                if let Some(k) = all.iter().position(|s| s.name == *f) {
                    if k == i {
                        return true;
                    }
                    if !seen[k] {
                        seen[k] = true;
                        todo.push(k);
                    }
                }
            }
        }
        false
    };
    loop {
        let found = (0..all.len()).find(|&i| {
            all[i].sink.is_none()
                && stateless(&all[i])
                && all.iter().any(|r| r.from.contains(&all[i].name))
                && !on_cycle(all, i)
        });
        let Some(i) = found else { return };
        let s = all.remove(i);
        for r in all.iter_mut().filter(|r| r.from.contains(&s.name)) {
            if r.from.len() > 1 {
                let path = format!("streams.{}.from", r.name);
                let msg = format!(
                    "`{}` has no window or `alert`, so a union cannot read it yet: its steps would apply to the union's other inputs (read what `{}` reads here, with its steps in this stream)",
                    s.name, s.name
                );
                match r.from_node {
                    Some(n) => c.node(n, &path, msg),
                    None => c.at(r.at.0, r.at.1, &path, msg),
                }
                r.from.retain(|f| *f != s.name);
                continue;
            }
            r.from = s.from.clone();
            let mut steps = s.steps.clone();
            steps.append(&mut r.steps);
            r.steps = steps;
            // Its own preparations (folded in before) now come after these.
            let n = s.steps.len();
            for p in &mut r.prepared {
                p.1 += n;
            }
            r.prepared.extend(s.prepared.iter().cloned());
            let before: usize = s.prepared.iter().map(|p| p.2).sum();
            r.prepared.push((s.name.clone(), before, n - before));
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn read_stream<'a>(
    c: &mut Checker,
    k: &marked_yaml::types::MarkedScalarNode,
    v: &'a Node,
) -> Option<StreamRead<'a>> {
    let name = k.as_str().to_string();
    let at = key_pos(k);
    let path = format!("streams.{name}");
    if !valid_name(&name) {
        c.at(
            at.0,
            at.1,
            &path,
            "a stream's name is letters, digits, `_` and `-`",
        );
    }
    let Some(map) = v.as_mapping() else {
        c.node(
            v,
            &path,
            "expected a mapping with `from`, `steps` and optionally `sink`",
        );
        return None;
    };
    for (key, _) in map.iter() {
        if !STREAM_KEYS.contains(&key.as_str()) {
            let hint = suggest(key.as_str(), STREAM_KEYS.iter().copied())
                .map(|s| format!("did you mean `{s}`? "))
                .unwrap_or_default();
            let (l, col) = key_pos(key);
            c.at(
                l,
                col,
                &path,
                format!(
                    "unknown key `{}`; {hint}expected one of: {}",
                    key.as_str(),
                    STREAM_KEYS.join(", ")
                ),
            );
        }
    }
    let from_node = map.get_node("from");
    let mut from = Vec::new();
    match from_node {
        None => c.at(
            at.0,
            at.1,
            &path,
            "missing `from`: the source or stream this stream reads (or a list of them)",
        ),
        Some(n) => {
            let items: Vec<&Node> = match n.as_sequence() {
                Some(seq) => seq.iter().collect(),
                None => vec![n],
            };
            for item in items {
                match item.as_scalar() {
                    Some(s) if !s.as_str().is_empty() => {
                        if from.iter().any(|f| f == s.as_str()) {
                            c.node(
                                item,
                                &format!("{path}.from"),
                                format!("`{}` is named twice", s.as_str()),
                            );
                        } else {
                            from.push(s.as_str().to_string());
                        }
                    }
                    _ => c.node(
                        item,
                        &format!("{path}.from"),
                        "expected the name of a source or a stream, or a list of them",
                    ),
                }
            }
            if from.is_empty() && n.as_sequence().is_some() {
                c.node(n, &format!("{path}.from"), "names no source or stream");
            }
        }
    }
    let mut steps = Vec::new();
    if let Some(n) = map.get_node("steps") {
        match n.as_sequence() {
            Some(seq) => {
                for (i, item) in seq.iter().enumerate() {
                    if let Some(s) = c.section::<StepConfig>(item, &format!("{path}.steps[{i}]")) {
                        steps.push((s, item));
                    }
                }
            }
            None => c.node(n, &format!("{path}.steps"), "expected a list of steps"),
        }
    }
    Some(StreamRead {
        name,
        at,
        from,
        from_node,
        reads_sources: false,
        prepared: Vec::new(),
        steps,
        sink: map.get_node("sink"),
    })
}
