//! What an operator sees over HTTP on the engine's own port: `GET /metrics` (Prometheus
//! text format, through `prometheus-client`), `GET /healthz` (200 while accepting, 503
//! while draining), and static files (a demo page). Plain (non-upgrade) GET and HEAD
//! requests to these paths are answered and the connection closed; an upgrade request to
//! them is routed to gears like any other.
//!
//! Per-gear counters are kept per shard ([`GearCounters`], written only by the owning
//! shard, no locked instruction) and summed when scraped, like the shards' own counters.

use std::fmt::Write as _;
use std::sync::Arc;

use kythera_registry::Counter;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use crate::gear::App;
use crate::server::Shared;

/// Close codes counted one by one; any other code is counted as `other`.
const CLOSE_CODES: [u16; 14] = [
    1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
];

/// Handshake refusals counted one by one; any other status is counted as `other`.
const REJECT_STATUSES: [u16; 9] = [400, 403, 404, 405, 409, 426, 431, 500, 503];

/// One shard's counters for one gear (index `gears.len()` of a shard's list stands for
/// requests that matched no gear).
#[derive(Debug, Default)]
pub struct GearCounters {
    /// Data messages received from clients.
    pub frames_in: Counter,
    /// Frames sent to clients (data and close frames the gear sent, published frames).
    pub frames_out: Counter,
    /// Bytes received on open connections of the gear.
    pub bytes_in: Counter,
    /// Bytes of frames queued to clients.
    pub bytes_out: Counter,
    /// Connections upgraded (after `init`).
    pub opened: Counter,
    /// Connections whose `terminate` ran.
    pub terminated: Counter,
    closes_sent: [Counter; CLOSE_CODES.len() + 1],
    closes_received: [Counter; CLOSE_CODES.len() + 1],
    rejected: [Counter; REJECT_STATUSES.len() + 1],
}

fn slot_of(list: &[u16], value: u16) -> usize {
    list.iter().position(|&v| v == value).unwrap_or(list.len())
}

impl GearCounters {
    /// A close frame with `code` was sent (`None`: without a status, counted as 1005).
    pub fn close_sent(&self, code: Option<u16>) {
        self.closes_sent[slot_of(&CLOSE_CODES, code.unwrap_or(1005))].add(1);
    }

    /// A close frame with `code` arrived from the client.
    pub fn close_received(&self, code: Option<u16>) {
        self.closes_received[slot_of(&CLOSE_CODES, code.unwrap_or(1005))].add(1);
    }

    /// An upgrade was refused with `status`.
    pub fn rejected(&self, status: u16) {
        self.rejected[slot_of(&REJECT_STATUSES, status)].add(1);
    }
}

/// Every shard's counters: `[shard][gear]`, the last gear slot for unrouted requests.
pub(crate) type AllGearCounters = Box<[Arc<[GearCounters]>]>;

/// The paths and files answered over plain HTTP.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Where the metrics are served (`None`: not served). Default `/metrics`.
    pub metrics: Option<String>,
    /// Where health is served (`None`: not served). Default `/healthz`.
    pub health: Option<String>,
    /// Static files: path, content type, body.
    pub files: Vec<(String, &'static str, &'static [u8])>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            metrics: Some("/metrics".into()),
            health: Some("/healthz".into()),
            files: Vec::new(),
        }
    }
}

/// What the sessions need to answer plain HTTP requests: set once the server is built.
pub(crate) struct Http {
    pub config: HttpConfig,
    pub shared: Arc<Shared>,
}

