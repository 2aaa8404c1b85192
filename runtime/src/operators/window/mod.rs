//! Keyed event-time windows with Flink's semantics.
//!
//! One [`WindowOperator`] lives on each worker and holds the windows of the
//! keys in that worker's key groups. The rules, as in Flink's
//! `WindowOperator` with the default `EventTimeTrigger`:
//!
//! - An event is assigned to its windows (one tumbling window, `size/slide`
//!   sliding windows, or a session window `[ts, ts + gap)` merged with every
//!   window of the key it touches; windows that touch end-to-start merge).
//! - A window is *late* when `end − 1 + allowed_lateness <= watermark`; the
//!   event skips late windows. An event that skipped all its windows and
//!   whose `ts + allowed_lateness <= watermark` goes to the late output.
//! - A window fires when the watermark reaches `end − 1`. An event added to
//!   a window that already fired (within the allowed lateness) fires it
//!   again at once with the updated result.
//! - A window's state is dropped when the watermark reaches
//!   `end − 1 + allowed_lateness`.
//!
//! Timers live in one ordered map per worker. A timer names the key and the
//! exact window bounds; one whose window has since merged or gone is
//! ignored when it comes due, which is how timers are "deleted".
//!
//! Costs: an event costs one hash lookup and, for a new window, one small
//! allocation and one timer entry. Firing allocates the output line.

mod acc;
mod step;

pub use acc::{Acc, AggFunc};
pub mod sketch;
pub use step::{WindowStep, WindowStepOptions, STATE_VERSION};

use crate::expr::Ast;
use crate::value::{decode_key, Value};
use hashbrown::HashTable;
use smallvec::SmallVec;
use std::collections::BTreeMap;

/// Window shape; all sizes in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    Tumbling { size: i64 },
    Sliding { size: i64, slide: i64 },
    Session { gap: i64 },
}

/// One named aggregate of a window result.
#[derive(Clone, Debug)]
pub struct Aggregate {
    pub name: String,
    pub func: AggFunc,
    /// The argument expression (`None` for `count()`).
    pub arg: Option<Ast>,
}

/// A window step: its shape, lateness and aggregates.
#[derive(Clone, Debug)]
pub struct WindowDef {
    pub kind: WindowKind,
    pub allowed_lateness: i64,
    pub aggregates: Vec<Aggregate>,
    /// Aggregates that did not parse, reported by `PipelineBuilder::build`.
    pub(crate) errors: Vec<String>,
    /// Most keys with open windows; events of new keys beyond it go to the
    /// dead-letter output. `None`: no bound.
    pub max_keys: Option<usize>,
}

