//! The reader thread: polls the source and deals numbered batches to the
//! parse workers in rotation.
//!
//! A batch is up to [`BATCH_EVENTS`] events, or what arrived within
//! [`LINGER`] of the first (low latency for a quiet stream, full batches for
//! a busy one). Every `checkpoint_interval`, at the end of the input and for
//! a savepoint, the batch closes a checkpoint: it carries the checkpoint's
//! id and the source position after it, and the stages downstream put a
//! barrier after its records.

use super::SavepointRequest;
use crate::context::RunContext;
use crate::metrics::names;
use crate::msg::End;
use crate::sources::{Poll, RawBatch, Source, SourceError};
use crate::time::Clock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events per batch at most.
pub const BATCH_EVENTS: usize = 1024;
/// The longest the reader keeps adding to a batch while events keep coming.
pub(super) const LINGER: Duration = Duration::from_millis(1);
/// How often the reader wakes when the source is quiet.
const TICK: Duration = Duration::from_millis(250);

/// A checkpoint cut after a batch.
#[derive(Clone, Debug)]
pub(super) struct Cut {
    /// The checkpoint's id, counting from 1 in each run.
    pub id: u64,
    /// The source position after the batch.
    pub position: Arc<Vec<u8>>,
}

/// One batch of raw input, as the reader deals it.
pub(super) struct InBatch {
    pub now_ms: i64,
    /// Arrival time of the newest event so far (`i64::MIN` before any).
    pub last_arrival_ms: i64,
    pub raw: RawBatch,
    pub end: Option<End>,
    /// Set on batches that close a checkpoint.
    pub checkpoint: Option<Cut>,
    /// A savepoint to write once this batch's checkpoint is committed.
    pub savepoint: Option<Arc<SavepointRequest>>,
}

/// What the reader needs to know besides its channels.
pub(super) struct ReaderConfig {
    /// Send empty batches when quiet (processing time, idleness).
    pub ticks: bool,
    pub max_payload: usize,
    pub checkpoint_every: Option<Duration>,
    /// Savepoint requests from the control socket.
    pub savepoints: Option<Receiver<SavepointRequest>>,
    /// Peer mode: checkpoint ids come from the wall clock (the number of
    /// `checkpoint_every` periods since 1970), so every peer's barrier of
    /// one period has the same id without a message between them.
    pub clock_ids: bool,
    /// Peer mode: set when this peer leaves; the source stops taking new
    /// input (what is on its way is still read).
    pub drain: Option<Arc<AtomicBool>>,
    /// Live state queries: while one waits, a quiet input still sends a
    /// batch every tick, so the keyed workers see it.
    pub queries: Option<Arc<crate::observe::query::Board>>,
    /// How long a batch waits for more events after its first
    /// ([`LINGER`]; zero when the same thread processes it).
    pub linger: Duration,
}

/// Where the reader's batches go.
pub(super) trait Deal {
    /// Hands on batch number `seq`; `false` when the stages after it
    /// stopped (a sink failed; the merger reports why).
    fn deal(&mut self, seq: u64, batch: InBatch) -> bool;
}

impl<D: Deal + ?Sized> Deal for &mut D {
    fn deal(&mut self, seq: u64, batch: InBatch) -> bool {
        (**self).deal(seq, batch)
    }
}

/// To the parse workers, in rotation.
impl Deal for Vec<SyncSender<InBatch>> {
    fn deal(&mut self, seq: u64, batch: InBatch) -> bool {
        self[(seq % self.len() as u64) as usize].send(batch).is_ok()
    }
}

