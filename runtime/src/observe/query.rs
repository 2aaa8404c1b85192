//! Live state queries (`GET /api/state`): the open windows and current
//! aggregate values of one key, read from the keyed workers while they run.
//!
//! Nothing on the hot path waits for a query. A query is put on the
//! [`Board`]; each keyed worker looks at the board once per frame (one
//! relaxed load while nothing is asked), answers from its own state, and the
//! asker wakes when every worker has answered. While a query waits, the
//! reader sends a frame every tick even when the input is quiet, so an idle
//! pipeline answers too.
//!
//! A job graph's further streams keep their keyed state on the merger's
//! thread (`exec/tail.rs`). Each gets a board of its own, registered on the
//! run's board under the stream's name ([`Board::add_stream`]); the merger
//! answers it after each batch. A query waiting on a stream's board also
//! counts as waiting on the run's board, so the reader keeps frames (and so
//! batches to the merger) flowing while it waits.

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
    /// The run's board, for a further stream's (its queries count as
    /// waiting there too).
    parent: Option<Arc<Board>>,
    /// On the run's board: the first stream's name in a job graph, and the
    /// boards of the further streams that keep keyed state.
    streams: Mutex<Streams>,
}

#[derive(Default)]
struct Streams {
    first: Option<String>,
    others: Vec<(String, Arc<Board>)>,
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

    /// Called by the run when its workers are gone; closes the further
    /// streams' boards too.
    pub fn close(&self) {
        *self.shape.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let streams = std::mem::take(&mut *self.streams.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, b) in streams.others {
            b.close();
        }
        self.answered.notify_all();
    }

    /// Called by a job graph's run: the first stream's name, whose keyed
    /// state is this board's.
    pub fn name_first(&self, name: &str) {
        self.streams.lock().unwrap_or_else(|e| e.into_inner()).first = Some(name.to_string());
    }

    /// Called by a job graph's run: a board for further stream `name`, open
    /// with `shape` (one answerer: the merger).
    pub fn add_stream(self: &Arc<Self>, name: &str, shape: Queryable) -> Arc<Board> {
        let board = Arc::new(Board {
            parent: Some(self.clone()),
            ..Default::default()
        });
        board.open(shape);
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .others
            .push((name.to_string(), board.clone()));
        board
    }

    /// The board that answers for stream `name`: this one for the first
    /// stream, a further stream's own, or `None` for a stream that is not
    /// in the run or keeps no keyed state.
    pub fn stream(self: &Arc<Self>, name: &str) -> Option<Arc<Board>> {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if streams.first.as_deref() == Some(name) {
            return Some(self.clone());
        }
        streams
            .others
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.clone())
    }

    /// The names that [`Board::stream`] knows.
    pub fn stream_names(&self) -> Vec<String> {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .first
            .iter()
            .cloned()
            .chain(streams.others.iter().map(|(n, _)| n.clone()))
            .collect()
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
        if let Some(p) = &self.parent {
            p.waiting.fetch_add(1, Ordering::SeqCst);
        }
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
        if let Some(p) = &self.parent {
            p.waiting.fetch_sub(1, Ordering::SeqCst);
        }
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
    fn a_further_streams_query_waits_on_the_runs_board_and_is_answered_by_its_own() {
        let run = Arc::new(Board::default());
        run.open(Queryable {
            workers: 2,
            ..Default::default()
        });
        run.name_first("per_sensor");
        let per_site = run.add_stream(
            "per_site",
            Queryable {
                workers: 1,
                key_names: vec!["site".into()],
                ..Default::default()
            },
        );
        assert!(Arc::ptr_eq(&run.stream("per_sensor").expect("first"), &run));
        assert!(Arc::ptr_eq(
            &run.stream("per_site").expect("further"),
            &per_site
        ));
        assert!(run.stream("nope").is_none());
        assert_eq!(run.stream_names(), vec!["per_sensor", "per_site"]);
        let (r, b) = (run.clone(), per_site.clone());
        let merger = std::thread::spawn(move || {
            while !r.waiting() {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(b.waiting());
            // The run's keyed workers find nothing of theirs to answer.
            r.answer(0, 1, |_| panic!("not the workers' query"));
            b.answer(0, 7, |k| {
                vec![vec![Value::Str(String::from_utf8_lossy(k).as_ref().into())].into()]
            });
        });
        let (rows, wm) = per_site
            .ask(vec![b"lab".to_vec()], Duration::from_secs(30))
            .expect("answered");
        merger.join().expect("merger");
        assert_eq!((rows.len(), wm), (1, 7));
        assert!(!run.waiting() && !per_site.waiting());
        run.close();
        assert!(
            per_site.shape().is_none(),
            "closing the run closes its streams"
        );
        assert!(run.stream("per_site").is_none());
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
