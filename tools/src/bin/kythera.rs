//! The kythera server: the echo gear on `/echo` and `/`, the chat gear on `/chat`, the
//! stats gear on `/stats`, the demo page at `GET /`, one shard per core.
//!
//! ```text
//! kythera --listen 127.0.0.1:8080 --listen [::1]:8080 --shards 2
//! ```
//!
//! Once every listener is bound it prints `kythera listening on ws://ADDR (N shards,
//! DRIVER)` (DRIVER: `io_uring` or `epoll`; with `, node ID` in a cluster) on stdout,
//! one line per address (`wss://` for a `--tls-listen` address). SIGHUP reloads the TLS
//! certificate and key (a reload that fails keeps the old pair and logs why). SIGTERM
//! or SIGINT drains the server (close 1001 to
//! every connection, spread over the drain window) and it exits 0 once drained; a second
//! signal exits at once. Logs go to stderr, filtered by `RUST_LOG` (default `info`).
//! If io_uring is unavailable it runs on epoll and says why in one log line (with
//! `--io uring` it says why and how to fix it, and exits 1); if it cannot
//! listen on an address (in use, also by another kythera), it says so and exits 3.
//! Options come from flags, `KYTHERA_*` variables and a `--config` TOML file
//! ([`tools::config`]); an invalid one exits 2 with a message naming it.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use kythera_engine::Server;
use mimalloc::MiMalloc;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tools::config::{self, Args, LogFormat};
use tools::gears::{Chat, Echo, PrefixEcho, Stats};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// The exit status when an address cannot be listened on (in use, by another kythera
/// too, or not permitted). 2 is an invalid configuration, 1 any other failure.
const EXIT_CANNOT_LISTEN: u8 = 3;