impl WindowDef {
    fn of(kind: WindowKind) -> Self {
        WindowDef {
            kind,
            allowed_lateness: 0,
            aggregates: Vec::new(),
            errors: Vec::new(),
            max_keys: None,
        }
    }
    /// Bounds the keys with open windows (see [`WindowDef::max_keys`]).
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = Some(n);
        self
    }
    pub fn tumbling(size: std::time::Duration) -> Self {
        Self::of(WindowKind::Tumbling {
            size: size.as_millis() as i64,
        })
    }
    pub fn sliding(size: std::time::Duration, slide: std::time::Duration) -> Self {
        Self::of(WindowKind::Sliding {
            size: size.as_millis() as i64,
            slide: slide.as_millis() as i64,
        })
    }
    pub fn session(gap: std::time::Duration) -> Self {
        Self::of(WindowKind::Session {
            gap: gap.as_millis() as i64,
        })
    }
    pub fn allowed_lateness(mut self, d: std::time::Duration) -> Self {
        self.allowed_lateness = d.as_millis() as i64;
        self
    }
    /// Adds an aggregate written as in pipeline files: `avg(celsius)`,
    /// `count()`. Errors are reported by `PipelineBuilder::build`.
    pub fn aggregate(mut self, name: &str, call: &str) -> Self {
        match parse_aggregate(call) {
            Ok((func, arg)) => self.aggregates.push(Aggregate {
                name: name.to_string(),
                func,
                arg,
            }),
            Err(e) => self.errors.push(format!("aggregate `{name}`: {e}")),
        }
        self
    }

    /// Problems recorded by [`WindowDef::aggregate`] or shape errors.
    pub fn problems(&self) -> Vec<String> {
        self.check().into_iter().map(|p| p.message).collect()
    }

    /// The fields of a result: the key fields, `window_start`,
    /// `window_end`, then each aggregate by name.
    pub fn output_schema(&self, key_names: &[String]) -> crate::msg::Schema {
        let mut names = key_names.to_vec();
        names.push("window_start".into());
        names.push("window_end".into());
        names.extend(self.aggregates.iter().map(|a| a.name.clone()));
        crate::msg::Schema { names }
    }

    /// The window's rules, in one place: the builder reports these, the
    /// pipeline file maps each to the position of the part it names.
    pub fn check(&self) -> Vec<WindowProblem> {
        let mut out: Vec<WindowProblem> = self
            .errors
            .iter()
            .map(|e| WindowProblem {
                part: WindowPart::Aggregates,
                message: e.clone(),
            })
            .collect();
        let mut bad = |part: WindowPart, what: &str, v: i64| {
            if v <= 0 {
                out.push(WindowProblem {
                    part,
                    message: format!("window {what} must be greater than zero"),
                });
            }
        };
        match self.kind {
            WindowKind::Tumbling { size } => bad(WindowPart::Size, "size", size),
            WindowKind::Sliding { size, slide } => {
                bad(WindowPart::Size, "size", size);
                bad(WindowPart::Slide, "slide", slide);
            }
            WindowKind::Session { gap } => bad(WindowPart::Gap, "gap", gap),
        }
        if self.allowed_lateness < 0 {
            out.push(WindowProblem {
                part: WindowPart::Lateness,
                message: "allowed_lateness must not be negative".into(),
            });
        }
        if self.aggregates.is_empty() && self.errors.is_empty() {
            out.push(WindowProblem {
                part: WindowPart::Aggregates,
                message: "a window needs at least one aggregate, like `readings: count()`".into(),
            });
        }
        for a in &self.aggregates {
            if ["window_start", "window_end"].contains(&a.name.as_str()) {
                out.push(WindowProblem {
                    part: WindowPart::Aggregate(a.name.clone()),
                    message: format!("`{}` is a reserved result field", a.name),
                });
            }
        }
        if self.max_keys == Some(0) {
            out.push(WindowProblem {
                part: WindowPart::MaxKeys,
                message: "max_keys must be at least 1".into(),
            });
        }
        out
    }

    /// Start of every window `ts` belongs to (not for sessions).
    fn assign(&self, ts: i64, out: &mut Vec<(i64, i64)>) {
        out.clear();
        match self.kind {
            WindowKind::Tumbling { size } => {
                let start = ts - ts.rem_euclid(size);
                out.push((start, start + size));
            }
            WindowKind::Sliding { size, slide } => {
                let mut start = ts - ts.rem_euclid(slide);
                while start > ts - size {
                    out.push((start, start + size));
                    start -= slide;
                }
            }
            WindowKind::Session { gap } => out.push((ts, ts + gap)),
        }
    }
}

/// The part of a window a problem is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowPart {
    Size,
    Slide,
    Gap,
    Lateness,
    /// The aggregates as a whole.
    Aggregates,
    /// One aggregate, by its result name.
    Aggregate(String),
    MaxKeys,
}

/// A broken window rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowProblem {
    pub part: WindowPart,
    pub message: String,
}

