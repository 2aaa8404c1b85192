//! A bounded source over lines held in memory.

use super::{Poll, RawBatch, Source, SourceError};
use std::sync::Arc;
use std::time::Duration;

/// Newline-separated payloads in memory; ends when they are used up.
#[derive(Clone)]
pub struct MemorySource {
    data: Arc<Vec<u8>>,
    pos: usize,
    line: u64,
}

impl MemorySource {
    /// `data` holds one payload per line.
    pub fn new(data: impl Into<Vec<u8>>) -> Self {
        MemorySource {
            data: Arc::new(data.into()),
            pos: 0,
            line: 0,
        }
    }

    pub fn from_lines<I: IntoIterator<Item = S>, S: AsRef<str>>(lines: I) -> Self {
        let mut data = Vec::new();
        for l in lines {
            data.extend_from_slice(l.as_ref().as_bytes());
            data.push(b'\n');
        }
        Self::new(data)
    }
}

impl Source for MemorySource {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn position(&self) -> Option<Vec<u8>> {
        Some(super::count_position(self.line))
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), SourceError> {
        let lines = super::read_count_position(position)?;
        while self.line < lines && self.pos < self.data.len() {
            let rest = &self.data[self.pos..];
            let len = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
            self.pos += (len + 1).min(rest.len());
            self.line += 1;
        }
        Ok(())
    }

    fn poll(
        &mut self,
        batch: &mut RawBatch,
        max_items: usize,
        max_payload: usize,
        _wait: Duration,
    ) -> Result<Poll, SourceError> {
        let data = &self.data[..];
        let mut n = 0;
        while n < max_items && self.pos < data.len() {
            let rest = &data[self.pos..];
            let len = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
            self.pos += (len + 1).min(rest.len());
            self.line += 1;
            push_line(batch, &rest[..len], self.line, max_payload);
            n += 1;
        }
        Ok(if self.pos >= data.len() {
            Poll::Finished
        } else {
            Poll::Open
        })
    }
}

/// Appends one line (without its newline) as a payload: strips a trailing
/// `\r`, skips blank lines, and truncates oversized ones.
pub(crate) fn push_line(batch: &mut RawBatch, line: &[u8], position: u64, max_payload: usize) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    batch.push_message("", line, position, max_payload);
}

/// A source fed from code: push payloads through a [`QueueHandle`]; the
/// stream ends when the handle is closed (or dropped).
pub struct QueueSource {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    position: u64,
}

/// The feeding end of a [`QueueSource`].
#[derive(Clone)]
pub struct QueueHandle(std::sync::mpsc::Sender<Vec<u8>>);

impl QueueHandle {
    /// Queues one payload; `false` once the pipeline has stopped.
    pub fn push(&self, payload: impl Into<Vec<u8>>) -> bool {
        self.0.send(payload.into()).is_ok()
    }
}

impl QueueSource {
    pub fn new() -> (QueueSource, QueueHandle) {
        let (tx, rx) = std::sync::mpsc::channel();
        (QueueSource { rx, position: 0 }, QueueHandle(tx))
    }
}

impl Source for QueueSource {
    fn describe(&self) -> String {
        "queue".into()
    }

    fn poll(
        &mut self,
        batch: &mut RawBatch,
        max_items: usize,
        max_payload: usize,
        wait: Duration,
    ) -> Result<Poll, SourceError> {
        use std::sync::mpsc::RecvTimeoutError;
        let mut next = self.rx.recv_timeout(wait);
        let mut n = 0;
        loop {
            match next {
                Ok(p) => {
                    self.position += 1;
                    push_line(batch, &p, self.position, max_payload);
                    n += 1;
                }
                Err(RecvTimeoutError::Timeout) => return Ok(Poll::Open),
                Err(RecvTimeoutError::Disconnected) => return Ok(Poll::Finished),
            }
            if n >= max_items {
                return Ok(Poll::Open);
            }
            next = match self.rx.try_recv() {
                Ok(p) => Ok(p),
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(Poll::Open),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    Err(RecvTimeoutError::Disconnected)
                }
            };
        }
    }
}
