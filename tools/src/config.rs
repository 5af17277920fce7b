//! The `kythera` binary's configuration: defaults that serve, a TOML file
//! (`--config FILE`), `KYTHERA_*` environment variables and command-line flags, each
//! over the one before (flags over environment over file over defaults).
//!
//! Every option has the same name in the three places: `--max-message-bytes`,
//! `KYTHERA_MAX_MESSAGE_BYTES`, `max_message_bytes = ...` in the file. An invalid value
//! stops the server with a message that names the key, where it came from and why
//! (exit status 2); so does an unknown key in the file.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use kythera_engine::IoChoice;
use kythera_engine::config::Limits;
use kythera_engine::shard::ShardTuning;
use serde::Deserialize;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// The I/O driver (`--io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoArg {
    /// io_uring when the start-up probe passes, else epoll (one log line says why).
    Auto,
    /// io_uring, or stop with the probe's explanation.
    Uring,
    /// epoll (no io_uring probe).
    Epoll,
}

impl From<IoArg> for IoChoice {
    fn from(arg: IoArg) -> IoChoice {
        match arg {
            IoArg::Auto => IoChoice::Auto,
            IoArg::Uring => IoChoice::Uring,
            IoArg::Epoll => IoChoice::Epoll,
        }
    }
}

/// The command line (and, through `env`, the environment). Every field is optional so
/// that an absent flag lets the file or the default speak.
#[derive(Debug, Default, Parser)]
#[command(
    name = "kythera",
    version,
    about = "A WebSocket engine on io_uring, serving the echo gear on /echo and /, the chat gear on /chat, the stats gear on /stats and the demo page at GET /.",
    after_help = "Precedence: flags over KYTHERA_* environment variables over the --config file over defaults. Log filtering: RUST_LOG (default info)."
)]
pub struct Args {
    /// TOML file with any of the options below (same names, snake_case).
    #[arg(long, value_name = "FILE", env = "KYTHERA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on; repeat for several (in the environment: comma-separated)
    /// [default: 127.0.0.1:8080].
    #[arg(
        long,
        value_name = "ADDR",
        env = "KYTHERA_LISTEN",
        value_delimiter = ','
    )]
    pub listen: Vec<SocketAddr>,
    /// Address to listen on for wss:// and https:// (TLS 1.3 and 1.2); repeat for
    /// several (in the environment: comma-separated). Needs --tls-cert and --tls-key.
    /// Plain --listen addresses keep serving beside them [default: none].
    #[arg(
        long,
        value_name = "ADDR",
        env = "KYTHERA_TLS_LISTEN",
        value_delimiter = ','
    )]
    pub tls_listen: Vec<SocketAddr>,
    /// PEM file with the TLS listeners' certificate chain, leaf first. Read again on
    /// SIGHUP (new handshakes get the new one; open connections stay).
    #[arg(long, value_name = "FILE", env = "KYTHERA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1). Read again
    /// on SIGHUP.
    #[arg(long, value_name = "FILE", env = "KYTHERA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Number of shards, threads pinned to cores, 1 to 256 [default: the number of CPUs].
    #[arg(long, value_name = "N", env = "KYTHERA_SHARDS")]
    pub shards: Option<usize>,
    /// Largest message (frame or reassembled), in bytes; larger ones are closed with
    /// 1009 [default: 5000000].
    #[arg(long, value_name = "BYTES", env = "KYTHERA_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<u64>,
    /// Bytes queued to a client behind a send it has not taken; over it the client is
    /// closed with 1008, slow consumer [default: 1048576].
    #[arg(long, value_name = "BYTES", env = "KYTHERA_MAX_OUTGOING_BYTES")]
    pub max_outgoing_bytes: Option<usize>,
    /// Connections per gear; over it the upgrade is answered 503 [default: the open-file
    /// limit times the shard count].
    #[arg(long, value_name = "N", env = "KYTHERA_MAX_CONNECTIONS_PER_GEAR")]
    pub max_connections_per_gear: Option<usize>,
    /// Largest request head, in bytes; over it 431 [default: 8192].
    #[arg(long, value_name = "BYTES", env = "KYTHERA_MAX_HEAD_BYTES")]
    pub max_head_bytes: Option<usize>,
    /// Close connections that send nothing for this many seconds, with 1000 [default: 60].
    #[arg(long, value_name = "SECS", env = "KYTHERA_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// The upgrade request must arrive within this many seconds [default: 10].
    #[arg(long, value_name = "SECS", env = "KYTHERA_HANDSHAKE_TIMEOUT_SECS")]
    pub handshake_timeout_secs: Option<u64>,
    /// After sending close, wait this many seconds for the peer's close [default: 5].
    #[arg(long, value_name = "SECS", env = "KYTHERA_CLOSING_TIMEOUT_SECS")]
    pub closing_timeout_secs: Option<u64>,
    /// On SIGTERM/SIGINT, spread the 1001 closes over this many seconds [default: 5].
    #[arg(long, value_name = "SECS", env = "KYTHERA_DRAIN_WINDOW_SECS")]
    pub drain_window_secs: Option<u64>,
    /// Ping a connection that has sent nothing for this many seconds; 0 is off
    /// [default: 0].
    #[arg(long, value_name = "SECS", env = "KYTHERA_PING_INTERVAL_SECS")]
    pub ping_interval_secs: Option<u64>,
    /// With pings on, close a connection whose pong is this late, in seconds [default: 20].
    #[arg(long, value_name = "SECS", env = "KYTHERA_PONG_TIMEOUT_SECS")]
    pub pong_timeout_secs: Option<u64>,
    /// Messages each registry queue between shards holds; at the bound messages are
    /// dropped and counted [default: 8192].
    #[arg(long, value_name = "N", env = "KYTHERA_REGISTRY_QUEUE_CAPACITY")]
    pub registry_queue_capacity: Option<usize>,
    /// Use plain file descriptors instead of io_uring direct descriptors [default: false].
    #[arg(long, value_name = "BOOL", env = "KYTHERA_PLAIN_FDS", num_args = 0..=1, default_missing_value = "true")]
    pub plain_fds: Option<bool>,
    /// Send messages of at least this many bytes with zero-copy sends (slower on
    /// loopback); 0 is off [default: 0].
    #[arg(long, value_name = "BYTES", env = "KYTHERA_SEND_ZC_MIN_BYTES")]
    pub send_zc_min_bytes: Option<usize>,
    /// Size of each receive buffer in a shard's provided-buffer ring, 256 to 1048576
    /// [default: 65536; 4096 without incremental buffers].
    #[arg(long, value_name = "BYTES", env = "KYTHERA_RECV_BUFFER_BYTES")]
    pub recv_buffer_bytes: Option<u32>,
    /// Receive buffers per shard, a power of two up to 32768 [default: 64; 1024 without
    /// incremental buffers].
    #[arg(long, value_name = "N", env = "KYTHERA_RECV_BUFFERS")]
    pub recv_buffers: Option<u16>,
    /// Consume receive buffers incrementally (Linux 6.15): a receive takes only the
    /// bytes it got; without it each receive takes a whole buffer (on kernels that
    /// refuse it, buffers over 4 KiB are then cut into 4 KiB ones) [default: true].
    #[arg(long, value_name = "BOOL", env = "KYTHERA_RECV_BUFFERS_INCREMENTAL", num_args = 0..=1, default_missing_value = "true")]
    pub recv_buffers_incremental: Option<bool>,
    /// Log line format [default: pretty].
    #[arg(long, value_name = "FORMAT", env = "KYTHERA_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Unix socket on which a new process (started with --take-over PATH) can take
    /// this one's listeners and connections; this process exits 0 once it holds
    /// nothing (README, "Deploying without disconnecting") [default: none].
    #[arg(long, value_name = "PATH", env = "KYTHERA_HANDOVER_SOCKET")]
    pub handover_socket: Option<PathBuf>,
    /// Take over the listeners and connections of the process listening on this Unix
    /// socket (its --handover-socket) instead of binding; give the same listen
    /// addresses [default: none].
    #[arg(long, value_name = "PATH", env = "KYTHERA_TAKE_OVER")]
    pub take_over: Option<PathBuf>,
    /// Put this text before every text message the echo gear sends back, to tell one
    /// build from another (a handover test sees where the answers switch)
    /// [default: none].
    #[arg(long, value_name = "TEXT", env = "KYTHERA_ECHO_PREFIX")]
    pub echo_prefix: Option<String>,
    /// The I/O driver: auto (io_uring when it works here, else epoll), uring, or epoll
    /// [default: auto].
    #[arg(long, value_name = "DRIVER", env = "KYTHERA_IO")]
    pub io: Option<IoArg>,
    /// Agree to permessage-deflate (RFC 7692) when a client offers it [default: true].
    #[arg(long, value_name = "BOOL", env = "KYTHERA_DEFLATE", num_args = 0..=1, default_missing_value = "true")]
    pub deflate: Option<bool>,
    /// Compress every message on its own: no compressor per connection, one per shard
    /// [default: true].
    #[arg(
        long,
        value_name = "BOOL",
        env = "KYTHERA_DEFLATE_SERVER_NO_CONTEXT_TAKEOVER"
    )]
    pub deflate_server_no_context_takeover: Option<bool>,
    /// Ask clients to compress every message on its own: no decompressor per
    /// connection [default: true].
    #[arg(
        long,
        value_name = "BOOL",
        env = "KYTHERA_DEFLATE_CLIENT_NO_CONTEXT_TAKEOVER"
    )]
    pub deflate_client_no_context_takeover: Option<bool>,
    /// Largest compression window of the server, 9 to 15 [default: 15].
    #[arg(
        long,
        value_name = "BITS",
        env = "KYTHERA_DEFLATE_SERVER_MAX_WINDOW_BITS"
    )]
    pub deflate_server_max_window_bits: Option<u8>,
    /// Largest window asked of clients that allow it, 9 to 15 [default: 15].
    #[arg(
        long,
        value_name = "BITS",
        env = "KYTHERA_DEFLATE_CLIENT_MAX_WINDOW_BITS"
    )]
    pub deflate_client_max_window_bits: Option<u8>,
    /// zlib level of the server's compression, 0 to 9 [default: 1].
    #[arg(long, value_name = "LEVEL", env = "KYTHERA_DEFLATE_LEVEL")]
    pub deflate_level: Option<u8>,
    /// Send messages shorter than this uncompressed; 0 compresses all [default: 0].
    #[arg(long, value_name = "BYTES", env = "KYTHERA_DEFLATE_MIN_BYTES")]
    pub deflate_min_bytes: Option<usize>,
    /// Pages allowed to open websocket connections besides this server's own (their
    /// `Origin`, as `https://app.example.com`; repeat, or comma-separated; `*` for any).
    /// Browser upgrades from other pages get 403; clients that send no `Origin` pass
    /// [default: none: this server's pages only].
    #[arg(
        long,
        value_name = "ORIGIN",
        env = "KYTHERA_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// Join a cluster through this Redis: redis://HOST:PORT[/DB]; for a Redis Cluster,
    /// one or more seed nodes, comma-separated. Without it the server is a single
    /// process [default: none].
    #[arg(long, value_name = "URL", env = "KYTHERA_CLUSTER_REDIS")]
    pub cluster_redis: Option<String>,
    /// This node's id in the cluster: 1 to 64 letters, digits, '.', '_' or '-'
    /// [default: HOST-PID-START, unique per process start].
    #[arg(long, value_name = "ID", env = "KYTHERA_NODE_ID")]
    pub node_id: Option<String>,
    /// How long this node's liveness key lives in Redis, in milliseconds; refreshed
    /// every third of it. The others remove what a dead node held within about this
    /// plus one refresh [default: 3000].
    #[arg(long, value_name = "MS", env = "KYTHERA_CLUSTER_TTL_MS")]
    pub cluster_ttl_ms: Option<u64>,
}

