//! The keyed stage: one host per owner of key groups, running a
//! [`KeyedOperator`] over the frames of its [`Inbox`].
//!
//! The host owns the time and checkpoint rules, so operators need not:
//! - watermarks of every input go through a [`WatermarkValve`]; when its
//!   output rises the operator advances (timers fire);
//! - checkpoint barriers are aligned ([`BarrierAligner`]): an input that
//!   delivered barrier `n` is held until every input has; then the operator
//!   snapshots its changed keys, which go to the merger with this frame's
//!   outputs (the merger commits once they are written);
//! - the input ends when every input has ended.
//!
//! For each frame it receives, the host sends the merger one `OutBatch`:
//! the merger takes them in the same rotation as the inbox, which is what
//! keeps the output order independent of the number of workers.

use super::exchange::Inbox;
use super::merge::{OutBatch, WorkerSnapshot};
use crate::context::RunContext;
use crate::metrics::{names, Counter, Gauge};
use crate::msg::{End, Msg, Order};
use crate::operators::keyed::KeyedOperator;
use crate::time::valve::WatermarkValve;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

/// Aligns checkpoint barriers across inputs (Flink's aligned checkpoints).
#[derive(Debug)]
pub struct BarrierAligner {
    /// The barrier being aligned, if one arrived.
    current: Option<u64>,
    /// Inputs that delivered it (and are held until the others do).
    arrived: Vec<bool>,
}

impl BarrierAligner {
    pub fn new(inputs: usize) -> Self {
        BarrierAligner {
            current: None,
            arrived: vec![false; inputs.max(1)],
        }
    }

    /// Inputs to hold back: those that delivered the barrier in alignment.
    pub fn blocked(&self) -> &[bool] {
        &self.arrived
    }

    /// Input `i` delivered barrier `id`. Returns `Some(id)` when every
    /// input has delivered it: snapshot now, and read every input again.
    /// A barrier newer than the one in alignment means an input skipped
    /// one (it cannot, in order): the older alignment is abandoned.
    pub fn arrive(&mut self, i: usize, id: u64) -> Option<u64> {
        match self.current {
            Some(cur) if cur > id => return None,
            Some(cur) if cur < id => {
                tracing::warn!(
                    abandoned = cur,
                    barrier = id,
                    "a newer checkpoint barrier overtook one in alignment"
                );
                self.arrived.iter_mut().for_each(|a| *a = false);
            }
            _ => {}
        }
        self.current = Some(id);
        self.arrived[i] = true;
        if self.arrived.iter().all(|&a| a) {
            self.current = None;
            self.arrived.iter_mut().for_each(|a| *a = false);
            Some(id)
        } else {
            None
        }
    }
}

pub(super) struct KeyedHost {
    pub op: Box<dyn KeyedOperator>,
    pub valve: WatermarkValve,
    pub aligner: BarrierAligner,
    /// Inputs that have ended.
    pub ended: Vec<bool>,
    /// Peer mode: the end of input 0 (this peer's own stream) ends the
    /// run; the other peers' streams are not waited for.
    pub local_end: bool,
    /// Peer mode: event time stays at most this watermark until the
    /// instant passes (peers that went away may still bring input from
    /// before it).
    pub hold: Option<(i64, std::time::Instant)>,
    /// What it counts, per frame.
    counters: HostCounters,
    /// Live state queries, answered between frames.
    pub queries: Option<Arc<crate::observe::query::Board>>,
    /// Put out watermark marks (a tail reads them: [`super::tail`]).
    pub marks: bool,
    worker: usize,
}

/// What a keyed host counts, per frame.
#[derive(Default)]
struct HostCounters {
    records_in: Counter,
    records_out: Counter,
    frames: Counter,
    watermark: Gauge,
    keys: Gauge,
    windows: Gauge,
    /// When the open windows were last counted (that walks every key).
    windows_at: Option<std::time::Instant>,
}

impl KeyedHost {
    pub fn new(op: Box<dyn KeyedOperator>, inputs: usize) -> Self {
        KeyedHost {
            op,
            valve: WatermarkValve::new(inputs),
            aligner: BarrierAligner::new(inputs),
            ended: vec![false; inputs.max(1)],
            local_end: false,
            hold: None,
            counters: HostCounters::default(),
            queries: None,
            marks: false,
            worker: 0,
        }
    }

