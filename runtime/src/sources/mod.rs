//! Sources: where raw events come from.
//!
//! A [`Source`] hands the runtime batches of raw payloads ([`RawBatch`]);
//! decoding happens later, in parallel, on the workers. A source never
//! blocks longer than the runtime asks, so the runtime can notice shutdown,
//! idleness and the passing of processing time.
//!
//! - [`file::FileSource`]: JSON Lines from a file or stdin (bounded).
//! - [`generator::Generator`]: synthetic sensor readings.
//! - [`memory::MemorySource`]: lines held in memory (tests, benchmarks, Rust users).
//! - [`union::UnionSource`]: several sources read as one (a job graph's `from: [a, b]`).

pub mod file;
pub mod generator;
pub mod journal;
pub mod memory;
pub mod mqtt;
pub mod union;

use std::time::Duration;

/// One raw event inside a [`RawBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawItem {
    /// Byte range of the payload in [`RawBatch::data`].
    pub start: u32,
    pub end: u32,
    /// Processing time at which the event was read (ms since the epoch);
    /// set by the runtime.
    pub arrival_ms: i64,
    /// Where the event was in its source: the line number for files, the
    /// sequence number otherwise. Shown in dead letters. Positions increase
    /// in arrival order and go on across restarts: they break ties of equal
    /// timestamps for `first`/`last`.
    pub position: u64,
    /// Set when the payload was larger than `max_payload`: its full size.
    /// Only a prefix is kept in `data`, for the dead-letter record.
    pub oversize: Option<u64>,
    /// Byte range of the MQTT topic in [`RawBatch::topics`] (empty when none).
    pub topic: (u32, u32),
    /// The MQTT message came with the retain flag.
    pub retain: bool,
    /// Which source of a union it came from (0 otherwise).
    pub source: u16,
}

/// Raw payloads, stored back to back in one buffer.
#[derive(Debug, Default)]
pub struct RawBatch {
    pub data: Vec<u8>,
    pub items: Vec<RawItem>,
    /// Topics of the items that have one, back to back.
    pub topics: Vec<u8>,
    /// Sources of a union that ended during this poll (their event time
    /// moves to +infinity; the union ends when all have).
    pub finished: Vec<u16>,
}

impl RawBatch {
    pub fn payload(&self, item: &RawItem) -> &[u8] {
        &self.data[item.start as usize..item.end as usize]
    }

    /// Appends one payload.
    pub fn push(&mut self, payload: &[u8], position: u64) {
        let start = self.data.len() as u32;
        self.data.extend_from_slice(payload);
        self.items.push(RawItem {
            start,
            end: self.data.len() as u32,
            arrival_ms: 0,
            position,
            oversize: None,
            topic: (0, 0),
            retain: false,
            source: 0,
        });
    }

    /// Appends one payload with its topic; a payload over `max_payload`
    /// keeps only a prefix and is marked oversized.
    pub fn push_message(&mut self, topic: &str, payload: &[u8], position: u64, max_payload: usize) {
        self.push_sized(topic, payload, payload.len(), position, max_payload);
    }

    /// Like [`RawBatch::push_message`], for a payload of `size` bytes of
    /// which `payload` may be only the first (a message larger than its
    /// source takes).
    pub fn push_sized(
        &mut self,
        topic: &str,
        payload: &[u8],
        size: usize,
        position: u64,
        max_payload: usize,
    ) {
        let t0 = self.topics.len() as u32;
        self.topics.extend_from_slice(topic.as_bytes());
        let start = self.data.len() as u32;
        let size = size.max(payload.len());
        let oversize = (size > max_payload).then_some(size as u64);
        let kept = if oversize.is_some() {
            &payload[..OVERSIZE_PREFIX.min(payload.len())]
        } else {
            payload
        };
        self.data.extend_from_slice(kept);
        self.items.push(RawItem {
            start,
            end: self.data.len() as u32,
            arrival_ms: 0,
            position,
            oversize,
            topic: (t0, self.topics.len() as u32),
            retain: false,
            source: 0,
        });
    }