/// How the server joins a cluster (`--cluster-redis`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Redis URLs (seeds of a Redis Cluster, or one server).
    pub redis: Vec<String>,
    /// The node id; `None` generates one.
    pub node_id: Option<String>,
    /// The liveness TTL.
    pub ttl: Duration,
}

/// The `--config` file: the same options, all optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    listen: Option<Vec<SocketAddr>>,
    tls_listen: Option<Vec<SocketAddr>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    shards: Option<usize>,
    max_message_bytes: Option<u64>,
    max_outgoing_bytes: Option<usize>,
    max_connections_per_gear: Option<usize>,
    max_head_bytes: Option<usize>,
    idle_timeout_secs: Option<u64>,
    handshake_timeout_secs: Option<u64>,
    closing_timeout_secs: Option<u64>,
    drain_window_secs: Option<u64>,
    ping_interval_secs: Option<u64>,
    pong_timeout_secs: Option<u64>,
    registry_queue_capacity: Option<usize>,
    plain_fds: Option<bool>,
    send_zc_min_bytes: Option<usize>,
    recv_buffer_bytes: Option<u32>,
    recv_buffers: Option<u16>,
    recv_buffers_incremental: Option<bool>,
    log_format: Option<LogFormat>,
    handover_socket: Option<PathBuf>,
    take_over: Option<PathBuf>,
    echo_prefix: Option<String>,
    io: Option<IoArg>,
    deflate: Option<bool>,
    deflate_server_no_context_takeover: Option<bool>,
    deflate_client_no_context_takeover: Option<bool>,
    deflate_server_max_window_bits: Option<u8>,
    deflate_client_max_window_bits: Option<u8>,
    deflate_level: Option<u8>,
    deflate_min_bytes: Option<usize>,
    cluster_redis: Option<String>,
    node_id: Option<String>,
    cluster_ttl_ms: Option<u64>,
    allowed_origins: Option<Vec<String>>,
}

