//! Synthetic sensor readings, for demos, tests and benchmarks.
//!
//! Event `i` comes from a sensor drawn at random among `sensors`, with
//! timestamp `start + i·1000/rate` ms, moved back by a random lag of up to
//! `disorder`. With `rate: unlimited` events are produced as fast as the
//! pipeline takes them and event time advances 1 ms per event. The same
//! seed gives the same events (for a given rivulet version).

use super::{Poll, RawBatch, Source, SourceError};
use std::io::Write;
use std::time::{Duration, Instant};

/// The fields of every generated event.
pub const FIELDS: &[&str] = &["sensor_id", "ts", "temperature", "humidity"];

#[derive(Clone, Debug)]
pub struct GeneratorOptions {
    pub sensors: u32,
    /// Events per second, paced in real time; `None` is unlimited.
    pub rate: Option<f64>,
    /// Largest backwards lag of an event's timestamp, in ms.
    pub disorder_ms: i64,
    pub seed: u64,
    /// Total events; `None` is unbounded.
    pub count: Option<u64>,
    /// Event time of event 0 (ms since the epoch).
    pub start_ms: i64,
}

impl Default for GeneratorOptions {
    fn default() -> Self {
        GeneratorOptions {
            sensors: 10,
            rate: Some(1000.0),
            disorder_ms: 0,
            seed: 1,
            count: None,
            start_ms: 0,
        }
    }
}

pub struct Generator {
    opts: GeneratorOptions,
    rng: fastrand::Rng,
    next: u64,
    /// When pacing started; event `i` is due at `began + i/rate`.
    began: Option<Instant>,
    /// Each sensor's base temperature in °F.
    base: Vec<f64>,
    line: Vec<u8>,
}

impl Generator {
    pub fn new(opts: GeneratorOptions) -> Self {
        let mut rng = fastrand::Rng::with_seed(opts.seed);
        let base = (0..opts.sensors.max(1))
            .map(|_| 50.0 + rng.f64() * 40.0)
            .collect();
        Generator {
            rng,
            next: 0,
            began: None,
            base,
            line: Vec::with_capacity(128),
            opts,
        }
    }

    fn event_time(&self, i: u64) -> i64 {
        let step = match self.opts.rate {
            Some(r) if r > 0.0 => 1000.0 / r,
            _ => 1.0,
        };
        self.opts.start_ms.saturating_add((i as f64 * step) as i64)
    }

    fn write_event(&mut self, i: u64) {
        // Each event draws from its own seed, so the stream can resume at any event.
        self.rng = fastrand::Rng::with_seed(self.opts.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i);
        let sensor = self.rng.u32(0..self.opts.sensors.max(1));
        let lag = if self.opts.disorder_ms > 0 {
            self.rng.i64(0..=self.opts.disorder_ms)
        } else {
            0
        };
        let ts = self.event_time(i) - lag;
        let t = self.base[sensor as usize] + (self.rng.f64() - 0.5) * 10.0;
        let h = 30.0 + self.rng.f64() * 40.0;
        self.line.clear();
        // Writing to a Vec cannot fail.
        let _ = write!(
            self.line,
            r#"{{"sensor_id":"sensor-{sensor}","ts":{ts},"temperature":{:.2},"humidity":{:.1}}}"#,
            t, h
        );
    }
}

impl Source for Generator {
    fn describe(&self) -> String {
        "generator".into()
    }

    fn poll(
        &mut self,
        batch: &mut RawBatch,
        max_items: usize,
        _max_payload: usize,
        wait: Duration,
    ) -> Result<Poll, SourceError> {
        let began = *self.began.get_or_insert_with(Instant::now);
        let mut due = self.opts.count.unwrap_or(u64::MAX);
        if let Some(rate) = self.opts.rate {
            let mut by_now = (began.elapsed().as_secs_f64() * rate) as u64 + 1;
            if by_now <= self.next {
                // Nothing due yet: sleep until the next event, or `wait`.
                let at = Duration::from_secs_f64(self.next as f64 / rate);
                let sleep = at.saturating_sub(began.elapsed()).min(wait);
                std::thread::sleep(sleep);
                by_now = (began.elapsed().as_secs_f64() * rate) as u64 + 1;
            }
            due = due.min(by_now);
        }
        let end = due.min(self.next + max_items as u64);
        while self.next < end {
            let i = self.next;
            self.write_event(i);
            let line = std::mem::take(&mut self.line);
            batch.push(&line, i + 1);
            self.line = line;
            self.next += 1;
        }
        Ok(match self.opts.count {
            Some(c) if self.next >= c => Poll::Finished,
            _ => Poll::Open,
        })
    }

    fn known_fields(&self) -> Option<Vec<String>> {
        Some(FIELDS.iter().map(|s| s.to_string()).collect())
    }

    fn position(&self) -> Option<Vec<u8>> {
        Some(super::count_position(self.next))
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), SourceError> {
        self.next = super::read_count_position(position)?;
        // Pacing continues from here, not from event 0.
        if let Some(rate) = self.opts.rate {
            self.began = Some(Instant::now() - Duration::from_secs_f64(self.next as f64 / rate));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(opts: GeneratorOptions, n: usize) -> Vec<serde_json::Value> {
        let mut g = Generator::new(opts);
        let mut b = RawBatch::default();
        while b.len() < n {
            let room = n - b.len();
            if g.poll(&mut b, room, 1 << 20, Duration::ZERO).unwrap() == Poll::Finished {
                break;
            }
        }
        b.items
            .iter()
            .map(|it| serde_json::from_slice(b.payload(it)).unwrap())
            .collect()
    }

    #[test]
    fn deterministic_bounded_and_disordered() {
        let opts = GeneratorOptions {
            sensors: 3,
            rate: None,
            disorder_ms: 50,
            seed: 7,
            count: Some(500),
            start_ms: 1_000_000,
        };
        let a = take(opts.clone(), 1000);
        let b = take(opts, 1000);
        assert_eq!(a.len(), 500);
        assert_eq!(a, b);
        let ts: Vec<i64> = a.iter().map(|e| e["ts"].as_i64().unwrap()).collect();
        assert!(ts.windows(2).any(|w| w[1] < w[0]), "some disorder");
        assert!(ts.iter().enumerate().all(|(i, t)| {
            let nominal = 1_000_000 + i as i64;
            *t <= nominal && *t >= nominal - 50
        }));
        let ids: std::collections::BTreeSet<_> = a
            .iter()
            .map(|e| e["sensor_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), 3);
    }
}
