//! The rules of a pipeline's shape, in one place. The builder
//! ([`super::PipelineBuilder::build`]) and the pipeline file
//! ([`crate::config::validate`]) both apply them; the file maps each
//! problem to the line and column of the step it names.

/// What a rule needs to know of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepShape {
    /// A stateless step (`map`, `filter`, your own).
    Step,
    /// `key_by` with this many fields.
    KeyBy {
        fields: usize,
    },
    Window,
    /// `deduplicate`, `deadband`, `alert`: keyed and stateful, last.
    Stateful,
}

/// What a problem is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// The step at this index; `part` names the part of the step
    /// (`key_by`), if any.
    Step {
        index: usize,
        part: Option<&'static str>,
    },
    /// The `workers` setting.
    Workers,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleProblem {
    pub subject: Subject,
    pub message: String,
}

fn step(index: usize, part: Option<&'static str>, message: String) -> RuleProblem {
    RuleProblem {
        subject: Subject::Step { index, part },
        message,
    }
}

/// Checks the order and number of steps. `has_time`: whether events have
/// a time (event or processing); `None` when not known (the source section
/// has problems of its own), which skips the rule that needs it.
pub fn check_steps(steps: &[StepShape], has_time: Option<bool>) -> Vec<RuleProblem> {
    let mut out = Vec::new();
    let mut key: Option<usize> = None;
    let mut window: Option<usize> = None;
    let mut stateful: Option<usize> = None;
    for (i, s) in steps.iter().enumerate() {
        if let Some(w) = window {
            out.push(step(
                i,
                None,
                format!("steps after the window (steps[{w}]) are not supported; the window must be the last step"),
            ));
        } else if let Some(w) = stateful {
            out.push(step(
                i,
                None,
                format!("steps after a stateful step (steps[{w}]) are not supported yet; it must be the last step"),
            ));
        }
        match *s {
            StepShape::Step => {}
            StepShape::KeyBy { fields } => {
                if let Some(first) = key {
                    out.push(step(
                        i,
                        Some("key_by"),
                        format!("only one key_by is allowed (already at steps[{first}])"),
                    ));
                } else {
                    key = Some(i);
                }
                if fields == 0 {
                    out.push(step(
                        i,
                        Some("key_by"),
                        "key_by needs at least one field".into(),
                    ));
                }
            }
            StepShape::Stateful => {
                if stateful.is_none() {
                    stateful = Some(i);
                }
                if key.is_none() {
                    out.push(step(
                        i,
                        None,
                        "a stateful step keeps state per key: put a `key_by` before it".into(),
                    ));
                }
                if has_time == Some(false) {
                    out.push(step(
                        i,
                        None,
                        "a stateful step needs time: set `source.event_time` (or `source.time: processing`)"
                            .into(),
                    ));
                }
            }
            StepShape::Window => {
                if let Some(first) = window {
                    out.push(step(
                        i,
                        None,
                        format!("only one window is allowed (already at steps[{first}])"),
                    ));
                } else {
                    window = Some(i);
                }
                if has_time == Some(false) {
                    out.push(step(
                        i,
                        None,
                        "a window needs time: set `source.event_time` (or `source.time: processing`)"
                            .into(),
                    ));
                }
            }
        }
    }
    if let (Some(k), None, None) = (key, window, stateful) {
        out.push(step(
            k,
            Some("key_by"),
            "key_by without a window has no effect; add a `window` step (or `deduplicate`, `deadband`, `alert`) after it".into(),
        ));
    }
    out
}

/// Checks the number of workers.
pub fn check_workers(n: usize) -> Option<RuleProblem> {
    (n == 0 || n > crate::partition::KEY_GROUPS).then(|| RuleProblem {
        subject: Subject::Workers,
        message: format!(
            "must be between 1 and {}, got {n}",
            crate::partition::KEY_GROUPS
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use StepShape::*;

    fn messages(steps: &[StepShape], time: Option<bool>) -> Vec<String> {
        check_steps(steps, time)
            .into_iter()
            .map(|p| p.message)
            .collect()
    }

    #[test]
    fn a_good_pipeline_has_no_problems() {
        assert!(messages(&[Step, KeyBy { fields: 1 }, Step, Window], Some(true)).is_empty());
        assert!(
            messages(&[Window], Some(true)).is_empty(),
            "a global window"
        );
        assert!(messages(&[Step, Step], Some(false)).is_empty());
    }

    #[test]
    fn each_rule_names_its_step() {
        let p = check_steps(
            &[KeyBy { fields: 0 }, KeyBy { fields: 1 }, Window, Step],
            Some(false),
        );
        let got: Vec<(Subject, &str)> = p
            .iter()
            .map(|p| (p.subject, p.message.split(' ').next().unwrap_or("")))
            .collect();
        let at = |index, part| Subject::Step { index, part };
        assert_eq!(
            got,
            vec![
                (at(0, Some("key_by")), "key_by"),
                (at(1, Some("key_by")), "only"),
                (at(2, None), "a"),
                (at(3, None), "steps"),
            ]
        );
        assert_eq!(
            messages(&[KeyBy { fields: 1 }], Some(true)),
            vec!["key_by without a window has no effect; add a `window` step (or `deduplicate`, `deadband`, `alert`) after it"]
        );
        // A stateful step: after key_by, with time, last.
        assert!(messages(&[KeyBy { fields: 1 }, Stateful], Some(true)).is_empty());
        let got = messages(&[Stateful, Step], Some(false));
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].contains("put a `key_by` before it"), "{got:?}");
        assert!(got[1].contains("needs time"), "{got:?}");
        assert!(got[2].contains("must be the last step"), "{got:?}");
        assert!(
            messages(&[Window], None).is_empty(),
            "time unknown: skipped"
        );
    }

    #[test]
    fn workers_are_bounded_by_the_key_groups() {
        assert!(check_workers(1).is_none());
        assert!(check_workers(256).is_none());
        assert!(check_workers(0).is_some());
        assert!(check_workers(257).is_some());
    }
}
