//! The input journal of the MQTT source: `<state.dir>/journal.redb`.
//!
//! MQTT cannot replay, so a message is acknowledged to the broker (QoS 1
//! PUBACK) only once it is durable here. Messages are numbered from 1 in
//! arrival order; the number is the source position a checkpoint saves. On
//! restart the source replays the journal after the checkpoint's position,
//! then goes on with live messages. A committed checkpoint trims what it
//! covers.
//!
//! Entries are group-committed: the connection thread collects messages
//! until [`GROUP`] of them are held, the first has waited [`LINGER`], or
//! the stream pauses for a millisecond; it writes them in one durable
//! transaction, then acknowledges them all.
//!
//! Record format version 1: table `entries` from the message number to
//! `[packet id: u16 LE][topic length: u32 LE][topic][payload]`; table
//! `meta` with `next` (the number the next message gets, u64 LE), so
//! numbering never goes back even when every entry is trimmed; table
//! `arrivals` from the message number to its arrival time (epoch ms), for
//! the entries stamped on arrival (`time: ingestion`), trimmed with them.
//! A journal written before `arrivals` existed has none.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const ARRIVALS: TableDefinition<u64, i64> = TableDefinition::new("arrivals");

/// Most messages in one group commit.
pub const GROUP: usize = 512;
/// Longest a message waits for its group to be committed.
pub const LINGER: Duration = Duration::from_millis(5);
/// Entries always kept after a trim, besides every entry whose PUBACK is not
/// known to be written: with them, a redelivery after a restart is
/// recognised.
pub const KEEP_FOR_DEDUP: u64 = 1024;

/// The retain flag's bit in an entry's topic length.
const RETAIN_BIT: u32 = 1 << 31;
/// Set in an entry's topic length when the payload is only the first bytes
/// of a larger one; its size (8 bytes) follows the topic.
const OVERSIZE_BIT: u32 = 1 << 30;

/// One journaled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub pkid: u16,
    pub topic: &'a str,
    pub payload: &'a [u8],
    /// When it arrived (epoch ms), kept for ingestion time; 0: not kept.
    pub arrival: i64,
    /// It came with the retain flag (kept in the topic length's top bit,
    /// which a topic of at most 65,535 bytes never sets: older entries read
    /// as not retained).
    pub retain: bool,
    /// The payload's size when `payload` is only its first bytes (a message
    /// larger than the connection takes; the pipeline dead-letters it).
    pub oversize: Option<u64>,
}

impl<'a> Entry<'a> {
    fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.pkid.to_le_bytes());
        let len = self.topic.len() as u32
            | if self.retain { RETAIN_BIT } else { 0 }
            | if self.oversize.is_some() {
                OVERSIZE_BIT
            } else {
                0
            };
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(self.topic.as_bytes());
        if let Some(size) = self.oversize {
            out.extend_from_slice(&size.to_le_bytes());
        }
        out.extend_from_slice(self.payload);
    }

    fn decode(b: &'a [u8]) -> Option<Entry<'a>> {
        let pkid = u16::from_le_bytes(b.get(0..2)?.try_into().ok()?);
        let len = u32::from_le_bytes(b.get(2..6)?.try_into().ok()?);
        let retain = len & RETAIN_BIT != 0;
        let oversized = len & OVERSIZE_BIT != 0;
        let len = (len & !(RETAIN_BIT | OVERSIZE_BIT)) as usize;
        let topic = std::str::from_utf8(b.get(6..6usize.checked_add(len)?)?).ok()?;
        let (oversize, rest) = if oversized {
            let size = u64::from_le_bytes(b.get(6 + len..14 + len)?.try_into().ok()?);
            (Some(size), 14 + len)
        } else {
            (None, 6 + len)
        };
        Some(Entry {
            pkid,
            topic,
            payload: b.get(rest..)?,
            arrival: 0,
            retain,
            oversize,
        })
    }
}

/// What the journal held when opened.
#[derive(Debug, Default)]
pub struct Opened {
    /// Number of the first entry still held (`next` when none).
    pub first: u64,
    /// Number the next message gets.
    pub next: u64,
    /// Packet id and number of every entry held, oldest first, for
    /// redelivery checks.
    pub recent: Vec<(u16, u64)>,
}

