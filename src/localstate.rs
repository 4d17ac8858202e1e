//! Per-host state that must survive a daemon crash, in a redb file under
//! the driver's Home.
//!
//! RADOS is the source of truth for what exists in the fleet; this file only
//! records what *this host* has done to its own kernel: which layers are
//! mapped to which device, mounted where, and how many `Get`s hold them. A
//! restarted daemon reads it to adopt what is still mounted and to clean up
//! what is not. Every change is one redb write transaction, durable
//! (fsync'd) when [`LocalState::put`] returns.
//!
//! Values are JSON with a schema version, so a newer daemon can read an
//! older file.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why the local state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database file could not be opened or created.
    #[error("cannot open local state {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<redb::Error>,
    },
    /// A transaction failed.
    #[error("local state {op} of {table}/{key} failed")]
    Db {
        /// What was attempted.
        op: &'static str,
        /// The table.
        table: &'static str,
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored value does not decode (written by an incompatible version,
    /// or damaged).
    #[error("local state {table}/{key} holds an unreadable value")]
    Decode {
        /// The table.
        table: &'static str,
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// One row of [`LocalState::list`]: the key and its decoded record, or why
/// it did not decode.
pub type Row<T> = (String, Result<T, StateError>);

/// The redb file.
pub struct LocalState {
    db: redb::Database,
}

/// A table of JSON records keyed by string.
pub struct Table<T> {
    def: TableDefinition<'static, &'static str, &'static [u8]>,
    name: &'static str,
    _record: PhantomData<fn() -> T>,
}

impl<T> Table<T> {
    /// Declares a table. Tables are created on first write.
    pub const fn new(name: &'static str) -> Self {
        Self {
            def: TableDefinition::new(name),
            name,
            _record: PhantomData,
        }
    }
}

fn boxed<E: Into<redb::Error>>(e: E) -> Box<redb::Error> {
    Box::new(e.into())
}

impl LocalState {
    /// Opens or creates the state file.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StateError::Open {
                path: path.to_path_buf(),
                source: boxed(redb::DatabaseError::Storage(redb::StorageError::Io(e))),
            })?;
        }
        let db = redb::Database::create(path).map_err(|e| StateError::Open {
            path: path.to_path_buf(),
            source: boxed(e),
        })?;
        Ok(Self { db })
    }

    /// Reads one record.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: &Table<T>,
        key: &str,
    ) -> Result<Option<T>, StateError> {
        let err = |op, source| StateError::Db {
            op,
            table: table.name,
            key: key.to_string(),
            source,
        };
        let txn = self.db.begin_read().map_err(|e| err("read", boxed(e)))?;
        let t = match txn.open_table(table.def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(err("read", boxed(e))),
        };
        let Some(value) = t.get(key).map_err(|e| err("read", boxed(e)))? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|source| StateError::Decode {
                table: table.name,
                key: key.to_string(),
                source,
            })
    }

    /// Writes one record durably.
    pub fn put<T: Serialize>(
        &self,
        table: &Table<T>,
        key: &str,
        value: &T,
    ) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StateError::Decode {
            table: table.name,
            key: key.to_string(),
            source,
        })?;
        self.write(table.name, key, |txn| {
            let mut t = txn.open_table(table.def)?;
            t.insert(key, bytes.as_slice())?;
            Ok(())
        })
    }

    /// Deletes one record (absent is fine).
    pub fn remove<T>(&self, table: &Table<T>, key: &str) -> Result<(), StateError> {
        self.write(table.name, key, |txn| {
            let mut t = txn.open_table(table.def)?;
            t.remove(key)?;
            Ok(())
        })
    }

    /// Every record of a table, by key. Undecodable records are returned as
    /// errors in place so the caller can report and skip them.
    pub fn list<T: DeserializeOwned>(&self, table: &Table<T>) -> Result<Vec<Row<T>>, StateError> {
        let err = |source| StateError::Db {
            op: "list",
            table: table.name,
            key: String::new(),
            source,
        };
        let txn = self.db.begin_read().map_err(|e| err(boxed(e)))?;
        let t = match txn.open_table(table.def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(boxed(e))),
        };
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| err(boxed(e)))? {
            let (k, v) = row.map_err(|e| err(boxed(e)))?;
            let key = k.value().to_string();
            let decoded = serde_json::from_slice(v.value()).map_err(|source| StateError::Decode {
                table: table.name,
                key: key.clone(),
                source,
            });
            out.push((key, decoded));
        }
        Ok(out)
    }

    fn write(
        &self,
        table: &'static str,
        key: &str,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StateError> {
        let err = |source| StateError::Db {
            op: "write",
            table,
            key: key.to_string(),
            source,
        };
        let txn = self.db.begin_write().map_err(|e| err(boxed(e)))?;
        f(&txn).map_err(|e| err(Box::new(e)))?;
        txn.commit().map_err(|e| err(boxed(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        n: u32,
    }
    const T: Table<Rec> = Table::new("recs");

    #[test]
    fn round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.redb");
        {
            let s = LocalState::open(&path).unwrap();
            assert_eq!(s.get(&T, "a").unwrap(), None);
            assert!(s.list(&T).unwrap().is_empty());
            s.put(&T, "a", &Rec { n: 1 }).unwrap();
            s.put(&T, "b", &Rec { n: 2 }).unwrap();
            s.put(&T, "a", &Rec { n: 3 }).unwrap();
            s.remove(&T, "b").unwrap();
            s.remove(&T, "never").unwrap();
        }
        let s = LocalState::open(&path).unwrap();
        assert_eq!(s.get(&T, "a").unwrap(), Some(Rec { n: 3 }));
        let all = s.list(&T).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, "a");
    }

    #[test]
    fn undecodable_values_are_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalState::open(&dir.path().join("s.redb")).unwrap();
        const OTHER: Table<String> = Table::new("recs");
        s.put(&OTHER, "bad", &"not a rec".to_string()).unwrap();
        s.put(&T, "good", &Rec { n: 7 }).unwrap();
        let err = s.get(&T, "bad").unwrap_err();
        assert!(err.to_string().contains("recs/bad"), "{err}");
        let all = s.list(&T).unwrap();
        assert!(all.iter().any(|(k, r)| k == "bad" && r.is_err()));
        assert!(all.iter().any(|(k, r)| k == "good" && r.is_ok()));
    }
}