pub(super) fn read(
    mut source: Box<dyn Source>,
    mut to_parse: impl Deal,
    clock: Arc<dyn Clock>,
    shutdown: Arc<AtomicBool>,
    cfg: ReaderConfig,
    ctx: &RunContext,
) -> Result<(), SourceError> {
    let ReaderConfig {
        ticks,
        max_payload,
        checkpoint_every,
        savepoints,
        clock_ids,
        drain,
        queries,
        linger,
    } = cfg;
    let mut drained = false;
    let period_of = |every: Duration| {
        let ms = every.as_millis().max(1) as u64;
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64 / ms)
            .unwrap_or(0)
    };
    let read = ctx.counter(
        names::SOURCE_EVENTS,
        "events read from the source",
        &[("source", &ctx.operator)],
    );
    let sent = ctx.counter(
        names::STAGE_BATCHES,
        "batches a stage has taken from its queues",
        &[("stage", "read"), ("worker", "0")],
    );
    let mut next_checkpoint = checkpoint_every.map(|d| Instant::now() + d);
    // Whether events came since the last checkpoint (a quiet input gets
    // one more checkpoint, then none until something arrives).
    let mut read_since_checkpoint = false;
    let mut seq = 0u64;
    // Peer mode: the first barrier comes in the next period, after every
    // checkpoint an earlier view took (ids grow across views).
    let mut checkpoint_id = match (clock_ids, checkpoint_every) {
        (true, Some(every)) => period_of(every),
        _ => 0u64,
    };
    let mut last_arrival = i64::MIN;
    let mut result = Ok(());
    // Size each batch like the last full one, so buffers rarely regrow.
    let (mut cap_items, mut cap_bytes) = (16, 1024);
    loop {
        let mut batch = RawBatch {
            data: Vec::with_capacity(cap_bytes),
            items: Vec::with_capacity(cap_items),
            ..Default::default()
        };
        let started = Instant::now();
        let mut end = None;
        if !drained && drain.as_ref().is_some_and(|d| d.load(Ordering::Relaxed)) {
            drained = true;
            source.stop_input();
        }
        loop {
            if shutdown.load(Ordering::Relaxed) {
                end = Some(End::Stop);
                break;
            }
            // Wait for the first event; after that, linger briefly for more.
            let wait = if batch.is_empty() {
                TICK.saturating_sub(started.elapsed())
            } else {
                linger.saturating_sub(started.elapsed())
            };
            let before = batch.len();
            let room = BATCH_EVENTS - batch.len();
            let polled = source.poll(&mut batch, room, max_payload, wait);
            if batch.len() > before {
                let now = clock.now_ms();
                // Sources that stamp arrivals themselves (ingestion time)
                // keep their stamps.
                for it in batch.items[before..]
                    .iter_mut()
                    .filter(|it| it.arrival_ms == 0)
                {
                    it.arrival_ms = now;
                }
                last_arrival = now;
                read.add((batch.len() - before) as u64);
            }
            match polled {
                Ok(Poll::Finished) => {
                    end = Some(End::Flush);
                    break;
                }
                Ok(Poll::Open) => {}
                Err(e) => {
                    result = Err(e);
                    end = Some(End::Stop);
                    break;
                }
            }
            let full = batch.len() >= BATCH_EVENTS;
            let lingered = !batch.is_empty() && started.elapsed() >= linger;
            let ticked = batch.is_empty() && started.elapsed() >= TICK;
            if full || lingered || ticked {
                break;
            }
        }
        // Every checkpoint_interval, at the end, and for a savepoint, the
        // batch closes a checkpoint; when the input is quiet, an empty
        // batch does, if events came since the last one.
        let savepoint = savepoints
            .as_ref()
            .and_then(|rx| rx.try_recv().ok())
            .map(Arc::new);
        let due = match (clock_ids, checkpoint_every) {
            (true, Some(every)) => period_of(every) > checkpoint_id,
            _ => next_checkpoint.is_some_and(|at| Instant::now() >= at),
        };
        read_since_checkpoint |= !batch.is_empty();
        let quiet_checkpoint = due && read_since_checkpoint;
        let asked = queries.as_ref().is_some_and(|q| q.waiting());
        if batch.is_empty()
            && batch.finished.is_empty()
            && end.is_none()
            && !ticks
            && savepoint.is_none()
            && !quiet_checkpoint
            && !asked
        {
            continue;
        }
        cap_items = batch.items.len().clamp(16, BATCH_EVENTS);
        cap_bytes = batch.data.len().clamp(1024, 1 << 20);
        let checkpoint = match checkpoint_every {
            // A peer's checkpoints are the cluster's: only on the clock.
            Some(every) if clock_ids && due => {
                checkpoint_id = period_of(every);
                Some(Cut {
                    id: checkpoint_id,
                    position: Arc::new(source.position().unwrap_or_default()),
                })
            }
            Some(_) if clock_ids => None,
            Some(every) if end.is_some() || savepoint.is_some() || due => {
                next_checkpoint = Some(Instant::now() + every);
                read_since_checkpoint = false;
                checkpoint_id += 1;
                Some(Cut {
                    id: checkpoint_id,
                    position: Arc::new(source.position().unwrap_or_default()),
                })
            }
            _ => None,
        };
        let msg = InBatch {
            now_ms: clock.now_ms(),
            last_arrival_ms: last_arrival,
            raw: batch,
            end,
            checkpoint,
            savepoint,
        };
        if !to_parse.deal(seq, msg) {
            // The merger stopped (a sink failed); it reports why.
            return result;
        }
        seq += 1;
        sent.add(1);
        if end.is_some() {
            return result;
        }
    }
}
