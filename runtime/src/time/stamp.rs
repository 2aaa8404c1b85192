//! Reading an event's timestamp: numeric epochs in a given unit, RFC 3339,
//! other layouts (strftime-style), and local times in a time zone.
//!
//! The rules (docs/pipeline.md, "Timestamps"):
//! - A number is an epoch in `unit` (default milliseconds); fractions are
//!   floored to the millisecond.
//! - A string is RFC 3339 (with an offset), or, with `format`, laid out as
//!   the format says. A string without an offset (`2026-12-01T21:00:00`,
//!   or a format without `%z`) is a local time in `timezone`; without a
//!   `timezone` it is refused with a reason that says to set one.
//! - A local time that falls into a daylight-saving gap is moved forward by
//!   the gap (02:30 on the spring-forward night in Berlin is 03:30 CEST);
//!   one that happens twice (the autumn hour) is the first of the two. This
//!   is the "compatible" rule of RFC 5545 and JavaScript's Temporal.
//! - A number outside the plausible years (default 2000 to 2100) is refused,
//!   naming the unit it would fit, so seconds read as milliseconds never
//!   become silent events of January 1970.

use super::MAX_ABS_TIMESTAMP;
use crate::value::Value;
use jiff::tz::TimeZone;

/// The unit of a numeric epoch timestamp.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EpochUnit {
    S,
    #[default]
    Ms,
    Us,
    Ns,
}

impl EpochUnit {
    pub const ALL: [EpochUnit; 4] = [EpochUnit::S, EpochUnit::Ms, EpochUnit::Us, EpochUnit::Ns];

    pub fn parse(s: &str) -> Option<EpochUnit> {
        Some(match s {
            "s" => EpochUnit::S,
            "ms" => EpochUnit::Ms,
            "us" => EpochUnit::Us,
            "ns" => EpochUnit::Ns,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            EpochUnit::S => "s",
            EpochUnit::Ms => "ms",
            EpochUnit::Us => "us",
            EpochUnit::Ns => "ns",
        }
    }

    fn words(self) -> &'static str {
        match self {
            EpochUnit::S => "seconds",
            EpochUnit::Ms => "milliseconds",
            EpochUnit::Us => "microseconds",
            EpochUnit::Ns => "nanoseconds",
        }
    }

    /// Milliseconds of an integer epoch in this unit (floored); `None` when
    /// it overflows.
    #[inline]
    fn int_ms(self, v: i64) -> Option<i64> {
        match self {
            EpochUnit::S => v.checked_mul(1000),
            EpochUnit::Ms => Some(v),
            EpochUnit::Us => Some(v.div_euclid(1000)),
            EpochUnit::Ns => Some(v.div_euclid(1_000_000)),
        }
    }

    fn float_ms(self, v: f64) -> f64 {
        match self {
            EpochUnit::S => v * 1000.0,
            EpochUnit::Ms => v,
            EpochUnit::Us => v / 1000.0,
            EpochUnit::Ns => v / 1_000_000.0,
        }
    }
}

/// A time zone with the name it was given (`local` for the system's).
#[derive(Clone, Debug)]
pub struct Zone {
    pub name: String,
    pub tz: TimeZone,
}

/// Zones are the same when they were given the same name.
impl PartialEq for Zone {
    fn eq(&self, other: &Zone) -> bool {
        self.name == other.name
    }
}
impl Eq for Zone {}

impl Zone {
    /// An IANA name (`Europe/Berlin`, `UTC`) from the system's tz database
    /// (or the copy built in), or `local` for this machine's zone.
    pub fn named(name: &str) -> Result<Zone, String> {
        let tz = if name == "local" {
            TimeZone::try_system().map_err(|e| {
                format!(
                    "cannot tell this machine's time zone ({e}); name one, like `Europe/Berlin`"
                )
            })?
        } else {
            TimeZone::get(name).map_err(|_| {
                format!("unknown time zone `{name}`; expected an IANA name like `Europe/Berlin`, `UTC`, or `local`")
            })?
        };
        Ok(Zone {
            name: name.to_string(),
            tz,
        })
    }
}

/// The years a numeric timestamp may fall in (`from` inclusive, `until`
/// exclusive), as epoch milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plausible {
    pub from_year: i16,
    pub until_year: i16,
    from_ms: i64,
    until_ms: i64,
}

impl Plausible {
    pub const DEFAULT: &'static str = "2000..2100";

