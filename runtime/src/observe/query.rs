//! Live state queries (`GET /api/state`): the open windows and current
//! aggregate values of one key, read from the keyed workers while they run.
//!
//! Nothing on the hot path waits for a query. A query is put on the
//! [`Board`]; each keyed worker looks at the board once per frame (one
//! relaxed load while nothing is asked), answers from its own state, and the
//! asker wakes when every worker has answered. While a query waits, the
//! reader sends a frame every tick even when the input is quiet, so an idle
//! pipeline answers too.

use crate::msg::Schema;
use crate::value::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// One row per open window: the row of the window's output schema.
pub type Rows = Vec<Box<[Value]>>;

struct Query {
    /// Encoded keys to look up (several when a value's type is ambiguous).
    keys: Vec<Vec<u8>>,
    answered: Vec<bool>,
    rows: Rows,
    /// The watermarks of the workers that answered (the lowest is shown).
    watermark: i64,
}

/// What the keyed stage of a run offers to queries.
#[derive(Clone, Debug, Default)]
pub struct Queryable {
    /// Keyed workers that answer.
    pub workers: usize,
    /// The key fields, in key order.
    pub key_names: Vec<String>,
    /// The fields of the rows.
    pub schema: Schema,
}

/// The queries waiting for the keyed workers of a run.
#[derive(Default)]
pub struct Board {
    waiting: AtomicUsize,
    queries: Mutex<Vec<Arc<Mutex<Query>>>>,
    answered: Condvar,
    shape: Mutex<Option<Queryable>>,
}

/// Why a query got no answer.
#[derive(Debug, PartialEq, Eq)]
pub enum QueryError {
    /// The pipeline keeps no keyed state (no window), or is not running.
    NoState,
    /// The workers did not answer in time (the pipeline is stuck or busy).
    Timeout,
}

impl Board {
    /// Called by the run once its keyed workers exist.
    pub fn open(&self, shape: Queryable) {
        *self.shape.lock().unwrap_or_else(|e| e.into_inner()) = Some(shape);
    }

    /// Called by the run when its workers are gone.
    pub fn close(&self) {
        *self.shape.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.answered.notify_all();
    }

    /// The keyed stage's shape, while the run offers one.
    pub fn shape(&self) -> Option<Queryable> {
        self.shape.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether a query waits (the reader keeps frames flowing then).
    #[inline]
    pub fn waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Asks every keyed worker for the windows of `keys`; the rows and the
    /// lowest watermark of the workers.
    pub fn ask(&self, keys: Vec<Vec<u8>>, timeout: Duration) -> Result<(Rows, i64), QueryError> {
        let workers = self.shape().ok_or(QueryError::NoState)?.workers;
        if workers == 0 {
            return Err(QueryError::NoState);
        }
        let q = Arc::new(Mutex::new(Query {
            keys,
            answered: vec![false; workers],
            rows: Vec::new(),
            watermark: i64::MAX,
        }));
        let mut list = self.queries.lock().unwrap_or_else(|e| e.into_inner());
        list.push(q.clone());
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + timeout;
        let result = loop {
            {
                let q = q.lock().unwrap_or_else(|e| e.into_inner());
                if q.answered.iter().all(|&a| a) {
                    break Ok((q.rows.clone(), q.watermark));
                }
            }
            let now = std::time::Instant::now();
            if now >= deadline || self.shape().is_none() {
                break Err(QueryError::Timeout);
            }
            list = self
                .answered
                .wait_timeout(list, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        };
        list.retain(|x| !Arc::ptr_eq(x, &q));
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// Worker `worker` answers what waits, looking keys up with `lookup`.
    pub fn answer(&self, worker: usize, watermark: i64, lookup: impl Fn(&[u8]) -> Rows) {
        let list = self.queries.lock().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        for q in list.iter() {
            let mut q = q.lock().unwrap_or_else(|e| e.into_inner());
            if q.answered.get(worker) != Some(&false) {
                continue;
            }
            let found: Rows = q.keys.iter().flat_map(|k| lookup(k)).collect();
            q.rows.extend(found);
            q.watermark = q.watermark.min(watermark);
            q.answered[worker] = true;
            any = true;
        }
        drop(list);
        if any {
            self.answered.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_answered_once_every_worker_has_looked() {
        let board = Arc::new(Board::default());
        board.open(Queryable {
            workers: 2,
            ..Default::default()
        });
        let b = board.clone();
        let workers = std::thread::spawn(move || {
            while !b.waiting() {
                std::thread::sleep(Duration::from_millis(1));
            }
            b.answer(0, 50, |_| Vec::new());
            b.answer(0, 50, |_| panic!("worker 0 answered already"));
            b.answer(1, 40, |k| {
                vec![vec![Value::Str(String::from_utf8_lossy(k).as_ref().into())].into()]
            });
        });
        let (rows, wm) = board
            .ask(vec![b"k".to_vec()], Duration::from_secs(30))
            .expect("answered");
        workers.join().expect("workers");
        assert_eq!(rows.len(), 1);
        assert_eq!(wm, 40, "the lowest watermark");
        assert!(!board.waiting());
    }

    #[test]
    fn no_keyed_stage_and_no_answer_are_errors() {
        let board = Board::default();
        assert_eq!(board.ask(vec![], Duration::ZERO), Err(QueryError::NoState));
        board.open(Queryable {
            workers: 1,
            ..Default::default()
        });
        assert_eq!(
            board.ask(vec![], Duration::from_millis(10)),
            Err(QueryError::Timeout)
        );
        assert!(!board.waiting(), "a timed-out query is taken off the board");
    }
}
