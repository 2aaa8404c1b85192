//! Global checkpoints of peer mode, in each peer's state file.
//!
//! Every peer keeps a whole copy of the cluster's last global checkpoint:
//! the keyed state of every key group (not only its own), each peer's
//! source position, and the checkpoint's mark (id and view). A checkpoint
//! is written in two steps:
//! 1. each peer's [`Delta`] (the keys its groups changed and its position)
//!    goes to every peer, which keeps it in the `pending` table, durably;
//! 2. once the checkpoint is known complete (every peer holds every
//!    delta), [`StateStore::apply_pending`] folds the deltas into the state
//!    in one transaction.
//!
//! So a crash between the steps leaves a whole pending checkpoint that is
//! applied or dropped by what the cluster decided, and a peer that missed
//! checkpoints takes a [`Snapshot`] of another peer's file.

use super::{op_table_name, store_err, table_key, Header, KeyRecord, StateError, StateStore, META};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const PENDING: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pending");

/// Which global checkpoint: its id and the view it was taken in (ids are
/// time-derived and may repeat across views).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mark {
    pub id: u64,
    pub view: u64,
}

/// One peer's part of a global checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Delta {
    pub mark: Mark,
    pub peer: String,
    /// The peer's source position at the checkpoint.
    pub position: Vec<u8>,
    /// The watermark of the peer's keyed operator and of its input.
    pub watermark: i64,
    pub input_watermark: i64,
    /// (operator, key, new record or `None` for deleted).
    pub changes: Vec<(u16, Vec<u8>, Option<Vec<u8>>)>,
}

/// A whole global checkpoint, as one peer sends it to another.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub mark: Mark,
    pub positions: BTreeMap<String, Vec<u8>>,
    pub watermark: i64,
    pub input_watermark: i64,
    /// Per operator, every key with its record.
    pub keys: Vec<Vec<KeyRecord>>,
}

fn pending_key(mark: Mark, peer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + peer.len());
    k.extend_from_slice(&mark.view.to_be_bytes());
    k.extend_from_slice(&mark.id.to_be_bytes());
    k.extend_from_slice(peer.as_bytes());
    k
}

impl StateStore {
    fn db(&self) -> Result<&redb::Database, StateError> {
        self.db
            .as_ref()
            .ok_or_else(|| store_err(&self.path, "the state file is not open"))
    }

    /// The last global checkpoint this file holds, if any.
    pub fn global_mark(&self) -> Result<Option<Mark>, StateError> {
        let e = |x: &dyn std::fmt::Display| store_err(&self.path, x);
        let txn = self.db()?.begin_read().map_err(|x| e(&x))?;
        let meta = match txn.open_table(META) {
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            other => other.map_err(|x| e(&x))?,
        };
        let Some(v) = meta.get("global").map_err(|x| e(&x))? else {
            return Ok(None);
        };
        postcard::from_bytes(v.value())
            .map(Some)
            .map_err(|x| e(&format!("unreadable global checkpoint mark: {x}")))
    }

    /// Every peer's source position at the last global checkpoint.
    pub fn positions(&self) -> Result<BTreeMap<String, Vec<u8>>, StateError> {
        let e = |x: &dyn std::fmt::Display| store_err(&self.path, x);
        let txn = self.db()?.begin_read().map_err(|x| e(&x))?;
        let meta = match txn.open_table(META) {
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            other => other.map_err(|x| e(&x))?,
        };
        let Some(v) = meta.get("positions").map_err(|x| e(&x))? else {
            return Ok(BTreeMap::new());
        };
        postcard::from_bytes(v.value()).map_err(|x| e(&format!("unreadable positions: {x}")))
    }

    /// Keeps one peer's delta of a checkpoint not yet complete, durably.
    pub fn write_pending(&mut self, d: &Delta) -> Result<(), StateError> {
        let path = self.path.clone();
        let e = |x: &dyn std::fmt::Display| store_err(&path, x);
        let body = postcard::to_stdvec(d).map_err(|x| e(&x))?;
        let txn = self.db()?.begin_write().map_err(|x| e(&x))?;
        {
            let mut t = txn.open_table(PENDING).map_err(|x| e(&x))?;
            t.insert(pending_key(d.mark, &d.peer).as_slice(), body.as_slice())
                .map_err(|x| e(&x))?;
        }
        txn.commit().map_err(|x| e(&x))
    }

