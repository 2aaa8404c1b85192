//! Checks of a `window` step.

#[allow(unused_imports)]
use super::*;

pub(super) fn check_window(
    c: &mut Checker,
    w: &WindowConfig,
    node: &Node,
    path: &str,
    known: Option<&[String]>,
) -> Option<WindowDef> {
    let kinds = [
        w.tumbling.is_some(),
        w.sliding.is_some(),
        w.session.is_some(),
    ];
    let count = kinds.iter().filter(|k| **k).count();
    if count != 1 {
        c.node(
            node,
            path,
            format!(
                "a window needs exactly one of `tumbling`, `sliding`, `session`; found {}",
                if count == 0 {
                    "none".to_string()
                } else {
                    count.to_string()
                }
            ),
        );
    }
    // Durations are read here; what they must be is the window's rule
    // (`WindowDef::check`), mapped to their positions below.
    let kind = if let Some(t) = &w.tumbling {
        c.duration(t, &format!("{path}.tumbling"))
            .map(|size| WindowKind::Tumbling { size })
    } else if let Some(s) = &w.sliding {
        let size = c.duration(&s.size, &format!("{path}.sliding.size"));
        let slide = c.duration(&s.slide, &format!("{path}.sliding.slide"));
        match (size, slide) {
            (Some(size), Some(slide)) => Some(WindowKind::Sliding { size, slide }),
            _ => None,
        }
    } else if let Some(s) = &w.session {
        c.duration(&s.gap, &format!("{path}.session.gap"))
            .map(|gap| WindowKind::Session { gap })
    } else {
        None
    };
    let lateness = match &w.allowed_lateness {
        Some(d) => c.duration(d, &format!("{path}.allowed_lateness")),
        None => Some(0),
    };
    let mut aggregates = Vec::new();
    let mut ok = true;
    // No aggregate at all is the window's own rule (reported below).
    match &w.aggregate {
        None => {}
        Some(a) => {
            for (name, call) in a {
                let p = format!("{path}.aggregate.{}", name.value);
                match parse_aggregate(&call.0) {
                    Ok((func, arg)) => {
                        if let (Some(known), Some(arg)) = (known, &arg) {
                            let mut used = Vec::new();
                            arg.fields(&mut used);
                            for f in used {
                                check_field(c, known, &f, call.line, call.column, &p);
                            }
                        }
                        aggregates.push(crate::operators::window::Aggregate {
                            name: name.value.clone(),
                            func,
                            arg,
                        });
                    }
                    Err(e) => {
                        c.sp(call, &p, e);
                        ok = false;
                    }
                }
            }
        }
    }
    let (Some(kind), Some(allowed_lateness), true) = (kind, lateness, ok) else {
        return None;
    };
    let def = WindowDef {
        kind,
        allowed_lateness,
        aggregates,
        errors: Vec::new(),
        max_keys: w.max_keys,
    };
    let problems = def.check();
    for p in &problems {
        match &p.part {
            WindowPart::Size => match (&w.tumbling, &w.sliding) {
                (Some(t), _) => c.sp(t, &format!("{path}.tumbling"), &p.message),
                (_, Some(s)) => c.sp(&s.size, &format!("{path}.sliding.size"), &p.message),
                _ => c.node(node, path, &p.message),
            },
            WindowPart::Slide => match &w.sliding {
                Some(s) => c.sp(&s.slide, &format!("{path}.sliding.slide"), &p.message),
                None => c.node(node, path, &p.message),
            },
            WindowPart::Gap => match &w.session {
                Some(s) => c.sp(&s.gap, &format!("{path}.session.gap"), &p.message),
                None => c.node(node, path, &p.message),
            },
            WindowPart::Lateness => c.node(node, &format!("{path}.allowed_lateness"), &p.message),
            WindowPart::Aggregates => c.node(node, path, &p.message),
            WindowPart::Aggregate(name) => {
                let p_path = format!("{path}.aggregate.{name}");
                match w
                    .aggregate
                    .as_ref()
                    .and_then(|a| a.keys().find(|k| k.value == *name))
                {
                    Some(k) => c.sp(k, &p_path, &p.message),
                    None => c.node(node, &p_path, &p.message),
                }
            }
            WindowPart::MaxKeys => c.node(node, &format!("{path}.max_keys"), &p.message),
        }
    }
    problems.is_empty().then_some(def)
}