/// A handle on the journal; clones share the file (the connection thread
/// writes, the source replays).
#[derive(Clone)]
pub struct Journal {
    /// `None` after a failed write: opened again (and so repaired) by the
    /// next one.
    db: Arc<Mutex<Option<redb::Database>>>,
    path: PathBuf,
    /// Whether the `arrivals` table exists (it held stamps when opened, or a
    /// stamped entry was written since): journals without stamps never
    /// touch it.
    stamped: Arc<std::sync::atomic::AtomicBool>,
}

/// redb's page cache for the journal: entries are written once and read
/// back at most once, so a small cache does (redb's default is 1 GiB).
const CACHE: usize = 4 << 20;

fn create(path: &Path) -> Result<redb::Database, redb::DatabaseError> {
    let mut b = redb::Builder::new();
    b.set_cache_size(CACHE);
    crate::util::dbfile::open(&b, path)
}

fn err(path: &Path, e: impl std::fmt::Display) -> String {
    format!("input journal {}: {e}", path.display())
}

impl Journal {
    /// Opens (creating) `dir/journal.redb`.
    pub fn open(dir: &Path) -> Result<(Journal, Opened), String> {
        std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        let path = dir.join("journal.redb");
        let db = create(&path).map_err(|e| err(&path, format!("{e} (not a rivulet journal?)")))?;
        let mut opened = Opened {
            first: 1,
            next: 1,
            recent: Vec::new(),
        };
        let stamped;
        {
            let txn = db.begin_read().map_err(|e| err(&path, e))?;
            stamped = match txn.open_table(ARRIVALS) {
                Err(redb::TableError::TableDoesNotExist(_)) => false,
                Err(e) => return Err(err(&path, e)),
                Ok(_) => true,
            };
            match txn.open_table(META) {
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(err(&path, e)),
                Ok(meta) => {
                    if let Some(n) = meta.get("next").map_err(|e| err(&path, e))? {
                        opened.next = n.value().max(1);
                    }
                }
            }
            match txn.open_table(ENTRIES) {
                Err(redb::TableError::TableDoesNotExist(_)) => opened.first = opened.next,
                Err(e) => return Err(err(&path, e)),
                Ok(t) => {
                    opened.first = match t.first().map_err(|e| err(&path, e))? {
                        Some((k, _)) => k.value(),
                        None => opened.next,
                    };
                    if let Some((k, _)) = t.last().map_err(|e| err(&path, e))? {
                        opened.next = opened.next.max(k.value() + 1);
                    }
                    for e in t.iter().map_err(|e| err(&path, e))? {
                        let (k, v) = e.map_err(|e| err(&path, e))?;
                        let entry = Entry::decode(v.value())
                            .ok_or_else(|| err(&path, "an entry is unreadable"))?;
                        opened.recent.push((entry.pkid, k.value()));
                    }
                }
            }
        }
        Ok((
            Journal {
                db: Arc::new(Mutex::new(Some(db))),
                path,
                stamped: Arc::new(stamped.into()),
            },
            opened,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the database, opening it again first if a write failed.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, String>,
    ) -> Result<T, String> {
        let path = &self.path;
        let mut guard = self
            .db
            .lock()
            .map_err(|_| err(path, "a thread failed while holding the journal"))?;
        let db = match guard.take() {
            Some(db) => db,
            None => create(path).map_err(|e| err(path, e))?,
        };
        let result = f(&db);
        if result.is_ok() {
            *guard = Some(db);
        }
        // After a failure the handle is dropped: redb may refuse further
        // writes on it, and opening the file again repairs it.
        result
    }

    /// Writes `entries`, numbered from `first`, and removes the entries
    /// numbered up to `trim_through`, in one transaction; durable when
    /// there are entries (a trim alone may be lost in a crash: the next
    /// start skips trimmed positions anyway).
    pub fn append(
        &self,
        first: u64,
        entries: &[Entry<'_>],
        trim_through: Option<u64>,
    ) -> Result<(), String> {
        let path = &self.path;
        use std::sync::atomic::Ordering;
        let stamped =
            entries.iter().any(|e| e.arrival != 0) || self.stamped.load(Ordering::Relaxed);
        self.with_db(|db| {
            let mut buf = Vec::new();
            let mut txn = db.begin_write().map_err(|e| err(path, e))?;
            if entries.is_empty() {
                txn.set_durability(redb::Durability::None)
                    .map_err(|e| err(path, e))?;
            }
            {
                let mut t = txn.open_table(ENTRIES).map_err(|e| err(path, e))?;
                for (i, e) in entries.iter().enumerate() {
                    e.encode(&mut buf);
                    t.insert(first + i as u64, buf.as_slice())
                        .map_err(|e| err(path, e))?;
                }
                let mut arrivals = if stamped {
                    Some(txn.open_table(ARRIVALS).map_err(|e| err(path, e))?)
                } else {
                    None
                };
                if let Some(a) = arrivals.as_mut() {
                    for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.arrival != 0) {
                        a.insert(first + i as u64, e.arrival)
                            .map_err(|e| err(path, e))?;
                    }
                }
                if let Some(through) = trim_through {
                    t.retain_in(..=through, |_, _| false)
                        .map_err(|e| err(path, e))?;
                    if let Some(a) = arrivals.as_mut() {
                        a.retain_in(..=through, |_, _| false)
                            .map_err(|e| err(path, e))?;
                    }
                }
                let mut meta = txn.open_table(META).map_err(|e| err(path, e))?;
                let next = first + entries.len() as u64;
                let stored = meta
                    .get("next")
                    .map_err(|e| err(path, e))?
                    .map(|v| v.value())
                    .unwrap_or(1);
                meta.insert("next", next.max(stored))
                    .map_err(|e| err(path, e))?;
            }
            txn.commit().map_err(|e| err(path, e))?;
            if stamped {
                self.stamped.store(true, Ordering::Relaxed);
            }
            Ok(())
        })
    }

    /// Whether entry `seq` holds this topic and payload (`false` when it was
    /// trimmed).
    pub fn holds(&self, seq: u64, topic: &str, payload: &[u8]) -> Result<bool, String> {
        let mut same = false;
        self.read(seq, seq, 1, |_, e| {
            same = e.topic == topic && e.payload == payload;
        })?;
        Ok(same)
    }

    /// Calls `f` with the entries numbered `from..=through`, at most `max`
    /// of them, in order; returns the number after the last one read.
    pub fn read(
        &self,
        from: u64,
        through: u64,
        max: usize,
        mut f: impl FnMut(u64, Entry<'_>),
    ) -> Result<u64, String> {
        let path = &self.path;
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| err(path, e))?;
            let t = match txn.open_table(ENTRIES) {
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(through + 1),
                other => other.map_err(|e| err(path, e))?,
            };
            let arrivals = match txn.open_table(ARRIVALS) {
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                other => Some(other.map_err(|e| err(path, e))?),
            };
            let mut next = from;
            for e in t.range(from..=through).map_err(|e| err(path, e))?.take(max) {
                let (k, v) = e.map_err(|e| err(path, e))?;
                let mut entry = Entry::decode(v.value())
                    .ok_or_else(|| err(path, format!("entry {} is unreadable", k.value())))?;
                if let Some(a) = &arrivals {
                    if let Some(at) = a.get(k.value()).map_err(|e| err(path, e))? {
                        entry.arrival = at.value();
                    }
                }
                f(k.value(), entry);
                next = k.value() + 1;
            }
            if next == from {
                // Nothing (left) in the range: it was trimmed.
                next = through + 1;
            }
            Ok(next)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn e(pkid: u16, topic: &'static str, payload: &'static [u8]) -> Entry<'static> {
        Entry {
            pkid,
            topic,
            payload,
            arrival: 0,
            retain: false,
            oversize: None,
        }
    }

    #[test]
    fn an_oversized_entry_keeps_its_size_with_its_prefix_and_flags() {
        let big = Entry {
            retain: true,
            oversize: Some(5_000_000),
            ..e(9, "cam/1", b"\xff\xd8prefix")
        };
        let mut buf = Vec::new();
        big.encode(&mut buf);
        assert_eq!(Entry::decode(&buf), Some(big.clone()));
        let plain = e(9, "cam/1", b"\xff\xd8prefix");
        plain.encode(&mut buf);
        assert_eq!(Entry::decode(&buf).unwrap().oversize, None);
    }

    #[test]
    fn the_retain_flag_is_kept_and_older_entries_read_as_not_retained() {
        let kept = Entry {
            retain: true,
            ..e(7, "a/b", b"\x00\xff")
        };
        let mut buf = Vec::new();
        kept.encode(&mut buf);
        assert_eq!(Entry::decode(&buf), Some(kept.clone()));
        // An entry as the previous version wrote it: plain topic length.
        let mut old = 7u16.to_le_bytes().to_vec();
        old.extend_from_slice(&3u32.to_le_bytes());
        old.extend_from_slice(b"a/b\x00\xff");
        assert_eq!(
            Entry::decode(&old),
            Some(Entry {
                retain: false,
                ..kept
            })
        );
    }

    #[test]
    fn arrival_stamps_are_kept_with_their_entries_and_trimmed_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        let stamped = |pkid, arrival| Entry {
            arrival,
            ..e(pkid, "t", b"x")
        };
        j.append(1, &[stamped(1, 1_800_000_000_001), e(2, "t", b"y")], None)
            .unwrap();
        j.append(3, &[stamped(3, 1_800_000_000_003)], None).unwrap();
        drop(j);
        let (j, _) = Journal::open(dir.path()).unwrap();
        let read = |j: &Journal| {
            let mut got = Vec::new();
            j.read(1, 3, 10, |n, e| got.push((n, e.arrival))).unwrap();
            got
        };
        assert_eq!(
            read(&j),
            vec![(1, 1_800_000_000_001), (2, 0), (3, 1_800_000_000_003)]
        );
        j.append(4, &[], Some(2)).unwrap();
        assert_eq!(read(&j), vec![(3, 1_800_000_000_003)]);
    }

    #[test]
    fn a_journal_without_stamps_has_no_arrivals_table() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        j.append(1, &[e(1, "t", b"x")], Some(1)).unwrap();
        assert!(!j.stamped.load(std::sync::atomic::Ordering::Relaxed));
        drop(j);
        let db = create(&dir.path().join("journal.redb")).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(matches!(
            txn.open_table(ARRIVALS),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
    }

    #[test]
    fn entries_survive_reopening_and_trims_keep_the_numbering() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, o) = Journal::open(dir.path()).unwrap();
            assert_eq!((o.first, o.next), (1, 1));
            j.append(1, &[e(7, "a/b", b"{}"), e(8, "a/c", b"xy")], None)
                .unwrap();
            j.append(3, &[e(9, "t", b"")], None).unwrap();
        }
        let (j, o) = Journal::open(dir.path()).unwrap();
        assert_eq!((o.first, o.next), (1, 4));
        assert_eq!(o.recent.len(), 3);
        assert_eq!(o.recent[1], (8, 2));
        assert!(j.holds(2, "a/c", b"xy").unwrap());
        assert!(!j.holds(2, "a/c", b"xz").unwrap());
        assert!(!j.holds(2, "a/d", b"xy").unwrap());
        let mut seen = Vec::new();
        let next = j
            .read(2, 3, 10, |n, e| {
                seen.push((n, e.topic.to_string(), e.payload.to_vec()))
            })
            .unwrap();
        assert_eq!(next, 4);
        assert_eq!(
            seen,
            vec![(2, "a/c".into(), b"xy".to_vec()), (3, "t".into(), vec![])]
        );
        // Trim everything: the next number stays.
        j.append(4, &[], Some(3)).unwrap();
        drop(j);
        let (j, o) = Journal::open(dir.path()).unwrap();
        assert_eq!((o.first, o.next), (4, 4));
        assert_eq!(j.read(1, 3, 10, |_, _| panic!("trimmed")).unwrap(), 4);
    }

    #[test]
    fn a_foreign_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("journal.redb"), b"not a database at all").unwrap();
        let e = Journal::open(dir.path()).err().unwrap();
        assert!(e.contains("journal.redb"), "{e}");
    }

    #[test]
    fn entries_decode_what_they_encode() {
        let mut buf = Vec::new();
        let x = e(65535, "sensors/ü/1", b"\x00\xff");
        x.encode(&mut buf);
        assert_eq!(Entry::decode(&buf), Some(x));
        assert_eq!(Entry::decode(&buf[..5]), None);
        assert_eq!(Entry::decode(&[0, 0, 255, 255, 255, 255]), None);
    }
}