/// Why the configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The option's name (as in the file).
    pub key: String,
    /// Where the bad value came from: `command line (--key)`, `environment variable
    /// KYTHERA_KEY`, `config file PATH, line N`, or `default`.
    pub source: String,
    /// Why it is refused.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value for `{}` ({}): {}",
            self.key, self.source, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Where to listen.
    pub listen: Vec<SocketAddr>,
    /// The TLS listeners, if any.
    pub tls: Option<TlsSettings>,
    /// Shards; `None` is one per CPU.
    pub shards: Option<usize>,
    /// Connection limits (SPEC section 3).
    pub limits: Limits,
    /// `None` keeps the engine's default (open-file limit times shards).
    pub max_connections_per_gear: Option<usize>,
    /// Per-shard io_uring sizes.
    pub tuning: ShardTuning,
    /// Registry queue size.
    pub registry_queue_capacity: usize,
    /// Log line format.
    pub log_format: LogFormat,
    /// The I/O driver.
    pub io: IoChoice,
    /// The cluster to join; `None`: a single process.
    pub cluster: Option<ClusterSettings>,
    /// Origins allowed besides the server's own (`*`: any).
    pub allowed_origins: Vec<String>,
    /// Where a new process can take this one over.
    pub handover_socket: Option<PathBuf>,
    /// The process to take over.
    pub take_over: Option<PathBuf>,
    /// The echo gear's prefix for text.
    pub echo_prefix: Option<String>,
}

/// The TLS listeners and their certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Where to listen for `wss://`.
    pub listen: Vec<SocketAddr>,
    /// The PEM certificate chain.
    pub cert: PathBuf,
    /// The PEM private key.
    pub key: PathBuf,
}

/// Reads the `--config` file, if any.
pub fn read_file(path: &Path) -> Result<File, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        key: "config".into(),
        source: "--config or KYTHERA_CONFIG".into(),
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    toml::from_str(&text).map_err(|e| file_error(path, &text, &e))
}

/// A TOML error as the key, the file and line, and toml's message (its first line:
/// the rest is an excerpt of the file, which the line number replaces).
fn file_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim();
    let at = e.span().map(|s| s.start.min(text.len()));
    let line_text = at.map(|at| {
        let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
        &text[start..end]
    });
    // `unknown field `x``: the key is in the message; else it starts the line.
    let key = message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split('`').next())
        .map(str::to_owned)
        .or_else(|| {
            let line = line_text?;
            let (key, _) = line.split_once('=')?;
            Some(key.trim().trim_matches('"').to_owned())
        })
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| "config".to_owned());
    let source = match at {
        Some(at) => format!(
            "config file {}, line {}",
            path.display(),
            text[..at].matches('\n').count() + 1
        ),
        None => format!("config file {}", path.display()),
    };
    ConfigError {
        key,
        source,
        reason: message.lines().next().unwrap_or(message).to_owned(),
    }
}

