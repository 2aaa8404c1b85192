//! Keyed, stateful operators: the trait the keyed stage runs.
//!
//! An operator instance holds the state of the keys in the key groups its
//! worker (or peer) owns. The host calls, in stream order:
//! - [`KeyedOperator::process`] for runs of records, with the watermark as
//!   it stands before them;
//! - [`KeyedOperator::advance`] when the watermark rises (timers fire);
//! - [`KeyedOperator::snapshot`] at a checkpoint barrier: every key changed
//!   since the last snapshot, encoded, or `None` for a key whose state is
//!   gone;
//! - [`KeyedOperator::restore`] before the first record, with the keys of
//!   the groups it owns as a checkpoint saved them.
//!
//! State is declared ([`KeyedOperator::state`]): a name and a version of the
//! record format, stored with the checkpoint, so a later release can read
//! (or refuse, clearly) what an earlier one wrote. The window operator is
//! one implementation ([`crate::operators::window::WindowStep`]).

use crate::msg::{KeyedBatch, Order, Output};
use crate::time::valve::WatermarkValve;
use std::ops::Range;

/// The state an operator keeps, as recorded in checkpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDecl {
    /// The kind of state (`window`).
    pub name: &'static str,
    /// Version of the per-key record format.
    pub version: u32,
    /// What the saved state depends on (key fields, window shape,
    /// aggregates): state saved under another fingerprint is refused.
    pub fingerprint: String,
    /// Names to label saved values with (`rivulet state inspect`), as JSON.
    pub layout: String,
}

/// One key's saved state: its encoded record, or `None` when it is gone.
pub type KeyChange = (Box<[u8]>, Option<Vec<u8>>);

/// A keyed, stateful operator (see the module docs).
pub trait KeyedOperator: Send {
    /// The state this operator keeps.
    fn state(&self) -> StateDecl;

    /// The fields of the records it puts out (as [`crate::msg::Body::Row`]).
    fn output_schema(&self) -> crate::msg::Schema;

    /// Called once before the first record, with the run's context (its
    /// metrics, and this operator's id); `worker` labels what it counts.
    fn start(&mut self, _ctx: &crate::context::RunContext, _worker: usize) {}

    /// Processes `batch.recs[recs]` with the current watermark, appending
    /// outputs (results, late records, dead letters).
    fn process(&mut self, batch: &KeyedBatch, recs: Range<usize>, out: &mut Vec<Output>);

    /// The event time of a result it put out, for an operator after it:
    /// `window_end − 1` for a window result (Flink's rule; `end` of an
    /// [`Output`] is the window's end).
    fn result_time(&self, o: &Output) -> i64 {
        o.end.saturating_sub(1)
    }

    /// Called after every frame with the wall clock: processing-time
    /// timers that are due fire.
    fn tick(&mut self, _now_ms: i64, _out: &mut Vec<Output>) {}

    /// The watermark rose to `watermark`: fire what is due, with `order`.
    fn advance(&mut self, watermark: i64, order: Order, out: &mut Vec<Output>);

    /// The operator's watermark.
    fn watermark(&self) -> i64;

    /// Starts recording which keys change, for [`KeyedOperator::snapshot`].
    fn track_changes(&mut self);

    /// The keys changed since the last snapshot.
    fn snapshot(&mut self, out: &mut Vec<KeyChange>);

    /// Puts back saved state: the watermark, then each key's record.
    /// A record that cannot be read is an error naming the key's position.
    fn restore(&mut self, watermark: i64, keys: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), String>;

    /// Windows (or other units of state) still open; reported when
    /// stopped, and about once a second for metrics.
    fn open_windows(&self) -> u64 {
        0
    }

    /// Keys with state now (cheap: read after every frame).
    fn keys(&self) -> u64 {
        0
    }

    /// The open state of one key, as rows of [`KeyedOperator::output_schema`]
    /// (a window's current aggregates), for live queries.
    fn query(&self, _key: &[u8]) -> Vec<Box<[crate::value::Value]>> {
        Vec::new()
    }

    /// Feeds one batch: runs of records, and between them the watermarks
    /// reached inside the batch, through the valve (a watermark reached at
    /// event `i` applies after it, before the next record), advancing to
    /// at most `cap` (peer mode holds event time while a peer is missing).
    /// With `marks`, each rise of the watermark is also put out as an
    /// [`Output::mark`] (for steps after this operator).
    ///
    /// Provided, so that each operator gets its own copy in which
    /// `process` and `advance` are direct calls: one dynamic call per
    /// batch, not two per record. Operators do not override it.
    fn feed(
        &mut self,
        valve: &mut WatermarkValve,
        input: usize,
        batch: &KeyedBatch,
        cap: i64,
        marks: bool,
        out: &mut Vec<Output>,
    ) {
        let (recs, wms) = (&batch.recs, &batch.watermarks[..]);
        let parts = &batch.watermark_parts[..];
        let mut valve_at = |w: usize, wm: i64| match parts.get(w) {
            Some(&p) => valve.part_watermark(input, p, wm),
            None => valve.watermark(input, wm),
        };
        let (mut r, mut w) = (0, 0);
        while r < recs.len() {
            while w < wms.len() && wms[w].0 < recs[r].idx {
                if let Some(wm) = valve_at(w, wms[w].1) {
                    let order = Order::after(wms[w].0);
                    self.advance(wm.min(cap), order, out);
                    if marks {
                        out.push(Output::mark(order, self.watermark()));
                    }
                }
                w += 1;
            }
            // Runs are short when timestamps rise often: a linear scan.
            // `recs[r]` is in the run: every watermark before it is applied.
            let end = match wms.get(w) {
                Some(&(at, _)) => {
                    let mut e = r + 1;
                    while e < recs.len() && recs[e].idx <= at {
                        e += 1;
                    }
                    e
                }
                None => recs.len(),
            };
            self.process(batch, r..end, out);
            r = end;
        }
        for (k, &(at, wm)) in wms.iter().enumerate().skip(w) {
            if let Some(wm) = valve_at(k, wm) {
                self.advance(wm.min(cap), Order::after(at), out);
                if marks {
                    out.push(Output::mark(Order::after(at), self.watermark()));
                }
            }
        }
    }
}
