//! A gear's unique names: a concurrent map from name to connection.
//!
//! `register` must answer `Taken` or ok at once from any shard, and `send_message` must
//! find a name's connection without a global lock, so names live in a sharded
//! concurrent map (`dashmap`: one read-write lock per map shard, picked by the name's
//! hash; readers of different names rarely meet). The connection id says which engine
//! shard owns the connection, which is all a sender needs to route a message.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use kythera_handler_api::{ConnId, NameTable, RegistryError};

/// The longest name or group, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// The hasher of the registry's maps: foldhash is several times faster than SipHash on
/// short strings, and its `RandomState` is seeded per process, since names come from
/// clients and a fixed seed would invite hash flooding.
pub(crate) type Hasher = foldhash::fast::RandomState;

/// Checks a name or group: 1 to [`MAX_NAME_BYTES`] bytes.
pub(crate) fn check_name(name: &str) -> Result<(), RegistryError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        Err(RegistryError::InvalidName)
    } else {
        Ok(())
    }
}

/// The names of one gear.
#[derive(Debug, Default)]
pub struct Names {
    map: DashMap<Box<str>, ConnId, Hasher>,
    /// Counts the names given up. A shard's cache of lookups
    /// ([`crate::ShardRegistry`]) is valid while this has not moved: a name can only
    /// change holder by being given up first, and new names are cache misses anyway.
    released: CachePadded<AtomicU64>,
}

impl Names {
    /// An empty table.
    pub fn new() -> Names {
        Names::default()
    }

    /// How many names are held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The count of names given up so far (see the field's comment).
    pub(crate) fn released(&self) -> u64 {
        self.released.load(Ordering::Acquire)
    }

    /// Whether no name is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Registers `name` for `conn`: `Ok(true)` if it was free, `Ok(false)` if `conn`
    /// held it already, [`RegistryError::Taken`] if another connection does.
    pub fn claim(&self, conn: ConnId, name: &str) -> Result<bool, RegistryError> {
        check_name(name)?;
        if let Some(holder) = self.map.get(name) {
            // The common refusal without taking the write lock.
            return if *holder == conn {
                Ok(false)
            } else {
                Err(RegistryError::Taken)
            };
        }
        match self.map.entry(name.into()) {
            Entry::Occupied(e) if *e.get() == conn => Ok(false),
            Entry::Occupied(_) => Err(RegistryError::Taken),
            Entry::Vacant(v) => {
                v.insert(conn);
                Ok(true)
            }
        }
    }

    /// Calls `f` with every name and its holder (the map's shards are read-locked one
    /// at a time, so names registered meanwhile may or may not be seen).
    pub fn each(&self, mut f: impl FnMut(&str, ConnId)) {
        for entry in self.map.iter() {
            f(entry.key(), *entry.value());
        }
    }
}

impl NameTable for Names {
    fn register(&self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
        self.claim(conn, name).map(|_| ())
    }

    fn unregister(&self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
        match self.map.remove_if(name, |_, holder| *holder == conn) {
            Some(_) => {
                // After the removal, so that a reader who sees the new count also
                // misses the name in the map.
                self.released.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            None => Err(RegistryError::NotRegistered),
        }
    }

    fn lookup(&self, name: &str) -> Option<ConnId> {
        self.map.get(name).map(|holder| *holder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_per_connection() {
        let names = Names::new();
        let (a, b) = (ConnId::new(0, 1), ConnId::new(1, 1));
        assert_eq!(names.register(a, "ann"), Ok(()));
        assert_eq!(names.register(a, "ann"), Ok(()), "same connection again");
        assert_eq!(names.register(b, "ann"), Err(RegistryError::Taken));
        assert_eq!(names.lookup("ann"), Some(a));
        assert_eq!(
            names.unregister(b, "ann"),
            Err(RegistryError::NotRegistered)
        );
        assert_eq!(names.unregister(a, "ann"), Ok(()));
        assert_eq!(names.register(b, "ann"), Ok(()));
        assert_eq!(names.register(b, ""), Err(RegistryError::InvalidName));
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(names.register(b, &long), Err(RegistryError::InvalidName));
    }

    #[test]
    fn concurrent_registration_has_one_winner() {
        let names = std::sync::Arc::new(Names::new());
        let winners: usize = (0..8)
            .map(|t| {
                let names = std::sync::Arc::clone(&names);
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|i| names.register(ConnId::new(t, 1), &format!("n{i}")).is_ok())
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(winners, 1000);
        assert_eq!(names.len(), 1000);
    }
}
