//! Stateless steps (`map`, `filter`, your own), the [`keyed::KeyedOperator`]
//! trait of keyed, stateful operators, and the window operator.
//!
//! A [`Step`] processes a batch of records in place: it may change fields,
//! drop records, or reject them to the dead-letter output. Steps run in the
//! parse stage, on every worker in parallel, so each worker holds its own
//! copy (`Step: Clone`).
//!
//! ```
//! use rivulet::operators::{Records, Step};
//! use rivulet::value::Value;
//!
//! /// Rounds one field to a whole number.
//! #[derive(Clone)]
//! struct Round { field: String, slot: usize }
//!
//! impl Step for Round {
//!     fn fields(&self) -> Vec<String> { vec![self.field.clone()] }
//!     fn bind(&mut self, slots: &[usize]) { self.slot = slots[0]; }
//!     fn process(&mut self, records: &mut Records<'_>) {
//!         for i in records.live() {
//!             if let Value::Float(f) = records.get(i)[self.slot] {
//!                 records.get_mut(i)[self.slot] = Value::Float(f.round());
//!             }
//!         }
//!     }
//! }
//! ```

pub mod keyed;
pub mod stateful;
pub mod window;

use crate::expr::{Ast, Expr};
use crate::value::Value;

/// What became of a record in the parse stage.
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    Live,
    /// Dropped on purpose (a filter); not an error.
    Dropped,
    /// Sent to the dead-letter output: the reason's class (one of
    /// [`crate::metrics::reason`]) and its text.
    Dead(&'static str, String),
}

/// A batch of decoded records: `len()` rows of `width` slots each.
pub struct Records<'a> {
    pub(crate) slots: &'a mut [Value],
    pub(crate) width: usize,
    pub(crate) status: &'a mut [Status],
    /// Records a step dropped or rejected (for its in/out counts).
    pub(crate) removed: usize,
}

impl Records<'_> {
    pub fn len(&self) -> usize {
        self.status.len()
    }
    pub fn is_empty(&self) -> bool {
        self.status.is_empty()
    }
    /// Indices of the records still live (one small allocation per batch).
    pub fn live(&self) -> Vec<usize> {
        (0..self.status.len())
            .filter(|&i| self.status[i] == Status::Live)
            .collect()
    }
    pub fn get(&self, i: usize) -> &[Value] {
        &self.slots[i * self.width..(i + 1) * self.width]
    }
    pub fn get_mut(&mut self, i: usize) -> &mut [Value] {
        &mut self.slots[i * self.width..(i + 1) * self.width]
    }
    /// Drops record `i` silently (as a filter does).
    pub fn drop_record(&mut self, i: usize) {
        if self.status[i] == Status::Live {
            self.removed += 1;
        }
        self.status[i] = Status::Dropped;
    }
    /// Sends record `i` to the dead-letter output with `reason` (counted
    /// as an expression error).
    pub fn reject(&mut self, i: usize, reason: impl Into<String>) {
        self.reject_as(i, crate::metrics::reason::EXPRESSION, reason);
    }
    /// Sends record `i` to the dead-letter output with `reason`, counted
    /// under `class` (one of [`crate::metrics::reason`]).
    pub fn reject_as(&mut self, i: usize, class: &'static str, reason: impl Into<String>) {
        if self.status[i] == Status::Live {
            self.removed += 1;
        }
        self.status[i] = Status::Dead(class, reason.into());
    }
}

/// A stateless processing step. See the module docs for an example.
pub trait Step: Send + StepClone {
    /// Field paths this step reads or writes. Each is given a slot, and
    /// fields read from the event are decoded for it.
    fn fields(&self) -> Vec<String>;
    /// The slot of each path of [`Step::fields`], in the same order; called
    /// once, before the first batch.
    fn bind(&mut self, slots: &[usize]);
    /// Processes the live records of a batch.
    fn process(&mut self, records: &mut Records<'_>);
    /// Fields this step creates or replaces; pass-through outputs (pipelines
    /// without a window) write them over the original event.
    fn writes(&self) -> Vec<String> {
        Vec::new()
    }
    /// The kind of step (`map`, `filter`): with its place in the pipeline,
    /// its operator id in metrics and on the live page.
    fn kind(&self) -> &'static str {
        "step"
    }
    /// A short description for the live page.
    fn describe(&self) -> String {
        String::new()
    }
}