    /// The peers whose deltas of `mark` are pending here.
    pub fn pending_peers(&self, mark: Mark) -> Result<Vec<String>, StateError> {
        let e = |x: &dyn std::fmt::Display| store_err(&self.path, x);
        let txn = self.db()?.begin_read().map_err(|x| e(&x))?;
        let t = match txn.open_table(PENDING) {
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            other => other.map_err(|x| e(&x))?,
        };
        let prefix = pending_key(mark, "");
        let mut out = Vec::new();
        for entry in t.range(prefix.as_slice()..).map_err(|x| e(&x))? {
            let (k, _) = entry.map_err(|x| e(&x))?;
            let k = k.value();
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(out)
    }

    /// Folds the pending deltas of `mark` (one per peer in `members`) into
    /// the state, in one transaction, with every older pending delta of
    /// the same view first: a peer's delta holds its changes since its
    /// previous one, which may belong to a checkpoint that never completed
    /// (another peer skipped it). Forgets the deltas applied and those of
    /// other views. Returns `false`, changing nothing, when a member's
    /// delta of `mark` is missing.
    pub fn apply_pending(&mut self, mark: Mark, members: &[String]) -> Result<bool, StateError> {
        let path = self.path.clone();
        let e = |x: &dyn std::fmt::Display| store_err(&path, x);
        let operators = self.operators.clone();
        let header = Header {
            operators: &operators,
            fingerprint: &self.fingerprint,
            layout: &self.layout,
        };
        let txn = self.db()?.begin_write().map_err(|x| e(&x))?;
        {
            let mut pending = txn.open_table(PENDING).map_err(|x| e(&x))?;
            for m in members {
                if pending
                    .get(pending_key(mark, m).as_slice())
                    .map_err(|x| e(&x))?
                    .is_none()
                {
                    return Ok(false);
                }
            }
            // This view's deltas up to `mark`, oldest first (the keys sort
            // by view, then id).
            let mut deltas = Vec::new();
            let from = pending_key(
                Mark {
                    id: 0,
                    view: mark.view,
                },
                "",
            );
            for entry in pending.range(from.as_slice()..).map_err(|x| e(&x))? {
                let (k, v) = entry.map_err(|x| e(&x))?;
                let k = k.value();
                let view = u64::from_be_bytes(k[..8].try_into().unwrap_or_default());
                let id = u64::from_be_bytes(k[8..16].try_into().unwrap_or_default());
                if view != mark.view || id > mark.id {
                    break;
                }
                let d: Delta = postcard::from_bytes(v.value())
                    .map_err(|x| e(&format!("unreadable pending checkpoint: {x}")))?;
                deltas.push(d);
            }
            let mut meta = txn.open_table(META).map_err(|x| e(&x))?;
            let mut positions: BTreeMap<String, Vec<u8>> = match meta.get("positions") {
                Ok(Some(v)) => postcard::from_bytes(v.value()).unwrap_or_default(),
                _ => BTreeMap::new(),
            };
            let mut tables = Vec::new();
            let names: Vec<String> = operators.iter().map(|o| op_table_name(o.id)).collect();
            for name in &names {
                tables.push(
                    txn.open_table(TableDefinition::<&[u8], &[u8]>::new(name))
                        .map_err(|x| e(&x))?,
                );
            }
            let (mut wm, mut iwm) = (i64::MAX, i64::MAX);
            for d in &deltas {
                for (op, k, v) in &d.changes {
                    let Some(t) = tables.get_mut(*op as usize) else {
                        return Err(e(&format!("a change for unknown operator {op}")));
                    };
                    let tk = table_key(k);
                    match v {
                        Some(r) => {
                            t.insert(tk.as_slice(), r.as_slice()).map_err(|x| e(&x))?;
                        }
                        None => {
                            t.remove(tk.as_slice()).map_err(|x| e(&x))?;
                        }
                    }
                }
                // Older deltas bring their changes only; the checkpoint's
                // own bring the positions and watermarks too.
                if d.mark != mark {
                    continue;
                }
                positions.insert(d.peer.clone(), d.position.clone());
                wm = wm.min(d.watermark);
                iwm = iwm.min(d.input_watermark);
            }
            // Pending deltas of this checkpoint and of older ones go; a
            // newer checkpoint's (same view) stay for their decision.
            let mut stale = Vec::new();
            for entry in pending.iter().map_err(|x| e(&x))? {
                let (k, _) = entry.map_err(|x| e(&x))?;
                let k = k.value();
                let view = u64::from_be_bytes(k[..8].try_into().unwrap_or_default());
                let id = u64::from_be_bytes(k[8..16].try_into().unwrap_or_default());
                if view != mark.view || id <= mark.id {
                    stale.push(k.to_vec());
                }
            }
            for k in stale {
                pending.remove(k.as_slice()).map_err(|x| e(&x))?;
            }
            header.write(&mut meta).map_err(|x| e(&x))?;
            let pos = postcard::to_stdvec(&positions).map_err(|x| e(&x))?;
            let m = postcard::to_stdvec(&mark).map_err(|x| e(&x))?;
            let epoch = self.epoch + 1;
            let mut put = |k: &str, v: &[u8]| meta.insert(k, v).map(|_| ()).map_err(|x| e(&x));
            put("positions", &pos)?;
            put("global", &m)?;
            put("watermark", &wm.to_le_bytes())?;
            put("input_watermark", &iwm.to_le_bytes())?;
            put("epoch", &(epoch as i64).to_le_bytes())?;
        }
        txn.commit().map_err(|x| e(&x))?;
        self.epoch += 1;
        Ok(true)
    }

    /// Forgets every pending delta (checkpoints that will never complete).
    pub fn discard_pending(&mut self) -> Result<(), StateError> {
        let path = self.path.clone();
        let e = |x: &dyn std::fmt::Display| store_err(&path, x);
        let txn = self.db()?.begin_write().map_err(|x| e(&x))?;
        match txn.delete_table(PENDING) {
            Ok(_) | Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(x) => return Err(e(&x)),
        }
        txn.commit().map_err(|x| e(&x))
    }

    /// The whole last global checkpoint, for a peer that lacks it.
    pub fn export_snapshot(&self) -> Result<Snapshot, StateError> {
        let e = |x: &dyn std::fmt::Display| store_err(&self.path, x);
        let mark = self.global_mark()?.unwrap_or_default();
        let positions = self.positions()?;
        let txn = self.db()?.begin_read().map_err(|x| e(&x))?;
        let saved = super::read_saved(&txn, &self.path)?;
        let meta = saved.as_ref().map(|s| &s.meta);
        let mut keys = Vec::new();
        for o in &self.operators {
            keys.push(super::read_keys(
                &txn,
                super::FORMAT_VERSION,
                o.id,
                &self.path,
            )?);
        }
        Ok(Snapshot {
            mark,
            positions,
            watermark: super::num(meta.and_then(|m| m.get("watermark"))),
            input_watermark: super::num(meta.and_then(|m| m.get("input_watermark"))),
            keys,
        })
    }

    /// Replaces this file's state with another peer's global checkpoint,
    /// in one transaction.
    pub fn import_snapshot(&mut self, s: &Snapshot) -> Result<(), StateError> {
        let path = self.path.clone();
        let e = |x: &dyn std::fmt::Display| store_err(&path, x);
        let operators = self.operators.clone();
        if s.keys.len() != operators.len() {
            return Err(e(&format!(
                "a snapshot of {} operators for a pipeline of {}",
                s.keys.len(),
                operators.len()
            )));
        }
        let header = Header {
            operators: &operators,
            fingerprint: &self.fingerprint,
            layout: &self.layout,
        };
        let txn = self.db()?.begin_write().map_err(|x| e(&x))?;
        {
            match txn.delete_table(PENDING) {
                Ok(_) | Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(x) => return Err(e(&x)),
            }
            for (o, keys) in operators.iter().zip(&s.keys) {
                let name = op_table_name(o.id);
                match txn.delete_table(TableDefinition::<&[u8], &[u8]>::new(&name)) {
                    Ok(_) | Err(redb::TableError::TableDoesNotExist(_)) => {}
                    Err(x) => return Err(e(&x)),
                }
                let mut t = txn
                    .open_table(TableDefinition::<&[u8], &[u8]>::new(&name))
                    .map_err(|x| e(&x))?;
                for (k, v) in keys {
                    t.insert(table_key(k).as_slice(), v.as_slice())
                        .map_err(|x| e(&x))?;
                }
            }
            let mut meta = txn.open_table(META).map_err(|x| e(&x))?;
            header.write(&mut meta).map_err(|x| e(&x))?;
            let pos = postcard::to_stdvec(&s.positions).map_err(|x| e(&x))?;
            let m = postcard::to_stdvec(&s.mark).map_err(|x| e(&x))?;
            let epoch = self.epoch + 1;
            let mut put = |k: &str, v: &[u8]| meta.insert(k, v).map(|_| ()).map_err(|x| e(&x));
            put("positions", &pos)?;
            put("global", &m)?;
            put("watermark", &s.watermark.to_le_bytes())?;
            put("input_watermark", &s.input_watermark.to_le_bytes())?;
            put("epoch", &(epoch as i64).to_le_bytes())?;
        }
        txn.commit().map_err(|x| e(&x))?;
        self.epoch += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::operators::keyed::StateDecl;

    fn decl() -> StateDecl {
        StateDecl {
            name: "window",
            version: 1,
            fingerprint: "fp".into(),
            layout: "{}".into(),
        }
    }

    fn delta(mark: Mark, peer: &str, key: &[u8], pos: u8) -> Delta {
        Delta {
            mark,
            peer: peer.into(),
            position: vec![pos],
            watermark: 100,
            input_watermark: 90 + pos as i64,
            changes: vec![(0, key.to_vec(), Some(vec![pos]))],
        }
    }

    #[test]
    fn a_checkpoint_applies_only_with_every_members_delta() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = StateStore::open(dir.path(), &[decl()], false).unwrap();
        let m = Mark { id: 7, view: 3 };
        let members = vec!["a".to_string(), "b".to_string()];
        s.write_pending(&delta(m, "a", b"k1", 1)).unwrap();
        assert!(
            !s.apply_pending(m, &members).unwrap(),
            "b's delta is missing"
        );
        assert_eq!(s.global_mark().unwrap(), None);
        s.write_pending(&delta(m, "b", b"k2", 2)).unwrap();
        // A newer checkpoint's delta arrived before the decision: it stays.
        let next = Mark { id: 8, view: 3 };
        s.write_pending(&delta(next, "a", b"k3", 3)).unwrap();
        assert_eq!(s.pending_peers(m).unwrap(), vec!["a", "b"]);
        assert!(s.apply_pending(m, &members).unwrap());
        assert_eq!(s.global_mark().unwrap(), Some(m));
        assert!(s.pending_peers(m).unwrap().is_empty());
        assert_eq!(s.pending_peers(next).unwrap(), vec!["a"]);
        let p = s.positions().unwrap();
        assert_eq!(p["a"], vec![1]);
        assert_eq!(p["b"], vec![2]);
        drop(s);
        let (_, r) = StateStore::open(dir.path(), &[decl()], false).unwrap();
        let r = r.unwrap();
        assert_eq!(r.keys[0].len(), 2, "both peers' keys are in the state");
        assert_eq!(r.input_watermark, Some(91), "the lowest of the peers'");
    }

    #[test]
    fn a_delta_of_a_checkpoint_that_never_completed_is_applied_under_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = StateStore::open(dir.path(), &[decl()], false).unwrap();
        let members = vec!["a".to_string(), "b".to_string()];
        // Peer a took checkpoint 7, b skipped it: 7 never completes. a's
        // delta of 8 holds only what changed since 7.
        let (seven, eight) = (Mark { id: 7, view: 3 }, Mark { id: 8, view: 3 });
        s.write_pending(&delta(seven, "a", b"early", 1)).unwrap();
        s.write_pending(&delta(eight, "a", b"late", 2)).unwrap();
        s.write_pending(&delta(eight, "b", b"other", 3)).unwrap();
        // Another view's delta is never applied.
        s.write_pending(&delta(Mark { id: 6, view: 2 }, "a", b"stale", 4))
            .unwrap();
        assert!(s.apply_pending(eight, &members).unwrap());
        assert_eq!(s.positions().unwrap()["a"], vec![2], "8's position");
        drop(s);
        let (_, r) = StateStore::open(dir.path(), &[decl()], false).unwrap();
        let mut keys: Vec<Vec<u8>> = r.unwrap().keys[0].iter().map(|(k, _)| k.clone()).collect();
        keys.sort();
        assert_eq!(
            keys,
            vec![b"early".to_vec(), b"late".to_vec(), b"other".to_vec()]
        );
    }

    #[test]
    fn a_snapshot_moves_a_whole_checkpoint_to_another_file() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (mut sa, _) = StateStore::open(a.path(), &[decl()], false).unwrap();
        let m = Mark { id: 2, view: 1 };
        sa.write_pending(&delta(m, "a", b"k1", 1)).unwrap();
        assert!(sa.apply_pending(m, &["a".to_string()]).unwrap());
        let snap = sa.export_snapshot().unwrap();
        let (mut sb, _) = StateStore::open(b.path(), &[decl()], false).unwrap();
        sb.write_pending(&delta(Mark { id: 9, view: 9 }, "b", b"old", 5))
            .unwrap();
        sb.import_snapshot(&snap).unwrap();
        assert_eq!(sb.global_mark().unwrap(), Some(m));
        assert!(sb
            .pending_peers(Mark { id: 9, view: 9 })
            .unwrap()
            .is_empty());
        assert_eq!(sb.positions().unwrap()["a"], vec![1]);
        drop(sb);
        let (_, r) = StateStore::open(b.path(), &[decl()], false).unwrap();
        assert_eq!(r.unwrap().keys[0], vec![(b"k1".to_vec(), vec![1])]);
    }
}
