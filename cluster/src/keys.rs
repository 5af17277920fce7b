//! Where things live in Redis: key and channel names.
//!
//! Every key and channel carries a hash tag (the part in braces), so that the same code
//! runs against a Redis Cluster: what one script touches shares a slot, and the rest
//! spreads over the cluster.
//!
//! | name | type | holds |
//! |---|---|---|
//! | `kythera:{G}:names` | hash | name → `node` TAB `connection id` |
//! | `kythera:{G}:groups` | hash | `node` TAB `group` → members on that node |
//! | `kythera:{G}:seq` | string | the number of the gear's last event |
//! | `kythera:{G}:events` | channel | every change of the two hashes, numbered |
//! | `kythera:grp:{G|group}` | channel | publishes to a group (nodes with members subscribe) |
//! | `kythera:node:{N}` | channel | messages to connections on node N |
//! | `kythera:alive:{N}` | string, TTL | node N is alive |
//! | `kythera:nodes` | hash | node → start time (ms since the epoch) |
//!
//! `G` is the gear's mount pattern and `N` a node id; braces, `|` and `%` in patterns
//! and group names are percent-encoded so that a tag always ends where it should.

/// The prefix of every key and channel.
pub const PREFIX: &str = "kythera:";

/// The hash of node ids to their start times.
pub const NODES: &str = "kythera:nodes";

/// `s` with the characters that would end or split a hash tag percent-encoded.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '|' => out.push_str("%7C"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    out
}

/// The keys and channel of one gear.
#[derive(Debug, Clone)]
pub struct GearKeys {
    /// The names hash.
    pub names: String,
    /// The group counts hash.
    pub groups: String,
    /// The event counter.
    pub seq: String,
    /// The event channel.
    pub events: String,
    tag: String,
}

impl GearKeys {
    /// The keys of the gear mounted on `pattern`.
    pub fn new(pattern: &str) -> GearKeys {
        let tag = escape(pattern);
        GearKeys {
            names: format!("{PREFIX}{{{tag}}}:names"),
            groups: format!("{PREFIX}{{{tag}}}:groups"),
            seq: format!("{PREFIX}{{{tag}}}:seq"),
            events: format!("{PREFIX}{{{tag}}}:events"),
            tag,
        }
    }

    /// The channel of `group`.
    pub fn group_channel(&self, group: &str) -> String {
        format!("{PREFIX}grp:{{{}|{}}}", self.tag, escape(group))
    }
}

/// The channel of node `node`.
pub fn node_channel(node: &str) -> String {
    format!("{PREFIX}node:{{{node}}}")
}

/// The liveness key of node `node`.
pub fn alive_key(node: &str) -> String {
    format!("{PREFIX}alive:{{{node}}}")
}

/// Whether `id` is a valid node id: 1 to 64 ASCII letters, digits, `.`, `_` or `-` (so
/// that it needs no escaping in keys and cannot split a stored `node TAB value`).
pub fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_cannot_be_split_or_ended_early() {
        let k = GearKeys::new("/ro{o}ms/:id");
        assert_eq!(k.names, "kythera:{/ro%7Bo%7Dms/:id}:names");
        assert_eq!(k.events, "kythera:{/ro%7Bo%7Dms/:id}:events");
        assert_eq!(
            k.group_channel("a|b}"),
            "kythera:grp:{/ro%7Bo%7Dms/:id|a%7Cb%7D}"
        );
        // Distinct (pattern, group) pairs never share a channel.
        assert_ne!(
            GearKeys::new("a|b").group_channel("c"),
            GearKeys::new("a").group_channel("b|c")
        );
        assert_eq!(node_channel("n1"), "kythera:node:{n1}");
        assert_eq!(alive_key("n1"), "kythera:alive:{n1}");
    }

    #[test]
    fn node_ids() {
        assert!(valid_node_id("host-1.a_b"));
        for bad in ["", "a b", "a\tb", "a{b", "é", &"x".repeat(65)] {
            assert!(!valid_node_id(bad), "{bad:?}");
        }
    }
}
