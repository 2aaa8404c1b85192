//! Accumulators of the aggregate functions.
//!
//! Every function but `count()` ignores `null` inputs; a function that saw
//! no non-null input yields `null` (SQL's rule). `first`/`last` pick the
//! value with the smallest/largest event timestamp, ties broken by arrival
//! order, so they are deterministic and merge correctly for sessions.

use super::sketch::{Distinct, Moments, Quantile};
use crate::value::Value;

/// An aggregate function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AggFunc {
    /// `count()`: events in the window.
    Count,
    /// `count(e)`: events where `e` is not null.
    CountOf,
    Sum,
    Avg,
    Min,
    Max,
    First,
    Last,
    /// `variance(e)` (of the sample) and `variance_pop(e)`.
    Variance {
        sample: bool,
    },
    /// `stddev(e)` (of the sample) and `stddev_pop(e)`.
    Stddev {
        sample: bool,
    },
    /// `median(e)` and `percentile(e, p)`: the quantile in millionths.
    Percentile(u32),
    /// `count_distinct(e)`.
    CountDistinct,
}

impl AggFunc {
    pub const NAMES: &'static [&'static str] = &[
        "count",
        "sum",
        "avg",
        "min",
        "max",
        "first",
        "last",
        "variance",
        "variance_pop",
        "stddev",
        "stddev_pop",
        "median",
        "percentile",
        "count_distinct",
    ];

    /// The function of a call with one argument (`has_arg`) or none;
    /// `percentile`, which takes two, is read by the caller.
    pub fn from_name(name: &str, has_arg: bool) -> Option<AggFunc> {
        Some(match (name, has_arg) {
            ("count", false) => AggFunc::Count,
            ("count", true) => AggFunc::CountOf,
            ("sum", true) => AggFunc::Sum,
            ("avg", true) => AggFunc::Avg,
            ("min", true) => AggFunc::Min,
            ("max", true) => AggFunc::Max,
            ("first", true) => AggFunc::First,
            ("last", true) => AggFunc::Last,
            ("variance", true) => AggFunc::Variance { sample: true },
            ("variance_pop", true) => AggFunc::Variance { sample: false },
            ("stddev", true) => AggFunc::Stddev { sample: true },
            ("stddev_pop", true) => AggFunc::Stddev { sample: false },
            ("median", true) => AggFunc::Percentile(500_000),
            ("count_distinct", true) => AggFunc::CountDistinct,
            _ => return None,
        })
    }

    /// The function's name as written.
    pub fn name(self) -> &'static str {
        match self {
            AggFunc::Count | AggFunc::CountOf => "count",
            AggFunc::Sum => "sum",
            AggFunc::Avg => "avg",
            AggFunc::Min => "min",
            AggFunc::Max => "max",
            AggFunc::First => "first",
            AggFunc::Last => "last",
            AggFunc::Variance { sample: true } => "variance",
            AggFunc::Variance { sample: false } => "variance_pop",
            AggFunc::Stddev { sample: true } => "stddev",
            AggFunc::Stddev { sample: false } => "stddev_pop",
            AggFunc::Percentile(500_000) => "median",
            AggFunc::Percentile(_) => "percentile",
            AggFunc::CountDistinct => "count_distinct",
        }
    }

    /// Whether the function needs numbers (checked per event in the parse
    /// stage; a string there sends the event to the dead-letter output).
    pub fn numeric(self) -> bool {
        matches!(
            self,
            AggFunc::Sum
                | AggFunc::Avg
                | AggFunc::Min
                | AggFunc::Max
                | AggFunc::Variance { .. }
                | AggFunc::Stddev { .. }
                | AggFunc::Percentile(_)
        )
    }

    pub fn has_arg(self) -> bool {
        self != AggFunc::Count
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Acc {
    Count(i64),
    /// Integer sum while every input is an integer and it fits; float after.
    Sum {
        int: i64,
        float: f64,
        is_float: bool,
        any: bool,
    },
    Avg {
        sum: f64,
        n: i64,
    },
    Min(Value),
    Max(Value),
    /// (event time, arrival sequence, value); boxed so that every
    /// accumulator stays small (postcard writes a box as its content, so
    /// saved state is the same as unboxed).
    First(Option<Box<(i64, u64, Value)>>),
    Last(Option<Box<(i64, u64, Value)>>),
    // New variants go last: saved state names variants by position.
    /// `variance*` and `stddev*`: the moments, which of the two, and
    /// whether of the sample.
    Spread {
        m: Box<Moments>,
        root: bool,
        sample: bool,
    },
    Quantile(Box<Quantile>),
    Distinct(Box<Distinct>),
}

/// A value's hash for `count_distinct`: equal values hash equal (a float
/// that is a whole number counts as that integer, as in JSON).
fn distinct_hash(v: &Value) -> u64 {
    use xxhash_rust::xxh3::xxh3_64_with_seed;
    match v {
        Value::Null => 0,
        Value::Bool(b) => xxh3_64_with_seed(&[*b as u8], 1),
        Value::Int(i) => xxh3_64_with_seed(&i.to_le_bytes(), 2),
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
            xxh3_64_with_seed(&(*f as i64).to_le_bytes(), 2)
        }
        Value::Float(f) => xxh3_64_with_seed(&f.to_bits().to_le_bytes(), 3),
        Value::Str(s) => xxh3_64_with_seed(s.as_bytes(), 4),
    }
}

