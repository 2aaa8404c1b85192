//! The watermark rule, in one place.
//!
//! **Generation.** A source's watermark follows Flink's
//! bounded-out-of-orderness generator, advanced after every event:
//! `max timestamp seen − bound − 1 ms` ([`bounded`]). It depends on the
//! input alone, never on a timer, so the same input gives the same results.
//!
//! **Combination.** An operator with several inputs (the streams of several
//! peers, or of several sources) holds a [`WatermarkValve`], as Flink's
//! `StatusWatermarkValve`:
//! - each input's watermark only rises (a lower one is ignored);
//! - the output is the minimum over the *active* inputs;
//! - an input marked idle leaves the minimum until it sends a watermark
//!   again;
//! - when every input is idle, the output goes to the largest of their
//!   watermarks.
//!
//! rivulet adds one rule for idle inputs (`idle_timeout`): an input that
//! has been quiet for `q` ms of processing time counts as if its event time
//! had moved on by `q` (`watermark + q`), so the windows of a stream that
//! stopped still fire. With one input that is the whole idleness rule.
//!
//! The output never goes back: [`WatermarkValve::watermark`] and
//! [`WatermarkValve::idle`] return `Some` only when it rises.

/// The watermark after seeing `max_ts` with out-of-orderness `bound`
/// (`i64::MIN` before any event).
#[inline]
pub fn bounded(max_ts: i64, bound: i64) -> i64 {
    if max_ts == i64::MIN {
        return i64::MIN;
    }
    max_ts.saturating_sub(bound).saturating_sub(1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Input {
    /// The highest watermark the input sent.
    watermark: i64,
    /// `Some(q)`: idle, quiet for `q` ms of processing time.
    idle: Option<i64>,
}

/// Combines the watermarks of several inputs (see the module docs).
#[derive(Clone, Debug)]
pub struct WatermarkValve {
    inputs: Vec<Input>,
    /// For a union of sources: each input's watermark per source (the
    /// input's own is the least of them). Empty otherwise.
    parts: Vec<Vec<i64>>,
    /// The last watermark put out.
    output: i64,
}

impl WatermarkValve {
    /// A valve over `n` inputs (at least one), all active at `i64::MIN`.
    pub fn new(n: usize) -> Self {
        WatermarkValve {
            inputs: vec![
                Input {
                    watermark: i64::MIN,
                    idle: None
                };
                n.max(1)
            ],
            parts: Vec::new(),
            output: i64::MIN,
        }
    }

    /// Each input is a union of `n` sources, each with its own watermark
    /// (all at the inputs' watermark now).
    pub fn set_parts(&mut self, n: usize) {
        self.parts = match n > 1 {
            true => self.inputs.iter().map(|i| vec![i.watermark; n]).collect(),
            false => Vec::new(),
        };
    }

    /// A watermark of source `part` of input `i`: the input's watermark
    /// becomes the least of its sources'. Returns the new output when it
    /// rises.
    #[inline]
    pub fn part_watermark(&mut self, i: usize, part: u16, watermark: i64) -> Option<i64> {
        let Some(parts) = self.parts.get_mut(i) else {
            return self.watermark(i, watermark);
        };
        if let Some(w) = parts.get_mut(part as usize) {
            *w = (*w).max(watermark);
        }
        let least = parts.iter().copied().min().unwrap_or(watermark);
        self.watermark(i, least)
    }

    /// Number of inputs.
    pub fn inputs(&self) -> usize {
        self.inputs.len()
    }

    /// The output watermark now.
    pub fn current(&self) -> i64 {
        self.output
    }

    /// Starts every input and the output at a restored watermark.
    pub fn restore(&mut self, watermark: i64) {
        for i in &mut self.inputs {
            i.watermark = watermark;
            i.idle = None;
        }
        for p in self.parts.iter_mut().flatten() {
            *p = watermark;
        }
        self.output = watermark;
    }

    /// A watermark from input `i` (which becomes active). Returns the new
    /// output when it rises.
    #[inline]
    pub fn watermark(&mut self, i: usize, watermark: i64) -> Option<i64> {
        let input = &mut self.inputs[i];
        input.idle = None;
        if watermark > input.watermark {
            input.watermark = watermark;
        } else if self.inputs.len() == 1 {
            return None;
        }
        self.recompute()
    }

    /// Input `i` has been quiet for `quiet_ms` of processing time.
    pub fn idle(&mut self, i: usize, quiet_ms: i64) -> Option<i64> {
        self.inputs[i].idle = Some(quiet_ms.max(0));
        self.recompute()
    }

    fn recompute(&mut self) -> Option<i64> {
        let active = self
            .inputs
            .iter()
            .filter(|i| i.idle.is_none())
            .map(|i| i.watermark)
            .min();
        let candidate = match active {
            Some(min) => min,
            None => self
                .inputs
                .iter()
                .map(|i| {
                    if i.watermark == i64::MIN {
                        i64::MIN
                    } else {
                        i.watermark.saturating_add(i.idle.unwrap_or(0))
                    }
                })
                .max()
                .unwrap_or(i64::MIN),
        };
        if candidate > self.output {
            self.output = candidate;
            Some(candidate)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_union_of_sources_follows_the_slowest_and_a_finished_one_stops_counting() {
        let mut v = WatermarkValve::new(1);
        v.set_parts(2);
        // Source 0 is far ahead; source 1 (a backlog) holds event time.
        assert_eq!(v.part_watermark(0, 0, 10_000), None);
        assert_eq!(v.part_watermark(0, 1, 1_000), Some(1_000));
        assert_eq!(v.part_watermark(0, 1, 500), None, "never back");
        assert_eq!(v.part_watermark(0, 1, 2_000), Some(2_000));
        // The backlog ends: +infinity for it; source 0 decides.
        assert_eq!(v.part_watermark(0, 1, i64::MAX), Some(10_000));
        assert_eq!(v.part_watermark(0, 0, 12_000), Some(12_000));
        v.restore(5_000);
        assert_eq!(
            v.part_watermark(0, 0, 6_000),
            None,
            "source 1 restarts at 5000"
        );
        assert_eq!(v.part_watermark(0, 1, 7_000), Some(6_000));
    }

    #[test]
    fn the_bounded_rule_is_max_minus_bound_minus_one() {
        assert_eq!(bounded(10_000, 2_000), 7_999);
        assert_eq!(bounded(i64::MIN, 5), i64::MIN);
        assert_eq!(bounded(i64::MIN + 3, 5), i64::MIN);
    }

    #[test]
    fn one_input_passes_rises_and_ignores_falls() {
        let mut v = WatermarkValve::new(1);
        assert_eq!(v.watermark(0, 5), Some(5));
        assert_eq!(v.watermark(0, 3), None);
        assert_eq!(v.watermark(0, 5), None);
        assert_eq!(v.watermark(0, 9), Some(9));
        assert_eq!(v.current(), 9);
    }

    #[test]
    fn the_output_is_the_minimum_of_the_inputs() {
        let mut v = WatermarkValve::new(3);
        assert_eq!(v.watermark(0, 10), None, "two inputs have sent nothing");
        assert_eq!(v.watermark(1, 20), None);
        assert_eq!(v.watermark(2, 15), Some(10));
        assert_eq!(v.watermark(0, 30), Some(15));
        assert_eq!(v.watermark(2, 40), Some(20));
    }

    #[test]
    fn idle_inputs_leave_the_minimum_and_come_back_with_data() {
        let mut v = WatermarkValve::new(2);
        v.watermark(0, 100);
        assert_eq!(v.current(), i64::MIN);
        // Input 1 never sent anything; once idle it no longer holds back.
        assert_eq!(v.idle(1, 0), Some(100));
        assert_eq!(v.watermark(0, 150), Some(150));
        // Input 1 comes back below the output: the output does not go back,
        // and stays until input 1 catches up.
        assert_eq!(v.watermark(1, 120), None);
        assert_eq!(v.watermark(0, 200), None);
        assert_eq!(v.watermark(1, 180), Some(180));
    }

    #[test]
    fn when_every_input_is_idle_the_output_goes_to_the_largest() {
        let mut v = WatermarkValve::new(2);
        v.watermark(0, 100);
        v.watermark(1, 50);
        assert_eq!(v.current(), 50);
        v.idle(0, 0);
        assert_eq!(v.current(), 50, "input 1 alone is active");
        assert_eq!(v.idle(1, 0), Some(100));
    }

    #[test]
    fn a_quiet_input_moves_on_with_processing_time() {
        let mut v = WatermarkValve::new(1);
        v.watermark(0, 1_000);
        assert_eq!(v.idle(0, 500), Some(1_500));
        assert_eq!(v.idle(0, 400), None, "never backwards");
        assert_eq!(v.idle(0, 900), Some(1_900));
        // Data again: the input's own watermark is below the output.
        assert_eq!(v.watermark(0, 1_200), None);
        assert_eq!(v.watermark(0, 2_000), Some(2_000));
    }

    #[test]
    fn an_idle_input_that_never_sent_does_not_move_the_output() {
        let mut v = WatermarkValve::new(1);
        assert_eq!(v.idle(0, 10_000), None);
        assert_eq!(v.current(), i64::MIN);
    }

    #[test]
    fn restore_starts_every_input_at_the_saved_watermark() {
        let mut v = WatermarkValve::new(2);
        v.restore(500);
        assert_eq!(v.current(), 500);
        assert_eq!(v.watermark(0, 400), None);
        assert_eq!(v.watermark(0, 700), None, "input 1 still at 500");
        assert_eq!(v.watermark(1, 600), Some(600));
    }
}