/// Parses `count()`, `avg(expr)` …
pub fn parse_aggregate(call: &str) -> Result<(AggFunc, Option<Ast>), String> {
    let ast = crate::expr::parse(call)
        .map_err(|e| format!("{} (at column {} of `{call}`)", e.message, e.column))?;
    let Ast::Call(name, mut args) = ast else {
        return Err(format!(
            "`{call}` is not an aggregate call; expected one of count(), count(e), sum(e), avg(e), min(e), max(e), first(e), last(e), variance(e), stddev(e), median(e), percentile(e, p), count_distinct(e)"
        ));
    };
    if name == "percentile" {
        return parse_percentile(args);
    }
    if args.len() > 1 {
        return Err(format!("`{name}` takes one argument, got {}", args.len()));
    }
    let arg = args.pop();
    match AggFunc::from_name(&name, arg.is_some()) {
        Some(f) => {
            if let Some(a) = &arg {
                let mut problems = Vec::new();
                a.check_functions(&mut problems);
                if let Some(p) = problems.into_iter().next() {
                    return Err(p);
                }
            }
            Ok((f, arg))
        }
        None if AggFunc::NAMES.contains(&name.as_str()) => Err(format!(
            "`{name}` needs {} argument",
            if name == "count" {
                "zero or one"
            } else {
                "one"
            }
        )),
        None => {
            let hint = crate::util::suggest::suggest(&name, AggFunc::NAMES.iter().copied())
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            Err(format!("unknown aggregate function `{name}`{hint}"))
        }
    }
}

/// `percentile(e, p)`: `p` is a number from 0 to 1.
fn parse_percentile(mut args: Vec<Ast>) -> Result<(AggFunc, Option<Ast>), String> {
    if args.len() != 2 {
        return Err(format!(
            "`percentile` takes two arguments, an expression and a number from 0 to 1 (`percentile(e, 0.95)`), got {}",
            args.len()
        ));
    }
    let p = match args.pop() {
        Some(Ast::Const(v)) => v.as_f64(),
        _ => None,
    };
    let Some(p) = p else {
        return Err(
            "the second argument of `percentile` must be a number from 0 to 1, such as 0.95".into(),
        );
    };
    if !(0.0..=1.0).contains(&p) {
        let hint = if p > 1.0 && p <= 100.0 {
            format!(" (for the {p}th percentile write {})", p / 100.0)
        } else {
            String::new()
        };
        return Err(format!(
            "the second argument of `percentile` must be from 0 to 1, got {p}{hint}"
        ));
    }
    let arg = args.pop();
    if let Some(a) = &arg {
        let mut problems = Vec::new();
        a.check_functions(&mut problems);
        if let Some(p) = problems.into_iter().next() {
            return Err(p);
        }
    }
    Ok((AggFunc::Percentile((p * 1e6).round() as u32), arg))
}

/// A window result or late event produced by the operator.
#[derive(Debug)]
pub struct Emitted {
    pub start: i64,
    pub end: i64,
    pub key: Box<[u8]>,
    /// The result as a row of [`WindowOperator::output_schema`].
    pub row: Box<[Value]>,
}

/// Key bytes, inline up to 30 bytes so that finding a key touches no
/// memory beyond its own entry.
#[derive(Clone)]
enum KeyBytes {
    Inline(u8, [u8; 30]),
    Heap(Box<[u8]>),
}

impl KeyBytes {
    fn new(b: &[u8]) -> Self {
        if b.len() <= 30 {
            let mut buf = [0u8; 30];
            buf[..b.len()].copy_from_slice(b);
            KeyBytes::Inline(b.len() as u8, buf)
        } else {
            KeyBytes::Heap(b.into())
        }
    }
    #[inline]
    fn as_slice(&self) -> &[u8] {
        match self {
            KeyBytes::Inline(n, buf) => &buf[..*n as usize],
            KeyBytes::Heap(b) => b,
        }
    }
}

/// One key's open windows. The accumulators of window `i` are
/// `accs[i * n .. (i + 1) * n]` for `n` aggregates. The first two windows
/// and six accumulators live in the entry itself: finding a key's window
/// and its accumulators touches one entry, not three allocations.
struct KeyState {
    key: KeyBytes,
    hash: u64,
    /// Bumped when the slot is reused for another key, so old timers miss.
    gen: u32,
    /// (start, end), sorted by start.
    windows: SmallVec<[(i64, i64); 2]>,
    accs: SmallVec<[Acc; 6]>,
}

