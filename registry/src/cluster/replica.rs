//! What a node knows of a gear's names and groups on the other nodes.
//!
//! Written by the backplane's thread only (from Redis' snapshot and the events every
//! change publishes), read by the shards: `send_message`, `lookup`, `register`,
//! `publish` and `count` answer from here without waiting. It is as current as the
//! last event that arrived, a few milliseconds behind Redis on a healthy link.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use kythera_handler_api::ConnId;

use super::NodeIdx;
use crate::names::Hasher;

/// A connection on another node: the node, and the connection's id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteConn {
    /// Its node.
    pub node: NodeIdx,
    /// Its id on that node.
    pub conn: u64,
}

/// A remote name's holder and the alias this node gave it.
#[derive(Debug, Clone, Copy)]
struct Holder {
    target: RemoteConn,
    alias: ConnId,
}

/// Members of one group on other nodes.
#[derive(Debug, Default, Clone)]
struct Counts {
    by_node: Vec<(NodeIdx, usize)>,
    total: usize,
}

/// Aliases of remote connections: one per connection however many names it holds.
#[derive(Debug, Default)]
struct Aliases {
    by_target: HashMap<RemoteConn, (ConnId, usize), Hasher>,
    next: u64,
}

/// The remote side of one gear's registry: see the module documentation.
#[derive(Debug, Default)]
pub struct Replica {
    names: DashMap<Box<str>, Holder, Hasher>,
    targets: DashMap<ConnId, RemoteConn, Hasher>,
    aliases: Mutex<Aliases>,
    groups: DashMap<Box<str>, Counts, Hasher>,
    /// Bumped whenever a name leaves the replica or changes holder: shards' lookup
    /// caches are valid while it has not moved (see [`crate::Names`]).
    changed: AtomicU64,
    members: AtomicUsize,
}

impl Replica {
    /// An empty replica.
    pub fn new() -> Replica {
        Replica::default()
    }

    // ----- read by shards -----

    /// The alias of `name`'s holder, if another node holds it.
    pub fn holder(&self, name: &str) -> Option<ConnId> {
        self.names.get(name).map(|h| h.alias)
    }

    /// The connection an alias stands for.
    pub fn target(&self, alias: ConnId) -> Option<RemoteConn> {
        self.targets.get(&alias).map(|t| *t)
    }

