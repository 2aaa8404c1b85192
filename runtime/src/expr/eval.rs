//! Evaluation of compiled expressions over a record's slots.

use super::{Ast, BinOp, UnOp};
use crate::value::Value;
use compact_str::{format_compact, CompactString};
use std::cmp::Ordering;

/// An expression bound to slots, ready to evaluate.
#[derive(Clone, Debug)]
pub enum Expr {
    Const(Value),
    Slot(usize),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Func {
    Abs,
    Round,
    Floor,
    Ceil,
    Sqrt,
    Min,
    Max,
    Lower,
    Upper,
    Len,
    Concat,
    Replace,
    StartsWith,
    EndsWith,
    Contains,
    Substr,
    Trim,
    SplitPart,
    Coalesce,
    If,
    Number,
    String,
}

impl Expr {
    pub(super) fn compile(ast: &Ast, slot: &mut dyn FnMut(&str) -> usize) -> Expr {
        match ast {
            Ast::Const(v) => Expr::Const(v.clone()),
            Ast::Field(f) => Expr::Slot(slot(f)),
            Ast::Unary(op, a) => Expr::Unary(*op, Box::new(Expr::compile(a, slot))),
            Ast::Binary(op, a, b) => Expr::Binary(
                *op,
                Box::new(Expr::compile(a, slot)),
                Box::new(Expr::compile(b, slot)),
            ),
            Ast::Call(name, args) => {
                let f = match name.as_str() {
                    "abs" => Func::Abs,
                    "round" => Func::Round,
                    "floor" => Func::Floor,
                    "ceil" => Func::Ceil,
                    "sqrt" => Func::Sqrt,
                    "min" => Func::Min,
                    "max" => Func::Max,
                    "lower" => Func::Lower,
                    "upper" => Func::Upper,
                    "len" => Func::Len,
                    "concat" => Func::Concat,
                    "replace" => Func::Replace,
                    "starts_with" => Func::StartsWith,
                    "ends_with" => Func::EndsWith,
                    "contains" => Func::Contains,
                    "substr" => Func::Substr,
                    "trim" => Func::Trim,
                    "split_part" => Func::SplitPart,
                    "if" => Func::If,
                    "number" => Func::Number,
                    "string" => Func::String,
                    // Validation rejects unknown names before compiling;
                    // `coalesce` is the only one left.
                    _ => Func::Coalesce,
                };
                Expr::Call(f, args.iter().map(|a| Expr::compile(a, slot)).collect())
            }
        }
    }

    /// Evaluates over `slots`. An `Err` is the reason an event is dead-lettered.
    pub fn eval(&self, slots: &[Value]) -> Result<Value, String> {
        match self {
            Expr::Const(v) => Ok(v.clone()),
            Expr::Slot(i) => Ok(slots.get(*i).cloned().unwrap_or(Value::Null)),
            Expr::Unary(op, a) => unary(*op, a.eval(slots)?),
            Expr::Binary(op, a, b) => match op {
                BinOp::And | BinOp::Or => logic(*op, a, b, slots),
                BinOp::Coalesce => {
                    let l = a.eval(slots)?;
                    if l.is_null() {
                        b.eval(slots)
                    } else {
                        Ok(l)
                    }
                }
                _ => binary(*op, a.eval(slots)?, b.eval(slots)?),
            },
            Expr::Call(f, args) => call(*f, args, slots),
        }
    }