    /// The item's topic, if it came with one.
    pub fn topic(&self, item: &RawItem) -> Option<&str> {
        if item.topic.0 == item.topic.1 {
            return None;
        }
        std::str::from_utf8(&self.topics[item.topic.0 as usize..item.topic.1 as usize]).ok()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.items.clear();
        self.topics.clear();
        self.finished.clear();
    }
}

/// What a poll found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// The source may produce more.
    Open,
    /// The source has ended (a bounded input); the runtime flushes all windows.
    Finished,
}

/// Errors a source reports. They stop the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{source_name}: {error}")]
    Io {
        source_name: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// A stream of raw events.
pub trait Source: Send {
    /// A short description for logs and dead letters, like `file events.jsonl`.
    fn describe(&self) -> String;

    /// A live source whose polls hand over what arrived together: a
    /// stateless pipeline reading it runs on one thread (read, parse,
    /// write), without a hand-over or a wait for more per stage.
    fn runs_inline(&self) -> bool {
        false
    }

    /// Called before the first poll when the pipeline runs on one thread:
    /// a source with a thread of its own may drive its input from `poll`
    /// instead (each poll then waits on the input itself).
    fn poll_on_caller(&mut self) {}

    /// Called once before the first poll (after [`Source::seek`]), with the
    /// run's context (its metrics, and this source's operator id).
    fn start(&mut self, _ctx: &crate::context::RunContext) {}

    /// Appends up to `max_items` payloads to `batch`, waiting at most `wait`
    /// for the first one. Payloads over `max_payload` bytes are recorded
    /// with [`RawItem::oversize`] set.
    fn poll(
        &mut self,
        batch: &mut RawBatch,
        max_items: usize,
        max_payload: usize,
        wait: Duration,
    ) -> Result<Poll, SourceError>;

    /// The fields every event of this source has, when the source knows
    /// them (the generator does), so validation can catch misspellings.
    fn known_fields(&self) -> Option<Vec<String>> {
        None
    }

    /// How topics bind fields, for sources whose events have topics.
    fn topic_binder(&self) -> Option<TopicBinder> {
        None
    }

    /// Where the source is: after the last event it handed out. Saved with
    /// each checkpoint; `None` when the source cannot resume (stdin, MQTT
    /// without a journal).
    fn position(&self) -> Option<Vec<u8>> {
        None
    }

    /// Something to call with the position of each committed checkpoint
    /// (the MQTT source trims its journal). Taken once, before the run.
    fn checkpoint_hook(&mut self) -> Option<CheckpointHook> {
        None
    }

    /// Asks for no more new input (peer mode, leaving the cluster): the
    /// MQTT source unsubscribes, so the broker deals its messages to the
    /// other peers; what is already on its way still arrives.
    fn stop_input(&mut self) {}

    /// Resumes after a position from [`Source::position`], before the first poll.
    fn seek(&mut self, _position: &[u8]) -> Result<(), SourceError> {
        Err(SourceError::Other(format!(
            "{} cannot resume from a position",
            self.describe()
        )))
    }
}

/// Called with the source position of each committed checkpoint.
pub type CheckpointHook = Box<dyn Fn(&[u8]) + Send>;

/// A position that is a count (of lines or events).
pub(crate) fn count_position(n: u64) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

pub(crate) fn read_count_position(p: &[u8]) -> Result<u64, SourceError> {
    p.try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| SourceError::Other("a saved source position is not a count".into()))
}

/// Binds topic levels (and the whole topic) to fields.
#[derive(Clone, Debug, Default)]
pub struct TopicBinder {
    pub patterns: Vec<crate::mqtt::topic::TopicPattern>,
    /// Field that receives the whole topic, if any.
    pub topic_field: Option<String>,
}

impl TopicBinder {
    /// Every field this binder may set.
    pub fn fields(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in &self.patterns {
            for f in p.fields() {
                if !out.contains(&f) {
                    out.push(f);
                }
            }
        }
        if let Some(t) = &self.topic_field {
            if !out.contains(t) {
                out.push(t.clone());
            }
        }
        out
    }
}

/// How many bytes of an oversized payload are kept for its dead-letter record.
pub const OVERSIZE_PREFIX: usize = 1024;
