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

pub mod file;
pub mod generator;
pub mod memory;

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
    /// sequence number otherwise. Shown in dead letters.
    pub position: u64,
    /// Set when the payload was larger than `max_payload`: its full size.
    /// Only a prefix is kept in `data`, for the dead-letter record.
    pub oversize: Option<u64>,
}

/// Raw payloads, stored back to back in one buffer.
#[derive(Debug, Default)]
pub struct RawBatch {
    pub data: Vec<u8>,
    pub items: Vec<RawItem>,
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
        });
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
}

/// How many bytes of an oversized payload are kept for its dead-letter record.
pub const OVERSIZE_PREFIX: usize = 1024;
