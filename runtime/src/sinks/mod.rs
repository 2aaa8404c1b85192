//! Sinks: where results, late events and dead letters go.
//!
//! A sink receives one JSON object per call, already serialized (one line
//! of JSON Lines without the newline), in the pipeline's deterministic
//! output order, on one thread.

pub mod mqtt;

use std::io::{BufWriter, Write};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{sink}: {error}")]
    Io {
        sink: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

pub trait Sink: Send {
    /// A short description for logs, like `file out.jsonl`.
    fn describe(&self) -> String;
    /// Writes one record (a JSON object, no trailing newline).
    fn write(&mut self, record: &[u8]) -> Result<(), SinkError>;
    /// Makes what was written so far visible (called after every batch).
    fn flush(&mut self) -> Result<(), SinkError>;
    /// Called once at the end of the run.
    fn close(&mut self) -> Result<(), SinkError> {
        self.flush()
    }
}

/// JSON Lines to a file (appended, never truncated) or to standard output.
pub struct FileSink {
    name: String,
    out: BufWriter<Box<dyn Write + Send>>,
}

impl FileSink {
    /// Opens `path` for appending, creating it if needed; `-` is stdout.
    pub fn open(path: &str) -> Result<Self, SinkError> {
        if path == "-" {
            return Ok(Self::stdout());
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|error| SinkError::Io {
                sink: format!("file {path}"),
                error,
            })?;
        Ok(FileSink {
            name: format!("file {path}"),
            out: BufWriter::with_capacity(64 << 10, Box::new(file)),
        })
    }

    pub fn stdout() -> Self {
        FileSink {
            name: "stdout".into(),
            out: BufWriter::with_capacity(64 << 10, Box::new(std::io::stdout())),
        }
    }

    fn io(&self, error: std::io::Error) -> SinkError {
        SinkError::Io {
            sink: self.name.clone(),
            error,
        }
    }
}

impl Sink for FileSink {
    fn describe(&self) -> String {
        self.name.clone()
    }
    fn write(&mut self, record: &[u8]) -> Result<(), SinkError> {
        self.out
            .write_all(record)
            .and_then(|_| self.out.write_all(b"\n"))
            .map_err(|e| self.io(e))
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(|e| self.io(e))
    }
}

/// Collects records in memory; clone it to read them after the run.
#[derive(Clone, Default)]
pub struct MemorySink(Arc<Mutex<Vec<String>>>);

impl MemorySink {
    pub fn new() -> Self {
        Self::default()
    }
    /// The records written so far.
    pub fn records(&self) -> Vec<String> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Sink for MemorySink {
    fn describe(&self) -> String {
        "memory".into()
    }
    fn write(&mut self, record: &[u8]) -> Result<(), SinkError> {
        let mut v = self
            .0
            .lock()
            .map_err(|_| SinkError::Other("memory sink lock poisoned".into()))?;
        v.push(String::from_utf8_lossy(record).into_owned());
        Ok(())
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Discards everything (benchmarks).
#[derive(Clone, Copy, Default)]
pub struct NullSink;

impl Sink for NullSink {
    fn describe(&self) -> String {
        "discard".into()
    }
    fn write(&mut self, _: &[u8]) -> Result<(), SinkError> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}
