//! The expression language of `map`, `filter` and aggregate arguments.
//!
//! Syntax (parsed with `pest`, grammar in `grammar.pest`): numbers, strings
//! in single or double quotes, `true`, `false`, `null`, field paths
//! (`sensor_id`, `loc.room`), `+ - * / %`, comparisons `== != < <= > >=`,
//! `&& || !`, the null-coalescing `??`, parentheses and function calls.
//!
//! The null rule: a missing field reads as `null`; arithmetic, ordering
//! comparisons and functions of `null` give `null`; `==`/`!=` compare `null`
//! like any value; `&&`/`||` follow three-valued logic; a filter keeps an
//! event only when its condition is `true`. A value of the wrong type (a
//! string times a number, say) is an error: the event goes to the dead-letter
//! output with that reason.
//!
//! Parsing yields an [`Ast`] with field names; [`Ast::compile`] binds the
//! names to slots and gives an [`Expr`], whose `eval` walks the tree over a
//! record's slots without allocating (except to build new strings).

mod eval;

pub use eval::Expr;

use pest::iterators::Pairs;
use pest::pratt_parser::{Assoc, Op, PrattParser};
use pest::Parser;
use std::sync::OnceLock;

use crate::value::Value;

#[derive(pest_derive::Parser)]
#[grammar = "expr/grammar.pest"]
struct ExprParser;

/// A parsed expression, before its fields are bound to slots.
#[derive(Clone, Debug, PartialEq)]
pub enum Ast {
    Const(Value),
    Field(String),
    Unary(UnOp, Box<Ast>),
    Binary(BinOp, Box<Ast>, Box<Ast>),
    Call(String, Vec<Ast>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Coalesce,
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

/// A syntax error, with the 1-based column inside the expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub column: usize,
    pub message: String,
}

/// Functions that `map` and `filter` expressions may call, with the
/// fewest and the most arguments they take (`None`: no upper limit).
pub const FUNCTIONS: &[(&str, usize, Option<usize>)] = &[
    ("abs", 1, Some(1)),
    ("round", 1, Some(1)),
    ("floor", 1, Some(1)),
    ("ceil", 1, Some(1)),
    ("sqrt", 1, Some(1)),
    ("min", 1, None),
    ("max", 1, None),
    ("lower", 1, Some(1)),
    ("upper", 1, Some(1)),
    ("len", 1, Some(1)),
    ("concat", 1, None),
    ("coalesce", 1, None),
    ("if", 3, Some(3)),
    ("number", 1, Some(1)),
    ("string", 1, Some(1)),
    ("replace", 3, Some(3)),
    ("starts_with", 2, Some(2)),
    ("ends_with", 2, Some(2)),
    ("contains", 2, Some(2)),
    ("substr", 2, Some(3)),
    ("trim", 1, Some(1)),
    ("split_part", 3, Some(3)),
];

fn pratt() -> &'static PrattParser<Rule> {
    static P: OnceLock<PrattParser<Rule>> = OnceLock::new();
    P.get_or_init(|| {
        PrattParser::new()
            .op(Op::infix(Rule::coalesce, Assoc::Left))
            .op(Op::infix(Rule::or, Assoc::Left))
            .op(Op::infix(Rule::and, Assoc::Left))
            .op(Op::infix(Rule::eq, Assoc::Left) | Op::infix(Rule::ne, Assoc::Left))
            .op(Op::infix(Rule::lt, Assoc::Left)
                | Op::infix(Rule::le, Assoc::Left)
                | Op::infix(Rule::gt, Assoc::Left)
                | Op::infix(Rule::ge, Assoc::Left))
            .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
            .op(Op::infix(Rule::mul, Assoc::Left)
                | Op::infix(Rule::div, Assoc::Left)
                | Op::infix(Rule::rem, Assoc::Left))
            .op(Op::prefix(Rule::neg) | Op::prefix(Rule::not))
    })
}

