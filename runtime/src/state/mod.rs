//! Durable state: checkpoints of keyed operator state in redb.
//!
//! A checkpoint is one redb write transaction holding what changed since
//! the previous one (keys upserted or deleted, each an operator's encoded
//! record), the watermarks, and the source position after the last event
//! it covers. It is committed durably, so a checkpoint is wholly there or
//! not at all. On start, rivulet loads the last checkpoint, gives each key
//! to the worker that owns its key group, and asks the source to resume
//! after the position; results after that point are emitted again
//! (identical, since processing is deterministic).
//!
//! Savepoints are copies of the state file taken right after a checkpoint
//! requested through the control socket (see [`control`]); they are
//! portable (redb and postcard fix their byte order).
//!
//! ## Format 2 (this version)
//! - `meta` table: `version` (2), `position`, `watermark`,
//!   `input_watermark`, `epoch`, `fingerprint` and `layout` (of the whole
//!   pipeline, for messages and `state inspect`), and `operators`: a JSON
//!   list of [`OperatorMeta`] (id, state name and record version,
//!   fingerprint, layout).
//! - one table per keyed operator, `op.<id>`: `[key group] ++ key bytes` →
//!   the operator's record for that key. Key groups come first, so one
//!   range scan reads (or [`StateStore::export_groups`] moves) a range of
//!   groups of one operator.
//!
//! ## Format 1 (read, and upgraded on open)
//! `meta` with `version` 1, `fingerprint`, `max_ts` instead of
//! `input_watermark`, and one `keys` table laid out as `op.0` is, holding
//! window records (`window`, version 1). Opening such a file for a run
//! moves `keys` to `op.0` in one transaction; reading it (`inspect`,
//! installing a savepoint) leaves it as it is.

pub mod control;
pub mod global;

use crate::operators::keyed::StateDecl;
use crate::operators::window::KeySnapshot;
use crate::partition::KeyGroup;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Format 1's only keyed table.
const KEYS_V1: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys");
pub const FORMAT_VERSION: u64 = 2;

/// The table of operator `id`'s keys.
fn op_table_name(id: u16) -> String {
    format!("op.{id}")
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state {path}: {message}")]
    Store { path: String, message: String },
    #[error("state {path} was written by a different pipeline ({found}; this one is {expected}); move the directory away to start afresh, or start from a savepoint with --allow-non-restored-state to keep only the input position")]
    Incompatible {
        path: String,
        found: String,
        expected: String,
    },
}

/// What a checkpoint records of one keyed operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorMeta {
    /// Index of the operator in the pipeline; names its table.
    pub id: u16,
    /// The kind of state (`window`) and the version of its records.
    pub name: String,
    pub version: u32,
    pub fingerprint: String,
    pub layout: String,
}

impl OperatorMeta {
    fn of(id: u16, d: &StateDecl) -> Self {
        OperatorMeta {
            id,
            name: d.name.to_string(),
            version: d.version,
            fingerprint: d.fingerprint.clone(),
            layout: d.layout.clone(),
        }
    }
}

/// One key's state: the key's bytes and its operator's record.
pub type KeyRecord = (Vec<u8>, Vec<u8>);

/// What a checkpoint restores.
#[derive(Debug, Default)]
pub struct Restored {
    pub position: Vec<u8>,
    pub watermark: i64,
    /// The largest event time seen (written by format 1 only).
    pub max_ts: i64,
    /// The watermark of the keyed stage's input (its valve), when recorded;
    /// format 1 recorded `max_ts` instead, from which it follows.
    pub input_watermark: Option<i64>,
    pub epoch: u64,
    /// Per operator (in the order of the declarations given to
    /// [`StateStore::open`]), each key with its record.
    pub keys: Vec<Vec<KeyRecord>>,
}

impl Restored {
    /// Keys restored, over all operators.
    pub fn key_count(&self) -> usize {
        self.keys.iter().map(Vec::len).sum()
    }
}