/// A plain HTTP answer: status, content type, body.
pub(crate) struct HttpAnswer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Http {
    /// The answer to a plain GET or HEAD of `path`, if it is one of ours.
    pub(crate) fn answer(&self, app: &App, method: &str, path: &str) -> Option<HttpAnswer> {
        if method != "GET" && method != "HEAD" {
            return None;
        }
        let cfg = &self.config;
        let answer = if cfg.metrics.as_deref() == Some(path) {
            HttpAnswer {
                status: 200,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body: render_metrics(app, &self.shared).into_bytes(),
            }
        } else if cfg.health.as_deref() == Some(path) {
            let draining = self.shared.is_draining();
            HttpAnswer {
                status: if draining { 503 } else { 200 },
                content_type: "text/plain; charset=utf-8",
                body: if draining {
                    b"draining\n".to_vec()
                } else {
                    b"ok\n".to_vec()
                },
            }
        } else {
            let (_, content_type, body) = cfg.files.iter().find(|(p, _, _)| p == path)?;
            HttpAnswer {
                status: 200,
                content_type,
                body: body.to_vec(),
            }
        };
        Some(if method == "HEAD" {
            HttpAnswer {
                body: Vec::new(),
                ..answer
            }
        } else {
            answer
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GearLabel {
    gear: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GearCode {
    gear: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GearStatus {
    gear: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriverLabel {
    driver: String,
}

fn counter_family<L>(reg: &mut PromRegistry, name: &str, help: &str) -> Family<L, PromCounter>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, PromCounter>::default();
    reg.register(name, help, family.clone());
    family
}

fn gauge_family<L>(reg: &mut PromRegistry, name: &str, help: &str) -> Family<L, Gauge>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, Gauge>::default();
    reg.register(name, help, family.clone());
    family
}

/// The metrics of SPEC section 4, summed over shards now.
pub(crate) fn render_metrics(app: &App, shared: &Shared) -> String {
    let mut reg = PromRegistry::with_prefix("kythera");
    let connections =
        gauge_family::<GearLabel>(&mut reg, "connections", "Open connections per gear");
    let limit_pct = gauge_family::<GearLabel>(
        &mut reg,
        "connections_limit_percent",
        "Open connections per gear as a percentage of its limit",
    );
    let frames_in =
        counter_family::<GearLabel>(&mut reg, "frames_in", "Data messages received from clients");
    let frames_out = counter_family::<GearLabel>(&mut reg, "frames_out", "Frames sent to clients");
    let bytes_in =
        counter_family::<GearLabel>(&mut reg, "bytes_in", "Bytes received on open connections");
    let bytes_out =
        counter_family::<GearLabel>(&mut reg, "bytes_out", "Bytes of frames queued to clients");
    let closes_sent =
        counter_family::<GearCode>(&mut reg, "closes_sent", "Close frames sent, by code");
    let closes_received = counter_family::<GearCode>(
        &mut reg,
        "closes_received",
        "Close frames received, by code",
    );
    let rejected = counter_family::<GearStatus>(
        &mut reg,
        "handshakes_rejected",
        "Upgrade requests refused, by status (gear \"\": no gear matched)",
    );
    let forwarded = counter_family::<GearLabel>(
        &mut reg,
        "registry_forwarded",
        "Registry messages pushed from one shard to another",
    );
    let from_foreign = counter_family::<GearLabel>(
        &mut reg,
        "registry_from_foreign",
        "Registry messages pushed by threads outside the shards",
    );
    let dropped = counter_family::<GearLabel>(
        &mut reg,
        "registry_dropped_full",
        "Registry messages dropped because a queue was full",
    );
    let dropped_gone = counter_family::<GearLabel>(
        &mut reg,
        "registry_dropped_gone",
        "Registry messages whose connection had ended when they arrived",
    );
    let relayed = counter_family::<GearLabel>(
        &mut reg,
        "registry_handover_relayed",
        "Frames published during a live handover and relayed to the other process",
    );
    let unrelayed = counter_family::<GearLabel>(
        &mut reg,
        "registry_handover_unrelayed",
        "Typed messages published during a live handover: they reached this process's members only",
    );
    let io_driver = gauge_family::<DriverLabel>(
        &mut reg,
        "io_driver",
        "The I/O driver the shards run on (value 1): uring or epoll",
    );
    io_driver
        .get_or_create(&DriverLabel {
            driver: shared.driver.name().to_owned(),
        })
        .set(1);
    let loops =
        counter_family::<ShardLabel>(&mut reg, "loop_iterations", "Turns of each shard's loop");
    let submissions = counter_family::<ShardLabel>(
        &mut reg,
        "submissions",
        "io_uring operations submitted per shard",
    );
    let enobufs = counter_family::<ShardLabel>(
        &mut reg,
        "recv_enobufs",
        "Multishot receives ended because the shard's receive buffers were all in use",
    );
    let rearms = counter_family::<ShardLabel>(
        &mut reg,
        "recv_rearms",
        "Multishot receives armed again after they ended",
    );
    let releases = counter_family::<ShardLabel>(
        &mut reg,
        "memory_releases",
        "Calls of the memory-release hook after connections opened or closed",
    );
    let open = gauge_family::<ShardLabel>(&mut reg, "shard_connections", "Open sockets per shard");
    let registry_in = counter_family::<ShardLabel>(
        &mut reg,
        "registry_received",
        "Registry envelopes taken from each shard's inbound queues",
    );
    let depth = gauge_family::<ShardLabel>(
        &mut reg,
        "registry_queue_depth",
        "Registry envelopes waiting in each shard's inbound queues",
    );
    let remote_names = gauge_family::<GearLabel>(
        &mut reg,
        "registry_remote_names",
        "Names held on other nodes of the cluster, as this node knows them",
    );
    let remote_members = gauge_family::<GearLabel>(
        &mut reg,
        "registry_remote_members",
        "Group memberships on other nodes of the cluster, as this node knows them",
    );
    let accepted =
        counter_family::<ShardLabel>(&mut reg, "accepted", "Connections accepted per shard");
    let websockets = gauge_family::<ShardLabel>(
        &mut reg,
        "shard_websockets",
        "Connections running a gear per shard",
    );
    let tls_handshakes = counter_family::<ShardLabel>(
        &mut reg,
        "tls_handshakes",
        "TLS handshakes completed per shard",
    );
    let tls_failed = counter_family::<CauseLabel>(
        &mut reg,
        "tls_handshakes_failed",
        "TLS connections that failed before or during the handshake, by cause: not_tls \
         (the first bytes were not TLS; plain HTTP gets a 400), refused_by_client (an \
         alert from the client), protocol (anything else rustls refused), incomplete \
         (closed before the handshake completed: the handshake timeout, or the client left)",
    );
    let handover = counter_family::<ResultLabel>(
        &mut reg,
        "handover_connections",
        "Connections in live handovers, by result: moved (handed to the new process), \
         closed (closed with 1001 instead), taken (taken over from the old process), refused \
         (this build refused the state: the old process closes it with 1001), failed (the \
         socket could not be adopted: the same)",
    );

    let gear_names: Vec<String> = (0..app.gear_count())
        .map(|g| app.pattern(g).to_owned())
        .chain(std::iter::once(String::new()))
        .collect();
    for (g, name) in gear_names.iter().enumerate() {
        let label = GearLabel { gear: name.clone() };
        let sum = |f: &dyn Fn(&GearCounters) -> u64| -> u64 {
            shared.gear_counters.iter().map(|s| f(&s[g])).sum()
        };
        if g < app.gear_count() {
            let (live, max) = app.connections_of(g);
            connections.get_or_create(&label).set(live as i64);
            limit_pct
                .get_or_create(&label)
                .set((live * 100).checked_div(max).unwrap_or(0) as i64);
            frames_in
                .get_or_create(&label)
                .inc_by(sum(&|c| c.frames_in.get()));
            frames_out
                .get_or_create(&label)
                .inc_by(sum(&|c| c.frames_out.get()));
            bytes_in
                .get_or_create(&label)
                .inc_by(sum(&|c| c.bytes_in.get()));
            bytes_out
                .get_or_create(&label)
                .inc_by(sum(&|c| c.bytes_out.get()));
            if let Some(stats) = app.registry_stats_of(g) {
                forwarded.get_or_create(&label).inc_by(stats.forwarded);
                from_foreign
                    .get_or_create(&label)
                    .inc_by(stats.from_foreign);
                dropped.get_or_create(&label).inc_by(stats.dropped_full);
                dropped_gone
                    .get_or_create(&label)
                    .inc_by(stats.dropped_gone);
                relayed.get_or_create(&label).inc_by(stats.relayed);
                unrelayed.get_or_create(&label).inc_by(stats.unrelayed);
                if app.is_clustered(name) == Some(true) {
                    remote_names
                        .get_or_create(&label)
                        .set(stats.remote_names as i64);
                    remote_members
                        .get_or_create(&label)
                        .set(stats.remote_members as i64);
                }
            }
            for (i, code) in CLOSE_CODES
                .iter()
                .map(u16::to_string)
                .chain(std::iter::once("other".to_owned()))
                .enumerate()
            {
                let key = GearCode {
                    gear: name.clone(),
                    code,
                };
                let sent = sum(&|c| c.closes_sent[i].get());
                let received = sum(&|c| c.closes_received[i].get());
                if sent > 0 {
                    closes_sent.get_or_create(&key).inc_by(sent);
                }
                if received > 0 {
                    closes_received.get_or_create(&key).inc_by(received);
                }
            }
        }
        for (i, status) in REJECT_STATUSES
            .iter()
            .map(u16::to_string)
            .chain(std::iter::once("other".to_owned()))
            .enumerate()
        {
            let n = sum(&|c| c.rejected[i].get());
            if n > 0 {
                rejected
                    .get_or_create(&GearStatus {
                        gear: name.clone(),
                        status,
                    })
                    .inc_by(n);
            }
        }
    }
    for (i, stats) in shared.stats.iter().enumerate() {
        let label = ShardLabel {
            shard: i.to_string(),
        };
        let c = stats.snapshot();
        loops.get_or_create(&label).inc_by(c.loop_iterations);
        submissions.get_or_create(&label).inc_by(c.submissions);
        enobufs.get_or_create(&label).inc_by(c.enobufs);
        rearms.get_or_create(&label).inc_by(c.recv_rearms);
        releases.get_or_create(&label).inc_by(c.memory_releases);
        accepted.get_or_create(&label).inc_by(c.accepted);
        tls_handshakes
            .get_or_create(&label)
            .inc_by(c.tls_handshakes);
        for (cause, n) in [
            ("not_tls", c.tls_failed_not_tls),
            ("refused_by_client", c.tls_failed_refused),
            ("protocol", c.tls_failed_protocol),
            ("incomplete", c.tls_failed_incomplete),
        ] {
            tls_failed.get_or_create(&CauseLabel { cause }).inc_by(n);
        }
        for (result, n) in [
            ("moved", c.handover_moved),
            ("closed", c.handover_closed),
            ("taken", c.handover_taken),
            ("refused", c.handover_refused),
            ("failed", c.handover_failed),
        ] {
            handover.get_or_create(&ResultLabel { result }).inc_by(n);
        }
        open.get_or_create(&label).set(c.open() as i64);
        let running: u64 = shared.gear_counters[i]
            .iter()
            .map(|g| g.opened.get().saturating_sub(g.terminated.get()))
            .sum();
        websockets.get_or_create(&label).set(running as i64);
        registry_in.get_or_create(&label).inc_by(c.registry_in);
        depth
            .get_or_create(&label)
            .set(app.registry_depth(i) as i64);
    }
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
        let _ = writeln!(out, "# encoding failed");
    }
    if let Some(backplane) = app.backplane() {
        // The backplane's families go before the end marker.
        if out.ends_with("# EOF\n") {
            out.truncate(out.len() - "# EOF\n".len());
        }
        backplane.write_metrics(&mut out);
        out.push_str("# EOF\n");
    }
    out
}