/// Parses an expression.
pub fn parse(src: &str) -> Result<Ast, ParseError> {
    let mut pairs = ExprParser::parse(Rule::main, src).map_err(|e| {
        let column = match e.line_col {
            pest::error::LineColLocation::Pos((_, c)) => c,
            pest::error::LineColLocation::Span((_, c), _) => c,
        };
        let message = match &e.variant {
            pest::error::ErrorVariant::ParsingError { .. } => {
                "unexpected input; expected a value, an operator or a closing parenthesis"
                    .to_string()
            }
            pest::error::ErrorVariant::CustomError { message } => message.clone(),
        };
        ParseError { column, message }
    })?;
    // The grammar guarantees `main` holds exactly one `expr`.
    let expr = pairs
        .next()
        .and_then(|m| m.into_inner().next())
        .ok_or_else(|| ParseError {
            column: 1,
            message: "empty expression".into(),
        })?;
    build(expr.into_inner())
}

fn build(pairs: Pairs<Rule>) -> Result<Ast, ParseError> {
    pratt()
        .map_primary(|p| -> Result<Ast, ParseError> {
            let col = p.as_span().start_pos().line_col().1;
            match p.as_rule() {
                Rule::number => {
                    let s = p.as_str();
                    if let Ok(i) = s.parse::<i64>() {
                        Ok(Ast::Const(Value::Int(i)))
                    } else {
                        s.parse::<f64>()
                            .map(|f| Ast::Const(Value::Float(f)))
                            .map_err(|_| ParseError {
                                column: col,
                                message: format!("bad number `{s}`"),
                            })
                    }
                }
                Rule::string => {
                    let inner = p.into_inner().next().map(|i| i.as_str()).unwrap_or("");
                    Ok(Ast::Const(Value::Str(unescape(inner).into())))
                }
                Rule::literal => Ok(Ast::Const(match p.as_str() {
                    "true" => Value::Bool(true),
                    "false" => Value::Bool(false),
                    _ => Value::Null,
                })),
                Rule::field => Ok(Ast::Field(p.as_str().to_string())),
                Rule::call => {
                    let mut inner = p.into_inner();
                    let name = inner
                        .next()
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_default();
                    let args = inner
                        .map(|a| build(a.into_inner()))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Ast::Call(name, args))
                }
                Rule::expr => build(p.into_inner()),
                r => Err(ParseError {
                    column: col,
                    message: format!("unexpected {r:?}"),
                }),
            }
        })
        .map_prefix(|op, rhs| {
            let op = if op.as_rule() == Rule::neg {
                UnOp::Neg
            } else {
                UnOp::Not
            };
            Ok(Ast::Unary(op, Box::new(rhs?)))
        })
        .map_infix(|lhs, op, rhs| {
            let op = match op.as_rule() {
                Rule::coalesce => BinOp::Coalesce,
                Rule::or => BinOp::Or,
                Rule::and => BinOp::And,
                Rule::eq => BinOp::Eq,
                Rule::ne => BinOp::Ne,
                Rule::lt => BinOp::Lt,
                Rule::le => BinOp::Le,
                Rule::gt => BinOp::Gt,
                Rule::ge => BinOp::Ge,
                Rule::add => BinOp::Add,
                Rule::sub => BinOp::Sub,
                Rule::mul => BinOp::Mul,
                Rule::div => BinOp::Div,
                _ => BinOp::Rem,
            };
            Ok(Ast::Binary(op, Box::new(lhs?), Box::new(rhs?)))
        })
        .parse(pairs)
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

impl Ast {
    /// Every field path the expression reads, in order of appearance.
    pub fn fields(&self, out: &mut Vec<String>) {
        match self {
            Ast::Const(_) => {}
            Ast::Field(f) => {
                if !out.contains(f) {
                    out.push(f.clone())
                }
            }
            Ast::Unary(_, a) => a.fields(out),
            Ast::Binary(_, a, b) => {
                a.fields(out);
                b.fields(out);
            }
            Ast::Call(_, args) => args.iter().for_each(|a| a.fields(out)),
        }
    }