/// Where each option's value came from, for error messages.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    from_env: Vec<String>,
}

impl Sources {
    /// Reads which options the environment set from clap's matches.
    pub fn of(matches: &clap::ArgMatches) -> Sources {
        Sources {
            from_env: matches
                .ids()
                .filter(|id| {
                    matches.value_source(id.as_str())
                        == Some(clap::parser::ValueSource::EnvVariable)
                })
                .map(|id| id.as_str().to_owned())
                .collect(),
        }
    }

    /// The value of `key` from the flags or environment, else the file, with where it
    /// came from.
    fn pick<T: Clone>(&self, key: &str, flag: &Option<T>, file: &Option<T>) -> (Option<T>, String) {
        match (flag, file) {
            (Some(v), _) if self.from_env.iter().any(|k| k == key) => (
                Some(v.clone()),
                format!("environment variable KYTHERA_{}", key.to_ascii_uppercase()),
            ),
            (Some(v), _) => (
                Some(v.clone()),
                format!("command line (--{})", key.replace('_', "-")),
            ),
            (None, Some(v)) => (Some(v.clone()), "config file".to_owned()),
            (None, None) => (None, "default".to_owned()),
        }
    }
}

/// Parses the command line and environment; on an invalid value, an error that names
/// the option's key and where the value came from (a flag or a `KYTHERA_*` variable),
/// as [`resolve`]'s errors do. Other errors are clap's own (usage, `--help`).
pub fn parse_args<I, T>(argv: I) -> Result<(Args, Sources), ArgsError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory, FromArgMatches};
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    let matches = Args::command()
        .try_get_matches_from(&argv)
        .map_err(|e| value_error(&argv, e))?;
    let args = Args::from_arg_matches(&matches).map_err(ArgsError::Clap)?;
    Ok((args, Sources::of(&matches)))
}

/// Why the command line could not be parsed.
#[derive(Debug)]
pub enum ArgsError {
    /// An invalid value: the key, where it came from, why.
    Invalid(ConfigError),
    /// clap's own error (usage, `--help`, `--version`): `exit()` prints it.
    Clap(clap::Error),
}

/// An invalid value as a [`ConfigError`] naming the key and its source; other errors
/// as they are.
fn value_error(argv: &[std::ffi::OsString], e: clap::Error) -> ArgsError {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return ArgsError::Clap(e);
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return ArgsError::Clap(e);
    };
    // "--shards <N>" -> "shards"
    let flag = arg.split_whitespace().next().unwrap_or(arg).to_owned();
    let Some(name) = flag.strip_prefix("--") else {
        return ArgsError::Clap(e);
    };
    let on_command_line = argv
        .iter()
        .filter_map(|a| a.to_str())
        .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    let key = name.replace('-', "_");
    let source = if on_command_line {
        format!("command line ({flag})")
    } else {
        format!("environment variable KYTHERA_{}", key.to_ascii_uppercase())
    };
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => format!("{v:?}"),
        _ => "the value".to_owned(),
    };
    // clap's rendered message holds the parser's reason after the last ": ".
    let rendered = e.to_string();
    let first = rendered.lines().next().unwrap_or_default();
    let why = first.rsplit_once(": ").map_or(first, |(_, w)| w);
    ArgsError::Invalid(ConfigError {
        key,
        source,
        reason: format!("{value}: {why}"),
    })
}