    /// Registers what this host counts, as worker `worker`.
    pub fn count(&mut self, ctx: &RunContext, worker: usize) {
        let w = worker.to_string();
        let (records_in, records_out) = ctx.records_in_out(&[("stream", "main"), ("worker", &w)]);
        self.worker = worker;
        self.counters = HostCounters {
            records_in,
            records_out,
            frames: ctx.counter(
                names::STAGE_BATCHES,
                "batches a stage has taken from its queues",
                &[("stage", "keyed"), ("worker", &w)],
            ),
            watermark: ctx.gauge_ms(
                names::WATERMARK,
                "a keyed worker's watermark",
                &[("worker", &w)],
            ),
            keys: ctx.gauge(
                names::STATE_KEYS,
                "keys with state in a keyed operator",
                &[("worker", &w)],
            ),
            windows: ctx.gauge(
                names::OPEN_WINDOWS,
                "windows open in a keyed operator",
                &[("worker", &w)],
            ),
            windows_at: None,
        };
    }

    /// After each frame: the figures of the frame, and the answers to
    /// queries waiting.
    fn counted(&mut self, out: &OutBatch) {
        let c = &mut self.counters;
        c.frames.add(1);
        let results = out
            .outputs
            .iter()
            .filter(|o| o.stream == crate::msg::Stream::Main)
            .count();
        if results > 0 {
            c.records_out.add(results as u64);
        }
        let wm = self.op.watermark();
        c.watermark.set(wm.max(i64::MIN / 2));
        c.keys.set(self.op.keys() as i64);
        let now = std::time::Instant::now();
        if c.windows_at
            .is_none_or(|t| now.duration_since(t).as_secs() >= 1)
        {
            c.windows_at = Some(now);
            c.windows.set(self.op.open_windows() as i64);
        }
        if let Some(board) = self.queries.as_ref().filter(|b| b.waiting()) {
            let op = &self.op;
            board.answer(self.worker, wm, |key| op.query(key));
        }
    }

    /// Runs until every input ended or the merger went away.
    pub fn run(mut self, mut inbox: impl Inbox, to_merge: SyncSender<OutBatch>) {
        loop {
            let Some((input, frame)) = inbox.recv(self.aligner.blocked()) else {
                return;
            };
            let out = self.frame(input, frame);
            let end = out.end;
            if to_merge.send(out).is_err() || end.is_some() {
                return;
            }
        }
    }

    /// Peer mode: the outputs of other peers' frames are handed to the
    /// merger with the next frame of this peer's own stream (input 0), so
    /// the merger still gets one batch per batch of its own reader.
    pub fn run_peer(mut self, mut inbox: impl Inbox, to_merge: SyncSender<OutBatch>) {
        let mut carry = OutBatch::default();
        loop {
            let Some((input, frame)) = inbox.recv(self.aligner.blocked()) else {
                return;
            };
            let mut out = self.frame(input, frame);
            carry.outputs.append(&mut out.outputs);
            carry.open_windows += out.open_windows;
            if out.snapshot.is_some() {
                carry.snapshot = out.snapshot;
            }
            carry.end = carry.end.or(out.end);
            carry.watermark = out.watermark;
            if input != 0 {
                continue;
            }
            let out = std::mem::take(&mut carry);
            let end = out.end;
            if to_merge.send(out).is_err() || end.is_some() {
                return;
            }
        }
    }

    /// The watermark to advance to when the valve moved to `w`: `w`,
    /// capped while a hold lasts.
    fn held(&mut self, w: i64) -> i64 {
        match self.hold {
            Some((cap, until)) if std::time::Instant::now() < until => w.min(cap),
            Some(_) => {
                self.hold = None;
                w
            }
            None => w,
        }
    }

    /// With marks on: the operator's watermark after the outputs of `order`.
    fn mark(&self, order: Order, out: &mut Vec<crate::msg::Output>) {
        if self.marks {
            out.push(crate::msg::Output::mark(order, self.op.watermark()));
        }
    }