impl KeyState {
    #[inline]
    fn find(&self, start: i64, end: i64) -> Option<usize> {
        self.windows.iter().position(|w| *w == (start, end))
    }
    fn remove(&mut self, i: usize, n: usize) -> Vec<Acc> {
        self.windows.remove(i);
        self.accs.drain(i * n..(i + 1) * n).collect()
    }
    fn insert(&mut self, start: i64, end: i64, accs: impl IntoIterator<Item = Acc>, n: usize) {
        let pos = self.windows.partition_point(|w| w.0 < start);
        self.windows.insert(pos, (start, end));
        self.accs.insert_many(pos * n, accs);
    }
}

#[derive(Clone, Copy)]
struct Timer {
    key: u32,
    gen: u32,
    start: i64,
    end: i64,
}

/// The windows of one worker's keys.
pub struct WindowOperator {
    def: WindowDef,
    funcs: Vec<AggFunc>,
    key_names: Vec<String>,
    keys: Vec<KeyState>,
    free: Vec<u32>,
    index: HashTable<u32>,
    timers: BTreeMap<i64, Vec<Timer>>,
    /// The earliest timer (`i64::MAX` when none): a watermark below it
    /// fires nothing, so most advances skip the tree.
    next_due: i64,
    watermark: i64,
    assigned: Vec<(i64, i64)>,
    emitted: Vec<Emitted>,
    /// Change tracking for checkpoints (off unless `track_changes`).
    tracking: bool,
    dirty: Vec<u32>,
    is_dirty: Vec<bool>,
    deleted: Vec<Box<[u8]>>,
    /// This worker's share of `max_keys`.
    key_limit: usize,
}

/// What became of an event in the window operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// Too late for all its windows: for the late output.
    Late,
    /// A new key while the state holds `max_keys` keys: for the dead-letter output.
    StateFull,
}

/// The saved state of one key: its open windows and their accumulators.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeySnapshot {
    pub windows: Vec<(i64, i64)>,
    pub accs: Vec<Acc>,
}

/// What changed since the last [`WindowOperator::take_changes`].
#[derive(Debug, Default)]
pub struct Changes {
    /// Keys whose state changed, with their state now.
    pub upserts: Vec<(Box<[u8]>, KeySnapshot)>,
    /// Keys whose windows are all gone.
    pub deletes: Vec<Box<[u8]>>,
}

impl WindowOperator {
    pub fn new(def: WindowDef, key_names: Vec<String>) -> Self {
        let funcs = def.aggregates.iter().map(|a| a.func).collect();
        WindowOperator {
            def,
            funcs,
            key_names,
            keys: Vec::new(),
            free: Vec::new(),
            index: HashTable::new(),
            timers: BTreeMap::new(),
            next_due: i64::MAX,
            watermark: i64::MIN,
            assigned: Vec::new(),
            emitted: Vec::new(),
            tracking: false,
            dirty: Vec::new(),
            is_dirty: Vec::new(),
            deleted: Vec::new(),
            key_limit: usize::MAX,
        }
    }

    /// The fields of a result row: the key fields, `window_start`,
    /// `window_end`, then each aggregate by name.
    pub fn output_schema(&self) -> crate::msg::Schema {
        self.def.output_schema(&self.key_names)
    }

    /// Sets this worker's share of the key bound.
    pub fn limit_keys(&mut self, n: usize) {
        self.key_limit = n;
    }

    /// Records which keys change, for incremental checkpoints.
    pub fn track_changes(&mut self) {
        self.tracking = true;
    }

    #[inline]
    fn mark(&mut self, id: u32) {
        if !self.tracking {
            return;
        }
        let i = id as usize;
        if self.is_dirty.len() <= i {
            self.is_dirty.resize(i + 1, false);
        }
        if !self.is_dirty[i] {
            self.is_dirty[i] = true;
            self.dirty.push(id);
        }
    }

