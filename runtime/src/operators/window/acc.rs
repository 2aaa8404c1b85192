//! Accumulators of the aggregate functions.
//!
//! Every function but `count()` ignores `null` inputs; a function that saw
//! no non-null input yields `null` (SQL's rule). `first`/`last` pick the
//! value with the smallest/largest event timestamp, ties broken by arrival
//! order, so they are deterministic and merge correctly for sessions.

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
}

impl AggFunc {
    pub const NAMES: &'static [&'static str] =
        &["count", "sum", "avg", "min", "max", "first", "last"];

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
            _ => return None,
        })
    }

    /// Whether the function needs numbers (checked per event in the parse
    /// stage; a string there sends the event to the dead-letter output).
    pub fn numeric(self) -> bool {
        matches!(
            self,
            AggFunc::Sum | AggFunc::Avg | AggFunc::Min | AggFunc::Max
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
}
