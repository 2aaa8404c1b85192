//! Shared pieces of the benchmarks: a synthetic in-memory JSON source and
//! CPU/RSS measurement.

use rivulet::sources::{Poll, RawBatch, Source, SourceError};
use std::time::Duration;

/// First timestamp; 13 digits, so every timestamp has the same width and can
/// be patched into a template line in place.
pub const T0: i64 = 1_700_000_000_000;

/// JSON Lines of sensor readings, rendered from one template per key with
/// the timestamp patched in: no allocation and ~20 ns per event, so the
/// source costs little next to the pipeline it feeds.
pub struct SyntheticJson {
    templates: Vec<Vec<u8>>,
    /// Byte offset of the 13 timestamp digits in each template.
    ts_at: Vec<usize>,
    keys: Vec<u32>,
    next: u64,
    total: u64,
    events_per_second: u64,
}

impl SyntheticJson {
    /// `total` events over `keys` keys, `events_per_second` of event time,
    /// with up to 500 ms of disorder.
    pub fn new(total: u64, keys: u32, events_per_second: u64) -> Self {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut templates = Vec::new();
        let mut ts_at = Vec::new();
        for k in 0..keys {
            let t = 50.0 + (rnd() % 4000) as f64 / 100.0;
            let h = 30.0 + (rnd() % 400) as f64 / 10.0;
            let line = format!(
                r#"{{"sensor_id":"sensor-{k:05}","ts":{T0},"temperature":{t:.2},"humidity":{h:.1}}}"#
            );
            let at = line.find(&T0.to_string()).unwrap_or(0);
            templates.push(line.into_bytes());
            ts_at.push(at);
        }
        let keys_seq = (0..1 << 16).map(|_| (rnd() % keys as u64) as u32).collect();
        SyntheticJson {
            templates,
            ts_at,
            keys: keys_seq,
            next: 0,
            total,
            events_per_second,
        }
    }

    /// Average line length in bytes.
    pub fn avg_len(&self) -> f64 {
        self.templates.iter().map(|t| t.len()).sum::<usize>() as f64 / self.templates.len() as f64
    }

    /// Writes event `i` into `out` (cleared first).
    pub fn render(&self, i: u64, out: &mut Vec<u8>) {
        let k = self.keys[(i % self.keys.len() as u64) as usize] as usize;
        let ts = T0 + (i * 1000 / self.events_per_second) as i64 - ((i * 7919) % 500) as i64;
        out.clear();
        out.extend_from_slice(&self.templates[k]);
        let at = self.ts_at[k];
        let mut digits = [0u8; 13];
        let mut v = ts;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out[at..at + 13].copy_from_slice(&digits);
    }
}

impl Source for SyntheticJson {
    fn describe(&self) -> String {
        "synthetic".into()
    }

    fn poll(
        &mut self,
        batch: &mut RawBatch,
        max_items: usize,
        _max_payload: usize,
        _wait: Duration,
    ) -> Result<Poll, SourceError> {
        let end = self.total.min(self.next + max_items as u64);
        let mut line = Vec::with_capacity(128);
        while self.next < end {
            self.render(self.next, &mut line);
            batch.push(&line, self.next);
            self.next += 1;
        }
        Ok(if self.next >= self.total {
            Poll::Finished
        } else {
            Poll::Open
        })
    }
}

/// CPU time (user + system) of this process so far, and its peak RSS.
pub fn usage() -> (Duration, u64) {
    // SAFETY: getrusage writes into the zeroed struct we pass; RUSAGE_SELF is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (
        tv(ru.ru_utime) + tv(ru.ru_stime),
        ru.ru_maxrss as u64 * 1024,
    )
}