    /// `FROM..UNTIL` in years (UTC), e.g. `2000..2100`.
    pub fn parse(s: &str) -> Result<Plausible, String> {
        let bad = || format!("bad range `{s}`: expected years like `2000..2100`, or `any`");
        let (a, b) = s.trim().split_once("..").ok_or_else(bad)?;
        let (from, until): (i16, i16) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if !(1..=9999).contains(&from) || !(1..=9999).contains(&until) || from >= until {
            return Err(bad());
        }
        let ms = |y: i16| {
            jiff::civil::date(y, 1, 1)
                .to_zoned_datetime(TimeZone::UTC)
                .map(|z| z.timestamp().as_millisecond())
                .map_err(|_| bad())
        };
        Ok(Plausible {
            from_year: from,
            until_year: until,
            from_ms: ms(from)?,
            until_ms: ms(until)?,
        })
    }

    #[inline]
    fn holds(&self, ms: i64) -> bool {
        (self.from_ms..self.until_ms).contains(&ms)
    }
}

/// How a source's timestamps are read.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StampFormat {
    /// The unit of numeric epochs.
    pub unit: EpochUnit,
    /// A strftime-style layout for string timestamps (`%d.%m.%Y %H:%M:%S`);
    /// `None`: RFC 3339, or ISO 8601 without an offset.
    pub layout: Option<String>,
    /// The zone of timestamps that carry no offset.
    pub zone: Option<Zone>,
    /// The years a numeric timestamp must fall in; `None`: any.
    pub plausible: Option<Plausible>,
}

impl StampFormat {
    /// Checks a layout: it must be a valid strftime-style format that
    /// reads back at least a date.
    pub fn check_layout(layout: &str) -> Result<(), String> {
        let sample = jiff::civil::date(2024, 2, 3)
            .at(4, 5, 6, 0)
            .to_zoned_datetime(TimeZone::UTC)
            .map_err(|e| e.to_string())?;
        let text = jiff::fmt::strtime::format(layout, &sample)
            .map_err(|e| format!("bad format `{layout}`: {e}"))?;
        let back = jiff::fmt::strtime::parse(layout, &text)
            .map_err(|e| format!("bad format `{layout}`: {e}"))?;
        if back.to_timestamp().is_err() && back.to_datetime().is_err() {
            return Err(format!(
                "bad format `{layout}`: it must hold at least a year, month and day (like `%Y-%m-%d %H:%M:%S`)"
            ));
        }
        Ok(())
    }

    /// The timestamp of `v` in epoch milliseconds, or why it has none.
    #[inline]
    pub fn read(&self, v: &Value) -> Result<i64, String> {
        // The common case, per event: a plausible integer epoch.
        if let Value::Int(i) = v {
            if let Some(ms) = self.unit.int_ms(*i) {
                if ms.abs() < MAX_ABS_TIMESTAMP && self.plausible.is_none_or(|p| p.holds(ms)) {
                    return Ok(ms);
                }
            }
        }
        self.read_other(v)
    }

    /// Everything but a plausible integer: floats, strings, and the reasons
    /// for refusing a value.
    #[inline(never)]
    fn read_other(&self, v: &Value) -> Result<i64, String> {
        let ms = match v {
            Value::Int(i) => {
                let ms = self
                    .unit
                    .int_ms(*i)
                    .filter(|ms| ms.abs() < MAX_ABS_TIMESTAMP)
                    .ok_or_else(|| format!("the timestamp {i} is out of range"))?;
                self.plausible_number(ms, *i as f64)?
            }
            Value::Float(f) if f.is_finite() => {
                let ms = self.unit.float_ms(*f);
                if ms.abs() >= MAX_ABS_TIMESTAMP as f64 {
                    return Err(format!("the timestamp {f} is out of range"));
                }
                self.plausible_number(ms.floor() as i64, *f)?
            }
            Value::Str(s) => self.read_text(s)?,
            Value::Null => return Err("the timestamp field is missing or null".into()),
            other => {
                return Err(format!(
                    "the timestamp {other} is not an epoch number or a date-time string"
                ))
            }
        };
        if ms.abs() >= MAX_ABS_TIMESTAMP {
            return Err(format!("the timestamp {ms} is out of range"));
        }
        Ok(ms)
    }

    fn plausible_number(&self, ms: i64, raw: f64) -> Result<i64, String> {
        let Some(p) = &self.plausible else {
            return Ok(ms);
        };
        if p.holds(ms) {
            return Ok(ms);
        }
        let fits = EpochUnit::ALL.into_iter().find(|u| {
            *u != self.unit && {
                let m = u.float_ms(raw);
                m.is_finite() && m.abs() < MAX_ABS_TIMESTAMP as f64 && p.holds(m.floor() as i64)
            }
        });
        let when = show_ms(ms);
        Err(match fits {
            Some(u) => format!(
                "the timestamp {raw} read as {} is {when}, outside the plausible years {}..{}; it looks like {}: set `event_time.unit: {}`",
                self.unit.words(),
                p.from_year,
                p.until_year,
                u.words(),
                u.name()
            ),
            None => format!(
                "the timestamp {raw} read as {} is {when}, outside the plausible years {}..{} (set `event_time.plausible_years` to accept it)",
                self.unit.words(),
                p.from_year,
                p.until_year
            ),
        })
    }