    /// Evaluates a condition: `Ok(true)` only for boolean `true`.
    pub fn eval_bool(&self, slots: &[Value]) -> Result<bool, String> {
        match self.eval(slots)? {
            Value::Bool(b) => Ok(b),
            Value::Null => Ok(false),
            other => Err(format!(
                "condition gave a {} ({other}), not a boolean",
                other.type_name()
            )),
        }
    }
}

fn unary(op: UnOp, v: Value) -> Result<Value, String> {
    match (op, v) {
        (_, Value::Null) => Ok(Value::Null),
        (UnOp::Neg, Value::Int(i)) => Ok(i
            .checked_neg()
            .map(Value::Int)
            .unwrap_or(Value::Float(-(i as f64)))),
        (UnOp::Neg, Value::Float(f)) => Ok(Value::Float(-f)),
        (UnOp::Not, Value::Bool(b)) => Ok(Value::Bool(!b)),
        (UnOp::Neg, v) => Err(format!("cannot negate a {}", v.type_name())),
        (UnOp::Not, v) => Err(format!("`!` needs a boolean, got a {}", v.type_name())),
    }
}

fn logic(op: BinOp, a: &Expr, b: &Expr, slots: &[Value]) -> Result<Value, String> {
    let as_bool = |v: Value| match v {
        Value::Bool(b) => Ok(Some(b)),
        Value::Null => Ok(None),
        other => Err(format!(
            "`{}` needs booleans, got a {}",
            if op == BinOp::And { "&&" } else { "||" },
            other.type_name()
        )),
    };
    let l = as_bool(a.eval(slots)?)?;
    // Short-circuit exactly where three-valued logic allows it.
    match (op, l) {
        (BinOp::And, Some(false)) => return Ok(Value::Bool(false)),
        (BinOp::Or, Some(true)) => return Ok(Value::Bool(true)),
        _ => {}
    }
    let r = as_bool(b.eval(slots)?)?;
    Ok(match (op, l, r) {
        (BinOp::And, _, Some(false)) => Value::Bool(false),
        (BinOp::And, Some(true), Some(true)) => Value::Bool(true),
        (BinOp::Or, _, Some(true)) => Value::Bool(true),
        (BinOp::Or, Some(false), Some(false)) => Value::Bool(false),
        _ => Value::Null,
    })
}

fn op_str(op: BinOp) -> &'static str {
    match op {
        BinOp::Coalesce => "??",
        BinOp::Or => "||",
        BinOp::And => "&&",
        BinOp::Eq => "==",
        BinOp::Ne => "!=",
        BinOp::Lt => "<",
        BinOp::Le => "<=",
        BinOp::Gt => ">",
        BinOp::Ge => ">=",
        BinOp::Add => "+",
        BinOp::Sub => "-",
        BinOp::Mul => "*",
        BinOp::Div => "/",
        BinOp::Rem => "%",
    }
}

/// Compares two values of the same kind; `None` for kinds without an order.
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => Some(x.cmp(y)),
        (Value::Str(x), Value::Str(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

fn binary(op: BinOp, a: Value, b: Value) -> Result<Value, String> {
    match op {
        BinOp::Eq => return Ok(Value::Bool(equal(&a, &b))),
        BinOp::Ne => return Ok(Value::Bool(!equal(&a, &b))),
        _ => {}
    }
    if a.is_null() || b.is_null() {
        return Ok(Value::Null);
    }
    let mismatch = || {
        Err(format!(
            "cannot apply `{}` to a {} and a {}",
            op_str(op),
            a.type_name(),
            b.type_name()
        ))
    };
    match op {
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            let Some(ord) = compare(&a, &b) else {
                return mismatch();
            };
            Ok(Value::Bool(match op {
                BinOp::Lt => ord.is_lt(),
                BinOp::Le => ord.is_le(),
                BinOp::Gt => ord.is_gt(),
                _ => ord.is_ge(),
            }))
        }
        BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Rem => {
            if let (Value::Int(x), Value::Int(y)) = (&a, &b) {
                let r = match op {
                    BinOp::Add => x.checked_add(*y),
                    BinOp::Sub => x.checked_sub(*y),
                    BinOp::Mul => x.checked_mul(*y),
                    _ if *y == 0 => return Ok(Value::Null),
                    _ => x.checked_rem(*y),
                };
                if let Some(r) = r {
                    return Ok(Value::Int(r));
                }
            }
            if let (Value::Str(x), Value::Str(y), BinOp::Add) = (&a, &b, op) {
                let mut s = CompactString::with_capacity(x.len() + y.len());
                s.push_str(x);
                s.push_str(y);
                return Ok(Value::Str(s));
            }
            let (Some(x), Some(y)) = (a.as_f64(), b.as_f64()) else {
                return mismatch();
            };
            Ok(match op {
                BinOp::Add => Value::Float(x + y),
                BinOp::Sub => Value::Float(x - y),
                BinOp::Mul => Value::Float(x * y),
                _ if y == 0.0 => Value::Null,
                _ => Value::Float(x % y),
            })
        }
        BinOp::Div => {
            let (Some(x), Some(y)) = (a.as_f64(), b.as_f64()) else {
                return mismatch();
            };
            Ok(if y == 0.0 {
                Value::Null
            } else {
                Value::Float(x / y)
            })
        }
        // Handled above.
        BinOp::Eq | BinOp::Ne | BinOp::And | BinOp::Or | BinOp::Coalesce => Ok(Value::Null),
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(_) | Value::Float(_), Value::Int(_) | Value::Float(_)) => {
            compare(a, b) == Some(Ordering::Equal)
        }
        _ => a == b,
    }
}

