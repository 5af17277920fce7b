//! The Lua scripts that change a gear's names and groups in Redis, and the events they
//! publish.
//!
//! Each script runs atomically on the gear's three keys (one hash slot: see
//! [`crate::keys`]), and publishes every change it made as one event on the gear's
//! event channel, numbered by the gear's counter. So every node sees the same changes
//! in the same order, and a node that misses one (a gap in the numbers) knows it must
//! read the hashes again.
//!
//! Events are fields written as `length:bytes` one after the other (easy to write in
//! Lua, binary-safe): the event number, then per change a kind and its fields:
//!
//! | kind | fields | meaning |
//! |---|---|---|
//! | `C` | name, node, connection | the name is held by that node's connection |
//! | `R` | name | the name is free |
//! | `G` | node, group, count | the node has that many members of the group (0: none) |
//! | `X` | node | the node is gone: everything it held is free |

/// The shared helper of the scripts: one field as `length:bytes`.
const FIELD: &str = "local function f(s) return #s .. ':' .. s end\n";

/// `APPLY`: a node's claims, releases and member counts for one gear, in order.
///
/// KEYS: names, groups, seq. ARGV: event channel, publish command (`PUBLISH` or
/// `SPUBLISH`), node, then operations of three arguments each: `C name conn` (claim),
/// `R name conn` (release), `G group count`. Returns one integer per claim, in order: 1
/// won (the name was free or held by this node already), 0 lost.
///
/// A claim of a name this node holds for another connection wins: a node never has two
/// holders of a name (its own table sees to that), so such an entry is one this node
/// released and Redis has not heard of yet, or one of an earlier process with the same
/// node id.
pub const APPLY: &str = r#"
local chan, pub, node = ARGV[1], ARGV[2], ARGV[3]
local prefix = node .. '\t'
local out, ev, i = {}, {}, 4
while i + 2 <= #ARGV do
  local op, a, b = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'C' then
    local v = prefix .. b
    local cur = redis.call('HGET', KEYS[1], a)
    if not cur or string.sub(cur, 1, #prefix) == prefix then
      if cur ~= v then
        redis.call('HSET', KEYS[1], a, v)
        ev[#ev + 1] = f('C') .. f(a) .. f(node) .. f(b)
      end
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  elseif op == 'R' then
    if redis.call('HGET', KEYS[1], a) == prefix .. b then
      redis.call('HDEL', KEYS[1], a)
      ev[#ev + 1] = f('R') .. f(a)
    end
  elseif op == 'G' then
    if b == '0' then
      redis.call('HDEL', KEYS[2], prefix .. a)
    else
      redis.call('HSET', KEYS[2], prefix .. a, b)
    end
    ev[#ev + 1] = f('G') .. f(node) .. f(a) .. f(b)
  else
    return redis.error_reply('kythera: unknown operation ' .. op)
  end
  i = i + 3
end
if #ev > 0 then
  local seq = redis.call('INCR', KEYS[3])
  redis.call(pub, chan, f(tostring(seq)) .. table.concat(ev))
end
return out
"#;

/// `SNAPSHOT`: the gear's event number and both hashes, read at one instant.
///
/// KEYS: names, groups, seq. Returns `{seq, names (flat HGETALL), groups (flat)}`.
pub const SNAPSHOT: &str = r#"
return {redis.call('GET', KEYS[3]) or '0', redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"#;

/// `GONE`: removes everything a node held in one gear, and says so with an `X` event
/// (only if it held something). Run by every survivor that finds the node's liveness
/// key expired, and by a node for itself when it leaves: running it twice is harmless.
///
/// KEYS: names, groups, seq. ARGV: event channel, publish command, node. Returns how
/// many entries it removed.
pub const GONE: &str = r#"
local chan, pub, node = ARGV[1], ARGV[2], ARGV[3]
local prefix = node .. '\t'
local removed = 0
local names = redis.call('HGETALL', KEYS[1])
for i = 1, #names, 2 do
  if string.sub(names[i + 1], 1, #prefix) == prefix then
    redis.call('HDEL', KEYS[1], names[i])
    removed = removed + 1
  end
end
local fields = redis.call('HKEYS', KEYS[2])
for i = 1, #fields do
  if string.sub(fields[i], 1, #prefix) == prefix then
    redis.call('HDEL', KEYS[2], fields[i])
    removed = removed + 1
  end
end
if removed > 0 then
  local seq = redis.call('INCR', KEYS[3])
  redis.call(pub, chan, f(tostring(seq)) .. f('X') .. f(node))
end
return removed
"#;

/// The full text of a script: the helper, then the body.
pub fn source(body: &str) -> String {
    format!("{FIELD}{body}")
}

/// One change of a gear's event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<'a> {
    /// `name` is held by `node`'s connection `conn`.
    Claim {
        /// The name.
        name: &'a str,
        /// The holder's node.
        node: &'a str,
        /// The holder's id there.
        conn: u64,
    },
    /// `name` is free.
    Release {
        /// The name.
        name: &'a str,
    },
    /// `node` has `count` members of `group`.
    Count {
        /// The node.
        node: &'a str,
        /// The group.
        group: &'a str,
        /// Its members there.
        count: usize,
    },
    /// Everything `node` held is free.
    Gone {
        /// The node.
        node: &'a str,
    },
}

/// A gear's event: its number and changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// The event's number (the gear's counter after the change).
    pub seq: u64,
    /// What changed, in order.
    pub changes: Vec<Change<'a>>,
}

/// Reads `length:bytes` fields.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn next(&mut self) -> Option<&'a [u8]> {
        let colon = self.0.iter().position(|&b| b == b':')?;
        let len: usize = std::str::from_utf8(&self.0[..colon]).ok()?.parse().ok()?;
        let rest = &self.0[colon + 1..];
        let field = rest.get(..len)?;
        self.0 = &rest[len..];
        Some(field)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.next()?).ok()
    }

    fn num<T: std::str::FromStr>(&mut self) -> Option<T> {
        self.str()?.parse().ok()
    }
}

/// Parses an event; `None` if it is malformed.
pub fn parse_event(bytes: &[u8]) -> Option<Event<'_>> {
    let mut f = Fields(bytes);
    let seq = f.num()?;
    let mut changes = Vec::new();
    while !f.0.is_empty() {
        let change = match f.next()? {
            b"C" => Change::Claim {
                name: f.str()?,
                node: f.str()?,
                conn: f.num()?,
            },
            b"R" => Change::Release { name: f.str()? },
            b"G" => Change::Count {
                node: f.str()?,
                group: f.str()?,
                count: f.num()?,
            },
            b"X" => Change::Gone { node: f.str()? },
            _ => return None,
        };
        changes.push(change);
    }
    Some(Event { seq, changes })
}

/// Splits a stored holder (`node TAB conn`).
pub fn parse_holder(value: &[u8]) -> Option<(&str, u64)> {
    let value = std::str::from_utf8(value).ok()?;
    let (node, conn) = value.split_once('\t')?;
    Some((node, conn.parse().ok()?))
}

/// Splits a stored group field (`node TAB group`).
pub fn parse_group_field(field: &[u8]) -> Option<(&str, &str)> {
    std::str::from_utf8(field).ok()?.split_once('\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_with_any_bytes_in_names() {
        let name = "a:b\t9:";
        let field = format!("{}:{name}", name.len());
        let ev = format!("2:171:C{field}2:n22:421:R{field}1:X2:n21:G2:n33:g:12:40");
        let parsed = parse_event(ev.as_bytes()).unwrap();
        assert_eq!(parsed.seq, 17);
        assert_eq!(
            parsed.changes,
            vec![
                Change::Claim {
                    name,
                    node: "n2",
                    conn: 42
                },
                Change::Release { name },
                Change::Gone { node: "n2" },
                Change::Count {
                    node: "n3",
                    group: "g:1",
                    count: 40
                },
            ]
        );
        assert!(parse_event(b"2:17" as &[u8]).unwrap().changes.is_empty());
        for bad in [&b""[..], b"x", b"2:171:C", b"2:171:Z", b"5:1"] {
            assert!(parse_event(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn holders_and_group_fields() {
        assert_eq!(parse_holder(b"n1\t77"), Some(("n1", 77)));
        assert_eq!(parse_holder(b"n1 77"), None);
        assert_eq!(parse_group_field(b"n1\troom:\tx"), Some(("n1", "room:\tx")));
    }
}
