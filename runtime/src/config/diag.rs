//! Diagnostics: problems with line and column, and the checker that
//! collects them (every problem, never only the first).

#[allow(unused_imports)]
use super::*;

/// One problem in a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based; 0 when the position is unknown.
    pub line: usize,
    pub column: usize,
    /// Where in the file's structure, like `steps[2].window`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: ", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {error}")]
    Read { file: String, error: std::io::Error },
    #[error("{}", render(.file, .problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
    #[error("{file}: {message}")]
    Build { file: String, message: String },
}

pub(super) fn render(file: &str, problems: &[Problem]) -> String {
    let mut s = format!(
        "{file}: {} problem{}",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        s.push_str(&format!("\n  {file}:{p}"));
    }
    s
}

pub(super) struct Checker {
    pub(super) problems: Vec<Problem>,
}

impl Checker {
    pub(super) fn at(
        &mut self,
        line: usize,
        column: usize,
        path: &str,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            line,
            column,
            path: path.to_string(),
            message: message.into(),
        });
    }
    pub(super) fn node(&mut self, node: &Node, path: &str, message: impl Into<String>) {
        let (l, c) = pos(node);
        self.at(l, c, path, message);
    }
    pub(super) fn sp<T>(&mut self, v: &Sp<T>, path: &str, message: impl Into<String>) {
        self.at(v.line, v.column, path, message);
    }
    /// Deserializes one section, recording its problem.
    pub(super) fn section<T: serde::de::DeserializeOwned>(
        &mut self,
        node: &Node,
        path: &str,
    ) -> Option<T> {
        match marked_yaml::from_node::<T>(node) {
            Ok(v) => Some(v),
            Err(e) => {
                let (line, column) = match &*e {
                    // Point at the misspelled key itself, not its mapping.
                    marked_yaml::Error::UnknownFieldError(field, _, _) => find_key(node, field),
                    _ => None,
                }
                .or_else(|| e.start_mark().map(|m| (m.line(), m.column())))
                .unwrap_or_else(|| pos(node));
                let message = match &*e {
                    marked_yaml::Error::UnknownFieldError(field, expected, _) => {
                        let hint = suggest(field, expected.iter().copied())
                            .map(|s| format!("did you mean `{s}`? "))
                            .unwrap_or_default();
                        format!(
                            "unknown key `{field}`; {hint}expected one of: {}",
                            expected.join(", ")
                        )
                    }
                    other => tidy_serde_message(&other.to_string()),
                };
                self.at(line, column, path, message);
                None
            }
        }
    }
    pub(super) fn duration(&mut self, d: &DurationText, path: &str) -> Option<i64> {
        match parse_duration(d) {
            Ok(ms) => Some(ms),
            Err(e) => {
                self.sp(d, path, e);
                None
            }
        }
    }
    pub(super) fn positive(&mut self, d: &DurationText, path: &str) -> Option<i64> {
        let ms = self.duration(d, path)?;
        if ms == 0 {
            self.sp(d, path, "must be greater than zero");
            return None;
        }
        Some(ms)
    }
    pub(super) fn expr(&mut self, e: &Sp<Scalar>, path: &str) -> Option<crate::expr::Ast> {
        match crate::expr::parse(&e.0) {
            Ok(ast) => {
                let mut problems = Vec::new();
                ast.check_functions(&mut problems);
                for p in &problems {
                    self.sp(e, path, p.clone());
                }
                problems.is_empty().then_some(ast)
            }
            Err(err) => {
                self.at(
                    e.line,
                    e.column + err.column.saturating_sub(1),
                    path,
                    format!(
                        "bad expression `{}`: {}{}",
                        e.0,
                        err.message,
                        // `{ a: f(x, y) }` splits at the comma.
                        if e.0.matches('(').count() > e.0.matches(')').count() {
                            "; in a `{ … }` mapping a comma ends the value: quote the expression, or write the mapping as indented lines"
                        } else {
                            ""
                        }
                    ),
                );
                None
            }
        }
    }
}

/// Position of the first mapping key named `key` under `node`.
pub(super) fn find_key(node: &Node, key: &str) -> Option<(usize, usize)> {
    match node {
        Node::Mapping(m) => m.iter().find_map(|(k, v)| {
            if k.as_str() == key {
                k.span().start().map(|m| (m.line(), m.column()))
            } else {
                find_key(v, key)
            }
        }),
        Node::Sequence(s) => s.iter().find_map(|n| find_key(n, key)),
        Node::Scalar(_) => None,
    }
}

pub(super) fn pos(node: &Node) -> (usize, usize) {
    node.span()
        .start()
        .map(|m| (m.line(), m.column()))
        .unwrap_or((0, 0))
}

/// serde's messages name Rust types; say what the file should hold instead.
pub(super) fn tidy_serde_message(m: &str) -> String {
    m.replace("unknown variant", "unknown kind")
        .replace("variant identifier", "kind")
        .replace("struct ", "")
        .replace(
            "data did not match any variant of untagged enum OneOrMany",
            "expected one item or a list",
        )
}

pub(super) fn load_error(e: &marked_yaml::LoadError) -> (usize, usize, String) {
    use marked_yaml::LoadError as E;
    let (m, msg) = match e {
        E::TopLevelMustBeMapping(m) => (
            Some(*m),
            "a pipeline file is a mapping with `name`, `source`, `steps` and `sink`".to_string(),
        ),
        E::TopLevelMustBeSequence(m) => (Some(*m), "expected a list".into()),
        E::UnexpectedAnchor(m) => (
            Some(*m),
            "YAML anchors and aliases are not supported".into(),
        ),
        E::MappingKeyMustBeScalar(m) => (Some(*m), "keys must be plain words".into()),
        E::UnexpectedTag(m) => (Some(*m), "YAML tags are not supported".into()),
        E::ScanError(m, err) => (Some(*m), format!("not valid YAML: {err}")),
        E::DuplicateKey(d) => (
            d.key.span().start().copied(),
            format!("duplicate key `{}`", d.key.as_str()),
        ),
    };
    let (l, c) = m.map(|m| (m.line(), m.column())).unwrap_or((0, 0));
    (l, c, msg)
}