/// mimalloc: per-thread free lists suit shard-per-core threads, and large frame
/// buffers are reused instead of being handed back to the kernel and faulted in again.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// The shards' memory-release hook ([`kythera_engine::ServerBuilder::release_memory`]): frees
/// the pages mimalloc keeps for reuse on the calling shard's thread (the last page of
/// each size class, freed pages not purged yet) and returns them to the kernel. With
/// 10,000 idle connections this gave back about 230 KiB that the handshakes had left
/// resident (README, "Memory per idle connection").
fn release_heap() {
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any
    // time; it only walks and trims the allocator's own structures.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Flags and environment over the `--config` file over defaults.
fn load_settings(
    args: &Args,
    sources: &config::Sources,
) -> Result<config::Settings, config::ConfigError> {
    let file = match &args.config {
        Some(path) => config::read_file(path)?,
        None => config::File::default(),
    };
    config::resolve(args, sources, &file)
}

fn main() -> ExitCode {
    // First, before the heap grows: memory per connection is counted in bytes, and
    // 2 MiB heap pages would hide it (`disable_transparent_huge_pages`). Without the
    // prctl (old kernels, seccomp) the server runs the same, with a larger RSS.
    let thp_off = kythera_engine::disable_transparent_huge_pages();
    let (args, sources) = match config::parse_args(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(config::ArgsError::Invalid(err)) => {
            eprintln!("kythera: {err}");
            return ExitCode::from(2);
        }
        Err(config::ArgsError::Clap(err)) => err.exit(),
    };
    let settings = match load_settings(&args, &sources) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("kythera: {err}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org):
    // escape codes in a file or a log pipeline are noise.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match settings.log_format {
        LogFormat::Pretty => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    if let Err(err) = thp_off {
        tracing::debug!(error = %err, "transparent huge pages stay on");
    }

    let shards = settings
        .shards
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let limits = kythera_engine::config::Limits {
        max_connections_per_gear: settings
            .max_connections_per_gear
            .unwrap_or_else(|| kythera_engine::config::default_max_connections(shards)),
        ..settings.limits.clone()
    };
    let backplane = match &settings.cluster {
        None => None,
        Some(c) => {
            let mut config = kythera_cluster::ClusterConfig::new(c.redis.clone());
            if let Some(id) = &c.node_id {
                config.node_id = id.clone();
                // Taking over a running process: its node id too, once it has left
                // (a generated id is this process's own: there is none to take over).
                config.takes_over = settings.take_over.is_some();
            }
            config.ttl = c.ttl;
            match kythera_cluster::RedisBackplane::start(config) {
                Ok(b) => Some(b),
                Err(err) => {
                    eprintln!("kythera: {err}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let node = backplane.as_ref().map(|b| b.node_id().to_owned());
    let mut builder = Server::builder()
        .shards(shards)
        .limits(limits.clone())
        .tuning(settings.tuning)
        .io(settings.io)
        .release_memory(release_heap)
        .registry(kythera_engine::RegistryConfig {
            queue_capacity: settings.registry_queue_capacity,
            ..kythera_engine::RegistryConfig::default()
        });
    for addr in &settings.listen {
        builder = builder.listen(*addr);
    }
    let tls = match &settings.tls {
        Some(t) => match kythera_engine::TlsConfig::from_pem_files(&t.cert, &t.key) {
            Ok(config) => {
                for addr in &t.listen {
                    builder = builder.tls_listen(*addr);
                }
                builder = builder.tls(config.clone());
                Some(config)
            }
            Err(err) => {
                eprintln!("kythera: {err}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    if let Some(b) = &backplane {
        builder = builder.cluster(b.clone());
    }
    if let Some(path) = &settings.handover_socket {
        builder = builder.handover_socket(path);
    }
    if let Some(path) = &settings.take_over {
        builder = builder.take_over(path);
    }
    builder = match &settings.echo_prefix {
        Some(prefix) => builder.mount(
            "/echo",
            PrefixEcho {
                prefix: prefix.as_str().into(),
            },
        ),
        None => builder.mount("/echo", Echo),
    };
    let server = match builder
        .http(kythera_engine::observe::HttpConfig {
            files: tools::demo::files(),
            ..Default::default()
        })
        // Chat spans the cluster; the stats gear shows this node's figures to watchers
        // connected here, so it stays on its node.
        .mount_clustered("/chat", Chat)
        .mount("/stats", Stats)
        .mount("/", Echo)
        .allowed_origins(
            "*",
            kythera_engine::origin::OriginPolicy::from_list(&settings.allowed_origins),
        )
        .build()
    {
        Ok(server) => server,
        Err(err) => {
            eprintln!("kythera: {err}");
            // A documented status for "cannot listen" (address in use, not
            // permitted), so that a supervisor can tell it from a bad configuration.
            return match err {
                kythera_engine::StartError::Bind { .. } => ExitCode::from(EXIT_CANNOT_LISTEN),
                _ => ExitCode::FAILURE,
            };
        }
    };
    let features = server.features();
    info!(
        listen = ?server.local_addrs(),
        shards,
        max_message_bytes = limits.max_message_bytes,
        max_outgoing_bytes = limits.max_outgoing_bytes,
        max_connections_per_gear = limits.max_connections_per_gear,
        idle_timeout_secs = limits.idle_timeout.as_secs(),
        handshake_timeout_secs = limits.handshake_timeout.as_secs(),
        ping_interval_secs = limits.ping_interval.map_or(0, |p| p.as_secs()),
        permessage_deflate = limits.deflate.enabled,
        io = %server.driver(),
        ring = %features.map_or("-".to_owned(), |f| f.ring_flags.to_string()),
        msg_ring = features.is_some_and(|f| f.msg_ring),
        direct_descriptors = features.is_some() && settings.tuning.direct_slots != Some(0),
        recv_buffers = settings.tuning.buf_entries,
        recv_buffer_bytes = settings.tuning.buf_size,
        node = node.as_deref().unwrap_or("(single process)"),
        cluster_redis = ?settings.cluster.as_ref().map(|c| &c.redis),
        "kythera starting"
    );

    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
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
                if signal == SIGHUP {
                    // Reload the certificate and key; open connections keep theirs.
                    match &tls {
                        Some(tls) => match tls.reload() {
                            Ok(()) => info!("TLS certificate and key reloaded"),
                            Err(err) => {
                                warn!(error = %err, "TLS reload failed; keeping the old certificate")
                            }
                        },
                        None => info!("SIGHUP: no TLS listener, nothing to reload"),
                    }
                    continue;
                }
                if handle.is_draining() {
                    eprintln!("kythera: second signal ({signal}); exiting without draining");
                    std::process::exit(1);
                }
                info!(signal, "draining");
                handle.drain();
            }
        })
        .expect("spawn the signal thread");

    // The demo page's live figures; the thread ends when the drain starts.
    let _ = tools::gears::stats::spawn_feeder(
        server.handle(),
        "/stats",
        std::time::Duration::from_secs(1),
    );

    let shards = server.shards();
    let shards_text = if shards == 1 {
        "1 shard".to_owned()
    } else {
        format!("{shards} shards")
    };
    let driver = server.driver();
    let node_text = node.map(|n| format!(", node {n}")).unwrap_or_default();
    let mut stdout = std::io::stdout().lock();
    let tls_addrs = server.tls_addrs();
    for addr in server.local_addrs() {
        let scheme = if tls_addrs.contains(&addr) {
            "wss"
        } else {
            "ws"
        };
        // Tests and scripts read this line to learn the address: flush it.
        let _ = writeln!(
            stdout,
            "kythera listening on {scheme}://{addr} ({shards_text}, {driver}{node_text})"
        );
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
