//! The window operator as a [`KeyedOperator`]: records in, window results,
//! late records and dead letters out.
//!
//! Saved state, record format 1 (`window`, version 1): per key, a postcard
//! [`KeySnapshot`] (open windows and their accumulators). State format 1
//! of the store kept exactly these records, so its files still load.

use super::{Emitted, KeySnapshot, Outcome, WindowDef, WindowOperator};
use crate::msg::{
    dead_letter_line, Body, DeadSource, KeyedBatch, Order, Output, Phase, Schema, Stream,
};
use crate::operators::keyed::{KeyChange, KeyedOperator, StateDecl};
use crate::value::hash_key;
use std::ops::Range;

/// Version of the per-key record this operator saves.
pub const STATE_VERSION: u32 = 1;

/// A window step on one worker (see the module docs).
pub struct WindowStep {
    op: WindowOperator,
    /// Aggregates per record in a [`KeyedBatch`].
    width: usize,
    /// Named in dead letters.
    source_name: String,
    /// The pipeline's `max_keys`, named in dead letters.
    max_keys: Option<usize>,
    state: StateDecl,
    emitted: Vec<Emitted>,
    /// Dead letters for a full state, counted as they happen.
    state_full: crate::metrics::Counter,
}

/// What a [`WindowStep`] needs besides its window.
#[derive(Clone, Debug, Default)]
pub struct WindowStepOptions {
    pub key_names: Vec<String>,
    pub source_name: String,
    /// This worker's share of `max_keys`.
    pub key_limit: Option<usize>,
    pub fingerprint: String,
    pub layout: String,
}

impl WindowStep {
    pub fn new(def: WindowDef, o: WindowStepOptions) -> Self {
        let width = def.aggregates.len();
        let max_keys = def.max_keys;
        let mut op = WindowOperator::new(def, o.key_names);
        if let Some(n) = o.key_limit {
            op.limit_keys(n);
        }
        WindowStep {
            op,
            width,
            source_name: o.source_name,
            max_keys,
            state: StateDecl {
                name: "window",
                version: STATE_VERSION,
                fingerprint: o.fingerprint,
                layout: o.layout,
            },
            emitted: Vec::new(),
            state_full: Default::default(),
        }
    }

    fn collect(&mut self, idx: u32, phase: Phase, out: &mut Vec<Output>) {
        out.extend(self.emitted.drain(..).map(|e| Output {
            idx,
            phase,
            end: e.end,
            start: e.start,
            key: e.key,
            stream: Stream::Main,
            body: Body::Row(e.row),
        }));
    }
}

impl KeyedOperator for WindowStep {
    fn state(&self) -> StateDecl {
        self.state.clone()
    }

    fn output_schema(&self) -> Schema {
        self.op.output_schema()
    }

    fn process(&mut self, batch: &KeyedBatch, recs: Range<usize>, out: &mut Vec<Output>) {
        let first = recs.start;
        for (n, rec) in batch.recs[recs].iter().enumerate() {
            let i = first + n;
            // Ties of `first`/`last` by source position, which goes on
            // across restarts (a per-run counter would put events after a
            // recovery before those in the restored state).
            let outcome = self.op.process(
                batch.key(rec),
                rec.hash,
                rec.ts,
                rec.position,
                batch.vals(rec, self.width),
                &mut self.emitted,
            );
            self.collect(rec.idx, Phase::During, out);
            match outcome {
                Outcome::Accepted => {}
                // Counted always; the payload is there when a late output
                // reads it.
                Outcome::Late => out.push(Output::plain(
                    rec.idx,
                    Stream::Late,
                    batch.payload(i).to_vec(),
                )),
                Outcome::StateFull => {
                    self.state_full.add(1);
                    let reason = format!(
                        "the window state is full: a new key beyond max_keys ({})",
                        self.max_keys.unwrap_or(0)
                    );
                    let from = DeadSource {
                        source: &self.source_name,
                        position: rec.position,
                        topic: batch.topic(i),
                        payload: batch.payload(i),
                        oversize: None,
                    };
                    out.push(Output::plain(
                        rec.idx,
                        Stream::Dead,
                        dead_letter_line(&reason, &from),
                    ));
                }
            }
        }
    }

    fn advance(&mut self, watermark: i64, order: Order, out: &mut Vec<Output>) {
        self.op.advance(watermark, &mut self.emitted);
        self.collect(order.idx, order.phase, out);
    }

    fn watermark(&self) -> i64 {
        self.op.watermark()
    }

    fn track_changes(&mut self) {
        self.op.track_changes();
    }

    fn snapshot(&mut self, out: &mut Vec<KeyChange>) {
        let changes = self.op.take_changes();
        out.extend(changes.deletes.into_iter().map(|k| (k, None)));
        for (k, snap) in changes.upserts {
            match postcard::to_stdvec(&snap) {
                Ok(bytes) => out.push((k, Some(bytes))),
                // Encoding into a Vec fails only for types serde cannot
                // describe, which KeySnapshot is not.
                Err(e) => tracing::error!(error = %e, "cannot encode a key's window state"),
            }
        }
    }

    fn restore(&mut self, watermark: i64, keys: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), String> {
        self.op.restore_watermark(watermark);
        for (key, bytes) in keys {
            let snap: KeySnapshot = postcard::from_bytes(&bytes)
                .map_err(|e| format!("unreadable window state of a key: {e}"))?;
            self.op.restore_key(&key, hash_key(&key), snap);
        }
        Ok(())
    }

    fn open_windows(&self) -> u64 {
        self.op.open_windows() as u64
    }

    fn keys(&self) -> u64 {
        self.op.open_keys() as u64
    }

    fn query(&self, key: &[u8]) -> Vec<Box<[crate::value::Value]>> {
        self.op.query(key, hash_key(key))
    }

    fn start(&mut self, ctx: &crate::context::RunContext, _worker: usize) {
        self.state_full = ctx.counter(
            crate::metrics::names::DEAD_LETTERS,
            "records sent to the dead-letter output, by reason class",
            &[("reason", crate::metrics::reason::STATE_FULL)],
        );
    }
}
