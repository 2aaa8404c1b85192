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

    /// Processes `batch.recs[recs]` with the current watermark, appending
    /// outputs (results, late records, dead letters).
    fn process(&mut self, batch: &KeyedBatch, recs: Range<usize>, out: &mut Vec<Output>);

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

    /// Windows (or other units of state) still open; reported when stopped.
    fn open_windows(&self) -> u64 {
        0
    }
}
