//! The checkpoint writer: a thread of its own, so the pipeline goes on
//! while a checkpoint is committed.
//!
//! The merger hands over, at each checkpoint boundary, the keys changed
//! since the last boundary with the source position and watermark there.
//! One checkpoint is written at a time. A boundary reached while the
//! writer is busy is queued; a later boundary absorbs a queued one (its
//! changes are older, so newer ones win), which still describes a
//! consistent cut: the later position with every change up to it. A
//! failed checkpoint's changes go under the next one's, so nothing is lost.

use super::RunError;
use crate::context::RunContext;
use crate::metrics::names;
use crate::sources::CheckpointHook;
use crate::state::control::SavepointRequest;
use crate::state::{Pending, StateStore};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One checkpoint to write.
struct Job {
    position: Arc<Vec<u8>>,
    watermark: i64,
    input_watermark: i64,
    pending: Pending,
    savepoints: Vec<Arc<SavepointRequest>>,
}

impl Job {
    /// Takes in an older job's changes and savepoint requests.
    fn absorb(&mut self, older: Pending, savepoints: Vec<Arc<SavepointRequest>>) {
        for (k, v) in older.keys {
            self.pending.keys.entry(k).or_insert(v);
        }
        let mut all = savepoints;
        all.append(&mut self.savepoints);
        self.savepoints = all;
    }
}

/// What the writer reports after a job: the changes of a failed one.
struct Done {
    failed: Option<Pending>,
}

pub(super) struct Checkpointer {
    tx: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    busy: bool,
    queued: Option<Job>,
    /// Changes of a failed checkpoint, for the next one.
    carry: Pending,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub(super) fn start(
        mut store: StateStore,
        hook: Option<CheckpointHook>,
        ctx: &RunContext,
    ) -> Result<Checkpointer, RunError> {
        let completed = ctx.counter(names::CHECKPOINTS, "checkpoints", &[("result", "ok")]);
        let failed = ctx.counter(names::CHECKPOINTS, "checkpoints", &[("result", "failed")]);
        let last_at = ctx.gauge_ms(
            names::LAST_CHECKPOINT,
            "when the last checkpoint completed",
            &[],
        );
        let last_id = ctx.gauge(
            names::CHECKPOINT_LAST_ID,
            "id (epoch) of the last completed checkpoint",
            &[],
        );
        let took = ctx.metrics.histogram(
            names::CHECKPOINT_DURATION,
            "how long checkpoints take to commit",
            &[("pipeline", &ctx.pipeline)],
            &crate::metrics::CHECKPOINT_BUCKETS,
        );
        let bytes = ctx.gauge(
            names::CHECKPOINT_BYTES,
            "bytes of keyed state the last checkpoint wrote (changed keys only)",
            &[],
        );
        let last_took = ctx.gauge_ms(
            names::CHECKPOINT_LAST_DURATION,
            "how long the last checkpoint took",
            &[],
        );
        let metrics = ctx.metrics.clone();
        let (tx, rx) = sync_channel::<Job>(1);
        let (done_tx, done) = sync_channel::<Done>(1);
        let thread = super::spawn("rivulet-checkpoint".into(), move || {
            for job in rx {
                let Job {
                    position,
                    watermark,
                    input_watermark,
                    mut pending,
                    savepoints,
                } = job;
                let started = std::time::Instant::now();
                let keys = pending.keys.len();
                let size: usize = pending
                    .keys
                    .iter()
                    .map(|(k, v)| k.1.len() + v.as_ref().map_or(0, |v| v.len()))
                    .sum();
                let committed = store.commit(&position, watermark, input_watermark, &mut pending);
                let elapsed = started.elapsed();
                took.observe(elapsed);
                last_took.set(elapsed.as_millis() as i64);
                match &committed {
                    Err(e) => {
                        failed.add(1);
                        metrics.note("checkpoint", &format!("failed: {e}"));
                    }
                    Ok(()) => {
                        completed.add(1);
                        bytes.set(size as i64);
                        metrics.note(
                            "checkpoint",
                            &format!(
                                "#{} ok: {keys} keys, {size} bytes, {:.1} ms",
                                store.epoch(),
                                elapsed.as_secs_f64() * 1000.0
                            ),
                        );
                        last_id.set(store.epoch() as i64);
                        last_at.set(
                            std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map(|d| d.as_millis() as i64)
                                .unwrap_or(0),
                        );
                    }
                }
                match &committed {
                    Err(e) => {
                        tracing::error!(error = %e, "checkpoint failed; processing goes on and the next checkpoint retries");
                    }
                    Ok(()) => {
                        tracing::debug!(keys, took = ?started.elapsed(), "checkpoint written");
                        if let Some(hook) = &hook {
                            hook(&position);
                        }
                    }
                }
                for req in savepoints {
                    let result = committed
                        .as_ref()
                        .map_err(|e| e.to_string())
                        .and_then(|_| store.save_copy(&req.path).map_err(|e| e.to_string()))
                        .map(|_| req.path.clone());
                    if let Ok(p) = &result {
                        tracing::info!(savepoint = %p.display(), "savepoint written");
                    }
                    let _ = req.reply.send(result);
                }
                let failed = committed.is_err().then_some(pending);
                if done_tx.send(Done { failed }).is_err() {
                    return;
                }
            }
        })?;
        Ok(Checkpointer {
            tx: Some(tx),
            done,
            busy: false,
            queued: None,
            carry: Pending::default(),
            thread: Some(thread),
        })
    }