impl Acc {
    pub fn new(f: AggFunc) -> Acc {
        match f {
            AggFunc::Count | AggFunc::CountOf => Acc::Count(0),
            AggFunc::Sum => Acc::Sum {
                int: 0,
                float: 0.0,
                is_float: false,
                any: false,
            },
            AggFunc::Avg => Acc::Avg { sum: 0.0, n: 0 },
            AggFunc::Min => Acc::Min(Value::Null),
            AggFunc::Max => Acc::Max(Value::Null),
            AggFunc::First => Acc::First(None),
            AggFunc::Last => Acc::Last(None),
            AggFunc::Variance { sample } => Acc::Spread {
                m: Box::default(),
                root: false,
                sample,
            },
            AggFunc::Stddev { sample } => Acc::Spread {
                m: Box::default(),
                root: true,
                sample,
            },
            AggFunc::Percentile(millionths) => {
                Acc::Quantile(Box::new(Quantile::new(millionths as f64 / 1e6)))
            }
            AggFunc::CountDistinct => Acc::Distinct(Box::default()),
        }
    }

    /// Adds one input. `v` is `Value::Bool(true)` for `count()`.
    pub fn add(&mut self, v: &Value, ts: i64, seq: u64) {
        if v.is_null() {
            return;
        }
        match self {
            Acc::Count(n) => *n += 1,
            Acc::Sum {
                int,
                float,
                is_float,
                any,
            } => {
                *any = true;
                match v {
                    Value::Int(i) if !*is_float => match int.checked_add(*i) {
                        Some(s) => *int = s,
                        None => {
                            *is_float = true;
                            *float = *int as f64 + *i as f64;
                        }
                    },
                    _ => {
                        if !*is_float {
                            *is_float = true;
                            *float = *int as f64;
                        }
                        *float += v.as_f64().unwrap_or(0.0);
                    }
                }
            }
            Acc::Avg { sum, n } => {
                *sum += v.as_f64().unwrap_or(0.0);
                *n += 1;
            }
            Acc::Min(m) => {
                if m.is_null() || v.as_f64() < m.as_f64() {
                    *m = v.clone();
                }
            }
            Acc::Max(m) => {
                if m.is_null() || v.as_f64() > m.as_f64() {
                    *m = v.clone();
                }
            }
            Acc::First(cur) => match cur {
                Some(c) if (ts, seq) < (c.0, c.1) => **c = (ts, seq, v.clone()),
                Some(_) => {}
                None => *cur = Some(Box::new((ts, seq, v.clone()))),
            },
            Acc::Last(cur) => match cur {
                Some(c) if (ts, seq) > (c.0, c.1) => **c = (ts, seq, v.clone()),
                Some(_) => {}
                None => *cur = Some(Box::new((ts, seq, v.clone()))),
            },
            Acc::Spread { m, .. } => {
                if let Some(x) = v.as_f64().filter(|x| x.is_finite()) {
                    m.add(x)
                }
            }
            Acc::Quantile(q) => {
                if let Some(x) = v.as_f64() {
                    q.add(x)
                }
            }
            Acc::Distinct(d) => d.add_hash(distinct_hash(v)),
        }
    }

