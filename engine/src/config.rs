//! The limits of SPEC section 3, each with its default and what happens at it, and the
//! permessage-deflate settings.

use std::time::Duration;

pub use crate::protocol::deflate::DeflateConfig;

/// Limits applied to every connection. Each one has a default that serves and a
/// documented outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (one frame, or a reassembled fragmented message), in bytes.
    /// Over it: close 1009. Default 5,000,000 (antikythera's).
    pub max_message_bytes: u64,
    /// Connections per gear across all shards, unless the gear's mount overrides it.
    /// Over it: HTTP 503 with body `TooManyWebsocketConnections`. Default: the
    /// process's open-file limit (RLIMIT_NOFILE) times the shard count, since each
    /// shard's ring has its own descriptor table.
    pub max_connections_per_gear: usize,
    /// No data from the client for this long: close 1000, terminate `Timeout`.
    /// Default 60 s. Reset only by incoming data.
    pub idle_timeout: Duration,
    /// The upgrade request must be complete within this long of the accept, else the
    /// socket is closed without a response. Default 10 s.
    pub handshake_timeout: Duration,
    /// Largest request head (request line and headers). Over it: 431. Default 8 KiB.
    pub max_head_bytes: usize,
    /// Bytes queued to one client and not yet sent. Over it (the client stopped
    /// reading): close 1008, terminate `SlowConsumer`, the queue is freed. Default 1 MiB.
    pub max_outgoing_bytes: usize,
    /// After sending close, how long to wait for the peer's close before closing the
    /// socket. Default 5 s.
    pub closing_timeout: Duration,
    /// On drain, closes (1001) are spread over this window; connections still open at
    /// its end are closed. Default 5 s.
    pub drain_window: Duration,
    /// Ping a connection that has sent nothing (a pong counts) for this long (off by
    /// default). A connection that keeps sending is known to be there and is not
    /// pinged, so no per-connection ping deadline is kept.
    pub ping_interval: Option<Duration>,
    /// With pings on: no pong within this long of a ping closes the connection
    /// (terminate `PongTimeout`). Default 20 s.
    pub pong_timeout: Duration,
    /// permessage-deflate (RFC 7692): on by default, without context takeover either
    /// way (no zlib state per connection); see [`crate::protocol::deflate`].
    pub deflate: DeflateConfig,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 5_000_000,
            max_connections_per_gear: default_max_connections(1),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_head_bytes: 8 * 1024,
            max_outgoing_bytes: 1024 * 1024,
            closing_timeout: Duration::from_secs(5),
            drain_window: Duration::from_secs(5),
            ping_interval: None,
            pong_timeout: Duration::from_secs(20),
            deflate: DeflateConfig::default(),
        }
    }
}

/// The default per-gear connection limit for `shards` shards: the open-file limit of
/// the process (each shard's registered file table is bounded by it) times the shard
/// count, minus a few descriptors per shard for the ring and the listener.
pub fn default_max_connections(shards: usize) -> usize {
    let per_shard = crate::uring::probe::open_file_limit().unwrap_or(1024);
    per_shard.saturating_sub(16).max(1) * shards.max(1)
}
