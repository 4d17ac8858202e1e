//! A typed table: one RADOS object's omap, JSON values, compare-and-set.

use std::marker::PhantomData;
use std::sync::Arc;

use ceph_client::{IoCtx, WriteOp};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, SCHEMA_VERSION};

/// A record type stored in a [`Table`].
pub trait Record: Serialize + DeserializeOwned + Clone {}

/// A record as read, with the exact bytes it was read as, which a later
/// compare-and-set compares against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The decoded record.
    pub value: T,
    raw: Vec<u8>,
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    v: u32,
    #[serde(flatten)]
    record: &'a T,
}

#[derive(Deserialize)]
struct Version {
    v: u32,
}

/// How many times [`Table::update`] retries a lost compare-and-set.
const MAX_ATTEMPTS: u32 = 32;

/// A table of `T` records in the omap of one RADOS object.
pub struct Table<T> {
    ioctx: Arc<IoCtx>,
    object: String,
    _record: PhantomData<fn() -> T>,
}

impl<T: Record> Table<T> {
    pub(crate) fn new(ioctx: Arc<IoCtx>, object: String) -> Self {
        Self {
            ioctx,
            object,
            _record: PhantomData,
        }
    }

    /// The RADOS object holding the table.
    pub fn object(&self) -> &str {
        &self.object
    }

    fn rados(&self, op: &'static str, key: &str) -> impl FnOnce(ceph_client::Error) -> Error {
        let object = self.object.clone();
        let key = key.to_string();
        move |source| Error::Rados {
            op,
            object,
            key,
            source: Box::new(source),
        }
    }

    fn encode(&self, key: &str, value: &T) -> Result<Vec<u8>> {
        serde_json::to_vec(&EnvelopeOut {
            v: SCHEMA_VERSION,
            record: value,
        })
        .map_err(|source| Error::Decode {
            object: self.object.clone(),
            key: key.to_string(),
            source,
        })
    }

    fn decode(&self, key: &str, raw: Vec<u8>) -> Result<Versioned<T>> {
        let decode_err = |source| Error::Decode {
            object: self.object.clone(),
            key: key.to_string(),
            source,
        };
        let version: Version = serde_json::from_slice(&raw).map_err(decode_err)?;
        if version.v > SCHEMA_VERSION {
            return Err(Error::FutureSchema {
                object: self.object.clone(),
                key: key.to_string(),
                found: version.v,
            });
        }
        let value = serde_json::from_slice(&raw).map_err(decode_err)?;
        Ok(Versioned { value, raw })
    }

    /// Reads one record.
    pub fn get(&self, key: &str) -> Result<Option<Versioned<T>>> {
        match self.ioctx.omap_get_vals_by_keys(&self.object, &[key]) {
            Ok(vals) => match vals.into_iter().find(|(k, _)| k == key) {
                Some((_, raw)) => self.decode(key, raw).map(Some),
                None => Ok(None),
            },
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(self.rados("read", key)(e)),
        }
    }

    /// Reads every record, in key order. A record that does not decode is
    /// returned as an error in place, so one bad value hides nothing else.
    pub fn list(&self) -> Result<Vec<(String, Result<Versioned<T>>)>> {
        let all = match self.ioctx.omap_get_all(&self.object) {
            Ok(all) => all,
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            Err(e) => return Err(self.rados("list", "")(e)),
        };
        Ok(all
            .into_iter()
            .map(|(k, raw)| {
                let decoded = self.decode(&k, raw);
                (k, decoded)
            })
            .collect())
    }

    /// Inserts `value` under `key` if the key is absent.
    pub fn create(&self, key: &str, value: &T) -> Result<Versioned<T>> {
        let raw = self.encode(key, value)?;
        self.cas(key, &[], Some(&raw)).map_err(|e| match e {
            Error::Conflict { object, key } => Error::Exists { object, key },
            e => e,
        })?;
        Ok(Versioned {
            value: value.clone(),
            raw,
        })
    }

    /// Replaces `expected` (as read) with `value`.
    pub fn replace(&self, key: &str, expected: &Versioned<T>, value: &T) -> Result<Versioned<T>> {
        let raw = self.encode(key, value)?;
        self.cas(key, &expected.raw, Some(&raw))?;
        Ok(Versioned {
            value: value.clone(),
            raw,
        })
    }

    /// Deletes `key` if it still holds `expected`.
    pub fn delete(&self, key: &str, expected: &Versioned<T>) -> Result<()> {
        self.cas(key, &expected.raw, None)
    }

    /// Read-modify-write with retries: `f` sees the current record (or
    /// `None`) and returns the new one (`Some`) or deletion (`None`). `f`
    /// may run several times; it must be a pure function of its input.
    /// Returns what was written.
    pub fn update<E>(
        &self,
        key: &str,
        mut f: impl FnMut(Option<&T>) -> Result<Option<T>, E>,
    ) -> Result<Result<Option<T>, E>> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.get(key)?;
            let next = match f(current.as_ref().map(|c| &c.value)) {
                Ok(next) => next,
                Err(e) => return Ok(Err(e)),
            };
            let expected = current.as_ref().map(|c| c.raw.as_slice()).unwrap_or(&[]);
            let result = match &next {
                Some(value) => {
                    let raw = self.encode(key, value)?;
                    self.cas(key, expected, Some(&raw))
                }
                None if current.is_none() => return Ok(Ok(None)),
                None => self.cas(key, expected, None),
            };
            match result {
                Ok(()) => return Ok(Ok(next)),
                Err(Error::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Contended {
            object: self.object.clone(),
            key: key.to_string(),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Changes the record under `key` in place with `f` (which may run
    /// several times), if there is one. Returns the record written, or
    /// `None` when the key is absent.
    pub fn modify(&self, key: &str, mut f: impl FnMut(&mut T)) -> Result<Option<T>> {
        let written = self.update(key, |current| -> Result<_, std::convert::Infallible> {
            Ok(current.map(|c| {
                let mut next = c.clone();
                f(&mut next);
                next
            }))
        })?;
        Ok(written.unwrap_or_else(|never| match never {}))
    }

    /// One atomic op: make the object if needed, compare `key` with
    /// `expected` (empty = absent), then set it to `new` or remove it.
    fn cas(&self, key: &str, expected: &[u8], new: Option<&[u8]>) -> Result<()> {
        let op = WriteOp::new().create(false).omap_cmp_eq(key, expected);
        let op = match new {
            Some(raw) => op.omap_set(&[(key, raw)]),
            None => op.omap_rm_keys(&[key]),
        };
        match self.ioctx.operate(&self.object, op) {
            Ok(()) => Ok(()),
            Err(e) if e.is_canceled() => Err(Error::Conflict {
                object: self.object.clone(),
                key: key.to_string(),
            }),
            Err(e) => Err(self.rados("write", key)(e)),
        }
    }
}
