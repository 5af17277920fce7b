//! Values that only some connections hold at a time (a send in flight, the address
//! buffer of a `SO_PEERNAME` operation), kept out of the connection slots so that an
//! idle connection does not carry their size: a slot holds a 4-byte key instead of the
//! value. The table grows to the largest number held at once and reuses freed
//! entries, so sending does not allocate once it has warmed up.

/// A key into a [`SideTable`]; [`Key::NONE`] holds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key(u32);

impl Key {
    /// No value.
    pub(crate) const NONE: Key = Key(u32::MAX);

    /// Whether the key holds a value.
    pub(crate) fn is_some(self) -> bool {
        self != Key::NONE
    }

    /// Whether the key holds nothing.
    pub(crate) fn is_none(self) -> bool {
        self == Key::NONE
    }
}

/// A slab of `T` with a free list.
#[derive(Debug)]
pub(crate) struct SideTable<T> {
    entries: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for SideTable<T> {
    fn default() -> Self {
        SideTable {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> SideTable<T> {
    /// Stores `value` and returns its key.
    pub(crate) fn insert(&mut self, value: T) -> Key {
        match self.free.pop() {
            Some(k) => {
                self.entries[k as usize] = Some(value);
                Key(k)
            }
            None => {
                let k = u32::try_from(self.entries.len())
                    .ok()
                    .filter(|&k| k != u32::MAX)
                    .expect("side table full");
                self.entries.push(Some(value));
                Key(k)
            }
        }
    }

    /// The value under `key` (the shard only changes or takes them).
    #[cfg(test)]
    pub(crate) fn get(&self, key: Key) -> Option<&T> {
        self.entries.get(key.0 as usize)?.as_ref()
    }

    /// The value under `key`, to change.
    pub(crate) fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        self.entries.get_mut(key.0 as usize)?.as_mut()
    }

    /// Takes the value under `key` out (its entry is reused) and sets `key` to
    /// [`Key::NONE`].
    pub(crate) fn take(&mut self, key: &mut Key) -> Option<T> {
        let k = std::mem::replace(key, Key::NONE);
        let value = self.entries.get_mut(k.0 as usize)?.take()?;
        self.free.push(k.0);
        Some(value)
    }

    /// Every value held, to give up on (the shard's drop leaks what the kernel may
    /// still use).
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.free.clear();
        self.entries.drain(..).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_reused_and_keys_cleared() {
        let mut t = SideTable::default();
        let mut a = t.insert("a");
        let b = t.insert("b");
        assert_ne!(a, b);
        assert_eq!(t.get(a), Some(&"a"));
        assert_eq!(t.take(&mut a), Some("a"));
        assert!(a.is_none());
        assert_eq!(t.take(&mut a), None, "NONE holds nothing");
        let c = t.insert("c");
        assert_eq!(c.0, 0, "the freed entry is reused");
        *t.get_mut(c).unwrap() = "c2";
        assert_eq!(t.get(c), Some(&"c2"));
        assert_eq!(t.get(b), Some(&"b"));
        let mut left: Vec<_> = t.drain().collect();
        left.sort_unstable();
        assert_eq!(left, ["b", "c2"]);
        assert!(t.insert("d").is_some());
    }
}