    /// Handles one frame of input `input`.
    pub fn frame(&mut self, input: usize, frame: Vec<Msg>) -> OutBatch {
        let mut out = OutBatch::default();
        let mut after_data = false;
        if let Some((_, until)) = self.hold {
            if std::time::Instant::now() >= until {
                // The wait for departed peers is over: catch up.
                self.hold = None;
                let w = self.valve.current();
                if w > i64::MIN {
                    self.op.advance(w, Order::START, &mut out.outputs);
                    self.mark(Order::START, &mut out.outputs);
                }
            }
        }
        for msg in frame {
            match msg {
                Msg::Data(batch) => {
                    self.counters.records_in.add(batch.recs.len() as u64);
                    let cap = self.held(i64::MAX);
                    self.op.feed(
                        &mut self.valve,
                        input,
                        &batch,
                        cap,
                        self.marks,
                        &mut out.outputs,
                    );
                    after_data = true;
                }
                Msg::Watermark(w) => {
                    if let Some(w) = self.valve.watermark(input, w).map(|w| self.held(w)) {
                        // The final watermark's results come last of all.
                        let order = match (w, after_data) {
                            (i64::MAX, _) => Order::FLUSH,
                            (_, true) => Order::END,
                            (_, false) => Order::START,
                        };
                        self.op.advance(w, order, &mut out.outputs);
                        self.mark(order, &mut out.outputs);
                    }
                }
                Msg::Idle { quiet_ms } => {
                    if let Some(w) = self.valve.idle(input, quiet_ms).map(|w| self.held(w)) {
                        self.op.advance(w, Order::END, &mut out.outputs);
                        self.mark(Order::END, &mut out.outputs);
                    }
                }
                Msg::Barrier(id) => {
                    if self.aligner.arrive(input, id).is_some() {
                        let mut changes = Vec::new();
                        self.op.snapshot(&mut changes);
                        out.snapshot = Some(WorkerSnapshot {
                            id,
                            changes,
                            watermark: self.op.watermark(),
                            input_watermark: self.valve.current(),
                        });
                    }
                }
                Msg::End(end) => {
                    self.ended[input] = true;
                    if self.ended.iter().all(|&e| e) || (self.local_end && input == 0) {
                        match end {
                            End::Flush => {
                                self.op.advance(i64::MAX, Order::FLUSH, &mut out.outputs);
                                self.mark(Order::FLUSH, &mut out.outputs);
                            }
                            End::Stop => out.open_windows = self.op.open_windows(),
                        }
                        out.end = Some(end);
                    }
                }
            }
        }
        // Processing-time timers (process functions) that are due.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.op.tick(now, &mut out.outputs);
        out.watermark = Some(self.op.watermark());
        self.counted(&out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_barrier_completes_when_every_input_delivered_it() {
        let mut a = BarrierAligner::new(3);
        assert_eq!(a.arrive(1, 7), None);
        assert_eq!(a.blocked(), &[false, true, false]);
        assert_eq!(a.arrive(0, 7), None);
        assert_eq!(a.arrive(2, 7), Some(7));
        assert_eq!(
            a.blocked(),
            &[false, false, false],
            "every input reads again"
        );
        assert_eq!(BarrierAligner::new(1).arrive(0, 1), Some(1));
    }

    use crate::msg::{KeyedBatch, KeyedRec, Stream};
    use crate::operators::window::{WindowDef, WindowStep, WindowStepOptions};
    use crate::value::{encode_key, hash_key, Value};

    /// Records `(key, ts)` with `count()` as the one aggregate.
    fn data(recs: &[(&str, i64)]) -> Msg {
        let mut b = KeyedBatch::default();
        for (i, (k, ts)) in recs.iter().enumerate() {
            let k0 = b.keys.len() as u32;
            encode_key(&Value::Str((*k).into()), &mut b.keys);
            let hash = hash_key(&b.keys[k0 as usize..]);
            b.recs.push(KeyedRec {
                idx: i as u32,
                ts: *ts,
                hash,
                position: i as u64,
                key: (k0, b.keys.len() as u32),
                vals: b.vals.len() as u32,
            });
            b.vals.push(Value::Bool(true));
        }
        Msg::Data(b)
    }

    fn host(inputs: usize) -> KeyedHost {
        let def = WindowDef::tumbling(std::time::Duration::from_secs(1)).aggregate("n", "count()");
        let mut op = WindowStep::new(
            def,
            WindowStepOptions {
                key_names: vec!["k".into()],
                ..Default::default()
            },
        );
        op.track_changes();
        KeyedHost::new(Box::new(op), inputs)
    }

    fn results(out: &OutBatch) -> usize {
        out.outputs
            .iter()
            .filter(|o| o.stream == Stream::Main)
            .count()
    }

    #[test]
    fn with_two_inputs_windows_fire_on_the_slower_watermark() {
        let mut h = host(2);
        let out = h.frame(0, vec![data(&[("a", 1000)]), Msg::Watermark(5000)]);
        assert_eq!(results(&out), 0, "input 1 has not reported: nothing fires");
        let out = h.frame(1, vec![Msg::Watermark(1500)]);
        assert_eq!(
            results(&out),
            0,
            "min(5000, 1500) is before the window's end"
        );
        let out = h.frame(1, vec![data(&[("b", 1200)]), Msg::Watermark(2500)]);
        assert_eq!(
            results(&out),
            2,
            "min(5000, 2500) fires [1000, 2000) of a and b"
        );
        assert_eq!(h.valve.current(), 2500);
    }

    #[test]
    fn an_idle_input_stops_holding_the_watermark_back() {
        let mut h = host(2);
        h.frame(0, vec![data(&[("a", 1000)]), Msg::Watermark(3000)]);
        assert_eq!(h.valve.current(), i64::MIN);
        let out = h.frame(1, vec![Msg::Idle { quiet_ms: 0 }]);
        assert_eq!(results(&out), 1, "input 0 alone decides now");
        assert_eq!(h.valve.current(), 3000);
    }

    #[test]
    fn a_barrier_is_aligned_over_both_inputs_before_the_snapshot() {
        let mut h = host(2);
        let out = h.frame(0, vec![data(&[("a", 1000)]), Msg::Barrier(1)]);
        assert!(
            out.snapshot.is_none(),
            "input 1 has not delivered barrier 1"
        );
        assert_eq!(h.aligner.blocked(), &[true, false], "input 0 is held back");
        let out = h.frame(1, vec![data(&[("b", 1100)]), Msg::Barrier(1)]);
        let snap = out.snapshot.expect("aligned: snapshot");
        assert_eq!(snap.changes.len(), 2, "both keys' windows are in it");
        assert_eq!(h.aligner.blocked(), &[false, false]);
        // The next checkpoint holds only what changed since.
        h.frame(0, vec![data(&[("a", 1001)]), Msg::Barrier(2)]);
        let snap = h.frame(1, vec![Msg::Barrier(2)]).snapshot.expect("aligned");
        assert_eq!(snap.changes.len(), 1);
    }

    #[test]
    fn a_hold_keeps_windows_from_firing_past_it_until_it_lapses() {
        let mut h = host(1);
        let until = std::time::Instant::now() + std::time::Duration::from_millis(200);
        h.hold = Some((1500, until));
        // Watermarks inside the batch and after it: capped at 1500.
        let mut b = data(&[("a", 1000), ("b", 2500)]);
        if let Msg::Data(batch) = &mut b {
            batch.watermarks = std::sync::Arc::new(vec![(1, 4000)]);
        }
        let out = h.frame(0, vec![b, Msg::Watermark(5000)]);
        assert_eq!(results(&out), 0, "[1000, 2000) waits for the hold");
        std::thread::sleep(std::time::Duration::from_millis(250));
        let out = h.frame(0, vec![]);
        assert_eq!(results(&out), 2, "the hold lapsed: both windows fire");
    }

    #[test]
    fn the_end_comes_when_every_input_has_ended() {
        let mut h = host(2);
        h.frame(0, vec![data(&[("a", 1000)])]);
        let out = h.frame(0, vec![Msg::Watermark(i64::MAX), Msg::End(End::Flush)]);
        assert!(out.end.is_none());
        assert_eq!(results(&out), 0, "input 1 still holds the watermark");
        let out = h.frame(1, vec![Msg::Watermark(i64::MAX), Msg::End(End::Flush)]);
        assert_eq!(out.end, Some(End::Flush));
        assert_eq!(results(&out), 1);
    }

    #[test]
    fn an_overtaking_barrier_restarts_the_alignment() {
        let mut a = BarrierAligner::new(2);
        assert_eq!(a.arrive(0, 1), None);
        assert_eq!(a.arrive(1, 2), None);
        assert_eq!(a.blocked(), &[false, true]);
        assert_eq!(a.arrive(0, 1), None, "a stale barrier is ignored");
        assert_eq!(a.arrive(0, 2), Some(2));
    }
}
