//! `kythera-load`: a WebSocket load generator on kythera's io_uring loop and codec.
//!
//! ```text
//! kythera-load echo --url ws://127.0.0.1:8080/echo -c 100 -b 20 -p 1 -d 5
//! kythera-load connect --url ws://127.0.0.1:8080/echo -c 50000 --hold 30
//! kythera-load broadcast --url ws://127.0.0.1:8080/chat -c 1000 --rate 1000 -d 5
//! kythera-load direct --url ws://127.0.0.1:8081/chat,ws://127.0.0.1:8082/chat -c 200 -p 8
//! ```
//!
//! `--url` takes several URLs, comma-separated: connection `i` goes to the `i`-th
//! modulo their number (the nodes of a cluster, say).
//!
//! A progress line on stderr while it runs, a summary table on stdout at the end,
//! `--json FILE` for the same results machine-readable. Exit status: 0 when every
//! connection was established and everything received was right, 1 when the server
//! misbehaved (wrong content or order, wrong opcode, an unasked close, a disconnect, a
//! lost message, a failed handshake), 2 for bad arguments or a setup failure.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tools::load::{self, Config, Kind, Mode, Target};

/// A WebSocket load generator (echo, connect and broadcast tests) on io_uring.
#[derive(Debug, Parser)]
#[command(name = "kythera-load", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Round trips through an echo server: messages/s and latency percentiles.
    Echo {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        traffic: Traffic,
        /// Frame kind.
        #[arg(long, value_enum, default_value_t = KindArg::Text)]
        kind: KindArg,
        /// Milliseconds each connection waits after an echo before it sends the next
        /// message (a paced load, to see pauses rather than queueing) [default: 0].
        #[arg(long, value_name = "MS", default_value_t = 0.0)]
        pause_ms: f64,
    },
    /// Opens connections as fast as it can: handshakes/s and handshake latency.
    Connect {
        #[command(flatten)]
        common: Common,
        /// Keep the connections open and idle this many seconds (to measure the
        /// server's memory per idle connection).
        #[arg(long, value_name = "SECS", default_value_t = 0.0)]
        hold: f64,
    },
    /// One publisher, C subscribers in a chat room (`PATH?room=R&name=sN`):
    /// deliveries/s and publish-to-receive latency.
    Broadcast {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        traffic: Traffic,
        /// The chat room.
        #[arg(long, default_value = "load")]
        room: String,
        /// Publications per second [default: as fast as --in-flight allows, counting a
        /// publication in flight until every subscriber has it].
        #[arg(long, value_name = "MSGS")]
        rate: Option<f64>,
    },
    /// Direct messages through a chat gear (`PATH?room=R&name=dN`): connection N sends
    /// `{"to":"dN+1",...}`, so with several URLs every message crosses servers;
    /// messages/s and send-to-receive latency.
    Direct {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        traffic: Traffic,
        /// The chat room the connections join (unused by the traffic).
        #[arg(long, default_value = "load")]
        room: String,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Target: ws://HOST:PORT/PATH, or several, comma-separated (connections go round
    /// robin).
    #[arg(long, default_value = "ws://127.0.0.1:8080/echo")]
    url: String,
    /// Connections (subscribers in broadcast mode).
    #[arg(short = 'c', long, default_value_t = 100)]
    connections: usize,
    /// Threads, each with its own io_uring ring and share of the connections.
    #[arg(long, value_name = "N", default_value_t = 1)]
    threads: usize,
    /// Local addresses to bind, round robin over the connections, e.g.
    /// 127.0.0.1,127.0.0.2 [default: the kernel picks; on loopback over 25,000
    /// connections 127.0.0.1, 127.0.0.2, ... one per 25,000].
    #[arg(long, value_delimiter = ',', value_name = "IP,IP,...")]
    source_addrs: Vec<IpAddr>,
    /// Connects plus handshakes in progress per thread at most.
    #[arg(long, value_name = "N", default_value_t = 256)]
    concurrency: usize,
    /// Seconds the connect phase may take before the run goes on without the rest.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    connect_timeout: f64,
    /// Write the results as JSON to this file ("-" for stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// No progress line.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// The server's process id: its resident memory is read before connecting and at
    /// the end of the window or hold, and reported per connection; its CPU time
    /// (`/proc/PID/stat`) over the connect phase and the window, reported per handshake
    /// and per message.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Offer permessage-deflate (RFC 7692, `client_max_window_bits`) and fail any
    /// connection the server does not agree to it on; every message is then sent
    /// compressed and every compressed reply inflated and checked.
    #[arg(long)]
    deflate: bool,
    /// PEM file of the CA (or self-signed certificate) to trust for wss:// targets
    /// [default: none; give --ca or --insecure for wss://].
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// wss:// without checking the server's certificate (a bench against a test
    /// certificate; never against a server you do not run).
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Args)]
struct Traffic {
    /// Payload bytes (broadcast: the publication's text is padded to this size).
    #[arg(short = 'b', long, value_name = "BYTES", default_value_t = 20)]
    bytes: usize,
    /// Messages in flight per connection (1: the classic request-response test).
    #[arg(short = 'p', long = "in-flight", value_name = "P", default_value_t = 1)]
    in_flight: usize,
    /// Seconds measured.
    #[arg(short = 'd', long, value_name = "SECS", default_value_t = 5.0)]
    duration: f64,
    /// Seconds of traffic before the measured window.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    warmup: f64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KindArg {
    Text,
    Binary,
}