    /// A checkpoint boundary: `pending` (taken) holds the changes since the
    /// previous boundary, `position` the source position here.
    pub(super) fn checkpoint(
        &mut self,
        position: Arc<Vec<u8>>,
        time: (i64, i64),
        pending: &mut Pending,
        savepoint: Option<Arc<SavepointRequest>>,
    ) {
        self.poll();
        let mut job = Job {
            position,
            watermark: time.0,
            input_watermark: time.1,
            pending: std::mem::take(pending),
            savepoints: savepoint.into_iter().collect(),
        };
        if let Some(older) = self.queued.take() {
            job.absorb(older.pending, older.savepoints);
        }
        job.absorb(std::mem::take(&mut self.carry), Vec::new());
        if self.busy {
            self.queued = Some(job);
        } else {
            self.send(job);
        }
    }

    /// Notes finished checkpoints without waiting; starts a queued one.
    pub(super) fn poll(&mut self) {
        while let Ok(d) = self.done.try_recv() {
            self.finished(d);
        }
    }

    fn finished(&mut self, d: Done) {
        self.busy = false;
        if let Some(failed) = d.failed {
            match &mut self.queued {
                Some(q) => q.absorb(failed, Vec::new()),
                None => {
                    for (k, v) in failed.keys {
                        self.carry.keys.entry(k).or_insert(v);
                    }
                }
            }
        }
        if let Some(q) = self.queued.take() {
            self.send(q);
        }
    }

    fn send(&mut self, job: Job) {
        if let Some(tx) = &self.tx {
            if tx.send(job).is_ok() {
                self.busy = true;
            }
        }
    }

    /// Waits until every checkpoint handed over is written (at the end).
    pub(super) fn finish(&mut self) {
        while self.busy {
            match self.done.recv() {
                Ok(d) => self.finished(d),
                Err(_) => break,
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::operators::window::KeySnapshot;

    fn decl() -> crate::operators::keyed::StateDecl {
        crate::operators::keyed::StateDecl {
            name: "window",
            version: 1,
            fingerprint: "fp".into(),
            layout: "{}".into(),
        }
    }

    fn snap(start: i64) -> Vec<u8> {
        postcard::to_stdvec(&KeySnapshot {
            windows: vec![(start, start + 10)],
            accs: Vec::new(),
        })
        .unwrap()
    }

    #[test]
    fn boundaries_reached_while_writing_are_queued_and_merged_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path(), &[decl()], false).unwrap();
        let mut cp = Checkpointer::start(
            store,
            None,
            &RunContext::new("t", Default::default(), Default::default()),
        )
        .unwrap();
        let mut pending = Pending::default();
        // Several boundaries in quick succession: the writer is busy with
        // the first while the others arrive.
        pending.upsert(0, b"a".to_vec().into(), snap(0));
        pending.upsert(0, b"b".to_vec().into(), snap(0));
        cp.checkpoint(Arc::new(vec![1]), (5, 9), &mut pending, None);
        assert!(pending.keys.is_empty(), "the changes were handed over");
        pending.delete(0, b"a".to_vec().into());
        pending.upsert(0, b"b".to_vec().into(), snap(10));
        cp.checkpoint(Arc::new(vec![2]), (15, 19), &mut pending, None);
        pending.upsert(0, b"c".to_vec().into(), snap(20));
        cp.checkpoint(Arc::new(vec![3]), (25, 29), &mut pending, None);
        cp.finish();
        drop(cp);
        let (_, restored) = StateStore::open(dir.path(), &[decl()], false).unwrap();
        let r = restored.unwrap();
        assert_eq!(r.position, vec![3]);
        assert_eq!(r.watermark, 25);
        let mut keys: Vec<(Vec<u8>, i64)> = r.keys[0]
            .clone()
            .into_iter()
            .map(|(k, s)| {
                let s: KeySnapshot = postcard::from_bytes(&s).unwrap();
                (k, s.windows[0].0)
            })
            .collect();
        keys.sort();
        assert_eq!(keys, vec![(b"b".to_vec(), 10), (b"c".to_vec(), 20)]);
    }

    #[test]
    fn a_newer_change_wins_over_an_absorbed_older_one() {
        let mut job = Job {
            position: Arc::new(vec![2]),
            watermark: 0,
            input_watermark: 0,
            pending: Pending::default(),
            savepoints: Vec::new(),
        };
        job.pending.delete(0, b"k".to_vec().into());
        let mut older = Pending::default();
        older.upsert(0, b"k".to_vec().into(), snap(0));
        older.upsert(0, b"j".to_vec().into(), snap(0));
        job.absorb(older, Vec::new());
        assert!(
            job.pending.keys[&(0, b"k".to_vec().into())].is_none(),
            "the delete stays"
        );
        assert!(job.pending.keys[&(0, b"j".to_vec().into())].is_some());
    }
}