fn num_fn(name: &str, v: Value, f: impl Fn(f64) -> f64) -> Result<Value, String> {
    match v {
        Value::Null => Ok(Value::Null),
        Value::Int(i) if name != "sqrt" => Ok(Value::Int(if name == "abs" {
            i.saturating_abs()
        } else {
            i
        })),
        v => match v.as_f64() {
            Some(x) => Ok(Value::Float(f(x))),
            None => Err(format!("`{name}` needs a number, got a {}", v.type_name())),
        },
    }
}

fn str_fn(name: &str, v: Value, f: impl Fn(&str) -> Value) -> Result<Value, String> {
    match v {
        Value::Null => Ok(Value::Null),
        Value::Str(s) => Ok(f(&s)),
        v => Err(format!("`{name}` needs a string, got a {}", v.type_name())),
    }
}

fn to_text(v: &Value) -> CompactString {
    match v {
        Value::Str(s) => s.clone(),
        Value::Null => CompactString::const_new(""),
        other => format_compact!("{other}"),
    }
}

/// Characters `start..start + len` of `s` (a negative start counts from
/// the end; no `len`: to the end), clamped to the string.
fn substr(s: &str, start: i64, len: Option<i64>) -> &str {
    let count = s.chars().count() as i64;
    let from = if start < 0 { count + start } else { start }.clamp(0, count);
    let to = match len {
        Some(l) => from.saturating_add(l.max(0)).min(count),
        None => count,
    };
    let byte = |c: i64| {
        s.char_indices()
            .nth(c as usize)
            .map(|(b, _)| b)
            .unwrap_or(s.len())
    };
    &s[byte(from)..byte(to)]
}

