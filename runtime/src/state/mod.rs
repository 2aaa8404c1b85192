//! Durable state: checkpoints of keyed window state in redb.
//!
//! A checkpoint is one redb write transaction holding what changed since
//! the previous one (keys upserted or deleted, postcard-encoded), the
//! watermark, and the source position after the last event it covers. It
//! is committed durably, so a checkpoint is wholly there or not at all. On
//! start, rivulet loads the last checkpoint, gives each key to the worker
//! that owns its key group, and asks the source to resume after the
//! position; results after that point are emitted again (identical, since
//! processing is deterministic).
//!
//! Savepoints are copies of the state file taken right after a checkpoint
//! requested through the control socket (see [`control`]); they are
//! portable (redb and postcard fix their byte order).
//!
//! Record format version 1: `meta` table (`version`, `fingerprint`,
//! `position`, `watermark`, `max_ts`, `epoch`), `keys` table from
//! `[key group] ++ key bytes` to a postcard [`KeySnapshot`].

pub mod control;

use crate::operators::window::KeySnapshot;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys");
pub const FORMAT_VERSION: u64 = 1;

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

/// What a checkpoint restores.
#[derive(Debug, Default)]
pub struct Restored {
    pub position: Vec<u8>,
    pub watermark: i64,
    pub max_ts: i64,
    pub epoch: u64,
    pub keys: Vec<(Vec<u8>, KeySnapshot)>,
}

/// Changes waiting to be committed: key → new state (`None`: deleted).
#[derive(Debug, Default)]
pub struct Pending {
    pub keys: HashMap<Box<[u8]>, Option<KeySnapshot>>,
}

impl Pending {
    pub fn upsert(&mut self, key: Box<[u8]>, snap: KeySnapshot) {
        self.keys.insert(key, Some(snap));
    }
    pub fn delete(&mut self, key: Box<[u8]>) {
        self.keys.insert(key, None);
    }
}

pub struct StateStore {
    /// `None` after a failed commit: reopened (and repaired) before the next.
    db: Option<redb::Database>,
    path: PathBuf,
    epoch: u64,
    /// Key field and aggregate names, so `rivulet state inspect` can label values.
    layout: String,
}

/// What `rivulet state inspect` shows.
#[derive(Debug)]
pub struct Inspection {
    pub epoch: u64,
    pub watermark: i64,
    pub position: Vec<u8>,
    pub fingerprint: String,
    /// Key field names and aggregate names.
    pub layout: serde_json::Value,
    pub keys: Vec<(Vec<u8>, KeySnapshot)>,
}