/// Picks each option from the flags/environment, else the file, else the default,
/// and checks it.
pub fn resolve(args: &Args, sources: &Sources, file: &File) -> Result<Settings, ConfigError> {
    fn err(key: &str, source: String, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            source,
            reason: reason.into(),
        }
    }
    let p = sources;
    /// A whole number of seconds, at least `min`.
    fn secs(
        key: &str,
        (v, src): (Option<u64>, String),
        default: u64,
        min: u64,
    ) -> Result<u64, ConfigError> {
        let v = v.unwrap_or(default);
        if v < min {
            return Err(err(key, src, format!("must be at least {min}")));
        }
        Ok(v)
    }

    let defaults = Limits::default();
    let listen = if args.listen.is_empty() {
        file.listen
            .clone()
            .unwrap_or_else(|| vec!["127.0.0.1:8080".parse().expect("a valid address")])
    } else {
        args.listen.clone()
    };
    if listen.is_empty() {
        return Err(err(
            "listen",
            "config file".into(),
            "needs at least one address",
        ));
    }
    let (shards, src) = p.pick("shards", &args.shards, &file.shards);
    if let Some(n) = shards
        && !(1..=kythera_engine::server::MAX_SHARDS).contains(&n)
    {
        return Err(err(
            "shards",
            src,
            format!(
                "must be between 1 and {}",
                kythera_engine::server::MAX_SHARDS
            ),
        ));
    }
    let (max_message_bytes, src) = p.pick(
        "max_message_bytes",
        &args.max_message_bytes,
        &file.max_message_bytes,
    );
    let max_message_bytes = max_message_bytes.unwrap_or(defaults.max_message_bytes);
    if max_message_bytes == 0 {
        return Err(err("max_message_bytes", src, "must be at least 1"));
    }
    let (max_outgoing_bytes, src) = p.pick(
        "max_outgoing_bytes",
        &args.max_outgoing_bytes,
        &file.max_outgoing_bytes,
    );
    let max_outgoing_bytes = max_outgoing_bytes.unwrap_or(defaults.max_outgoing_bytes);
    if max_outgoing_bytes < 1024 {
        return Err(err("max_outgoing_bytes", src, "must be at least 1024"));
    }
    let (max_conns, src) = p.pick(
        "max_connections_per_gear",
        &args.max_connections_per_gear,
        &file.max_connections_per_gear,
    );
    if max_conns == Some(0) {
        return Err(err("max_connections_per_gear", src, "must be at least 1"));
    }
    let (max_head_bytes, src) =
        p.pick("max_head_bytes", &args.max_head_bytes, &file.max_head_bytes);
    let max_head_bytes = max_head_bytes.unwrap_or(defaults.max_head_bytes);
    if !(256..=1024 * 1024).contains(&max_head_bytes) {
        return Err(err(
            "max_head_bytes",
            src,
            "must be between 256 and 1048576",
        ));
    }
    let idle = secs(
        "idle_timeout_secs",
        p.pick(
            "idle_timeout_secs",
            &args.idle_timeout_secs,
            &file.idle_timeout_secs,
        ),
        defaults.idle_timeout.as_secs(),
        1,
    )?;
    let handshake = secs(
        "handshake_timeout_secs",
        p.pick(
            "handshake_timeout_secs",
            &args.handshake_timeout_secs,
            &file.handshake_timeout_secs,
        ),
        defaults.handshake_timeout.as_secs(),
        1,
    )?;
    let closing = secs(
        "closing_timeout_secs",
        p.pick(
            "closing_timeout_secs",
            &args.closing_timeout_secs,
            &file.closing_timeout_secs,
        ),
        defaults.closing_timeout.as_secs(),
        1,
    )?;
    let drain = secs(
        "drain_window_secs",
        p.pick(
            "drain_window_secs",
            &args.drain_window_secs,
            &file.drain_window_secs,
        ),
        defaults.drain_window.as_secs(),
        0,
    )?;
    let ping = secs(
        "ping_interval_secs",
        p.pick(
            "ping_interval_secs",
            &args.ping_interval_secs,
            &file.ping_interval_secs,
        ),
        0,
        0,
    )?;
    let pong = secs(
        "pong_timeout_secs",
        p.pick(
            "pong_timeout_secs",
            &args.pong_timeout_secs,
            &file.pong_timeout_secs,
        ),
        defaults.pong_timeout.as_secs(),
        1,
    )?;
    let (capacity, src) = p.pick(
        "registry_queue_capacity",
        &args.registry_queue_capacity,
        &file.registry_queue_capacity,
    );
    let registry_queue_capacity =
        capacity.unwrap_or(kythera_registry::RegistryConfig::default().queue_capacity);
    if !(1..=1 << 24).contains(&registry_queue_capacity) {
        return Err(err(
            "registry_queue_capacity",
            src,
            "must be between 1 and 16777216",
        ));
    }
    let tuning_defaults = ShardTuning::default();
    let incremental = p
        .pick(
            "recv_buffers_incremental",
            &args.recv_buffers_incremental,
            &file.recv_buffers_incremental,
        )
        .0
        .unwrap_or(tuning_defaults.incremental_buffers);
    // Buffers that each receive takes whole are better small and many.
    let (default_entries, default_size) = if incremental {
        (tuning_defaults.buf_entries, tuning_defaults.buf_size)
    } else {
        (1024, 4096)
    };
    let (buf_size, src) = p.pick(
        "recv_buffer_bytes",
        &args.recv_buffer_bytes,
        &file.recv_buffer_bytes,
    );
    let buf_size = buf_size.unwrap_or(default_size);
    if !(256..=1024 * 1024).contains(&buf_size) {
        return Err(err(
            "recv_buffer_bytes",
            src,
            "must be between 256 and 1048576",
        ));
    }
    let (buf_entries, src) = p.pick("recv_buffers", &args.recv_buffers, &file.recv_buffers);
    let buf_entries = buf_entries.unwrap_or(default_entries);
    if !buf_entries.is_power_of_two() || buf_entries > 32768 {
        return Err(err(
            "recv_buffers",
            src,
            "must be a power of two up to 32768",
        ));
    }
    let plain_fds = p
        .pick("plain_fds", &args.plain_fds, &file.plain_fds)
        .0
        .unwrap_or(false);
    let zc = p
        .pick(
            "send_zc_min_bytes",
            &args.send_zc_min_bytes,
            &file.send_zc_min_bytes,
        )
        .0
        .filter(|&n| n > 0);
    let io = p
        .pick("io", &args.io, &file.io)
        .0
        .map_or(IoChoice::Auto, IoChoice::from);
    let log_format = p
        .pick("log_format", &args.log_format, &file.log_format)
        .0
        .unwrap_or(LogFormat::Pretty);
    let handover_socket = p
        .pick(
            "handover_socket",
            &args.handover_socket,
            &file.handover_socket,
        )
        .0;
    let take_over = p.pick("take_over", &args.take_over, &file.take_over).0;
    let echo_prefix = p
        .pick("echo_prefix", &args.echo_prefix, &file.echo_prefix)
        .0;
    let d = defaults.deflate;
    let deflate = kythera_engine::config::DeflateConfig {
        enabled: p
            .pick("deflate", &args.deflate, &file.deflate)
            .0
            .unwrap_or(d.enabled),
        server_no_context_takeover: p
            .pick(
                "deflate_server_no_context_takeover",
                &args.deflate_server_no_context_takeover,
                &file.deflate_server_no_context_takeover,
            )
            .0
            .unwrap_or(d.server_no_context_takeover),
        client_no_context_takeover: p
            .pick(
                "deflate_client_no_context_takeover",
                &args.deflate_client_no_context_takeover,
                &file.deflate_client_no_context_takeover,
            )
            .0
            .unwrap_or(d.client_no_context_takeover),
        server_max_window_bits: p
            .pick(
                "deflate_server_max_window_bits",
                &args.deflate_server_max_window_bits,
                &file.deflate_server_max_window_bits,
            )
            .0
            .unwrap_or(d.server_max_window_bits),
        client_max_window_bits: p
            .pick(
                "deflate_client_max_window_bits",
                &args.deflate_client_max_window_bits,
                &file.deflate_client_max_window_bits,
            )
            .0
            .unwrap_or(d.client_max_window_bits),
        level: p
            .pick("deflate_level", &args.deflate_level, &file.deflate_level)
            .0
            .unwrap_or(d.level),
        min_bytes: p
            .pick(
                "deflate_min_bytes",
                &args.deflate_min_bytes,
                &file.deflate_min_bytes,
            )
            .0
            .unwrap_or(d.min_bytes),
    };
    for (key, bits, src) in [
        (
            "deflate_server_max_window_bits",
            deflate.server_max_window_bits,
            p.pick(
                "deflate_server_max_window_bits",
                &args.deflate_server_max_window_bits,
                &file.deflate_server_max_window_bits,
            )
            .1,
        ),
        (
            "deflate_client_max_window_bits",
            deflate.client_max_window_bits,
            p.pick(
                "deflate_client_max_window_bits",
                &args.deflate_client_max_window_bits,
                &file.deflate_client_max_window_bits,
            )
            .1,
        ),
    ] {
        if !(9..=15).contains(&bits) {
            return Err(err(key, src, "must be between 9 and 15"));
        }
    }
    if deflate.level > 9 {
        let src = p
            .pick("deflate_level", &args.deflate_level, &file.deflate_level)
            .1;
        return Err(err("deflate_level", src, "must be between 0 and 9"));
    }

    let cluster = resolve_cluster(args, sources, file)?;
    let allowed_origins = if args.allowed_origins.is_empty() {
        file.allowed_origins.clone().unwrap_or_default()
    } else {
        args.allowed_origins.clone()
    };
    if let Some(bad) = allowed_origins
        .iter()
        .find(|o| o.trim() != "*" && !o.contains("://"))
    {
        let src = if args.allowed_origins.is_empty() {
            "config file".to_owned()
        } else {
            p.pick("allowed_origins", &Some(()), &None).1
        };
        return Err(err(
            "allowed_origins",
            src,
            format!("{bad:?} is not an origin (scheme://host[:port]) or *"),
        ));
    }

    let tls = resolve_tls(args, p, file)?;
    Ok(Settings {
        listen,
        tls,
        shards,
        limits: Limits {
            max_message_bytes,
            max_outgoing_bytes,
            max_head_bytes,
            idle_timeout: Duration::from_secs(idle),
            handshake_timeout: Duration::from_secs(handshake),
            closing_timeout: Duration::from_secs(closing),
            drain_window: Duration::from_secs(drain),
            ping_interval: (ping > 0).then(|| Duration::from_secs(ping)),
            pong_timeout: Duration::from_secs(pong),
            deflate,
            ..defaults
        },
        max_connections_per_gear: max_conns,
        tuning: ShardTuning {
            direct_slots: plain_fds.then_some(0),
            send_zc_min_bytes: zc,
            buf_size,
            buf_entries,
            incremental_buffers: incremental,
            ..tuning_defaults
        },
        registry_queue_capacity,
        log_format,
        io,
        cluster,
        allowed_origins,
        handover_socket,
        take_over,
        echo_prefix,
    })
}