    fn read_text(&self, s: &str) -> Result<i64, String> {
        let t = s.trim();
        let Some(layout) = &self.layout else {
            if let Ok(d) = chrono::DateTime::parse_from_rfc3339(t) {
                return Ok(d.timestamp_millis());
            }
            // ISO 8601 without an offset (Tasmota's `Time`): a local time.
            return match t.parse::<jiff::civil::DateTime>() {
                Ok(dt) => self.local(s, dt),
                Err(_) => Err(format!(
                    "the timestamp `{s}` is not RFC 3339 (like 2026-12-01T21:00:00Z); set `event_time.format` for other layouts"
                )),
            };
        };
        let parsed = jiff::fmt::strtime::parse(layout, t).map_err(|e| {
            format!("the timestamp `{s}` does not match the format `{layout}` ({e})")
        })?;
        if let Ok(ts) = parsed.to_timestamp() {
            return Ok(ts.as_millisecond());
        }
        if parsed.iana_time_zone().is_some() {
            if let Ok(z) = parsed.to_zoned_datetime() {
                return Ok(z.timestamp().as_millisecond());
            }
        }
        let dt = parsed.to_datetime().map_err(|e| {
            format!("the timestamp `{s}` does not name a date with `{layout}` ({e})")
        })?;
        self.local(s, dt)
    }

    /// A civil date-time in the configured zone.
    fn local(&self, s: &str, dt: jiff::civil::DateTime) -> Result<i64, String> {
        let Some(zone) = &self.zone else {
            return Err(format!(
                "the timestamp `{s}` has no UTC offset: set `event_time.timezone` to the zone it was written in (like `Europe/Berlin`, `UTC` or `local`)"
            ));
        };
        zone.tz
            .to_ambiguous_timestamp(dt)
            .compatible()
            .map(|t| t.as_millisecond())
            .map_err(|e| format!("the timestamp `{s}` in {}: {e}", zone.name))
    }
}