    /// Members of `group` on other nodes.
    pub fn count(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, |c| c.total)
    }

    /// How often names left or changed holder (see the field).
    pub(crate) fn changed(&self) -> u64 {
        self.changed.load(Ordering::Acquire)
    }

    /// Names held on other nodes.
    pub fn names_len(&self) -> usize {
        self.names.len()
    }

    /// Group memberships on other nodes, summed over groups.
    pub fn members_len(&self) -> usize {
        self.members.load(Ordering::Relaxed)
    }

    /// The names held on other nodes, for tests and tools.
    pub fn names(&self) -> Vec<(String, RemoteConn)> {
        self.names
            .iter()
            .map(|e| (e.key().to_string(), e.value().target))
            .collect()
    }

    // ----- written by the backplane -----

    /// `name` is held by `target` (replacing any other holder).
    pub fn set_name(&self, name: &str, target: RemoteConn) {
        if let Some(h) = self.names.get(name)
            && h.target == target
        {
            return;
        }
        let alias = self.alias_for(target);
        if let Some(old) = self.names.insert(name.into(), Holder { target, alias }) {
            self.drop_alias(old.target);
            self.changed.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// `name` is no longer held on another node.
    pub fn remove_name(&self, name: &str) {
        if let Some((_, old)) = self.names.remove(name) {
            self.changed.fetch_add(1, Ordering::AcqRel);
            self.drop_alias(old.target);
        }
    }

    /// Node `node` has `count` members of `group` (0: none).
    pub fn set_count(&self, group: &str, node: NodeIdx, count: usize) {
        let mut entry = self.groups.entry(group.into()).or_default();
        let counts = entry.value_mut();
        let before = match counts.by_node.iter_mut().find(|(n, _)| *n == node) {
            Some((_, c)) => std::mem::replace(c, count),
            None => {
                counts.by_node.push((node, count));
                0
            }
        };
        counts.by_node.retain(|&(_, c)| c > 0);
        counts.total = counts.total + count - before;
        let empty = counts.total == 0;
        drop(entry);
        if empty {
            self.groups.remove_if(group, |_, c| c.total == 0);
        }
        self.members.fetch_add(count, Ordering::Relaxed);
        self.members.fetch_sub(before, Ordering::Relaxed);
    }

    /// Everything node `node` held: gone.
    pub fn remove_node(&self, node: NodeIdx) {
        let names: Vec<Box<str>> = self
            .names
            .iter()
            .filter(|e| e.target.node == node)
            .map(|e| e.key().clone())
            .collect();
        for name in names {
            self.remove_name(&name);
        }
        let groups: Vec<Box<str>> = self
            .groups
            .iter()
            .filter(|e| e.by_node.iter().any(|&(n, _)| n == node))
            .map(|e| e.key().clone())
            .collect();
        for group in groups {
            self.set_count(&group, node, 0);
        }
    }

    /// Forgets everything (before a snapshot is loaded).
    pub fn clear(&self) {
        let names: Vec<Box<str>> = self.names.iter().map(|e| e.key().clone()).collect();
        for name in names {
            self.remove_name(&name);
        }
        self.groups.clear();
        self.members.store(0, Ordering::Relaxed);
    }

    fn alias_for(&self, target: RemoteConn) -> ConnId {
        let mut aliases = self.aliases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((alias, refs)) = aliases.by_target.get_mut(&target) {
            *refs += 1;
            return *alias;
        }
        aliases.next += 1;
        let alias = ConnId::new(ConnId::REMOTE_SHARD, aliases.next);
        aliases.by_target.insert(target, (alias, 1));
        self.targets.insert(alias, target);
        alias
    }

    fn drop_alias(&self, target: RemoteConn) {
        let mut aliases = self.aliases.lock().unwrap_or_else(|e| e.into_inner());
        let Some((alias, refs)) = aliases.by_target.get_mut(&target) else {
            return;
        };
        *refs -= 1;
        if *refs == 0 {
            let alias = *alias;
            aliases.by_target.remove(&target);
            self.targets.remove(&alias);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(node: NodeIdx, conn: u64) -> RemoteConn {
        RemoteConn { node, conn }
    }

    #[test]
    fn one_alias_per_remote_connection() {
        let r = Replica::new();
        r.set_name("ann", at(1, 7));
        r.set_name("ann2", at(1, 7));
        r.set_name("bob", at(2, 7));
        let (a, a2, b) = (
            r.holder("ann").unwrap(),
            r.holder("ann2").unwrap(),
            r.holder("bob").unwrap(),
        );
        assert_eq!(a, a2, "two names of one connection: one alias");
        assert_ne!(a, b);
        assert!(a.is_remote() && b.is_remote());
        assert_eq!(r.target(a), Some(at(1, 7)));
        r.remove_name("ann");
        assert_eq!(r.target(a), Some(at(1, 7)), "ann2 still refers to it");
        r.remove_name("ann2");
        assert_eq!(r.target(a), None, "alias gone with the last name");
        assert_eq!(r.names_len(), 1);
    }

    #[test]
    fn a_changed_holder_moves_the_counter() {
        let r = Replica::new();
        r.set_name("ann", at(1, 7));
        let c = r.changed();
        r.set_name("ann", at(1, 7));
        assert_eq!(r.changed(), c, "same holder again: nothing changed");
        r.set_name("ann", at(2, 9));
        assert!(r.changed() > c);
        assert_eq!(r.target(r.holder("ann").unwrap()), Some(at(2, 9)));
    }

    #[test]
    fn group_counts_per_node_and_node_removal() {
        let r = Replica::new();
        r.set_count("room", 1, 3);
        r.set_count("room", 2, 4);
        r.set_count("other", 2, 1);
        assert_eq!(
            (r.count("room"), r.count("other"), r.members_len()),
            (7, 1, 8)
        );
        r.set_count("room", 1, 1);
        assert_eq!(r.count("room"), 5);
        r.set_name("ann", at(2, 1));
        r.remove_node(2);
        assert_eq!(
            (r.count("room"), r.count("other"), r.members_len()),
            (1, 0, 1)
        );
        assert_eq!(r.holder("ann"), None);
        r.set_count("room", 1, 0);
        assert_eq!((r.count("room"), r.members_len()), (0, 0));
        assert!(r.groups.is_empty());
    }
}