fn call(f: Func, args: &[Expr], slots: &[Value]) -> Result<Value, String> {
    let arg = |i: usize| -> Result<Value, String> {
        args.get(i)
            .map(|a| a.eval(slots))
            .unwrap_or(Ok(Value::Null))
    };
    match f {
        Func::Abs => num_fn("abs", arg(0)?, f64::abs),
        Func::Round => num_fn("round", arg(0)?, f64::round),
        Func::Floor => num_fn("floor", arg(0)?, f64::floor),
        Func::Ceil => num_fn("ceil", arg(0)?, f64::ceil),
        Func::Sqrt => num_fn("sqrt", arg(0)?, f64::sqrt),
        Func::Lower => str_fn("lower", arg(0)?, |s| Value::Str(s.to_lowercase().into())),
        Func::Upper => str_fn("upper", arg(0)?, |s| Value::Str(s.to_uppercase().into())),
        Func::Len => str_fn("len", arg(0)?, |s| Value::Int(s.chars().count() as i64)),
        Func::Min | Func::Max => {
            let mut best = Value::Null;
            for a in args {
                let v = a.eval(slots)?;
                if v.is_null() {
                    return Ok(Value::Null);
                }
                if v.as_f64().is_none() {
                    return Err(format!(
                        "`{}` needs numbers, got a {}",
                        if f == Func::Min { "min" } else { "max" },
                        v.type_name()
                    ));
                }
                let better = match compare(&v, &best) {
                    _ if best.is_null() => true,
                    Some(Ordering::Less) => f == Func::Min,
                    Some(Ordering::Greater) => f == Func::Max,
                    _ => false,
                };
                if better {
                    best = v;
                }
            }
            Ok(best)
        }
        Func::Concat => {
            let mut s = CompactString::default();
            for a in args {
                s.push_str(&to_text(&a.eval(slots)?));
            }
            Ok(Value::Str(s))
        }
        Func::Replace => match (arg(0)?, arg(1)?, arg(2)?) {
            (Value::Null, _, _) => Ok(Value::Null),
            (Value::Str(s), Value::Str(from), to) if !from.is_empty() => {
                Ok(Value::Str(s.replace(from.as_str(), &to_text(&to)).into()))
            }
            (Value::Str(s), Value::Str(_), _) => Ok(Value::Str(s)),
            (s, from, _) => Err(format!(
                "`replace` needs strings, got a {} and a {}",
                s.type_name(),
                from.type_name()
            )),
        },
        Func::StartsWith | Func::EndsWith | Func::Contains => {
            let name = match f {
                Func::StartsWith => "starts_with",
                Func::EndsWith => "ends_with",
                _ => "contains",
            };
            match (arg(0)?, arg(1)?) {
                (Value::Null, _) | (_, Value::Null) => Ok(Value::Null),
                (Value::Str(s), Value::Str(p)) => Ok(Value::Bool(match f {
                    Func::StartsWith => s.starts_with(p.as_str()),
                    Func::EndsWith => s.ends_with(p.as_str()),
                    _ => s.contains(p.as_str()),
                })),
                (a, b) => Err(format!(
                    "`{name}` needs strings, got a {} and a {}",
                    a.type_name(),
                    b.type_name()
                )),
            }
        }
        Func::Substr => {
            let s = match arg(0)? {
                Value::Null => return Ok(Value::Null),
                Value::Str(s) => s,
                v => return Err(format!("`substr` needs a string, got a {}", v.type_name())),
            };
            let index = |v: Value, what: &str| match v {
                Value::Int(i) => Ok(Some(i)),
                Value::Null => Ok(None),
                v => Err(format!(
                    "`substr` needs a whole number as its {what}, got a {}",
                    v.type_name()
                )),
            };
            let (Some(start), len) = (index(arg(1)?, "start")?, index(arg(2)?, "length")?) else {
                return Ok(Value::Null);
            };
            Ok(Value::Str(substr(&s, start, len).into()))
        }
        Func::Trim => str_fn("trim", arg(0)?, |s| Value::Str(s.trim().into())),
        Func::SplitPart => match (arg(0)?, arg(1)?, arg(2)?) {
            (Value::Null, _, _) | (_, _, Value::Null) => Ok(Value::Null),
            (Value::Str(s), Value::Str(sep), Value::Int(n)) if !sep.is_empty() => {
                let parts: Vec<&str> = s.split(sep.as_str()).collect();
                let i = if n < 0 { parts.len() as i64 + n } else { n };
                Ok(usize::try_from(i)
                    .ok()
                    .and_then(|i| parts.get(i))
                    .map(|p| Value::Str((*p).into()))
                    .unwrap_or(Value::Null))
            }
            (s, sep, n) => Err(format!(
                "`split_part` needs a string, a non-empty separator and a whole number, got a {}, a {} and a {}",
                s.type_name(),
                sep.type_name(),
                n.type_name()
            )),
        },
        Func::Coalesce => {
            for a in args {
                let v = a.eval(slots)?;
                if !v.is_null() {
                    return Ok(v);
                }
            }
            Ok(Value::Null)
        }
        Func::If => match arg(0)? {
            Value::Bool(true) => arg(1),
            Value::Bool(false) | Value::Null => arg(2),
            other => Err(format!(
                "`if` needs a boolean condition, got a {}",
                other.type_name()
            )),
        },
        Func::Number => match arg(0)? {
            Value::Str(s) => {
                let t = s.trim();
                Ok(t.parse::<i64>()
                    .map(Value::Int)
                    .or_else(|_| t.parse::<f64>().map(Value::Float))
                    .unwrap_or(Value::Null))
            }
            Value::Bool(b) => Ok(Value::Int(b as i64)),
            v => Ok(v),
        },
        Func::String => match arg(0)? {
            Value::Null => Ok(Value::Null),
            v => Ok(Value::Str(to_text(&v))),
        },
    }
}

#[cfg(test)]
mod tests {
    use crate::expr::parse;
    use crate::value::Value;

    fn eval(src: &str, fields: &[(&str, Value)]) -> Result<Value, String> {
        let ast = parse(src).expect("parses");
        let names: Vec<&str> = fields.iter().map(|f| f.0).collect();
        let slots: Vec<Value> = fields.iter().map(|f| f.1.clone()).collect();
        let e = ast.compile(&mut |f| names.iter().position(|n| *n == f).unwrap_or(usize::MAX));
        e.eval(&slots)
    }

