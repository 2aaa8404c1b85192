//! Where log lines go, and in which form: text for a terminal, JSON for log
//! shippers, or the journal's native protocol under systemd (with the right
//! priority per level, so `journalctl -p warning` works).
//!
//! Logs always go to stderr (stdout may carry data: a `-` sink). The level
//! comes from `RUST_LOG` (`info` by default; `info,rivulet=debug` style).

use std::io::IsTerminal;
use std::str::FromStr;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The form of log lines (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// The journal when stderr is connected to it (systemd), else text.
    #[default]
    Auto,
    Text,
    Json,
    Journald,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(LogFormat::Auto),
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            "journald" => Ok(LogFormat::Journald),
            other => Err(format!(
                "unknown log format `{other}`: use auto, text, json or journald"
            )),
        }
    }
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM`
/// to `<device>:<inode>` of it (systemd.exec(5)).
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    // SAFETY: fstat writes into the struct we pass; fd 2 may be closed,
    // which is an error return, not undefined behaviour.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    dev.parse::<u64>().ok() == Some(st.st_dev as u64)
        && ino.parse::<u64>().ok() == Some(st.st_ino as u64)
}

/// The filter of `RUST_LOG`, or `info`; a value that does not parse is
/// reported once logging works, and `info` is used.
fn filter() -> (Targets, Option<String>) {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => match Targets::from_str(&v) {
            Ok(t) => (t, None),
            Err(e) => (
                Targets::new().with_default(tracing::Level::INFO),
                Some(format!(
                    "RUST_LOG={v:?} is not a log filter ({e}); using info"
                )),
            ),
        },
        _ => (Targets::new().with_default(tracing::Level::INFO), None),
    }
}

/// Installs the global logger. Falls back to text when the journal's
/// socket cannot be opened.
pub fn init(format: LogFormat) {
    let (targets, problem) = filter();
    let format = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let mut fallback = None;
    let layer: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(l) => l
                .with_field_prefix(None)
                .with_syslog_identifier("rivulet".into())
                .with_priority_mappings(tracing_journald::PriorityMappings {
                    info: tracing_journald::Priority::Informational,
                    debug: tracing_journald::Priority::Debug,
                    ..tracing_journald::PriorityMappings::new()
                })
                .boxed(),
            Err(e) => {
                fallback = Some(format!(
                    "cannot log to the journal ({e}); logging text to stderr"
                ));
                text_layer()
            }
        },
        _ => text_layer(),
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(targets))
        .try_init();
    for p in problem.into_iter().chain(fallback) {
        tracing::warn!("{p}");
    }
}

fn text_layer<S>() -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .boxed()
}

/// Says a repeated problem at most once per `every`: the first time, then a
/// summary of how many came since (never one line per event).
#[derive(Debug)]
pub struct RateLimit {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(every: std::time::Duration) -> Self {
        RateLimit {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line is due now: `n` occurrences were held back
    /// since the last one. `None`: count this one and stay quiet.
    pub fn hit(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_unknown_ones_are_named() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("journald".parse::<LogFormat>(), Ok(LogFormat::Journald));
        let e = "xml".parse::<LogFormat>().unwrap_err();
        assert!(e.contains("`xml`") && e.contains("journald"), "{e}");
    }

    #[test]
    fn a_repeated_problem_is_said_once_per_period_with_a_count() {
        let mut r = RateLimit::new(std::time::Duration::from_secs(3600));
        assert_eq!(r.hit(), Some(0), "the first is said");
        assert_eq!(r.hit(), None);
        assert_eq!(r.hit(), None);
        r.last = Some(std::time::Instant::now() - std::time::Duration::from_secs(7200));
        assert_eq!(r.hit(), Some(2), "the next line counts what was held back");
    }

    #[test]
    fn a_journal_stream_of_another_file_is_not_the_journal() {
        // Whatever fd 2 is here, inode 0 is no file's.
        std::env::set_var("JOURNAL_STREAM", "0:0");
        assert!(!stderr_is_journal());
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!stderr_is_journal());
    }
}
