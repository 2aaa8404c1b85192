//! Sinks: where results, late events and dead letters go.
//!
//! A sink receives one JSON object per call, already serialized (one line
//! of JSON Lines without the newline), in the pipeline's deterministic
//! output order, on one thread.

pub mod home_assistant;
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

/// What goes with a pass-through event: the fields its sinks asked for,
/// and the incoming message's retain flag.
pub struct EventMeta<'a> {
    pub names: &'a [String],
    pub values: &'a [crate::value::Value],
    pub retain: bool,
}

impl EventMeta<'_> {
    pub fn get(&self, name: &str) -> Option<&crate::value::Value> {
        self.names
            .iter()
            .position(|n| n == name)
            .and_then(|i| self.values.get(i))
    }
}

pub trait Sink: Send {
    /// A short description for logs, like `file out.jsonl`.
    fn describe(&self) -> String;
    /// Called once before the first write, with the run's context (its
    /// metrics, and this sink's operator id).
    fn start(&mut self, _ctx: &crate::context::RunContext) {}
    /// Writes one record (a JSON object, no trailing newline).
    fn write(&mut self, record: &[u8]) -> Result<(), SinkError>;
    /// Fields this sink places a pass-through event by (its topic's
    /// fields): the pipeline hands their values to [`Sink::write_event`],
    /// so they need not be part of the record.
    fn topic_fields(&self) -> Vec<String> {
        Vec::new()
    }
    /// Whether this sink wants each event's retain flag.
    fn keeps_retain(&self) -> bool {
        false
    }
    /// Writes a pass-through event; `fields` holds the values of `names`
    /// (the fields the pipeline's main sinks asked for).
    fn write_event(&mut self, record: &[u8], _event: &EventMeta) -> Result<(), SinkError> {
        self.write(record)
    }
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
        let io = |error| SinkError::Io {
            sink: format!("file {path}"),
            error,
        };
        drop_torn_tail(std::path::Path::new(path)).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
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

/// A crash in the middle of a write can leave an incomplete last line.
/// Every record ends with a newline, so that fragment is no record: it is
/// cut off (the run that follows emits the record again, whole), and what
/// earlier runs wrote in full is never touched.
fn drop_torn_tail(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len == 0 || !f.metadata()?.is_file() {
        return Ok(());
    }
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        if end == len && chunk.last() == Some(&b'\n') {
            return Ok(());
        }
        if let Some(i) = memchr::memrchr(b'\n', chunk) {
            let keep = start + i as u64 + 1;
            tracing::warn!(file = %path.display(), bytes = len - keep, "removed an incomplete last line left by an interrupted run");
            return f.set_len(keep);
        }
        if start == 0 {
            tracing::warn!(file = %path.display(), bytes = len, "removed an incomplete line left by an interrupted run");
            return f.set_len(0);
        }
        end = start;
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