fn store_err(path: &Path, e: impl std::fmt::Display) -> StateError {
    StateError::Store {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The table key of a key: its key group first, so one range holds a group.
fn table_key(key: &[u8]) -> Vec<u8> {
    let group = crate::partition::KeyGroup::of_key(key).0;
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(group);
    k.extend_from_slice(key);
    k
}

impl StateStore {
    /// Opens (creating) `dir/state.redb`. `fingerprint` names what the state
    /// depends on (key fields, window, aggregates); state written under
    /// another fingerprint is refused.
    pub fn open(
        dir: &Path,
        fingerprint: &str,
        layout: &str,
        allow_non_restored: bool,
    ) -> Result<(StateStore, Option<Restored>), StateError> {
        std::fs::create_dir_all(dir).map_err(|e| store_err(dir, e))?;
        let path = dir.join("state.redb");
        let db = redb::Database::create(&path)
            .map_err(|e| store_err(&path, format!("{e} (not a rivulet state file?)")))?;
        let restored = {
            let txn = db.begin_read().map_err(|e| store_err(&path, e))?;
            match txn.open_table(META) {
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(store_err(&path, e)),
                Ok(meta) => {
                    let get = |k: &str| -> Result<Option<Vec<u8>>, StateError> {
                        Ok(meta
                            .get(k)
                            .map_err(|e| store_err(&path, e))?
                            .map(|v| v.value().to_vec()))
                    };
                    let num = |b: Option<Vec<u8>>| -> i64 {
                        b.and_then(|b| b.try_into().ok())
                            .map(i64::from_le_bytes)
                            .unwrap_or(i64::MIN)
                    };
                    let found = get("fingerprint")?
                        .map(|f| String::from_utf8_lossy(&f).into_owned())
                        .unwrap_or_default();
                    let drop_keys = found != fingerprint && allow_non_restored;
                    if found != fingerprint && !allow_non_restored {
                        return Err(StateError::Incompatible {
                            path: path.display().to_string(),
                            found,
                            expected: fingerprint.to_string(),
                        });
                    }
                    let version = num(get("version")?);
                    if version != FORMAT_VERSION as i64 {
                        return Err(store_err(
                            &path,
                            format!("state format {version} is not {FORMAT_VERSION}"),
                        ));
                    }
                    let mut r = Restored {
                        position: get("position")?.unwrap_or_default(),
                        watermark: num(get("watermark")?),
                        max_ts: num(get("max_ts")?),
                        epoch: num(get("epoch")?).max(0) as u64,
                        keys: Vec::new(),
                    };
                    let keys = txn.open_table(KEYS).map_err(|e| store_err(&path, e))?;
                    if drop_keys {
                        let n = keys.len().map_err(|e| store_err(&path, e))?;
                        tracing::warn!(
                            state = %path.display(),
                            keys = n,
                            "the pipeline changed: dropping the saved keyed state it cannot use (--allow-non-restored-state), keeping the input position"
                        );
                    } else {
                        for entry in keys.iter().map_err(|e| store_err(&path, e))? {
                            let (k, v) = entry.map_err(|e| store_err(&path, e))?;
                            let snap: KeySnapshot =
                                postcard::from_bytes(v.value()).map_err(|e| {
                                    store_err(&path, format!("unreadable key state: {e}"))
                                })?;
                            r.keys.push((k.value()[1..].to_vec(), snap));
                        }
                    }
                    if drop_keys {
                        Some((r, true))
                    } else {
                        Some((r, false))
                    }
                }
            }
        };
        let (restored, clear) = match restored {
            Some((r, clear)) => (Some(r), clear),
            None => (None, false),
        };
        if clear {
            let txn = db.begin_write().map_err(|e| store_err(&path, e))?;
            txn.delete_table(KEYS).map_err(|e| store_err(&path, e))?;
            txn.commit().map_err(|e| store_err(&path, e))?;
        }
        let epoch = restored.as_ref().map(|r| r.epoch).unwrap_or(0);
        let mut store = StateStore {
            db: Some(db),
            path,
            epoch,
            layout: layout.to_string(),
        };
        if restored.is_none() || clear {
            // A fresh store records what it belongs to at once.
            store.commit(
                &[],
                i64::MIN,
                i64::MIN,
                &mut Pending::default(),
                fingerprint,
            )?;
        }
        Ok((store, restored))
    }

    pub fn path(&self) -> &Path {
        &self.path
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
                let keys = read.open_table(KEYS).map_err(|x| e(&x))?;
                let mut t = write.open_table(KEYS).map_err(|x| e(&x))?;
                for entry in keys.iter().map_err(|x| e(&x))? {
                    let (k, v) = entry.map_err(|x| e(&x))?;
                    t.insert(k.value(), v.value()).map_err(|x| e(&x))?;
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
        max_ts: i64,
        pending: &mut Pending,
        fingerprint: &str,
    ) -> Result<(), StateError> {
        let path = self.path.clone();
        let e = |x: &dyn std::fmt::Display| store_err(&path, x);
        if self.db.is_none() {
            // The last commit failed (a full disk, say): open the file
            // again, which also repairs it, and write everything pending.
            self.db = Some(redb::Database::create(&path).map_err(|x| e(&x))?);
        }
        let result = self.write(position, watermark, max_ts, pending, fingerprint);
        if result.is_err() {
            self.db = None;
        }
        result
    }

    fn write(
        &mut self,
        position: &[u8],
        watermark: i64,
        max_ts: i64,
        pending: &mut Pending,
        fingerprint: &str,
    ) -> Result<(), StateError> {
        let path = self.path.clone();
        let e = |x: &dyn std::fmt::Display| store_err(&path, x);
        let Some(db) = self.db.as_ref() else {
            return Err(e(&"the state file is not open"));
        };
        let txn = db.begin_write().map_err(|x| e(&x))?;
        {
            let mut meta = txn.open_table(META).map_err(|x| e(&x))?;
            let mut keys = txn.open_table(KEYS).map_err(|x| e(&x))?;
            for (k, v) in &pending.keys {
                let tk = table_key(k);
                match v {
                    Some(snap) => {
                        let bytes = postcard::to_stdvec(snap).map_err(|x| e(&x))?;
                        keys.insert(tk.as_slice(), bytes.as_slice())
                            .map_err(|x| e(&x))?;
                    }
                    None => {
                        keys.remove(tk.as_slice()).map_err(|x| e(&x))?;
                    }
                }
            }
            let epoch = self.epoch + 1;
            meta.insert("version", (FORMAT_VERSION as i64).to_le_bytes().as_slice())
                .map_err(|x| e(&x))?;
            meta.insert("fingerprint", fingerprint.as_bytes())
                .map_err(|x| e(&x))?;
            meta.insert("position", position).map_err(|x| e(&x))?;
            meta.insert("watermark", watermark.to_le_bytes().as_slice())
                .map_err(|x| e(&x))?;
            meta.insert("max_ts", max_ts.to_le_bytes().as_slice())
                .map_err(|x| e(&x))?;
            meta.insert("epoch", (epoch as i64).to_le_bytes().as_slice())
                .map_err(|x| e(&x))?;
            meta.insert("layout", self.layout.as_bytes())
                .map_err(|x| e(&x))?;
        }
        txn.commit().map_err(|x| e(&x))?;
        self.epoch += 1;
        pending.keys.clear();
        Ok(())
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
    let meta = txn.open_table(META).map_err(|e| store_err(&path, e))?;
    let get = |k: &str| -> Result<Vec<u8>, StateError> {
        Ok(meta
            .get(k)
            .map_err(|e| store_err(&path, e))?
            .map(|v| v.value().to_vec())
            .unwrap_or_default())
    };
    let num = |b: Vec<u8>| b.try_into().map(i64::from_le_bytes).unwrap_or(i64::MIN);
    let mut out = Inspection {
        epoch: num(get("epoch")?).max(0) as u64,
        watermark: num(get("watermark")?),
        position: get("position")?,
        fingerprint: String::from_utf8_lossy(&get("fingerprint")?).into_owned(),
        layout: serde_json::from_slice(&get("layout")?).unwrap_or_default(),
        keys: Vec::new(),
    };
    let keys = txn.open_table(KEYS).map_err(|e| store_err(&path, e))?;
    for entry in keys.iter().map_err(|e| store_err(&path, e))? {
        let (k, v) = entry.map_err(|e| store_err(&path, e))?;
        let snap: KeySnapshot = postcard::from_bytes(v.value())
            .map_err(|e| store_err(&path, format!("unreadable key state: {e}")))?;
        out.keys.push((k.value()[1..].to_vec(), snap));
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
