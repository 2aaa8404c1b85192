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
    /// `deduplicate`, `deadband` (which pass events on) or `alert`.
    Stateful {
        passes: bool,
    },
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

/// Checks the order of steps. `has_time`: whether events have a time
/// (event or processing); `None` when not known (the source section has
/// problems of its own), which skips the rule that needs it.
///
/// A pipeline is segments: steps, then optionally `key_by` and a window or
/// a stateful step. The first window may be global (no `key_by`); a later
/// one reads the results before it, which are not keyed, so it needs its
/// own `key_by`. Steps after `deduplicate` or `deadband` (which pass events
/// on) must lead to a window or an `alert`: they read the events' fields by
/// name, and what comes out are results.
pub fn check_steps(steps: &[StepShape], has_time: Option<bool>) -> Vec<RuleProblem> {
    let mut out = Vec::new();
    // The key_by of the current segment, the last keyed step, the last
    // step that passes events on.
    let mut key: Option<usize> = None;
    let mut keyed: Option<usize> = None;
    let mut passing: Option<usize> = None;
    let needs_time = |out: &mut Vec<RuleProblem>, i: usize, what: &str| {
        if has_time == Some(false) {
            out.push(step(
                i,
                None,
                format!(
                    "{what} needs time: set `source.event_time` (or `source.time: processing`)"
                ),
            ));
        }
    };
    // Steps after a step that passes events on (`deduplicate`,
    // `deadband`) read the events' fields by name: they must lead to a
    // window or an `alert`, whose results have known fields.
    let mut after_passing: Option<usize> = None;
    let results_needed = |p: usize| {
        format!("steps after deduplicate or deadband (steps[{p}]) need a window or an `alert` after them: they read the events' fields by name, and what comes out must be results (put other steps before steps[{p}])")
    };
    for (i, s) in steps.iter().enumerate() {
        if let (Some(_), None) = (passing, after_passing) {
            after_passing = Some(i);
        }
        match *s {
            StepShape::Window | StepShape::Stateful { passes: false } => {
                passing = None;
                after_passing = None;
            }
            StepShape::Stateful { passes: true } => {
                if let (Some(p), Some(_)) = (passing, after_passing) {
                    out.push(step(i, None, results_needed(p)));
                    after_passing = None;
                }
            }
            _ => {}
        }
        match *s {
            StepShape::Step => {}
            StepShape::KeyBy { fields } => {
                if let Some(first) = key {
                    out.push(step(
                        i,
                        Some("key_by"),
                        format!("only one key_by before each window (already at steps[{first}])"),
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
            StepShape::Window => {
                if let (Some(w), None) = (keyed, key) {
                    out.push(step(
                        i,
                        None,
                        format!("the results of steps[{w}] are not keyed: put a `key_by` before this window"),
                    ));
                }
                needs_time(&mut out, i, "a window");
                keyed = Some(i);
                key = None;
            }
            StepShape::Stateful { passes } => {
                if key.is_none() {
                    out.push(step(
                        i,
                        None,
                        "a stateful step keeps state per key: put a `key_by` before it".into(),
                    ));
                }
                needs_time(&mut out, i, "a stateful step");
                keyed = Some(i);
                key = None;
                if passes {
                    passing = Some(i);
                }
            }
        }
    }
    if let (Some(p), Some(first)) = (passing, after_passing) {
        out.push(step(first, None, results_needed(p)));
    }
    if let Some(k) = key {
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
            ]
        );
        assert_eq!(
            messages(&[KeyBy { fields: 1 }], Some(true)),
            vec!["key_by without a window has no effect; add a `window` step (or `deduplicate`, `deadband`, `alert`) after it"]
        );
        // A stateful step: after key_by, with time; nothing after one
        // that passes events on.
        let dedup = Stateful { passes: true };
        let alert = Stateful { passes: false };
        assert!(messages(&[KeyBy { fields: 1 }, dedup], Some(true)).is_empty());
        let got = messages(&[dedup, Step], Some(false));
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].contains("put a `key_by` before it"), "{got:?}");
        assert!(got[1].contains("needs time"), "{got:?}");
        assert!(
            got[2].contains("need a window or an `alert` after them"),
            "{got:?}"
        );
        // ... unless a window or an alert follows: its results come out.
        let k1 = KeyBy { fields: 1 };
        assert!(messages(&[k1, dedup, Step, k1, Window], Some(true)).is_empty());
        assert!(messages(&[k1, dedup, k1, alert, Step], Some(true)).is_empty());
        let got = messages(&[k1, dedup, k1, dedup, k1, Window], Some(true));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("steps[1]"), "{got:?}");
        // Steps after a window; a second window needs its own key_by.
        let k = KeyBy { fields: 1 };
        assert!(messages(
            &[k, Window, Step, k, Window, Step, k, alert, Step],
            Some(true)
        )
        .is_empty());
        let got = messages(&[k, Window, Window], Some(true));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("are not keyed"), "{got:?}");
        assert!(
            messages(&[Window, Step, k, Window], Some(true)).is_empty(),
            "a global window first"
        );
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
