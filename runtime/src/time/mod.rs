//! Time: the injected [`Clock`], durations in pipeline files, timestamps in
//! events, and the watermark rule ([`valve`]: how a source's watermark is
//! generated and how an operator combines the watermarks of its inputs).

pub mod stamp;
pub mod valve;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Where "now" comes from: processing-time windows, idle detection and
/// arrival times. Tests inject a [`ManualClock`].
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(start_ms: i64) -> Self {
        ManualClock(Arc::new(AtomicI64::new(start_ms)))
    }
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst)
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Timestamps outside ±2^62 ms (±146 million years) are rejected, so window
/// arithmetic never overflows.
pub const MAX_ABS_TIMESTAMP: i64 = 1 << 62;

/// Parses a duration written with a unit: `250ms`, `5s`, `2m`, `1h`.
/// Returns milliseconds.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "bad duration `{s}`: expected a whole number and a unit (ms, s, m, h), like `5s` or `250ms`"
            ))
        }
    };
    num.parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|ms| *ms <= MAX_ABS_TIMESTAMP)
        .ok_or_else(|| {
            format!("bad duration `{s}`: expected a whole number and a unit (ms, s, m, h), like `5s` or `250ms`")
        })
}

/// Reads an event timestamp as the builder's default does: epoch
/// milliseconds (integer or float, floored) or an RFC 3339 string, any
/// year. Pipeline files choose their own [`stamp::StampFormat`].
pub fn timestamp_from(v: &crate::value::Value) -> Result<i64, String> {
    stamp::StampFormat::default().read(v)
}

/// Parses an RFC 3339 date-time into epoch milliseconds.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .map(|d| d.timestamp_millis())
        .map_err(|e| format!("the timestamp `{s}` is not RFC 3339 ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Value;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(250));
        assert_eq!(parse_duration("5s"), Ok(5000));
        assert_eq!(parse_duration("2m"), Ok(120_000));
        assert_eq!(parse_duration("1h"), Ok(3_600_000));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5 sec").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp_from(&Value::Int(1500)), Ok(1500));
        assert_eq!(timestamp_from(&Value::Float(1500.9)), Ok(1500));
        assert_eq!(
            timestamp_from(&Value::Str("1970-01-01T00:00:01.5Z".into())),
            Ok(1500)
        );
        assert_eq!(
            timestamp_from(&Value::Str("1970-01-01T01:00:00+01:00".into())),
            Ok(0)
        );
        assert!(timestamp_from(&Value::Str("yesterday".into())).is_err());
        assert!(timestamp_from(&Value::Null).is_err());
        assert!(timestamp_from(&Value::Bool(true)).is_err());
        assert!(timestamp_from(&Value::Float(f64::NAN)).is_err());
        assert!(timestamp_from(&Value::Int(i64::MAX)).is_err());
    }
}
