//! JSON Lines from a file or standard input.
//!
//! A helper thread reads lines with a bounded buffer (a line longer than
//! `max_payload` is skipped over, never held whole) and hands batches to
//! [`FileSource::poll`] through a bounded channel, so waiting on a slow pipe
//! (stdin) never stops the runtime from noticing shutdown or idleness.

use super::memory::push_line;
use super::{Poll, RawBatch, RawItem, Source, SourceError, OVERSIZE_PREFIX};
use std::io::{BufRead, BufReader, Read};

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::Duration;

/// Lines per batch handed over by the helper thread.
const CHUNK_LINES: usize = 1024;
/// Batches the helper thread may read ahead.
const READ_AHEAD: usize = 4;

type Chunk = Result<RawBatch, std::io::Error>;

pub struct FileSource {
    path: String,
    /// The input, until the first poll starts the helper thread.
    reader: Option<Box<dyn Read + Send>>,
    rx: Option<Receiver<Chunk>>,
    /// Line number of the last line handed out.
    line: u64,
    /// Lines to skip at the start (resuming after a checkpoint).
    skip: u64,
}

impl FileSource {
    /// A source reading `path`; `-` is standard input. The file is opened
    /// here, so a missing file is reported before the pipeline starts.
    pub fn open(path: &str) -> Result<Self, SourceError> {
        let reader: Box<dyn Read + Send> = if path == "-" {
            Box::new(std::io::stdin())
        } else {
            Box::new(std::fs::File::open(path).map_err(|error| SourceError::Io {
                source_name: format!("file {path}"),
                error,
            })?)
        };
        Ok(FileSource {
            path: path.to_string(),
            reader: Some(reader),
            rx: None,
            line: 0,
            skip: 0,
        })
    }

    fn name(&self) -> String {
        if self.path == "-" {
            "stdin".into()
        } else {
            format!("file {}", self.path)
        }
    }
}

impl Source for FileSource {
    fn describe(&self) -> String {
        self.name()
    }

    fn poll(
        &mut self,
        batch: &mut RawBatch,
        _max_items: usize,
        max_payload: usize,
        wait: Duration,
    ) -> Result<Poll, SourceError> {
        if let Some(reader) = self.reader.take() {
            let (tx, rx) = mpsc::sync_channel(READ_AHEAD);
            let skip = self.skip;
            std::thread::Builder::new()
                .name("rivulet-file-reader".into())
                .spawn(move || {
                    read_lines(
                        BufReader::with_capacity(256 << 10, reader),
                        &tx,
                        max_payload,
                        skip,
                    )
                })
                .map_err(|e| SourceError::Other(format!("cannot start the reader thread: {e}")))?;
            self.rx = Some(rx);
        }
        let Some(rx) = &self.rx else {
            return Ok(Poll::Finished);
        };
        match rx.recv_timeout(wait) {
            Ok(Ok(mut chunk)) => {
                if let Some(last) = chunk.items.last() {
                    self.line = self.line.max(last.position);
                }
                if batch.is_empty() {
                    std::mem::swap(batch, &mut chunk);
                } else {
                    for item in &chunk.items {
                        let start = batch.data.len() as u32;
                        batch.data.extend_from_slice(chunk.payload(item));
                        batch.items.push(RawItem {
                            start,
                            end: batch.data.len() as u32,
                            ..*item
                        });
                    }
                }
                Ok(Poll::Open)
            }
            Ok(Err(error)) => Err(SourceError::Io {
                source_name: self.name(),
                error,
            }),
            Err(RecvTimeoutError::Timeout) => Ok(Poll::Open),
            Err(RecvTimeoutError::Disconnected) => {
                self.rx = None;
                Ok(Poll::Finished)
            }
        }
    }

    fn position(&self) -> Option<Vec<u8>> {
        (self.path != "-").then(|| super::count_position(self.line))
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), SourceError> {
        if self.path == "-" {
            return Err(SourceError::Other(
                "stdin cannot resume from a position".into(),
            ));
        }
        self.skip = super::read_count_position(position)?;
        self.line = self.skip;
        Ok(())
    }
}

