//! Opening redb files so that a crash while one is being created never
//! leaves a half-written file behind.
//!
//! A new file is created under a temporary name, made durable, and only
//! then renamed into place: a `kill -9` or a power cut during the first
//! start leaves at most the temporary file, which the next start removes.
//! An existing file is opened as it is (redb repairs it after a crash).

use std::path::{Path, PathBuf};

/// The temporary name `path` is created under.
fn creating(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".creating");
    path.with_file_name(name)
}

/// Opens `path` with `builder`, creating it atomically when it is missing.
pub fn open(builder: &redb::Builder, path: &Path) -> Result<redb::Database, redb::DatabaseError> {
    if path.exists() {
        return builder.create(path);
    }
    let tmp = creating(path);
    // Left by a start that did not finish creating it.
    let _ = std::fs::remove_file(&tmp);
    let db = builder.create(&tmp)?;
    let durable = std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .and_then(|_| match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
            _ => Ok(()),
        });
    match durable {
        // The open database follows its file through the rename.
        Ok(()) => Ok(db),
        Err(e) => {
            drop(db);
            let _ = std::fs::remove_file(&tmp);
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use redb::ReadableDatabase as _;

    #[test]
    fn a_half_created_file_of_an_earlier_start_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        // What a kill during creation used to leave: a file that is not yet
        // a database. Under the temporary name, the next start recreates it.
        std::fs::write(creating(&path), b"partial").unwrap();
        let db = open(&redb::Builder::new(), &path).unwrap();
        drop(db);
        assert!(path.exists() && !creating(&path).exists());
        // An existing database opens as it is.
        let table: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("t");
        let db = open(&redb::Builder::new(), &path).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(table).unwrap().insert(1, 2).unwrap();
        w.commit().unwrap();
        drop(db);
        let db = open(&redb::Builder::new(), &path).unwrap();
        let r = db.begin_read().unwrap();
        let v = r
            .open_table(table)
            .unwrap()
            .get(1)
            .unwrap()
            .map(|g| g.value());
        assert_eq!(v, Some(2));
    }
}
