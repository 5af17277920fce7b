//! The stats gear: pushes the server's live per-shard figures to every connected
//! client, once a second, as JSON text frames. The demo page shows them.
//!
//! Clients connect to the gear's path (`/stats` in `kythera`) and only listen; what
//! they send is ignored. Each connection joins the group [`WATCHERS`]; a feeder thread
//! outside the shards ([`spawn_feeder`]) samples [`ServerHandle::stats`] and publishes
//! one [`StatsUpdate`] to the group, which the registry delivers once per shard and
//! fans out there. A frame looks like this (rates per second over the last interval):
//!
//! ```text
//! {"shards":[{"shard":0,"connections":2,"in_per_sec":10.0,"out_per_sec":20.0}, ...],
//!  "connections":3,"in_per_sec":10.0,"out_per_sec":21.0}
//! ```
//!
//! `connections` counts connections running a gear (upgraded websockets, every gear
//! of the server), `in_per_sec` data messages received from clients, `out_per_sec`
//! frames sent to clients, stats frames included.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kythera_engine::{ServerHandle, ShardCounters};
use kythera_handler_api::{Conn, Context, Message, Websocket};
use serde::Serialize;

/// The group every stats connection joins.
pub const WATCHERS: &str = "watchers";

/// The stats gear: see the [module documentation](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats;

/// A JSON text frame of figures, encoded once and shared by every watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsUpdate(pub Arc<str>);

impl Websocket for Stats {
    type State = ();
    type Message = StatsUpdate;

    fn init(&self, _conn: &mut Conn, ctx: &mut Context<'_, StatsUpdate>) {
        if let Err(e) = ctx.join(WATCHERS) {
            tracing::warn!(conn = %ctx.id(), error = %e, "stats: could not join the watchers");
        }
    }

    fn handle_client_message(&self, _: &mut (), _: Message<'_>, _: &mut Context<'_, StatsUpdate>) {}

    fn handle_server_message(
        &self,
        _: &mut (),
        update: StatsUpdate,
        ctx: &mut Context<'_, StatsUpdate>,
    ) {
        ctx.send_text(&update.0);
    }
}

/// One shard's figures in a frame.
#[derive(Debug, Serialize, PartialEq)]
struct ShardFigures {
    shard: usize,
    connections: u64,
    in_per_sec: f64,
    out_per_sec: f64,
}

/// A whole frame.
#[derive(Debug, Serialize, PartialEq)]
struct Figures<'a> {
    /// This node's id, in a cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    /// The live nodes of the cluster as this node knows them, itself included.
    #[serde(skip_serializing_if = "Option::is_none")]
    nodes: Option<&'a [String]>,
    shards: Vec<ShardFigures>,
    connections: u64,
    in_per_sec: f64,
    out_per_sec: f64,
}

/// Per-second rate of a counter that went from `before` to `now` in `secs`, rounded to
/// a tenth.
fn rate(before: u64, now: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    (now.saturating_sub(before) as f64 / secs * 10.0).round() / 10.0
}

/// This node and the cluster's live nodes, for the frames of a node in a cluster.
#[derive(Debug, Clone, Copy)]
pub struct ClusterView<'a> {
    /// This node's id.
    pub node: &'a str,
    /// The live nodes, this one included.
    pub nodes: &'a [String],
}

/// The JSON frame for the interval between two samples `secs` apart (with the node and
/// the cluster's live nodes when `cluster` is given).
pub fn figures_json(
    before: &[ShardCounters],
    now: &[ShardCounters],
    secs: f64,
    cluster: Option<ClusterView<'_>>,
) -> String {
    let shards: Vec<ShardFigures> = now
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let b = before.get(i).copied().unwrap_or_default();
            ShardFigures {
                shard: i,
                connections: n.websockets,
                in_per_sec: rate(b.frames_in, n.frames_in, secs),
                out_per_sec: rate(b.frames_out, n.frames_out, secs),
            }
        })
        .collect();
    let figures = Figures {
        node: cluster.map(|c| c.node),
        nodes: cluster.map(|c| c.nodes),
        connections: shards.iter().map(|s| s.connections).sum(),
        in_per_sec: (shards.iter().map(|s| s.in_per_sec).sum::<f64>() * 10.0).round() / 10.0,
        out_per_sec: (shards.iter().map(|s| s.out_per_sec).sum::<f64>() * 10.0).round() / 10.0,
        shards,
    };
    serde_json::to_string(&figures).unwrap_or_else(|_| "{}".to_owned())
}

/// Starts the thread that publishes the figures to the stats gear mounted on `pattern`
/// every `every`, until the server drains. `None` if no stats gear is mounted there.
pub fn spawn_feeder(
    handle: ServerHandle,
    pattern: &str,
    every: Duration,
) -> Option<JoinHandle<()>> {
    let registry = handle.registry::<StatsUpdate>(pattern)?;
    let thread = std::thread::Builder::new()
        .name("kythera-stats".into())
        .spawn(move || {
            let mut before = handle.stats();
            let mut at = Instant::now();
            while !handle.is_draining() {
                std::thread::sleep(every);
                let now = handle.stats();
                let now_at = Instant::now();
                let secs = now_at.duration_since(at).as_secs_f64();
                // Skip the work when nobody watches.
                if registry.count(WATCHERS) > 0 {
                    let cluster = handle
                        .backplane()
                        .map(|b| (b.link().node_id(), b.live_nodes()));
                    let view = cluster
                        .as_ref()
                        .map(|(node, nodes)| ClusterView { node, nodes });
                    let json = figures_json(&before, &now, secs, view);
                    if let Err(e) = registry.publish(WATCHERS, StatsUpdate(json.into())) {
                        tracing::debug!(error = %e, "stats: publish failed");
                    }
                }
                (before, at) = (now, now_at);
            }
        })
        .ok()?;
    Some(thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_per_shard_and_summed() {
        let before = [
            ShardCounters {
                frames_in: 100,
                frames_out: 50,
                websockets: 1,
                ..Default::default()
            },
            ShardCounters::default(),
        ];
        let now = [
            ShardCounters {
                frames_in: 300,
                frames_out: 50,
                websockets: 3,
                ..Default::default()
            },
            ShardCounters {
                frames_in: 1,
                frames_out: 4,
                websockets: 2,
                ..Default::default()
            },
        ];
        let v: serde_json::Value =
            serde_json::from_str(&figures_json(&before, &now, 2.0, None)).unwrap();
        assert_eq!(v["connections"], 5);
        assert_eq!(v["in_per_sec"], 100.5);
        assert_eq!(v["out_per_sec"], 2.0);
        assert_eq!(v["shards"][0]["in_per_sec"], 100.0);
        assert_eq!(v["shards"][0]["connections"], 3);
        assert_eq!(v["shards"][1]["shard"], 1);
        assert_eq!(v["shards"][1]["out_per_sec"], 2.0);
        assert!(v.get("node").is_none(), "a single process names no node");
        let nodes = ["a".to_owned(), "b".to_owned()];
        let view = ClusterView {
            node: "a",
            nodes: &nodes,
        };
        let v: serde_json::Value =
            serde_json::from_str(&figures_json(&before, &now, 2.0, Some(view))).unwrap();
        assert_eq!(v["node"], "a");
        assert_eq!(v["nodes"], serde_json::json!(["a", "b"]));
    }

    #[test]
    fn no_time_no_rate() {
        assert_eq!(rate(0, 10, 0.0), 0.0);
        assert_eq!(rate(10, 5, 1.0), 0.0, "a counter never goes back");
    }
}
