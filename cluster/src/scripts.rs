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
/// `M name conn` (claim of a name that came with a handed-over connection), `R name
/// conn` (release), `G group count`, `A node -` (the node `M` claims may take names
/// from, for the operations after it). Returns one integer per claim, in order: 1 won
/// (the name was free or held by this node already), 0 lost.
///
/// A claim of a name this node holds for another connection wins: a node never has two
/// holders of a name (its own table sees to that), so such an entry is one this node
/// released and Redis has not heard of yet, or one of an earlier process with the same
/// node id. An `M` claim also wins over the `A` node's entry: during a live handover
/// that is the process the connection came from, whose release may not have reached
/// Redis yet; once the new process takes the old one's node id, it is the temporary
/// id it ran under meanwhile.
pub const APPLY: &str = r#"
local chan, pub, node = ARGV[1], ARGV[2], ARGV[3]
local prefix = node .. '\t'
local alias = nil
local out, ev, i = {}, {}, 4
while i + 2 <= #ARGV do
  local op, a, b = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'A' then
    alias = a .. '\t'
  elseif op == 'C' or op == 'M' then
    local v = prefix .. b
    local cur = redis.call('HGET', KEYS[1], a)
    if not cur or string.sub(cur, 1, #prefix) == prefix
      or (op == 'M' and alias and string.sub(cur, 1, #alias) == alias) then
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

    /// Runs `APPLY` for `node` with operations `ops` on a real Redis.
    async fn apply(
        c: &mut redis::aio::MultiplexedConnection,
        node: &str,
        ops: &[&str],
    ) -> Vec<i64> {
        let script = redis::Script::new(&source(APPLY));
        let mut call = script.key("names");
        call.key("groups")
            .key("seq")
            .arg("events")
            .arg("PUBLISH")
            .arg(node);
        for op in ops {
            call.arg(*op);
        }
        call.invoke_async(c).await.unwrap()
    }

    async fn holder(c: &mut redis::aio::MultiplexedConnection, name: &str) -> Option<String> {
        redis::cmd("HGET")
            .arg("names")
            .arg(name)
            .query_async(c)
            .await
            .unwrap()
    }

    /// A name that came with a handed-over connection (`M`) may be taken from the node
    /// named by `A` (the process it came from), and only from that one; a plain claim
    /// never takes a name from another node; a late release of the name's old holder
    /// leaves the new holder alone.
    #[test]
    fn moved_claims_take_names_only_from_the_alias_node() {
        let redis = kythera_testkit::redis::RedisServer::start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = redis::Client::open(redis.url()).unwrap();
            let c = &mut client.get_multiplexed_async_connection().await.unwrap();
            assert_eq!(
                apply(c, "old", &["C", "a", "1", "C", "b", "2"]).await,
                [1, 1]
            );
            assert_eq!(apply(c, "new", &["C", "a", "7"]).await, [0]);
            assert_eq!(apply(c, "new", &["M", "a", "7"]).await, [0], "no alias");
            let ops = ["A", "elsewhere", "-", "M", "a", "7"];
            assert_eq!(apply(c, "new", &ops).await, [0], "another alias");
            let ops = ["A", "old", "-", "C", "b", "8", "M", "a", "7", "M", "z", "9"];
            assert_eq!(apply(c, "new", &ops).await, [0, 1, 1]);
            assert_eq!(holder(c, "a").await.as_deref(), Some("new\t7"));
            assert_eq!(holder(c, "b").await.as_deref(), Some("old\t2"));
            apply(c, "old", &["R", "a", "1"]).await;
            assert_eq!(holder(c, "a").await.as_deref(), Some("new\t7"));
        });
    }

    #[test]
    fn holders_and_group_fields() {
        assert_eq!(parse_holder(b"n1\t77"), Some(("n1", 77)));
        assert_eq!(parse_holder(b"n1 77"), None);
        assert_eq!(parse_group_field(b"n1\troom:\tx"), Some(("n1", "room:\tx")));
    }
}