/// The TLS options: listeners need both files, and the files need listeners.
fn resolve_tls(args: &Args, p: &Sources, file: &File) -> Result<Option<TlsSettings>, ConfigError> {
    let err = |key: &str, source: String, reason: &str| ConfigError {
        key: key.into(),
        source,
        reason: reason.into(),
    };
    let listen = if args.tls_listen.is_empty() {
        file.tls_listen.clone().unwrap_or_default()
    } else {
        args.tls_listen.clone()
    };
    let listen_src = if args.tls_listen.is_empty() {
        "config file".to_owned()
    } else {
        p.pick("tls_listen", &Some(()), &None).1
    };
    let (cert, cert_src) = p.pick("tls_cert", &args.tls_cert, &file.tls_cert);
    let (key, key_src) = p.pick("tls_key", &args.tls_key, &file.tls_key);
    if listen.is_empty() {
        if cert.is_some() {
            return Err(err("tls_cert", cert_src, "needs tls_listen"));
        }
        if key.is_some() {
            return Err(err("tls_key", key_src, "needs tls_listen"));
        }
        return Ok(None);
    }
    let Some(cert) = cert else {
        return Err(err(
            "tls_listen",
            listen_src,
            "needs tls_cert (a PEM certificate chain)",
        ));
    };
    let Some(key) = key else {
        return Err(err(
            "tls_listen",
            listen_src,
            "needs tls_key (a PEM private key)",
        ));
    };
    Ok(Some(TlsSettings { listen, cert, key }))
}