    /// The keys changed since the last call, with their current state.
    pub fn take_changes(&mut self) -> Changes {
        let mut out = Changes {
            deletes: std::mem::take(&mut self.deleted),
            ..Default::default()
        };
        for id in std::mem::take(&mut self.dirty) {
            let i = id as usize;
            if !self.is_dirty.get(i).copied().unwrap_or(false) {
                continue;
            }
            self.is_dirty[i] = false;
            let k = &self.keys[i];
            out.upserts.push((
                k.key.as_slice().into(),
                KeySnapshot {
                    windows: k.windows.to_vec(),
                    accs: k.accs.to_vec(),
                },
            ));
        }
        out
    }

    /// Sets the watermark of restored state (before [`Self::restore_key`]).
    pub fn restore_watermark(&mut self, watermark: i64) {
        self.watermark = watermark;
    }

    /// Puts back one key's saved windows and their timers.
    pub fn restore_key(&mut self, key: &[u8], hash: u64, snap: KeySnapshot) {
        let n = self.funcs.len();
        if snap.accs.len() != snap.windows.len() * n {
            tracing::error!(
                "skipping a saved key whose state does not match the window's aggregates"
            );
            return;
        }
        let id = self.key_id(key, hash);
        let lateness = self.def.allowed_lateness;
        let k = &mut self.keys[id as usize];
        let gen = k.gen;
        k.windows = SmallVec::from_vec(snap.windows);
        k.accs = SmallVec::from_vec(snap.accs);
        let windows = k.windows.clone();
        for (start, end) in windows {
            let t = Timer {
                key: id,
                gen,
                start,
                end,
            };
            if end - 1 > self.watermark {
                self.add_timer(end - 1, t);
            }
            if lateness > 0 || end - 1 <= self.watermark {
                self.add_timer(end - 1 + lateness, t);
            }
        }
        self.release_if_empty(id);
    }

    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// Number of keys with open windows.
    pub fn open_keys(&self) -> usize {
        self.keys.len() - self.free.len()
    }

    /// The open windows of one key, as rows of the output schema with the
    /// aggregates' current values (what the window would emit now).
    pub fn query(&self, key: &[u8], hash: u64) -> Vec<Box<[Value]>> {
        let keys = &self.keys;
        let Some(&id) = self.index.find(hash, |&id| {
            let k = &keys[id as usize];
            k.hash == hash && k.key.as_slice() == key
        }) else {
            return Vec::new();
        };
        let k = &self.keys[id as usize];
        let n = self.funcs.len();
        k.windows
            .iter()
            .enumerate()
            .map(|(i, &(start, end))| {
                let mut row = Vec::with_capacity(self.key_names.len() + 2 + n);
                row.extend(decode_key(k.key.as_slice()).unwrap_or_default());
                row.resize(self.key_names.len(), Value::Null);
                row.push(Value::Int(start));
                row.push(Value::Int(end));
                row.extend(k.accs[i * n..(i + 1) * n].iter().map(Acc::result));
                row.into_boxed_slice()
            })
            .collect()
    }

    /// Number of open windows.
    pub fn open_windows(&self) -> usize {
        self.keys.iter().map(|k| k.windows.len()).sum()
    }