/// The helper thread: reads lines until end of input, or until the source
/// is dropped.
fn read_lines<R: Read>(mut r: BufReader<R>, tx: &SyncSender<Chunk>, max_payload: usize, skip: u64) {
    let mut batch = RawBatch::default();
    let mut line: Vec<u8> = Vec::new();
    // Full length of the current line once it is known to be too long.
    let mut too_long: Option<u64> = None;
    let mut line_no = 0u64;
    // Room for a `\r` before the newline.
    let limit = max_payload.saturating_add(1);
    loop {
        // About to block on an empty buffer: hand over what we have, so a
        // slow pipe gets low latency and a file still gets full batches.
        if r.buffer().is_empty()
            && !batch.is_empty()
            && tx.send(Ok(std::mem::take(&mut batch))).is_err()
        {
            return;
        }
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        if buf.is_empty() {
            if (!line.is_empty() || too_long.is_some()) && line_no + 1 > skip {
                line_no += 1;
                finish_line(&mut batch, &mut line, &mut too_long, line_no, max_payload);
            }
            if !batch.is_empty() {
                let _ = tx.send(Ok(batch));
            }
            return;
        }
        let (part, used, complete) = match memchr::memchr(b'\n', buf) {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        match &mut too_long {
            None if line.len() + part.len() <= limit => line.extend_from_slice(part),
            _ => {
                // Too long: count the bytes, keep only a prefix for the dead letter.
                let total = too_long.unwrap_or(line.len() as u64) + part.len() as u64;
                too_long = Some(total);
                let keep = OVERSIZE_PREFIX.saturating_sub(line.len()).min(part.len());
                line.extend_from_slice(&part[..keep]);
            }
        }
        r.consume(used);
        if complete {
            line_no += 1;
            if line_no <= skip {
                line.clear();
                too_long = None;
                continue;
            }
            finish_line(&mut batch, &mut line, &mut too_long, line_no, max_payload);
            if batch.len() >= CHUNK_LINES && tx.send(Ok(std::mem::take(&mut batch))).is_err() {
                return;
            }
        }
    }
}

fn finish_line(
    batch: &mut RawBatch,
    line: &mut Vec<u8>,
    too_long: &mut Option<u64>,
    line_no: u64,
    max_payload: usize,
) {
    match too_long.take() {
        Some(size) => {
            let start = batch.data.len() as u32;
            batch.data.extend_from_slice(line);
            batch.items.push(RawItem {
                start,
                end: batch.data.len() as u32,
                arrival_ms: 0,
                position: line_no,
                oversize: Some(size),
                topic: (0, 0),
                retain: false,
                source: 0,
            });
        }
        None => push_line(batch, line, line_no, max_payload),
    }
    line.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8], max_payload: usize) -> Vec<(String, u64, Option<u64>)> {
        let (tx, rx) = mpsc::sync_channel(100);
        // A tiny buffer exercises lines split across reads.
        read_lines(BufReader::with_capacity(7, input), &tx, max_payload, 0);
        drop(tx);
        let mut out = Vec::new();
        for chunk in rx {
            let chunk = chunk.unwrap();
            for it in &chunk.items {
                out.push((
                    String::from_utf8_lossy(chunk.payload(it)).into_owned(),
                    it.position,
                    it.oversize,
                ));
            }
        }
        out
    }

    #[test]
    fn lines_blank_lines_crlf_and_last_line() {
        let got = read_all(b"{\"a\":1}\r\n\n  \n{\"b\":22222222}\n{\"c\":3}", 100);
        assert_eq!(
            got,
            vec![
                ("{\"a\":1}".into(), 1, None),
                ("{\"b\":22222222}".into(), 4, None),
                ("{\"c\":3}".into(), 5, None),
            ]
        );
    }

    #[test]
    fn oversized_lines_are_marked_not_held() {
        let long = "x".repeat(5000);
        let input = format!("{long}\n{{}}\n");
        let got = read_all(input.as_bytes(), 10);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0.len(), OVERSIZE_PREFIX);
        assert_eq!(got[0].2, Some(5000));
        assert_eq!(got[1], ("{}".into(), 2, None));
    }
}