/// A key of one operator: (operator id, key bytes).
pub type OperatorKey = (u16, Box<[u8]>);

/// Changes waiting to be committed: (operator, key) → new record
/// (`None`: deleted).
#[derive(Debug, Default)]
pub struct Pending {
    pub keys: HashMap<OperatorKey, Option<Vec<u8>>>,
}

impl Pending {
    /// A key's new encoded record.
    pub fn upsert(&mut self, op: u16, key: Box<[u8]>, record: Vec<u8>) {
        self.keys.insert((op, key), Some(record));
    }
    pub fn delete(&mut self, op: u16, key: Box<[u8]>) {
        self.keys.insert((op, key), None);
    }
}

pub struct StateStore {
    /// `None` after a failed commit: reopened (and repaired) before the next.
    db: Option<redb::Database>,
    path: PathBuf,
    epoch: u64,
    /// The operators whose state this store keeps.
    operators: Vec<OperatorMeta>,
    /// The pipeline's fingerprint and layout (operator 0's), as format 1
    /// recorded them: shown by `inspect` and in errors.
    fingerprint: String,
    layout: String,
}

/// What `rivulet state inspect` shows.
#[derive(Debug)]
pub struct Inspection {
    /// The state format of the file.
    pub version: u64,
    pub epoch: u64,
    pub watermark: i64,
    pub position: Vec<u8>,
    pub fingerprint: String,
    /// Key field names and aggregate names (of the window operator).
    pub layout: serde_json::Value,
    pub operators: Vec<OperatorMeta>,
    /// The window operator's keys.
    pub keys: Vec<(Vec<u8>, KeySnapshot)>,
    /// Keys of the later stages' windows: (operator id, key, its windows).
    pub later_windows: Vec<(u16, Vec<u8>, KeySnapshot)>,
    /// Keys of stateful steps (`deduplicate`, `deadband`, `alert`, process
    /// functions): (operator id, key, its saved record).
    pub steps: Vec<(u16, Vec<u8>, Vec<u8>)>,
}

fn store_err(path: &Path, e: impl std::fmt::Display) -> StateError {
    StateError::Store {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The table key of a key: its key group first, so one range holds a group.
fn table_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(KeyGroup::of_key(key).0);
    k.extend_from_slice(key);
    k
}

/// What format 2 records about the store itself, written with every
/// checkpoint and by the upgrade of a format-1 file.
struct Header<'a> {
    operators: &'a [OperatorMeta],
    fingerprint: &'a str,
    layout: &'a str,
}

