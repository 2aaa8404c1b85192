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
    let kind = if let Some(t) = &w.tumbling {
        c.positive(t, &format!("{path}.tumbling"))
            .map(|size| WindowKind::Tumbling { size })
    } else if let Some(s) = &w.sliding {
        let size = c.positive(&s.size, &format!("{path}.sliding.size"));
        let slide = c.positive(&s.slide, &format!("{path}.sliding.slide"));
        match (size, slide) {
            (Some(size), Some(slide)) => Some(WindowKind::Sliding { size, slide }),
            _ => None,
        }
    } else if let Some(s) = &w.session {
        c.positive(&s.gap, &format!("{path}.session.gap"))
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
    match &w.aggregate {
        None => {
            c.node(node, path, "a window needs `aggregate:` with at least one result field, like `readings: count()`");
            ok = false;
        }
        Some(a) if a.is_empty() => {
            c.node(
                node,
                path,
                "`aggregate:` is empty; add at least one result field, like `readings: count()`",
            );
            ok = false;
        }
        Some(a) => {
            for (name, call) in a {
                let p = format!("{path}.aggregate.{}", name.value);
                if ["window_start", "window_end"].contains(&name.as_str()) {
                    c.sp(
                        name,
                        &p,
                        format!("`{}` is a reserved result field", name.value),
                    );
                    ok = false;
                }
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
    if w.max_keys == Some(0) {
        c.node(node, &format!("{path}.max_keys"), "must be at least 1");
        return None;
    }
    Some(WindowDef {
        kind,
        allowed_lateness,
        aggregates,
        errors: Vec::new(),
        max_keys: w.max_keys,
    })
}