    /// Folds `other` (of the same function) into `self` (session merges).
    pub fn merge(&mut self, other: &Acc) {
        match (self, other) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (
                Acc::Sum {
                    int,
                    float,
                    is_float,
                    any,
                },
                Acc::Sum {
                    int: i2,
                    float: f2,
                    is_float: fl2,
                    any: a2,
                },
            ) => {
                *any |= *a2;
                let ints = !*is_float && !*fl2;
                match int.checked_add(*i2) {
                    Some(s) if ints => *int = s,
                    _ => {
                        let a = if *is_float { *float } else { *int as f64 };
                        let b = if *fl2 { *f2 } else { *i2 as f64 };
                        *is_float = true;
                        *float = a + b;
                    }
                }
            }
            (Acc::Avg { sum, n }, Acc::Avg { sum: s2, n: n2 }) => {
                *sum += s2;
                *n += n2;
            }
            (acc @ (Acc::Min(_) | Acc::Max(_)), Acc::Min(v) | Acc::Max(v)) => acc.add(v, 0, 0),
            (acc @ (Acc::First(_) | Acc::Last(_)), Acc::First(Some(o)) | Acc::Last(Some(o))) => {
                acc.add(&o.2, o.0, o.1)
            }
            (Acc::Spread { m, .. }, Acc::Spread { m: o, .. }) => m.merge(o),
            (Acc::Quantile(q), Acc::Quantile(o)) => q.merge(o),
            (Acc::Distinct(d), Acc::Distinct(o)) => d.merge(o),
            _ => {}
        }
    }

    pub fn result(&self) -> Value {
        match self {
            Acc::Count(n) => Value::Int(*n),
            Acc::Sum { any: false, .. } => Value::Null,
            Acc::Sum {
                int,
                float,
                is_float,
                ..
            } => {
                if *is_float {
                    Value::Float(*float)
                } else {
                    Value::Int(*int)
                }
            }
            Acc::Avg { n: 0, .. } => Value::Null,
            Acc::Avg { sum, n } => Value::Float(*sum / *n as f64),
            Acc::Min(v) | Acc::Max(v) => v.clone(),
            Acc::First(v) | Acc::Last(v) => v.as_ref().map(|x| x.2.clone()).unwrap_or(Value::Null),
            Acc::Spread { m, root, sample } => match m.variance(*sample) {
                Some(var) if *root => Value::Float(var.sqrt()),
                Some(var) => Value::Float(var),
                None => Value::Null,
            },
            Acc::Quantile(q) => q.result().map(Value::Float).unwrap_or(Value::Null),
            Acc::Distinct(d) => Value::Int(d.result() as i64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(f: AggFunc, vals: &[(Value, i64)]) -> Value {
        let mut a = Acc::new(f);
        for (i, (v, ts)) in vals.iter().enumerate() {
            a.add(v, *ts, i as u64);
        }
        a.result()
    }

    #[test]
    fn functions_and_nulls() {
        let v = [
            (Value::Int(3), 10),
            (Value::Null, 5),
            (Value::Float(1.5), 2),
            (Value::Int(7), 10),
        ];
        assert_eq!(
            run(AggFunc::Count, &vec![(Value::Bool(true), 0); 3]),
            Value::Int(3)
        );
        assert_eq!(run(AggFunc::CountOf, &v), Value::Int(3));
        assert_eq!(run(AggFunc::Sum, &v), Value::Float(11.5));
        assert_eq!(run(AggFunc::Sum, &v[..1]), Value::Int(3));
        assert_eq!(run(AggFunc::Sum, &v[1..2]), Value::Null);
        assert_eq!(run(AggFunc::Avg, &v), Value::Float(11.5 / 3.0));
        assert_eq!(run(AggFunc::Min, &v), Value::Float(1.5));
        assert_eq!(run(AggFunc::Max, &v), Value::Int(7));
        assert_eq!(run(AggFunc::First, &v), Value::Float(1.5));
        // Same timestamp 10: the later arrival wins for last.
        assert_eq!(run(AggFunc::Last, &v), Value::Int(7));
        assert_eq!(
            run(
                AggFunc::Sum,
                &[(Value::Int(i64::MAX), 0), (Value::Int(1), 0)]
            ),
            Value::Float(i64::MAX as f64 + 1.0)
        );
    }

    #[test]
    fn merge_equals_sequential() {
        let vals: Vec<(Value, i64)> = (0..10)
            .map(|i| {
                (
                    if i % 3 == 0 {
                        Value::Float(i as f64 / 2.0)
                    } else {
                        Value::Int(i)
                    },
                    10 - i,
                )
            })
            .collect();
        for f in [
            AggFunc::Count,
            AggFunc::Sum,
            AggFunc::Avg,
            AggFunc::Min,
            AggFunc::Max,
            AggFunc::First,
            AggFunc::Last,
            AggFunc::Percentile(500_000),
            AggFunc::Percentile(900_000),
            AggFunc::CountDistinct,
        ] {
            let whole = run(f, &vals);
            let mut a = Acc::new(f);
            let mut b = Acc::new(f);
            for (i, (v, ts)) in vals.iter().enumerate() {
                if i % 2 == 0 { &mut a } else { &mut b }.add(v, *ts, i as u64);
            }
            b.merge(&a);
            assert_eq!(b.result(), whole, "{f:?}");
        }
    }

    #[test]
    fn statistical_functions_skip_nulls_and_survive_a_checkpoint() {
        let v = [
            (Value::Int(2), 0),
            (Value::Null, 0),
            (Value::Float(4.0), 0),
            (Value::Int(4), 0),
            (Value::Int(5), 0),
            (Value::Float(7.5), 0),
        ];
        let f = |name| AggFunc::from_name(name, true).unwrap();
        // Mean 4.5; squared deviations 6.25 + 0.25 + 0.25 + 0.25 + 9 = 16.
        assert_eq!(run(f("variance_pop"), &v), Value::Float(16.0 / 5.0));
        assert_eq!(run(f("variance"), &v), Value::Float(4.0));
        assert_eq!(run(f("stddev"), &v), Value::Float(2.0));
        assert_eq!(run(f("median"), &v), Value::Float(4.0));
        assert_eq!(
            run(AggFunc::Percentile(250_000), &v),
            Value::Float(4.0),
            "rank 1 of 0..4"
        );
        // 4.0 and 4 are one value.
        assert_eq!(run(f("count_distinct"), &v), Value::Int(4));
        assert_eq!(run(f("variance"), &v[..1]), Value::Null);
        assert_eq!(run(f("median"), &v[1..2]), Value::Null);
        assert_eq!(run(f("count_distinct"), &v[1..2]), Value::Int(0));
        for name in ["variance", "stddev_pop", "median", "count_distinct"] {
            let mut a = Acc::new(f(name));
            for (i, (x, ts)) in v.iter().enumerate() {
                a.add(x, *ts, i as u64);
            }
            let saved = postcard::to_allocvec(&a).unwrap();
            let back: Acc = postcard::from_bytes(&saved).unwrap();
            assert_eq!(back, a, "{name}");
            assert_eq!(f(name).name(), name);
        }
    }

    #[test]
    fn saved_accumulators_of_the_first_functions_keep_their_tags() {
        // New functions are added after the old ones, so that state written
        // before them still reads.
        let tag = |a: &Acc| postcard::to_allocvec(a).unwrap()[0];
        assert_eq!(tag(&Acc::new(AggFunc::Count)), 0);
        assert_eq!(tag(&Acc::new(AggFunc::Last)), 6);
        assert_eq!(tag(&Acc::new(AggFunc::CountDistinct)), 9);
    }
}