fn show_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("{ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    fn checked() -> StampFormat {
        StampFormat {
            plausible: Some(Plausible::parse(Plausible::DEFAULT).unwrap()),
            ..StampFormat::default()
        }
    }

    #[test]
    fn numbers_in_each_unit() {
        let f = |unit| StampFormat { unit, ..checked() };
        let want = utc("2023-11-14T22:13:20Z");
        assert_eq!(f(EpochUnit::S).read(&Value::Int(1_700_000_000)), Ok(want));
        assert_eq!(
            f(EpochUnit::S).read(&Value::Float(1_700_000_000.25)),
            Ok(want + 250)
        );
        assert_eq!(
            f(EpochUnit::Ms).read(&Value::Int(1_700_000_000_123)),
            Ok(want + 123)
        );
        assert_eq!(
            f(EpochUnit::Us).read(&Value::Int(1_700_000_000_123_456)),
            Ok(want + 123)
        );
        assert_eq!(
            f(EpochUnit::Ns).read(&Value::Int(1_700_000_000_123_456_789)),
            Ok(want + 123)
        );
    }

    #[test]
    fn an_implausible_number_names_the_unit_it_fits() {
        // OwnTracks' `tst` is seconds: read as milliseconds it is 1970.
        let e = checked().read(&Value::Int(1_700_000_000)).unwrap_err();
        assert!(e.contains("1970-01-20"), "{e}");
        assert!(
            e.contains("looks like seconds: set `event_time.unit: s`"),
            "{e}"
        );
        // Microseconds read as milliseconds are far in the future.
        let e = checked()
            .read(&Value::Int(1_700_000_000_000_000))
            .unwrap_err();
        assert!(e.contains("looks like microseconds"), "{e}");
        let ms_as_s = StampFormat {
            unit: EpochUnit::S,
            ..checked()
        };
        let e = ms_as_s.read(&Value::Int(1_700_000_000_000)).unwrap_err();
        assert!(
            e.contains("looks like milliseconds: set `event_time.unit: ms`"),
            "{e}"
        );
        // Fits no unit.
        let e = checked().read(&Value::Int(5)).unwrap_err();
        assert!(
            e.contains("outside the plausible years 2000..2100 (set"),
            "{e}"
        );
        // Without the check anything in range is taken.
        assert_eq!(StampFormat::default().read(&Value::Int(5)), Ok(5));
    }

    #[test]
    fn plausible_years() {
        let p = Plausible::parse("2020..2030").unwrap();
        assert!(p.holds(utc("2020-01-01T00:00:00Z")));
        assert!(!p.holds(utc("2019-12-31T23:59:59.999Z")));
        assert!(!p.holds(utc("2030-01-01T00:00:00Z")));
        for bad in ["2030..2020", "2000", "x..2100", "0..10", ""] {
            assert!(Plausible::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rfc3339_and_local_times() {
        let f = checked();
        assert_eq!(
            f.read(&Value::Str("2026-12-01T21:00:00+01:00".into())),
            Ok(utc("2026-12-01T20:00:00Z"))
        );
        // Tasmota: no offset and no zone set.
        let e = f
            .read(&Value::Str("2026-12-01T21:00:00".into()))
            .unwrap_err();
        assert!(
            e.contains("has no UTC offset: set `event_time.timezone`"),
            "{e}"
        );
        let berlin = StampFormat {
            zone: Some(Zone::named("Europe/Berlin").unwrap()),
            ..checked()
        };
        assert_eq!(
            berlin.read(&Value::Str("2026-12-01T21:00:00".into())),
            Ok(utc("2026-12-01T20:00:00Z"))
        );
        assert_eq!(
            berlin.read(&Value::Str("2026-07-01 21:00:00".into())),
            Ok(utc("2026-07-01T19:00:00Z"))
        );
        // An offset wins over the zone.
        assert_eq!(
            berlin.read(&Value::Str("2026-07-01T21:00:00Z".into())),
            Ok(utc("2026-07-01T21:00:00Z"))
        );
        let e = berlin.read(&Value::Str("yesterday".into())).unwrap_err();
        assert!(e.contains("set `event_time.format`"), "{e}");
    }

    #[test]
    fn daylight_saving_gaps_move_forward_and_repeats_take_the_first() {
        let f = StampFormat {
            layout: Some("%d.%m.%Y %H:%M:%S".into()),
            zone: Some(Zone::named("Europe/Berlin").unwrap()),
            ..checked()
        };
        let read = |s: &str| f.read(&Value::Str(s.into()));
        // 29 March 2026: clocks go from 02:00 CET to 03:00 CEST.
        assert_eq!(read("29.03.2026 01:59:59"), Ok(utc("2026-03-29T00:59:59Z")));
        assert_eq!(read("29.03.2026 02:30:00"), Ok(utc("2026-03-29T01:30:00Z")));
        assert_eq!(read("29.03.2026 03:00:00"), Ok(utc("2026-03-29T01:00:00Z")));
        // 25 October 2026: 02:00-03:00 happens twice; the first (CEST) counts.
        assert_eq!(read("25.10.2026 02:30:00"), Ok(utc("2026-10-25T00:30:00Z")));
        assert_eq!(read("25.10.2026 03:30:00"), Ok(utc("2026-10-25T02:30:00Z")));
        let e = read("2026-10-25 02:30:00").unwrap_err();
        assert!(e.contains("does not match the format"), "{e}");
    }

    #[test]
    fn formats_with_an_offset_or_epoch_need_no_zone() {
        let f = StampFormat {
            layout: Some("%Y/%m/%d %H:%M:%S %z".into()),
            ..checked()
        };
        assert_eq!(
            f.read(&Value::Str("2026/12/01 21:00:00 +0100".into())),
            Ok(utc("2026-12-01T20:00:00Z"))
        );
        let f = StampFormat {
            layout: Some("%d/%m/%Y".into()),
            zone: Some(Zone::named("UTC").unwrap()),
            ..checked()
        };
        assert_eq!(
            f.read(&Value::Str("01/12/2026".into())),
            Ok(utc("2026-12-01T00:00:00Z"))
        );
    }

    #[test]
    fn layouts_and_zones_are_checked() {
        assert!(StampFormat::check_layout("%d.%m.%Y %H:%M:%S").is_ok());
        assert!(StampFormat::check_layout("%Y-%m-%dT%H:%M:%S%z").is_ok());
        assert!(StampFormat::check_layout("%H:%M")
            .unwrap_err()
            .contains("year, month and day"));
        assert!(StampFormat::check_layout("%Y-%m-%d %!").is_err());
        assert!(Zone::named("Europe/Berlin").is_ok());
        assert!(Zone::named("Mars/Olympus")
            .unwrap_err()
            .contains("unknown time zone `Mars/Olympus`"));
    }
}