fn secs(s: f64, what: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("{what}: {s} is not a duration"))
}

fn config(cli: Cli) -> Result<(Config, Option<PathBuf>), String> {
    let mut echo_pause = 0.0;
    let (mode, common, traffic, kind, hold, room, rate) = match cli.command {
        Command::Echo {
            common,
            traffic,
            kind,
            pause_ms,
        } => {
            echo_pause = pause_ms / 1000.0;
            (Mode::Echo, common, Some(traffic), kind, 0.0, None, None)
        }
        Command::Connect { common, hold } => {
            (Mode::Connect, common, None, KindArg::Text, hold, None, None)
        }
        Command::Broadcast {
            common,
            traffic,
            room,
            rate,
        } => (
            Mode::Broadcast,
            common,
            Some(traffic),
            KindArg::Text,
            0.0,
            Some(room),
            rate,
        ),
        Command::Direct {
            common,
            traffic,
            room,
        } => (
            Mode::Direct,
            common,
            Some(traffic),
            KindArg::Text,
            0.0,
            Some(room),
            None,
        ),
    };
    let targets = common
        .url
        .split(',')
        .map(|u| Target::parse(u.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let target = &targets[0];
    if mode == Mode::Direct && common.connections < 2 {
        return Err("direct mode needs at least 2 connections".into());
    }
    if common.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return Err("--rate must be above 0".into());
    }
    let source_addrs = if common.source_addrs.is_empty() {
        load::default_source_addrs(target, common.connections)
    } else {
        common.source_addrs
    };
    let (bytes, in_flight, duration, warmup) = match &traffic {
        Some(t) => (
            t.bytes,
            t.in_flight.max(1),
            secs(t.duration, "--duration")?,
            secs(t.warmup, "--warmup")?,
        ),
        None => (0, 0, Duration::ZERO, Duration::ZERO),
    };
    let tls = match (&common.ca, common.insecure) {
        (_, true) => Some(tools::load::tls::insecure()),
        (Some(ca), false) => Some(tools::load::tls::trusting(ca)?),
        (None, false) if targets.iter().any(|t| t.tls) => {
            return Err("wss:// needs --ca FILE (the certificate to trust) or --insecure".into());
        }
        (None, false) => None,
    };
    let cfg = Config {
        mode,
        targets,
        connections: common.connections,
        bytes: if matches!(mode, Mode::Broadcast | Mode::Direct) {
            bytes.min(1 << 20)
        } else {
            bytes
        },
        kind: match kind {
            KindArg::Text => Kind::Text,
            KindArg::Binary => Kind::Binary,
        },
        in_flight,
        warmup,
        duration,
        hold: secs(hold, "--hold")?,
        source_addrs,
        threads: common.threads.max(1),
        concurrency: common.concurrency.max(1),
        connect_timeout: secs(common.connect_timeout, "--connect-timeout")?,
        room: room.unwrap_or_default(),
        rate,
        echo_pause: secs(echo_pause, "--pause-ms")?,
        progress: !common.quiet,
        server_pid: common.server_pid,
        deflate: common.deflate,
        tls,
    };
    Ok((cfg, common.json))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (cfg, json) = match config(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kythera-load: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match load::run(cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kythera-load: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).expect("a report serializes");
        let written = if path.as_os_str() == "-" {
            println!("{text}");
            Ok(())
        } else {
            std::fs::write(&path, text + "\n")
        };
        if let Err(e) = written {
            eprintln!("kythera-load: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