    #[test]
    fn string_functions_for_topics() {
        let t = [("topic", Value::Str("local/kitchen/temp".into()))];
        let s = |v: &str| Ok(Value::Str(v.into()));
        assert_eq!(
            eval("concat('remote/', substr(topic, len('local/')))", &t),
            s("remote/kitchen/temp")
        );
        assert_eq!(
            eval("replace(topic, 'local/', 'remote/')", &t),
            s("remote/kitchen/temp")
        );
        assert_eq!(eval("replace(topic, '', 'x')", &t), s("local/kitchen/temp"));
        assert_eq!(
            eval("starts_with(topic, 'local/')", &t),
            Ok(Value::Bool(true))
        );
        assert_eq!(eval("ends_with(topic, '/hum')", &t), Ok(Value::Bool(false)));
        assert_eq!(
            eval("contains(topic, 'kitchen')", &t),
            Ok(Value::Bool(true))
        );
        assert_eq!(eval("substr(topic, -4)", &t), s("temp"));
        assert_eq!(eval("substr(topic, 6, 7)", &t), s("kitchen"));
        assert_eq!(eval("substr(topic, 100)", &t), s(""));
        assert_eq!(eval("substr('äöü', 1, 1)", &[]), s("ö"));
        assert_eq!(eval("split_part(topic, '/', 1)", &t), s("kitchen"));
        assert_eq!(eval("split_part(topic, '/', -1)", &t), s("temp"));
        assert_eq!(eval("split_part(topic, '/', 9)", &t), Ok(Value::Null));
        assert_eq!(eval("trim('  a ')", &[]), s("a"));
        assert_eq!(eval("starts_with(missing, 'a')", &t), Ok(Value::Null));
        assert!(eval("replace(1, 'a', 'b')", &[])
            .unwrap_err()
            .contains("`replace` needs strings"));
        assert!(eval("substr(topic, 1.5)", &t)
            .unwrap_err()
            .contains("whole number"));
    }

    #[test]
    fn arithmetic() {
        let t = [("temperature", Value::Int(212))];
        assert_eq!(
            eval("(temperature - 32) * 5 / 9", &t),
            Ok(Value::Float(100.0))
        );
        assert_eq!(eval("7 % 3 + 1", &[]), Ok(Value::Int(2)));
        assert_eq!(eval("1 / 0", &[]), Ok(Value::Null));
        assert_eq!(eval("'a' + 'b'", &[]), Ok(Value::Str("ab".into())));
        assert_eq!(
            eval("9223372036854775807 + 1", &[]),
            Ok(Value::Float(9223372036854775808.0))
        );
        assert!(eval("'a' * 2", &[])
            .unwrap_err()
            .contains("cannot apply `*`"));
    }

    #[test]
    fn null_rule() {
        assert_eq!(eval("missing + 1", &[]), Ok(Value::Null));
        assert_eq!(eval("missing > 1", &[]), Ok(Value::Null));
        assert_eq!(eval("missing == null", &[]), Ok(Value::Bool(true)));
        assert_eq!(eval("1 == 1.0", &[]), Ok(Value::Bool(true)));
        assert_eq!(eval("'1' == 1", &[]), Ok(Value::Bool(false)));
        assert_eq!(eval("null && false", &[]), Ok(Value::Bool(false)));
        assert_eq!(eval("null || true", &[]), Ok(Value::Bool(true)));
        assert_eq!(eval("null && true", &[]), Ok(Value::Null));
        assert_eq!(eval("missing ?? 4", &[]), Ok(Value::Int(4)));
        assert!(eval("1 && true", &[]).is_err());
    }

    #[test]
    fn functions() {
        assert_eq!(eval("abs(-3)", &[]), Ok(Value::Int(3)));
        assert_eq!(eval("round(2.6)", &[]), Ok(Value::Float(3.0)));
        assert_eq!(eval("max(1, 7.5, 3)", &[]), Ok(Value::Float(7.5)));
        assert_eq!(eval("min(4, 2)", &[]), Ok(Value::Int(2)));
        assert_eq!(eval("upper('ab')", &[]), Ok(Value::Str("AB".into())));
        assert_eq!(eval("len('héllo')", &[]), Ok(Value::Int(5)));
        assert_eq!(
            eval("concat('t-', 3, null)", &[]),
            Ok(Value::Str("t-3".into()))
        );
        assert_eq!(eval("if(1 > 2, 'a', 'b')", &[]), Ok(Value::Str("b".into())));
        assert_eq!(eval("number(' 42 ')", &[]), Ok(Value::Int(42)));
        assert_eq!(eval("number('x')", &[]), Ok(Value::Null));
        assert_eq!(eval("coalesce(null, 2)", &[]), Ok(Value::Int(2)));
        assert!(eval("sqrt('x')", &[]).is_err());
    }
}
