//! The kythera server: the echo gear on `/echo` and `/`, the chat gear on `/chat`, one
//! shard per core.
//!
//! ```text
//! kythera --listen 127.0.0.1:8080 --listen [::1]:8080 --shards 2
//! ```
//!
//! Once every listener is bound it prints `kythera listening on ws://ADDR (N shards)`
//! on stdout, one line per address. SIGTERM or SIGINT drains the server (close 1001 to
//! every connection, spread over the drain window) and it exits 0 once drained; a second
//! signal exits at once. Logs go to stderr, filtered by `RUST_LOG` (default `info`).
//! If io_uring is unavailable it says why and how to fix it, and exits 1.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use engine::Server;
use mimalloc::MiMalloc;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tools::gears::{Chat, Echo};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// mimalloc: per-thread free lists suit shard-per-core threads, and large frame
/// buffers are reused instead of being handed back to the kernel and faulted in again.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// A WebSocket engine on io_uring, serving the echo gear on `/echo` and `/` and the chat
/// gear on `/chat`.
#[derive(Debug, Parser)]
#[command(name = "kythera", version, about)]
struct Args {
    /// Address to listen on; repeat for several.
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: Vec<SocketAddr>,
    /// Number of shards (threads pinned to cores) [default: the number of CPUs].
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// Largest message (frame or reassembled), in bytes; larger ones are closed with 1009.
    #[arg(long, value_name = "BYTES", default_value_t = 5_000_000)]
    max_message_bytes: u64,
    /// Bytes queued to a client behind a send it has not taken; over it the client is
    /// closed with 1008 (slow consumer).
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    max_outgoing_bytes: usize,
    /// Close connections that send nothing for this many seconds (close 1000).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    idle_timeout_secs: u64,
    /// Use plain file descriptors instead of io_uring direct descriptors (for
    /// comparison; direct descriptors are the default).
    #[arg(long)]
    plain_fds: bool,
    /// Send messages of at least this many bytes with zero-copy sends
    /// (IORING_OP_SEND_ZC); off by default (slower on loopback, see README).
    #[arg(long, value_name = "BYTES")]
    send_zc_min_bytes: Option<usize>,
    /// Size of each receive buffer in a shard's provided-buffer ring.
    #[arg(long, value_name = "BYTES", default_value_t = engine::shard::ShardTuning::default().buf_size)]
    recv_buffer_bytes: u32,
    /// Receive buffers per shard (a power of two).
    #[arg(long, value_name = "N", default_value_t = engine::shard::ShardTuning::default().buf_entries)]
    recv_buffers: u16,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let limits = engine::config::Limits {
        max_message_bytes: args.max_message_bytes,
        max_outgoing_bytes: args.max_outgoing_bytes,
        idle_timeout: std::time::Duration::from_secs(args.idle_timeout_secs),
        ..engine::config::Limits::default()
    };
    let mut builder = Server::builder().limits(limits);
    let tuning = engine::shard::ShardTuning {
        direct_slots: args.plain_fds.then_some(0),
        send_zc_min_bytes: args.send_zc_min_bytes,
        buf_size: args.recv_buffer_bytes,
        buf_entries: args.recv_buffers,
        ..engine::shard::ShardTuning::default()
    };
    builder = builder.tuning(tuning);
    for addr in &args.listen {
        builder = builder.listen(*addr);
    }
    if let Some(shards) = args.shards {
        builder = builder.shards(shards);
    }
    let server = match builder
        .mount("/echo", Echo)
        .mount("/chat", Chat)
        .mount("/", Echo)
        .build()
    {
        Ok(server) => server,
        Err(err) => {
            eprintln!("kythera: {err}");
            return ExitCode::FAILURE;
        }
    };

    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(signals) => signals,
        Err(err) => {
            eprintln!("kythera: cannot install signal handlers: {err}");
            return ExitCode::FAILURE;
        }
    };
    let handle = server.handle();
    std::thread::Builder::new()
        .name("kythera-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if handle.is_draining() {
                    eprintln!("kythera: second signal ({signal}); exiting without draining");
                    std::process::exit(1);
                }
                info!(signal, "draining");
                handle.drain();
            }
        })
        .expect("spawn the signal thread");

    let shards = server.shards();
    let mut stdout = std::io::stdout().lock();
    for addr in server.local_addrs() {
        // Tests and scripts read this line to learn the address: flush it.
        let _ = writeln!(stdout, "kythera listening on ws://{addr} ({shards} shards)");
    }
    let _ = stdout.flush();
    drop(stdout);

    match server.run() {
        Ok(()) => {
            info!("drained; exiting");
            ExitCode::SUCCESS
        }
        Err(err) => {
            error!(error = %err, "server failed");
            eprintln!("kythera: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let args = Args::try_parse_from(["kythera"]).unwrap();
        assert_eq!(args.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(args.shards, None);
    }

    #[test]
    fn listen_repeats_and_replaces_the_default() {
        let args = Args::try_parse_from([
            "kythera",
            "--listen",
            "127.0.0.1:9000",
            "--listen",
            "[::1]:9001",
            "--shards",
            "3",
        ])
        .unwrap();
        assert_eq!(
            args.listen,
            vec![
                "127.0.0.1:9000".parse::<SocketAddr>().unwrap(),
                "[::1]:9001".parse().unwrap()
            ]
        );
        assert_eq!(args.shards, Some(3));
    }

    #[test]
    fn rejects_a_bad_address() {
        assert!(Args::try_parse_from(["kythera", "--listen", "nowhere"]).is_err());
    }

    #[test]
    fn clap_config_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
