//! One connection to Redis, a single server or a Redis Cluster, with its pushes.
//!
//! Both speak RESP3, so one connection carries commands and subscriptions alike; what
//! is published to a subscribed channel arrives as a push on the channel returned by
//! [`Connection::open`]. Against a Redis Cluster, channels are sharded (`SSUBSCRIBE`,
//! `SPUBLISH`, Redis 7): a channel lives on the node that owns its slot, so publishing
//! traffic spreads over the cluster instead of being copied to every node.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, PushInfo, RedisResult, Value};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// How long a command may take before the connection counts as lost.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

enum Kind {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// A connection to Redis: see the module documentation.
pub struct Connection {
    kind: Kind,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("cluster", &self.is_cluster())
            .finish()
    }
}

/// `url` with RESP3 asked for (pushes need it).
fn resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

/// The part of a command's key that decides its slot in a Redis Cluster: the text in
/// its first braces if not empty, else the whole key (the key is the first argument,
/// the third for `EVALSHA`).
fn hash_tag(cmd: &Cmd) -> &[u8] {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let first = args.next().unwrap_or_default();
    let key = if first.eq_ignore_ascii_case(b"EVALSHA") {
        args.nth(2)
    } else {
        args.next()
    }
    .unwrap_or_default();
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

impl Connection {
    /// Connects to the first of `seeds`; if it is a node of a Redis Cluster, connects
    /// to the cluster through all of them.
    pub async fn open(seeds: &[String]) -> RedisResult<(Connection, UnboundedReceiver<PushInfo>)> {
        let first = seeds
            .first()
            .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Client, "no Redis URL")))?;
        let (tx, rx) = unbounded_channel();
        let client = redis::Client::open(resp3(first))?;
        let config = AsyncConnectionConfig::new()
            .set_push_sender(tx)
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        let mut single = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let info: String = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut single)
            .await?;
        if !info.contains("cluster_enabled:1") {
            return Ok((
                Connection {
                    kind: Kind::Single(single),
                },
                rx,
            ));
        }
        drop(single);
        let (tx, rx) = unbounded_channel();
        let client = ClusterClientBuilder::new(seeds.iter().map(|s| resp3(s)))
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .response_timeout(RESPONSE_TIMEOUT)
            .connection_timeout(CONNECT_TIMEOUT)
            .build()?;
        let cluster = client.get_async_connection().await?;
        Ok((
            Connection {
                kind: Kind::Cluster(cluster),
            },
            rx,
        ))
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// The publish command: sharded on a cluster.
    pub fn publish_command(&self) -> &'static str {
        if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// Runs `cmds` and returns their replies in order. On a single server they go as
    /// one pipeline; on a cluster, as one pipeline per hash tag (each to the node that
    /// owns the tag's slot, all at once), so that commands for one channel or key keep
    /// their order. A command that fails fails the call.
    pub async fn run(&mut self, cmds: &[Cmd]) -> RedisResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match &mut self.kind {
            Kind::Single(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd.clone());
                }
                pipe.query_async(c).await
            }
            Kind::Cluster(c) => {
                let mut groups: Vec<(&[u8], Vec<usize>)> = Vec::new();
                for (i, cmd) in cmds.iter().enumerate() {
                    let tag = hash_tag(cmd);
                    match groups.iter_mut().find(|(t, _)| *t == tag) {
                        Some((_, members)) => members.push(i),
                        None => groups.push((tag, vec![i])),
                    }
                }
                let futures = groups.iter().map(|(_, members)| {
                    let mut c = c.clone();
                    let mut pipe = redis::pipe();
                    for &i in members {
                        pipe.add_command(cmds[i].clone());
                    }
                    async move { pipe.query_async::<Vec<Value>>(&mut c).await }
                });
                let results = futures_util::future::join_all(futures).await;
                let mut out = vec![Value::Nil; cmds.len()];
                for ((_, members), result) in groups.iter().zip(results) {
                    for (&i, v) in members.iter().zip(result?) {
                        out[i] = v;
                    }
                }
                Ok(out)
            }
        }
    }

    /// Loads a script on every primary; returns its SHA-1.
    pub async fn load_script(&mut self, source: &str) -> RedisResult<String> {
        let cmd = redis::cmd("SCRIPT").arg("LOAD").arg(source).clone();
        match &mut self.kind {
            Kind::Single(c) => cmd.query_async(c).await,
            Kind::Cluster(c) => cmd.query_async(c).await,
        }
    }

    /// Subscribes to `channel` (sharded on a cluster); returns once Redis confirmed.
    pub async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match &mut self.kind {
            Kind::Single(c) => c.subscribe(channel).await,
            Kind::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    /// Unsubscribes from `channel`.
    pub async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match &mut self.kind {
            Kind::Single(c) => c.unsubscribe(channel).await,
            Kind::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_of_commands() {
        let publish = redis::cmd("SPUBLISH")
            .arg("kythera:node:{n1}")
            .arg("x")
            .clone();
        assert_eq!(hash_tag(&publish), b"n1");
        let eval = redis::cmd("EVALSHA")
            .arg("sha")
            .arg(3)
            .arg("kythera:{/chat}:names")
            .arg("kythera:{/chat}:groups")
            .clone();
        assert_eq!(hash_tag(&eval), b"/chat");
        let plain = redis::cmd("HKEYS").arg("kythera:nodes").clone();
        assert_eq!(hash_tag(&plain), b"kythera:nodes");
        let empty = redis::cmd("GET").arg("a{}b").clone();
        assert_eq!(hash_tag(&empty), b"a{}b");
    }
}