impl Header<'_> {
    fn write(&self, meta: &mut redb::Table<&str, &[u8]>) -> Result<(), String> {
        let operators = serde_json::to_vec(self.operators).map_err(|e| e.to_string())?;
        for (k, v) in [
            ("version", &(FORMAT_VERSION as i64).to_le_bytes()[..]),
            ("fingerprint", self.fingerprint.as_bytes()),
            ("layout", self.layout.as_bytes()),
            ("operators", &operators[..]),
        ] {
            meta.insert(k, v).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// What a file holds, read in one read transaction.
struct Saved {
    version: u64,
    meta: HashMap<String, Vec<u8>>,
    operators: Vec<OperatorMeta>,
}

fn num(b: Option<&Vec<u8>>) -> i64 {
    b.and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(i64::from_le_bytes)
        .unwrap_or(i64::MIN)
}

/// Reads the meta table; `None` for a file without one (fresh).
fn read_saved(txn: &redb::ReadTransaction, path: &Path) -> Result<Option<Saved>, StateError> {
    let meta_table = match txn.open_table(META) {
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(store_err(path, e)),
        Ok(t) => t,
    };
    let mut meta = HashMap::new();
    for entry in meta_table.iter().map_err(|e| store_err(path, e))? {
        let (k, v) = entry.map_err(|e| store_err(path, e))?;
        meta.insert(k.value().to_string(), v.value().to_vec());
    }
    let version = num(meta.get("version"));
    let text = |k: &str| {
        meta.get(k)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    let operators = match version {
        // Format 1 kept the state of the pipeline's window, if it had one
        // (a pipeline without a window saved only its input position).
        1 if text("fingerprint").ends_with("window=none") => Vec::new(),
        1 => vec![OperatorMeta {
            id: 0,
            name: "window".into(),
            version: 1,
            fingerprint: text("fingerprint"),
            layout: text("layout"),
        }],
        2 => serde_json::from_slice(meta.get("operators").map(Vec::as_slice).unwrap_or(b"[]"))
            .map_err(|e| store_err(path, format!("unreadable operator list: {e}")))?,
        v => {
            return Err(store_err(
                path,
                format!("state format {v} is not one this rivulet reads (1 or {FORMAT_VERSION}); was it written by a newer release?"),
            ))
        }
    };
    Ok(Some(Saved {
        version: version as u64,
        meta,
        operators,
    }))
}

/// Every entry of operator `op`'s table (format 1: the `keys` table).
fn read_keys(
    txn: &redb::ReadTransaction,
    version: u64,
    op: u16,
    path: &Path,
) -> Result<Vec<KeyRecord>, StateError> {
    let name = op_table_name(op);
    let def = if version == 1 {
        KEYS_V1
    } else {
        TableDefinition::<&[u8], &[u8]>::new(&name)
    };
    let table = match txn.open_table(def) {
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(store_err(path, e)),
        Ok(t) => t,
    };
    let mut out = Vec::new();
    for entry in table.iter().map_err(|e| store_err(path, e))? {
        let (k, v) = entry.map_err(|e| store_err(path, e))?;
        out.push((k.value()[1..].to_vec(), v.value().to_vec()));
    }
    Ok(out)
}

impl StateStore {
    /// Opens (creating) `dir/state.redb` for the keyed operators `decls`
    /// (operator `i` has id `i`). State saved for an operator under
    /// another fingerprint or state kind is refused, or with
    /// `allow_non_restored` dropped (the input position is kept).
    pub fn open(
        dir: &Path,
        decls: &[StateDecl],
        allow_non_restored: bool,
    ) -> Result<(StateStore, Option<Restored>), StateError> {
        std::fs::create_dir_all(dir).map_err(|e| store_err(dir, e))?;
        let path = dir.join("state.redb");
        let db = crate::util::dbfile::open(&redb::Builder::new(), &path)
            .map_err(|e| store_err(&path, format!("{e} (not a rivulet state file?)")))?;
        let operators: Vec<OperatorMeta> = decls
            .iter()
            .enumerate()
            .map(|(i, d)| OperatorMeta::of(i as u16, d))
            .collect();
        let fingerprint = operators
            .first()
            .map(|o| o.fingerprint.clone())
            .unwrap_or_else(|| "no keyed state".into());
        let layout = operators
            .first()
            .map(|o| o.layout.clone())
            .unwrap_or_else(|| "{}".into());

        let txn = db.begin_read().map_err(|e| store_err(&path, e))?;
        let saved = read_saved(&txn, &path)?;
        let mut restored = None;
        // Whether the file must be rewritten: an upgrade, or dropped state.
        let mut rewrite = false;
        if let Some(saved) = &saved {
            let fits = |o: &OperatorMeta| {
                o.fingerprint == operators[o.id as usize].fingerprint
                    && o.name == operators[o.id as usize].name
                    && o.version <= operators[o.id as usize].version
            };
            let usable = saved.operators.len() == operators.len()
                && saved
                    .operators
                    .iter()
                    .all(|o| (o.id as usize) < operators.len() && fits(o));
            if !usable && !allow_non_restored {
                let found = saved
                    .operators
                    .iter()
                    .map(|o| o.fingerprint.as_str())
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(StateError::Incompatible {
                    path: path.display().to_string(),
                    found,
                    expected: fingerprint.clone(),
                });
            }
            let mut r = Restored {
                position: saved.meta.get("position").cloned().unwrap_or_default(),
                watermark: num(saved.meta.get("watermark")),
                max_ts: num(saved.meta.get("max_ts")),
                input_watermark: saved.meta.get("input_watermark").map(|b| num(Some(b))),
                epoch: num(saved.meta.get("epoch")).max(0) as u64,
                keys: vec![Vec::new(); operators.len()],
            };
            if usable {
                for o in &saved.operators {
                    r.keys[o.id as usize] = read_keys(&txn, saved.version, o.id, &path)?;
                }
            } else {
                tracing::warn!(
                    state = %path.display(),
                    "the pipeline changed: dropping the saved keyed state it cannot use (--allow-non-restored-state), keeping the input position"
                );
            }
            rewrite = saved.version != FORMAT_VERSION || !usable;
            restored = Some(r);
        }
        drop(txn);
        if rewrite {
            // One transaction: the old tables go, the kept keys and the
            // meta data of format 2 come, so a crash leaves either file
            // whole. The checkpoint's position, watermarks and epoch stay.
            Self::rewrite(
                &db,
                &path,
                saved.as_ref(),
                restored.as_ref(),
                &Header {
                    operators: &operators,
                    fingerprint: &fingerprint,
                    layout: &layout,
                },
            )?;
        }
        let epoch = restored.as_ref().map(|r| r.epoch).unwrap_or(0);
        let mut store = StateStore {
            db: Some(db),
            path,
            epoch,
            operators,
            fingerprint,
            layout,
        };
        if restored.is_none() {
            // A fresh store records what it belongs to at once.
            store.commit(&[], i64::MIN, i64::MIN, &mut Pending::default())?;
        }
        Ok((store, restored))
    }

    fn rewrite(
        db: &redb::Database,
        path: &Path,
        saved: Option<&Saved>,
        restored: Option<&Restored>,
        header: &Header,
    ) -> Result<(), StateError> {
        let e = |x: &dyn std::fmt::Display| store_err(path, x);
        let txn = db.begin_write().map_err(|x| e(&x))?;
        if let Some(saved) = saved {
            if saved.version == 1 {
                match txn.delete_table(KEYS_V1) {
                    Ok(_) | Err(redb::TableError::TableDoesNotExist(_)) => {}
                    Err(x) => return Err(e(&x)),
                }
            } else {
                for o in &saved.operators {
                    let name = op_table_name(o.id);
                    match txn.delete_table(TableDefinition::<&[u8], &[u8]>::new(&name)) {
                        Ok(_) | Err(redb::TableError::TableDoesNotExist(_)) => {}
                        Err(x) => return Err(e(&x)),
                    }
                }
            }
        }
        if let Some(r) = restored {
            for (id, keys) in r.keys.iter().enumerate() {
                let name = op_table_name(id as u16);
                let mut t = txn
                    .open_table(TableDefinition::<&[u8], &[u8]>::new(&name))
                    .map_err(|x| e(&x))?;
                for (k, v) in keys {
                    t.insert(table_key(k).as_slice(), v.as_slice())
                        .map_err(|x| e(&x))?;
                }
            }
        }
        {
            // Format 1's `max_ts` stays until the first checkpoint writes
            // `input_watermark`; a restart before then derives it as format
            // 1 did.
            let mut meta = txn.open_table(META).map_err(|x| e(&x))?;
            header.write(&mut meta).map_err(|x| e(&x))?;
        }
        txn.commit().map_err(|x| e(&x))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of the last committed checkpoint.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The operators whose state this store keeps.
    pub fn operators(&self) -> &[OperatorMeta] {
        &self.operators
    }

    /// Writes the last committed checkpoint into a new, closed redb file
    /// (a copy of the live file would be marked as not cleanly closed).
    pub fn save_copy(&self, to: &Path) -> Result<(), StateError> {
        let e = |x: &dyn std::fmt::Display| store_err(to, x);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|x| e(&x))?;
        }
        let Some(db) = self.db.as_ref() else {
            return Err(e(
                &"the state file is not open (the last checkpoint failed)",
            ));
        };
        let tmp = to.with_extension("partial");
        let _ = std::fs::remove_file(&tmp);
        {
            let read = db.begin_read().map_err(|x| e(&x))?;
            let out = redb::Database::create(&tmp).map_err(|x| e(&x))?;
            let write = out.begin_write().map_err(|x| e(&x))?;
            {
                let meta = read.open_table(META).map_err(|x| e(&x))?;
                let mut m = write.open_table(META).map_err(|x| e(&x))?;
                for entry in meta.iter().map_err(|x| e(&x))? {
                    let (k, v) = entry.map_err(|x| e(&x))?;
                    m.insert(k.value(), v.value()).map_err(|x| e(&x))?;
                }
                for o in &self.operators {
                    let name = op_table_name(o.id);
                    let def = TableDefinition::<&[u8], &[u8]>::new(&name);
                    let keys = match read.open_table(def) {
                        Err(redb::TableError::TableDoesNotExist(_)) => continue,
                        other => other.map_err(|x| e(&x))?,
                    };
                    let mut t = write.open_table(def).map_err(|x| e(&x))?;
                    for entry in keys.iter().map_err(|x| e(&x))? {
                        let (k, v) = entry.map_err(|x| e(&x))?;
                        t.insert(k.value(), v.value()).map_err(|x| e(&x))?;
                    }
                }
            }
            write.commit().map_err(|x| e(&x))?;
        }
        std::fs::rename(&tmp, to).map_err(|x| e(&x))
    }

    /// Writes one checkpoint durably. On success `pending` is emptied; on
    /// failure it is kept, so the next checkpoint writes it again.
    pub fn commit(
        &mut self,
        position: &[u8],
        watermark: i64,
        input_watermark: i64,
        pending: &mut Pending,
    ) -> Result<(), StateError> {
        let path = self.path.clone();
        let e = |x: &dyn std::fmt::Display| store_err(&path, x);
        if self.db.is_none() {
            // The last commit failed (a full disk, say): open the file
            // again, which also repairs it, and write everything pending.
            self.db = Some(redb::Database::create(&path).map_err(|x| e(&x))?);
        }
        let result = self.write(position, watermark, input_watermark, pending);
        if result.is_err() {
            self.db = None;
        }
        result
    }

    fn write(
        &mut self,
        position: &[u8],
        watermark: i64,
        input_watermark: i64,
        pending: &mut Pending,
    ) -> Result<(), StateError> {
        let path = self.path.clone();
        let e = |x: &dyn std::fmt::Display| store_err(&path, x);
        let Some(db) = self.db.as_ref() else {
            return Err(e(&"the state file is not open"));
        };
        let txn = db.begin_write().map_err(|x| e(&x))?;
        {
            let mut meta = txn.open_table(META).map_err(|x| e(&x))?;
            let names: Vec<String> = self.operators.iter().map(|o| op_table_name(o.id)).collect();
            let mut tables = Vec::with_capacity(names.len());
            for name in &names {
                tables.push(
                    txn.open_table(TableDefinition::<&[u8], &[u8]>::new(name))
                        .map_err(|x| e(&x))?,
                );
            }
            for ((op, k), v) in &pending.keys {
                let Some(table) = tables.get_mut(*op as usize) else {
                    return Err(e(&format!("a change for unknown operator {op}")));
                };
                let tk = table_key(k);
                match v {
                    Some(record) => {
                        table
                            .insert(tk.as_slice(), record.as_slice())
                            .map_err(|x| e(&x))?;
                    }
                    None => {
                        table.remove(tk.as_slice()).map_err(|x| e(&x))?;
                    }
                }
            }
            let epoch = self.epoch + 1;
            let header = Header {
                operators: &self.operators,
                fingerprint: &self.fingerprint,
                layout: &self.layout,
            };
            header.write(&mut meta).map_err(|x| e(&x))?;
            let mut put = |k: &str, v: &[u8]| meta.insert(k, v).map(|_| ()).map_err(|x| e(&x));
            put("position", position)?;
            put("watermark", &watermark.to_le_bytes())?;
            put("input_watermark", &input_watermark.to_le_bytes())?;
            put("epoch", &(epoch as i64).to_le_bytes())?;
            // Superseded by `input_watermark` (format 1).
            meta.remove("max_ts").map_err(|x| e(&x))?;
        }
        txn.commit().map_err(|x| e(&x))?;
        self.epoch += 1;
        pending.keys.clear();
        Ok(())
    }

    /// The committed records of operator `op` in a range of key groups:
    /// what moves when those groups change owner.
    pub fn export_groups(
        &self,
        op: u16,
        groups: RangeInclusive<KeyGroup>,
    ) -> Result<Vec<KeyRecord>, StateError> {
        let e = |x: &dyn std::fmt::Display| store_err(&self.path, x);
        let Some(db) = self.db.as_ref() else {
            return Err(e(&"the state file is not open"));
        };
        let txn = db.begin_read().map_err(|x| e(&x))?;
        let name = op_table_name(op);
        let table = match txn.open_table(TableDefinition::<&[u8], &[u8]>::new(&name)) {
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            other => other.map_err(|x| e(&x))?,
        };
        let start = [groups.start().0];
        let mut out = Vec::new();
        for entry in table.range(&start[..]..).map_err(|x| e(&x))? {
            let (k, v) = entry.map_err(|x| e(&x))?;
            if k.value()[0] > groups.end().0 {
                break;
            }
            out.push((k.value()[1..].to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Replaces operator `op`'s records in a range of key groups with
    /// `records` (keys outside the range are refused), durably, in one
    /// transaction.
    pub fn import_groups(
        &mut self,
        op: u16,
        groups: RangeInclusive<KeyGroup>,
        records: &[KeyRecord],
    ) -> Result<(), StateError> {
        let path = self.path.clone();
        let e = |x: &dyn std::fmt::Display| store_err(&path, x);
        if let Some((k, _)) = records
            .iter()
            .find(|(k, _)| !groups.contains(&KeyGroup::of_key(k)))
        {
            return Err(e(&format!(
                "a key of group {} is outside the groups imported ({}..={})",
                KeyGroup::of_key(k).0,
                groups.start().0,
                groups.end().0
            )));
        }
        let Some(db) = self.db.as_ref() else {
            return Err(e(&"the state file is not open"));
        };
        let txn = db.begin_write().map_err(|x| e(&x))?;
        {
            let name = op_table_name(op);
            let mut t = txn
                .open_table(TableDefinition::<&[u8], &[u8]>::new(&name))
                .map_err(|x| e(&x))?;
            let start = [groups.start().0];
            let stale: Vec<Vec<u8>> = {
                let mut v = Vec::new();
                for entry in t.range(&start[..]..).map_err(|x| e(&x))? {
                    let (k, _) = entry.map_err(|x| e(&x))?;
                    if k.value()[0] > groups.end().0 {
                        break;
                    }
                    v.push(k.value().to_vec());
                }
                v
            };
            for k in stale {
                t.remove(k.as_slice()).map_err(|x| e(&x))?;
            }
            for (k, v) in records {
                t.insert(table_key(k).as_slice(), v.as_slice())
                    .map_err(|x| e(&x))?;
            }
        }
        txn.commit().map_err(|x| e(&x))
    }
}

/// Reads a state directory (or a savepoint file) without changing it.
pub fn inspect(dir: &Path) -> Result<Inspection, StateError> {
    if dir.is_file() {
        return inspect_file(dir);
    }
    let path = dir.join("state.redb");
    if !path.exists() {
        return Err(store_err(&path, "no such file (not a state directory?)"));
    }
    inspect_file(&path)
}

fn inspect_file(path: &Path) -> Result<Inspection, StateError> {
    let path = path.to_path_buf();
    // A file left by a crash needs redb's repair, which writes: repair a
    // copy, so inspecting never changes the state.
    let mut _copy = None;
    let (_ro, _rw);
    let txn = match redb::ReadOnlyDatabase::open(&path) {
        Ok(db) => {
            _ro = db;
            _ro.begin_read().map_err(|e| store_err(&path, e))?
        }
        Err(_) => {
            let tmp =
                std::env::temp_dir().join(format!("rivulet-inspect-{}.redb", std::process::id()));
            std::fs::copy(&path, &tmp).map_err(|e| store_err(&path, e))?;
            _copy = Some(TempFile(tmp.clone()));
            _rw = redb::Database::create(&tmp)
                .map_err(|e| store_err(&path, format!("{e} (not a rivulet state file?)")))?;
            _rw.begin_read().map_err(|e| store_err(&path, e))?
        }
    };
    let Some(saved) = read_saved(&txn, &path)? else {
        return Err(store_err(&path, "no checkpoint in this file"));
    };
    let text = |k: &str| {
        saved
            .meta
            .get(k)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    let mut out = Inspection {
        version: saved.version,
        epoch: num(saved.meta.get("epoch")).max(0) as u64,
        watermark: num(saved.meta.get("watermark")),
        position: saved.meta.get("position").cloned().unwrap_or_default(),
        fingerprint: text("fingerprint"),
        layout: serde_json::from_str(&text("layout")).unwrap_or_default(),
        operators: saved.operators.clone(),
        keys: Vec::new(),
        later_windows: Vec::new(),
        steps: Vec::new(),
    };
    for o in &saved.operators {
        for (k, v) in read_keys(&txn, saved.version, o.id, &path)? {
            if o.name != "window" {
                out.steps.push((o.id, k, v));
                continue;
            }
            let snap: KeySnapshot = postcard::from_bytes(&v)
                .map_err(|e| store_err(&path, format!("unreadable key state: {e}")))?;
            if o.id == 0 {
                out.keys.push((k, snap));
            } else {
                out.later_windows.push((o.id, k, snap));
            }
        }
    }
    Ok(out)
}

/// Puts a savepoint in place as the state of `dir` (replacing what is there).
pub fn install_savepoint(savepoint: &Path, dir: &Path) -> Result<(), StateError> {
    // Refuse what is not a rivulet state file before replacing anything.
    inspect_file(savepoint)?;
    std::fs::create_dir_all(dir).map_err(|e| store_err(dir, e))?;
    let target = dir.join("state.redb");
    if target.exists() {
        tracing::warn!(state = %target.display(), "replacing the existing state with the savepoint");
    }
    std::fs::copy(savepoint, &target).map_err(|e| store_err(&target, e))?;
    Ok(())
}

/// Removes a file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn decl(fp: &str) -> StateDecl {
        StateDecl {
            name: "window",
            version: 1,
            fingerprint: fp.into(),
            layout: "{}".into(),
        }
    }

    fn key(i: u32) -> Box<[u8]> {
        format!("key-{i}").into_bytes().into()
    }

    #[test]
    fn keys_of_each_operator_round_trip_and_a_changed_operator_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let decls = [decl("a"), decl("b")];
        {
            let (mut s, restored) = StateStore::open(dir.path(), &decls, false).unwrap();
            assert!(restored.is_none());
            let mut p = Pending::default();
            p.upsert(0, key(1), vec![1]);
            p.upsert(1, key(1), vec![2]);
            p.upsert(1, key(2), vec![3]);
            s.commit(&[9], 100, 90, &mut p).unwrap();
            p.delete(1, key(2));
            s.commit(&[10], 200, 190, &mut p).unwrap();
        }
        let (_, r) = StateStore::open(dir.path(), &decls, false).unwrap();
        let r = r.unwrap();
        assert_eq!(
            (r.position, r.watermark, r.input_watermark),
            (vec![10], 200, Some(190))
        );
        assert_eq!(r.keys[0], vec![(key(1).to_vec(), vec![1])]);
        assert_eq!(r.keys[1], vec![(key(1).to_vec(), vec![2])]);
        let Err(err) = StateStore::open(dir.path(), &[decl("a"), decl("c")], false) else {
            panic!("a changed operator must be refused");
        };
        assert!(err.to_string().contains("different pipeline"), "{err}");
        let (_, r) = StateStore::open(dir.path(), &[decl("a"), decl("c")], true).unwrap();
        assert_eq!(r.unwrap().key_count(), 0, "state dropped, position kept");
    }

    /// Regression: the upgrade of a format-1 file and its meta data are one
    /// transaction, and a restart before the first new checkpoint restores
    /// exactly what format 1 held (a second transaction used to follow, and
    /// a crash between the two lost every key).
    #[test]
    fn an_upgraded_format_1_file_restores_the_same_before_any_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/state-v1/checkpoint.redb");
        std::fs::copy(&fixture, dir.path().join("state.redb")).unwrap();
        let fp = "keys=[k] window=Tumbling { size: 1000 } lateness=500 aggregates=[n=Count,total=Sum,hi=Max,first=First,last=Last]";
        let decls = [decl(fp)];
        let (s1, r1) = StateStore::open(dir.path(), &decls, false).unwrap();
        let r1 = r1.unwrap();
        assert_eq!(s1.epoch(), r1.epoch, "the upgrade is no checkpoint");
        drop(s1);
        assert_eq!(inspect(dir.path()).unwrap().version, 2);
        let (_, r2) = StateStore::open(dir.path(), &decls, false).unwrap();
        let r2 = r2.unwrap();
        assert_eq!(r1.key_count(), 276);
        let sorted = |r: &Restored| {
            let mut k = r.keys[0].clone();
            k.sort();
            k
        };
        assert_eq!(sorted(&r1), sorted(&r2));
        assert_eq!(
            (
                r1.position.clone(),
                r1.watermark,
                r1.max_ts,
                r1.input_watermark,
                r1.epoch
            ),
            (
                r2.position,
                r2.watermark,
                r2.max_ts,
                r2.input_watermark,
                r2.epoch
            )
        );
        assert_eq!(r2.input_watermark, None, "still derived from max_ts");
        assert!(r2.max_ts > 0);
    }

    #[test]
    fn a_range_of_key_groups_is_exported_and_imported() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let decls = [decl("w")];
        let (mut a, _) = StateStore::open(from.path(), &decls, false).unwrap();
        let mut p = Pending::default();
        for i in 0..500 {
            p.upsert(0, key(i), i.to_le_bytes().to_vec());
        }
        a.commit(&[], 0, 0, &mut p).unwrap();
        let range = KeyGroup(64)..=KeyGroup(127);
        let moved = a.export_groups(0, range.clone()).unwrap();
        let expected = (0..500)
            .filter(|i| range.contains(&KeyGroup::of_key(&key(*i))))
            .count();
        assert_eq!(moved.len(), expected);
        assert!(expected > 50);
        let (mut b, _) = StateStore::open(to.path(), &decls, false).unwrap();
        // What the target held in those groups is replaced.
        let stale = (0..10_000)
            .map(key)
            .find(|k| range.contains(&KeyGroup::of_key(k)) && !moved.iter().any(|m| *m.0 == **k))
            .unwrap();
        let mut p = Pending::default();
        p.upsert(0, stale.clone(), vec![0]);
        b.commit(&[], 0, 0, &mut p).unwrap();
        b.import_groups(0, range.clone(), &moved).unwrap();
        let mut back = b.export_groups(0, KeyGroup(0)..=KeyGroup(255)).unwrap();
        back.sort();
        let mut want = moved.clone();
        want.sort();
        assert_eq!(back, want);
        let outside = (key(0).to_vec(), vec![]);
        let bad = b.import_groups(0, KeyGroup(0)..=KeyGroup(0), &[outside]);
        assert!(KeyGroup::of_key(&key(0)).0 == 0 || bad.is_err());
    }
}