    /// Checks function names and argument counts; returns every problem.
    pub fn check_functions(&self, problems: &mut Vec<String>) {
        match self {
            Ast::Const(_) | Ast::Field(_) => {}
            Ast::Unary(_, a) => a.check_functions(problems),
            Ast::Binary(_, a, b) => {
                a.check_functions(problems);
                b.check_functions(problems);
            }
            Ast::Call(name, args) => {
                match FUNCTIONS.iter().find(|(n, _, _)| n == name) {
                    None => {
                        let hint =
                            crate::util::suggest::suggest(name, FUNCTIONS.iter().map(|f| f.0))
                                .map(|s| format!("; did you mean `{s}`?"))
                                .unwrap_or_default();
                        problems.push(format!("unknown function `{name}`{hint}"));
                    }
                    Some((_, min, max))
                        if args.len() < *min || max.is_some_and(|m| args.len() > m) =>
                    {
                        let plural = |n: usize| if n == 1 { "" } else { "s" };
                        problems.push(match max {
                            Some(m) if m == min => {
                                format!(
                                    "`{name}` takes {m} argument{}, got {}",
                                    plural(*m),
                                    args.len()
                                )
                            }
                            Some(m) => {
                                format!("`{name}` takes {min} to {m} arguments, got {}", args.len())
                            }
                            None => {
                                format!("`{name}` takes at least {min} argument{}", plural(*min))
                            }
                        })
                    }
                    _ => {}
                }
                args.iter().for_each(|a| a.check_functions(problems));
            }
        }
    }

    /// Binds field names to slots.
    pub fn compile(&self, slot: &mut dyn FnMut(&str) -> usize) -> Expr {
        Expr::compile(self, slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        let a = parse("1 + 2 * 3 > 6 && !x || y ?? false").unwrap();
        // ((((1 + (2*3)) > 6) && !x) || y) ?? false
        match a {
            Ast::Binary(BinOp::Coalesce, l, _) => match *l {
                Ast::Binary(BinOp::Or, l, _) => match *l {
                    Ast::Binary(BinOp::And, l, r) => {
                        assert!(matches!(*l, Ast::Binary(BinOp::Gt, _, _)));
                        assert!(matches!(*r, Ast::Unary(UnOp::Not, _)));
                    }
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn literals_and_fields() {
        assert_eq!(
            parse("'a\\'b'").unwrap(),
            Ast::Const(Value::Str("a'b".into()))
        );
        assert_eq!(parse("null").unwrap(), Ast::Const(Value::Null));
        assert_eq!(parse("nullable").unwrap(), Ast::Field("nullable".into()));
        assert_eq!(parse("loc.room").unwrap(), Ast::Field("loc.room".into()));
        assert_eq!(parse("2.5e1").unwrap(), Ast::Const(Value::Float(25.0)));
    }

    #[test]
    fn syntax_errors_have_columns() {
        let e = parse("(temperature - 32").unwrap_err();
        assert_eq!(e.column, 18);
        let e = parse("a + * b").unwrap_err();
        assert_eq!(e.column, 5);
    }

    #[test]
    fn unknown_function_and_arity() {
        let mut p = Vec::new();
        parse("lowr(x) + abs(1, 2)")
            .unwrap()
            .check_functions(&mut p);
        assert_eq!(p.len(), 2);
        assert!(p[0].contains("did you mean `lower`"), "{p:?}");
        assert!(p[1].contains("takes 1 argument"), "{p:?}");
        let mut p = Vec::new();
        parse("substr(x) + substr(x, 1, 2) + substr(x, 1, 2, 3) + max()")
            .unwrap()
            .check_functions(&mut p);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("takes 2 to 3 arguments, got 1"), "{p:?}");
        assert!(p[2].contains("at least 1 argument"), "{p:?}");
    }
}