/// The cluster options: all or nothing of them.
fn resolve_cluster(
    args: &Args,
    p: &Sources,
    file: &File,
) -> Result<Option<ClusterSettings>, ConfigError> {
    let err = |key: &str, source: String, reason: &str| ConfigError {
        key: key.into(),
        source,
        reason: reason.into(),
    };
    let (redis, redis_src) = p.pick("cluster_redis", &args.cluster_redis, &file.cluster_redis);
    let (node_id, node_src) = p.pick("node_id", &args.node_id, &file.node_id);
    let (ttl_ms, ttl_src) = p.pick("cluster_ttl_ms", &args.cluster_ttl_ms, &file.cluster_ttl_ms);
    let Some(redis) = redis else {
        if node_id.is_some() {
            return Err(err("node_id", node_src, "needs cluster_redis"));
        }
        if ttl_ms.is_some() {
            return Err(err("cluster_ttl_ms", ttl_src, "needs cluster_redis"));
        }
        return Ok(None);
    };
    let urls: Vec<String> = redis
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        return Err(err("cluster_redis", redis_src, "needs a redis:// URL"));
    }
    if let Some(bad) = urls.iter().find(|u| !u.starts_with("redis://")) {
        return Err(err(
            "cluster_redis",
            redis_src,
            &format!("{bad:?} is not a redis://HOST:PORT[/DB] URL"),
        ));
    }
    if let Some(id) = &node_id
        && !kythera_cluster::keys::valid_node_id(id)
    {
        return Err(err(
            "node_id",
            node_src,
            "must be 1 to 64 ASCII letters, digits, '.', '_' or '-'",
        ));
    }
    let ttl_ms = ttl_ms.unwrap_or(kythera_cluster::DEFAULT_TTL.as_millis() as u64);
    if !(300..=600_000).contains(&ttl_ms) {
        return Err(err(
            "cluster_ttl_ms",
            ttl_src,
            "must be between 300 and 600000",
        ));
    }
    Ok(Some(ClusterSettings {
        redis: urls,
        node_id,
        ttl: Duration::from_millis(ttl_ms),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> (Args, Sources) {
        match parse_args(std::iter::once("kythera").chain(list.iter().copied())) {
            Ok(parsed) => parsed,
            Err(e) => panic!("invalid flags {list:?}: {e:?}"),
        }
    }

    fn resolve(parsed: &(Args, Sources), file: &File) -> Result<Settings, ConfigError> {
        super::resolve(&parsed.0, &parsed.1, file)
    }

    fn file(toml_text: &str) -> File {
        toml::from_str(toml_text).expect("valid file")
    }

    #[test]
    fn defaults_serve() {
        let s = resolve(&args(&[]), &File::default()).unwrap();
        assert_eq!(s.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(s.shards, None);
        assert_eq!(s.limits, Limits::default());
        assert_eq!(s.tuning, ShardTuning::default());
        assert_eq!(s.log_format, LogFormat::Pretty);
    }

    #[test]
    fn flags_over_file_over_defaults() {
        let f = file(
            "shards = 3\nidle_timeout_secs = 7\nlisten = [\"127.0.0.1:9000\"]\nlog_format = \"json\"\n",
        );
        let s = resolve(&args(&["--shards", "2"]), &f).unwrap();
        assert_eq!(s.shards, Some(2), "the flag wins");
        assert_eq!(
            s.limits.idle_timeout,
            Duration::from_secs(7),
            "the file wins"
        );
        assert_eq!(s.listen, vec!["127.0.0.1:9000".parse().unwrap()]);
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.limits.max_message_bytes, 5_000_000, "the default");
    }

    #[test]
    fn invalid_values_name_the_key_and_the_source() {
        let e = resolve(&args(&["--shards", "0"]), &File::default()).unwrap_err();
        assert_eq!(e.key, "shards");
        assert_eq!(e.source, "command line (--shards)");
        let e = resolve(&args(&[]), &file("recv_buffers = 1000")).unwrap_err();
        assert_eq!(e.key, "recv_buffers");
        assert_eq!(e.source, "config file");
        assert!(e.to_string().contains("power of two"), "{e}");
        let e = resolve(&args(&["--idle-timeout-secs", "0"]), &File::default()).unwrap_err();
        assert_eq!(e.key, "idle_timeout_secs");
        let e = resolve(&args(&[]), &file("deflate_server_max_window_bits = 8")).unwrap_err();
        assert_eq!(e.key, "deflate_server_max_window_bits");
        assert_eq!(e.source, "config file");
        let e = resolve(&args(&["--deflate-level", "10"]), &File::default()).unwrap_err();
        assert_eq!(e.key, "deflate_level");
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let path = std::env::temp_dir().join(format!("kythera-config-{}.toml", std::process::id()));
        std::fs::write(&path, "shards = 2\nmax_mesage_bytes = 5\n").unwrap();
        let e = read_file(&path).unwrap_err();
        assert_eq!(e.key, "max_mesage_bytes");
        assert_eq!(e.source, format!("config file {}, line 2", path.display()));
        assert!(e.reason.starts_with("unknown field"), "{e}");
        // A bad value names its key and line, with toml's message on one line.
        std::fs::write(&path, "listen = [\"127.0.0.1:1\"]\nshards = \"two\"\n").unwrap();
        let e = read_file(&path).unwrap_err();
        std::fs::remove_file(&path).ok();
        assert_eq!(e.key, "shards");
        assert_eq!(e.source, format!("config file {}, line 2", path.display()));
        assert!(
            !e.reason.contains('\n') && e.reason.contains("string"),
            "{e}"
        );
    }

    #[test]
    fn invalid_flags_and_variables_name_their_key_and_source() {
        let err = |argv: &[&str]| match parse_args(argv.iter().copied()) {
            Err(ArgsError::Invalid(e)) => e,
            other => panic!("{other:?}"),
        };
        let e = err(&["kythera", "--shards", "banana"]);
        assert_eq!(
            (e.key.as_str(), e.source.as_str()),
            ("shards", "command line (--shards)")
        );
        assert!(e.reason.contains("\"banana\""), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "invalid value for `shards` (command line (--shards)): {}",
                e.reason
            )
        );
    }

    #[test]
    fn whole_receive_buffers_default_to_4_kib() {
        let s = resolve(&args(&[]), &File::default()).unwrap();
        assert!(s.tuning.incremental_buffers);
        assert_eq!((s.tuning.buf_entries, s.tuning.buf_size), (64, 65536));
        let s = resolve(
            &args(&["--recv-buffers-incremental", "false"]),
            &File::default(),
        )
        .unwrap();
        assert!(!s.tuning.incremental_buffers);
        assert_eq!((s.tuning.buf_entries, s.tuning.buf_size), (1024, 4096));
        let s = resolve(
            &args(&["--recv-buffers-incremental=false", "--recv-buffers", "256"]),
            &File::default(),
        )
        .unwrap();
        assert_eq!((s.tuning.buf_entries, s.tuning.buf_size), (256, 4096));
    }

    #[test]
    fn ping_zero_is_off_and_plain_fds_is_a_flag() {
        let s = resolve(
            &args(&["--ping-interval-secs", "0", "--plain-fds"]),
            &File::default(),
        )
        .unwrap();
        assert_eq!(s.limits.ping_interval, None);
        assert_eq!(s.tuning.direct_slots, Some(0));
        let s = resolve(&args(&["--ping-interval-secs", "15"]), &File::default()).unwrap();
        assert_eq!(s.limits.ping_interval, Some(Duration::from_secs(15)));
    }

    #[test]
    fn deflate_can_be_switched_off_and_tuned() {
        let s = resolve(
            &args(&["--deflate", "false", "--deflate-level", "6"]),
            &file(
                "deflate_server_no_context_takeover = false\ndeflate_client_max_window_bits = 10",
            ),
        )
        .unwrap();
        assert!(!s.limits.deflate.enabled);
        assert_eq!(s.limits.deflate.level, 6);
        assert!(!s.limits.deflate.server_no_context_takeover);
        assert_eq!(s.limits.deflate.client_max_window_bits, 10);
        assert!(s.limits.deflate.client_no_context_takeover, "the default");
    }

    #[test]
    fn cluster_options() {
        let s = resolve(&args(&[]), &File::default()).unwrap();
        assert_eq!(s.cluster, None, "a single process by default");
        let s = resolve(
            &args(&[
                "--cluster-redis",
                "redis://127.0.0.1:7000, redis://127.0.0.1:7001",
            ]),
            &file("node_id = \"a-1\"\ncluster_ttl_ms = 2000"),
        )
        .unwrap();
        assert_eq!(
            s.cluster,
            Some(ClusterSettings {
                redis: vec![
                    "redis://127.0.0.1:7000".into(),
                    "redis://127.0.0.1:7001".into()
                ],
                node_id: Some("a-1".into()),
                ttl: Duration::from_millis(2000),
            })
        );
        let e = resolve(&args(&["--node-id", "x"]), &File::default()).unwrap_err();
        assert_eq!(e.key, "node_id");
        let e = resolve(&args(&["--cluster-redis", "http://x"]), &File::default()).unwrap_err();
        assert_eq!(e.key, "cluster_redis");
        let e = resolve(
            &args(&["--cluster-redis", "redis://x:1", "--node-id", "a b"]),
            &File::default(),
        )
        .unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.source.as_str()),
            ("node_id", "command line (--node-id)")
        );
        let e = resolve(
            &args(&[]),
            &file("cluster_redis = \"redis://x:1\"\ncluster_ttl_ms = 10"),
        )
        .unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.source.as_str()),
            ("cluster_ttl_ms", "config file")
        );
    }

    #[test]
    fn tls_options_come_together() {
        let s = resolve(
            &args(&[
                "--tls-listen",
                "127.0.0.1:8443",
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
            ]),
            &File::default(),
        )
        .unwrap();
        let tls = s.tls.unwrap();
        assert_eq!(tls.listen, vec!["127.0.0.1:8443".parse().unwrap()]);
        assert_eq!(
            (tls.cert.to_str(), tls.key.to_str()),
            (Some("c.pem"), Some("k.pem"))
        );
        // The plain listener keeps its default beside it.
        assert_eq!(s.listen, vec!["127.0.0.1:8080".parse().unwrap()]);

        let s = resolve(
            &args(&[]),
            &file("tls_listen = [\"127.0.0.1:8443\"]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\""),
        )
        .unwrap();
        assert!(s.tls.is_some());

        let e = resolve(&args(&["--tls-listen", "127.0.0.1:8443"]), &File::default()).unwrap_err();
        assert_eq!(e.key, "tls_listen");
        assert!(e.reason.contains("tls_cert"), "{}", e.reason);
        let e = resolve(&args(&["--tls-cert", "c.pem"]), &File::default()).unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.source.as_str()),
            ("tls_cert", "command line (--tls-cert)")
        );
        assert_eq!(resolve(&args(&[]), &File::default()).unwrap().tls, None);
    }

    #[test]
    fn clap_config_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
