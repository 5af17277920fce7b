//! Groups: who has members where.
//!
//! Membership lists are owned by shards (each shard knows only its own members of a
//! group); what is shared is one [`Group`] per group name with an array of per-shard
//! member counts. A publisher reads the counts to learn which shards to send one
//! message to, and how many members that reaches. Counts change only on join and
//! leave, never on publish.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use kythera_handler_api::RegistryError;

use crate::names::{Hasher, check_name};

/// One group of one gear: its name and how many members each shard has.
#[derive(Debug)]
pub struct Group {
    /// Unique for the life of the registry; the key of shards' member lists.
    pub(crate) id: u64,
    pub(crate) name: Box<str>,
    counts: Box<[AtomicUsize]>,
}

impl Group {
    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Members on `shard`.
    pub(crate) fn count_on(&self, shard: usize) -> usize {
        self.counts[shard].load(Ordering::Acquire)
    }

    /// Members on every shard.
    pub(crate) fn total(&self) -> usize {
        self.counts.iter().map(|c| c.load(Ordering::Acquire)).sum()
    }

    pub(crate) fn shards(&self) -> usize {
        self.counts.len()
    }
}

/// The groups of one gear.
#[derive(Debug)]
pub(crate) struct Groups {
    map: DashMap<Box<str>, Arc<Group>, Hasher>,
    next_id: AtomicU64,
    shards: usize,
}

impl Groups {
    pub(crate) fn new(shards: usize) -> Groups {
        Groups {
            map: DashMap::default(),
            next_id: AtomicU64::new(1),
            shards,
        }
    }

    /// The group called `name`, if it has members.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Group>> {
        self.map.get(name).map(|g| Arc::clone(&g))
    }

    /// Adds one member on `shard` to `name`, creating the group if needed, unless
    /// `is_member` says the joiner is already one. The count changes under the map
    /// entry's write lock, the same lock [`Groups::member_left`] takes to remove an
    /// empty group: a join can never increment the count of a group that is being
    /// removed.
    pub(crate) fn join(
        &self,
        name: &str,
        shard: usize,
        is_member: impl FnOnce(&Group) -> bool,
    ) -> Result<(Arc<Group>, bool), RegistryError> {
        check_name(name)?;
        let entry = self.map.entry(name.into()).or_insert_with(|| {
            Arc::new(Group {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                name: name.into(),
                counts: (0..self.shards).map(|_| AtomicUsize::new(0)).collect(),
            })
        });
        let group = Arc::clone(&entry);
        if is_member(&group) {
            return Ok((group, false));
        }
        group.counts[shard].fetch_add(1, Ordering::AcqRel);
        drop(entry);
        Ok((group, true))
    }

    /// One member on `shard` left `group`; the group goes when its last member does.
    pub(crate) fn member_left(&self, group: &Arc<Group>, shard: usize) {
        let before = group.counts[shard].fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "member count of {} underflows", group.name);
        if before == 1 && group.total() == 0 {
            self.map
                .remove_if(&group.name, |_, g| Arc::ptr_eq(g, group) && g.total() == 0);
        }
    }

    /// How many groups have members.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Calls `f` with every group (see [`crate::Names::each`] on consistency).
    pub(crate) fn each(&self, mut f: impl FnMut(&Group)) {
        for entry in self.map.iter() {
            f(entry.value());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_shard_and_removal() {
        let groups = Groups::new(2);
        let (g, added) = groups.join("room", 0, |_| false).unwrap();
        assert!(added);
        groups.join("room", 1, |_| false).unwrap();
        groups.join("room", 1, |_| false).unwrap();
        let (_, added) = groups.join("room", 1, |_| true).unwrap();
        assert!(!added, "already a member");
        assert_eq!((g.count_on(0), g.count_on(1), g.total()), (1, 2, 3));
        groups.member_left(&g, 1);
        groups.member_left(&g, 0);
        assert!(groups.get("room").is_some());
        groups.member_left(&g, 1);
        assert!(groups.get("room").is_none(), "empty group removed");
        let (g2, _) = groups.join("room", 0, |_| false).unwrap();
        assert_ne!(g.id, g2.id, "a new group, not the old one revived");
        assert_eq!(groups.len(), 1);
    }

    #[test]
    fn join_and_leave_race_keeps_counts_exact() {
        let groups = Arc::new(Groups::new(2));
        let threads: Vec<_> = (0..2)
            .map(|shard| {
                let groups = Arc::clone(&groups);
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let (g, _) = groups.join("hot", shard, |_| false).unwrap();
                        groups.member_left(&g, shard);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(groups.get("hot").is_none());
        assert_eq!(groups.len(), 0);
    }
}