/// Lets each worker hold its own copy of a step.
pub trait StepClone {
    fn clone_box(&self) -> Box<dyn Step>;
}

impl<T: Step + Clone + 'static> StepClone for T {
    fn clone_box(&self) -> Box<dyn Step> {
        Box::new(self.clone())
    }
}

/// `map`: assigns fields from expressions, in order (later ones see earlier ones).
#[derive(Clone)]
pub struct Map {
    assignments: Vec<(String, Ast)>,
    compiled: Vec<(usize, Expr)>,
}

impl Map {
    pub fn new(assignments: Vec<(String, Ast)>) -> Self {
        Map {
            assignments,
            compiled: Vec::new(),
        }
    }
}

/// Collects the targets and the fields read by a list of expressions, in
/// the order [`bind_exprs`] expects.
fn expr_fields<'a>(targets: impl Iterator<Item = &'a str>, exprs: &[&Ast]) -> Vec<String> {
    let mut out: Vec<String> = targets.map(str::to_string).collect();
    for e in exprs {
        e.fields(&mut out);
    }
    out
}

/// Compiles expressions against the slots given for [`expr_fields`].
fn bind_exprs(fields: &[String], slots: &[usize], ast: &Ast) -> Expr {
    ast.compile(&mut |name| {
        fields
            .iter()
            .position(|f| f == name)
            .map(|i| slots[i])
            .unwrap_or(usize::MAX)
    })
}

impl Step for Map {
    fn fields(&self) -> Vec<String> {
        let exprs: Vec<&Ast> = self.assignments.iter().map(|a| &a.1).collect();
        expr_fields(self.assignments.iter().map(|a| a.0.as_str()), &exprs)
    }
    fn bind(&mut self, slots: &[usize]) {
        let fields = self.fields();
        self.compiled = self
            .assignments
            .iter()
            .enumerate()
            .map(|(i, (_, ast))| (slots[i], bind_exprs(&fields, slots, ast)))
            .collect();
    }
    fn process(&mut self, records: &mut Records<'_>) {
        for i in 0..records.len() {
            if records.status[i] != Status::Live {
                continue;
            }
            for (j, (target, expr)) in self.compiled.iter().enumerate() {
                match expr.eval(records.get(i)) {
                    Ok(v) => records.get_mut(i)[*target] = v,
                    Err(e) => {
                        records.reject(i, format!("map `{}`: {e}", self.assignments[j].0));
                        break;
                    }
                }
            }
        }
    }
    fn writes(&self) -> Vec<String> {
        self.assignments.iter().map(|a| a.0.clone()).collect()
    }
    fn kind(&self) -> &'static str {
        "map"
    }
    fn describe(&self) -> String {
        self.writes().join(", ")
    }
}

/// `filter`: keeps events whose condition is `true`.
#[derive(Clone)]
pub struct Filter {
    condition: Ast,
    compiled: Option<Expr>,
}

impl Filter {
    pub fn new(condition: Ast) -> Self {
        Filter {
            condition,
            compiled: None,
        }
    }
}

impl Step for Filter {
    fn fields(&self) -> Vec<String> {
        expr_fields(std::iter::empty(), &[&self.condition])
    }
    fn bind(&mut self, slots: &[usize]) {
        self.compiled = Some(bind_exprs(&self.fields(), slots, &self.condition));
    }
    fn process(&mut self, records: &mut Records<'_>) {
        let Some(cond) = &self.compiled else { return };
        for i in 0..records.len() {
            if records.status[i] != Status::Live {
                continue;
            }
            match cond.eval_bool(records.get(i)) {
                Ok(true) => {}
                Ok(false) => records.drop_record(i),
                Err(e) => records.reject(i, format!("filter: {e}")),
            }
        }
    }
    fn kind(&self) -> &'static str {
        "filter"
    }
}