    fn key_id(&mut self, key: &[u8], hash: u64) -> u32 {
        let keys = &self.keys;
        if let Some(&id) = self.index.find(hash, |&id| {
            let k = &keys[id as usize];
            k.hash == hash && k.key.as_slice() == key
        }) {
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                let k = &mut self.keys[id as usize];
                k.key = KeyBytes::new(key);
                k.hash = hash;
                k.gen = k.gen.wrapping_add(1);
                id
            }
            None => {
                self.keys.push(KeyState {
                    key: KeyBytes::new(key),
                    hash,
                    gen: 0,
                    windows: SmallVec::new(),
                    accs: SmallVec::new(),
                });
                (self.keys.len() - 1) as u32
            }
        };
        let keys = &self.keys;
        self.index
            .insert_unique(hash, id, |&i| keys[i as usize].hash);
        id
    }

    fn release_if_empty(&mut self, id: u32) {
        let k = &self.keys[id as usize];
        if !k.windows.is_empty() {
            return;
        }
        if self.tracking {
            if let Some(d) = self.is_dirty.get_mut(id as usize) {
                *d = false;
            }
            self.deleted.push(k.key.as_slice().into());
        }
        let (hash, keys) = (k.hash, &self.keys);
        if let Ok(entry) = self.index.find_entry(hash, |&i| i == id) {
            entry.remove();
        }
        let _ = keys;
        self.free.push(id);
    }

    fn add_timer(&mut self, at: i64, t: Timer) {
        self.timers.entry(at).or_default().push(t);
        self.next_due = self.next_due.min(at);
    }

    /// Processes one event with the watermark as it stands before it.
    /// Results fired by late-but-allowed events are appended to `out`,
    /// sorted.
    pub fn process(
        &mut self,
        key: &[u8],
        hash: u64,
        ts: i64,
        seq: u64,
        vals: &[Value],
        out: &mut Vec<Emitted>,
    ) -> Outcome {
        let wm = self.watermark;
        let lateness = self.def.allowed_lateness;
        if self.open_keys() >= self.key_limit && !self.has_key(key, hash) {
            return Outcome::StateFull;
        }
        let mut assigned = std::mem::take(&mut self.assigned);
        self.def.assign(ts, &mut assigned);
        let id = self.key_id(key, hash);
        self.mark(id);
        let mut skipped = true;
        for &(start, end) in &assigned {
            let (start, end, created) = match self.def.kind {
                WindowKind::Session { .. } => match self.merge_session(id, start, end) {
                    Some(w) => w,
                    None => continue,
                },
                _ => {
                    if end - 1 + lateness <= wm {
                        continue;
                    }
                    self.window_for(id, start, end)
                }
            };
            skipped = false;
            let n = self.funcs.len();
            let k = &mut self.keys[id as usize];
            let gen = k.gen;
            let Some(i) = k.find(start, end) else {
                continue;
            };
            for (acc, v) in k.accs[i * n..(i + 1) * n].iter_mut().zip(vals) {
                acc.add(v, ts, seq);
            }
            let timer = Timer {
                key: id,
                gen,
                start,
                end,
            };
            if end - 1 <= wm {
                // Late but allowed: fire again with the update.
                self.emit(id, start, end);
            } else if created {
                self.add_timer(end - 1, timer);
            }
            if created && lateness > 0 {
                self.add_timer(end - 1 + lateness, timer);
            }
        }
        self.assigned = assigned;
        self.release_if_empty(id);
        self.drain_sorted(out);
        if skipped && ts.saturating_add(lateness) <= wm {
            Outcome::Late
        } else {
            Outcome::Accepted
        }
    }

    fn has_key(&self, key: &[u8], hash: u64) -> bool {
        let keys = &self.keys;
        self.index
            .find(hash, |&id| {
                let k = &keys[id as usize];
                k.hash == hash && k.key.as_slice() == key
            })
            .is_some()
    }

    /// The window with these bounds, created if missing.
    fn window_for(&mut self, id: u32, start: i64, end: i64) -> (i64, i64, bool) {
        let n = self.funcs.len();
        let k = &mut self.keys[id as usize];
        if k.find(start, end).is_some() {
            return (start, end, false);
        }
        k.insert(start, end, self.funcs.iter().map(|f| Acc::new(*f)), n);
        (start, end, true)
    }

    /// Merges the session window `[start, end)` with every window of the
    /// key it touches. `None` when the result is late (the event is skipped).
    fn merge_session(&mut self, id: u32, start: i64, end: i64) -> Option<(i64, i64, bool)> {
        let wm = self.watermark;
        let lateness = self.def.allowed_lateness;
        let n = self.funcs.len();
        let k = &mut self.keys[id as usize];
        // Flink's TimeWindow.intersects: touching windows merge too.
        let touching: Vec<usize> = (0..k.windows.len())
            .filter(|&i| k.windows[i].0 <= end && k.windows[i].1 >= start)
            .collect();
        let (mut s, mut e) = (start, end);
        for &i in &touching {
            s = s.min(k.windows[i].0);
            e = e.max(k.windows[i].1);
        }
        if e - 1 + lateness <= wm {
            return None;
        }
        if let [only] = touching[..] {
            if k.windows[only] == (s, e) {
                return Some((s, e, false));
            }
        }
        let mut accs: Vec<Acc> = self.funcs.iter().map(|f| Acc::new(*f)).collect();
        for &i in touching.iter().rev() {
            for (a, b) in accs.iter_mut().zip(k.remove(i, n).iter()) {
                a.merge(b);
            }
        }
        k.insert(s, e, accs, n);
        Some((s, e, true))
    }

    fn emit(&mut self, id: u32, start: i64, end: i64) {
        let n = self.funcs.len();
        let k = &self.keys[id as usize];
        let Some(i) = k.find(start, end) else {
            return;
        };
        // The row of the window's output schema (see `output_schema`).
        let keys = self.key_names.len();
        let mut row = Vec::with_capacity(keys + 2 + n);
        row.extend(decode_key(k.key.as_slice()).unwrap_or_default());
        // Keys are encoded by the parse stage; a row of another width
        // cannot happen, but would still print with nulls.
        row.resize(keys, Value::Null);
        row.push(Value::Int(start));
        row.push(Value::Int(end));
        row.extend(k.accs[i * n..(i + 1) * n].iter().map(Acc::result));
        self.emitted.push(Emitted {
            start,
            end,
            key: k.key.as_slice().into(),
            row: row.into_boxed_slice(),
        });
    }

    /// Advances the watermark, firing and cleaning up due windows. Results
    /// are appended to `out` in (end, start, key) order.
    pub fn advance(&mut self, watermark: i64, out: &mut Vec<Emitted>) {
        if watermark <= self.watermark {
            return;
        }
        self.watermark = watermark;
        if watermark < self.next_due {
            self.drain_sorted(out);
            return;
        }
        let lateness = self.def.allowed_lateness;
        while let Some(entry) = self.timers.first_entry() {
            if *entry.key() > watermark {
                break;
            }
            let (at, due) = entry.remove_entry();
            for t in due {
                let k = &self.keys[t.key as usize];
                if k.gen != t.gen || k.find(t.start, t.end).is_none() {
                    continue;
                }
                if at == t.end - 1 {
                    self.emit(t.key, t.start, t.end);
                }
                if at == t.end - 1 + lateness {
                    self.mark(t.key);
                    let n = self.funcs.len();
                    let k = &mut self.keys[t.key as usize];
                    if let Some(i) = k.find(t.start, t.end) {
                        k.remove(i, n);
                    }
                    self.release_if_empty(t.key);
                }
            }
        }
        self.next_due = self
            .timers
            .first_key_value()
            .map_or(i64::MAX, |(at, _)| *at);
        self.drain_sorted(out);
    }

    fn drain_sorted(&mut self, out: &mut Vec<Emitted>) {
        if self.emitted.is_empty() {
            return;
        }
        self.emitted
            .sort_by(|a, b| (a.end, a.start, &a.key).cmp(&(b.end, b.start, &b.key)));
        out.append(&mut self.emitted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_builder_reports_the_same_window_rules_as_the_file() {
        let d = WindowDef::sliding(Duration::ZERO, Duration::from_secs(1))
            .aggregate("window_start", "count()")
            .max_keys(0);
        let parts: Vec<WindowPart> = d.check().into_iter().map(|p| p.part).collect();
        assert_eq!(
            parts,
            vec![
                WindowPart::Size,
                WindowPart::Aggregate("window_start".into()),
                WindowPart::MaxKeys
            ]
        );
        let empty = WindowDef::tumbling(Duration::from_secs(5));
        assert_eq!(
            empty.problems(),
            vec!["a window needs at least one aggregate, like `readings: count()`"]
        );
        let bad_call = WindowDef::tumbling(Duration::from_secs(5)).aggregate("n", "cnt()");
        assert!(bad_call.problems()[0].contains("did you mean `count`"));
    }
}
