//! The merger (the calling thread): takes each input batch's outputs from
//! the parse stage and from every keyed worker, puts them in order and
//! writes the sinks; then hands a checkpoint whose outputs are all written
//! to the checkpoint writer.
//!
//! Order within a batch: by the event that caused an output, then
//! [`crate::msg::Phase`], window end, start and key. Since every keyed
//! worker sends one [`OutBatch`] per input batch, the result does not
//! depend on the number of workers.

use super::checkpoint::Checkpointer;
use super::reader::Cut;
use super::{Progress, RunError, RunStats};
use crate::msg::{End, Output, Stream};
use crate::operators::keyed::KeyChange;
use crate::sinks::Sink;
use crate::state::control::SavepointRequest;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

/// A keyed worker's part of a checkpoint.
pub(super) struct WorkerSnapshot {
    pub changes: Vec<KeyChange>,
    pub watermark: i64,
    /// The watermark of the worker's input (its valve).
    pub input_watermark: i64,
}

/// What one stage produced for one input batch.
#[derive(Default)]
pub(super) struct OutBatch {
    pub end: Option<End>,
    pub outputs: Vec<Output>,
    pub events: u64,
    pub filtered: u64,
    pub open_windows: u64,
    /// From the parse stage: the checkpoint this batch closes.
    pub checkpoint: Option<Cut>,
    /// From a keyed worker: its state changes for the checkpoint.
    pub snapshot: Option<WorkerSnapshot>,
    /// From the parse stage: a savepoint to write after the checkpoint.
    pub savepoint: Option<Arc<SavepointRequest>>,
}

/// The sinks of a run.
pub(super) struct Sinks {
    pub main: Vec<Box<dyn Sink>>,
    pub late: Vec<Box<dyn Sink>>,
    pub dead: Vec<Box<dyn Sink>>,
}

/// The merger: writes each batch's outputs in order.
pub(super) fn merge(
    mut checkpointer: Option<Checkpointer>,
    progress: &Progress,
    parse_out: Vec<Receiver<OutBatch>>,
    win_out: Vec<Receiver<OutBatch>>,
    sinks: Sinks,
) -> Result<RunStats, RunError> {
    let Sinks {
        main: mut sinks,
        mut late,
        mut dead,
    } = sinks;
    let mut stats = RunStats::default();
    let mut seq = 0usize;
    let lost = || RunError::Internal("a worker stopped unexpectedly".into());
    let mut logged_dead = 0u64;
    let mut pending = crate::state::Pending::default();
    loop {
        let mut batch = parse_out[seq % parse_out.len()]
            .recv()
            .map_err(|_| lost())?;
        stats.events += batch.events;
        stats.filtered += batch.filtered;
        let mut time = (i64::MIN, i64::MIN);
        for rx in &win_out {
            let mut w = rx.recv().map_err(|_| lost())?;
            batch.outputs.append(&mut w.outputs);
            stats.open_windows += w.open_windows;
            if let Some(snap) = w.snapshot.take() {
                // One keyed operator per pipeline today: id 0.
                for (k, record) in snap.changes {
                    match record {
                        Some(r) => pending.upsert(0, k, r),
                        None => pending.delete(0, k),
                    }
                }
                time = (time.0.max(snap.watermark), time.1.max(snap.input_watermark));
            }
        }
        let outputs = &mut batch.outputs;
        outputs.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        for o in outputs.iter() {
            match o.stream {
                Stream::Main => {
                    stats.results += 1;
                    for s in &mut sinks {
                        s.write(&o.line)?;
                    }
                }
                Stream::Late => {
                    stats.late += 1;
                    for s in &mut late {
                        s.write(&o.line)?;
                    }
                }
                Stream::Dead => {
                    stats.dead_letters += 1;
                    if dead.is_empty() {
                        logged_dead += 1;
                        if logged_dead <= 10 {
                            tracing::warn!(
                                record = %String::from_utf8_lossy(&o.line),
                                "dead letter (configure `dead_letter:` to keep them)"
                            );
                        }
                    }
                    for s in &mut dead {
                        s.write(&o.line)?;
                    }
                }
            }
        }
        for s in sinks.iter_mut().chain(&mut late).chain(&mut dead) {
            s.flush()?;
        }
        // The outputs up to here are written: now the checkpoint that
        // covers them (written by its own thread while processing goes on).
        if let Some(cp) = checkpointer.as_mut() {
            match batch.checkpoint.take() {
                Some(cut) => {
                    cp.checkpoint(cut.position, time, &mut pending, batch.savepoint.take())
                }
                None => cp.poll(),
            }
        }
        progress.batches_written.fetch_add(1, Ordering::Relaxed);
        if let Some(end) = batch.end {
            stats.stopped = end == End::Stop;
            if let Some(cp) = checkpointer.as_mut() {
                cp.finish();
            }
            for s in sinks.iter_mut().chain(&mut late).chain(&mut dead) {
                s.close()?;
            }
            return Ok(stats);
        }
        seq += 1;
    }
}
