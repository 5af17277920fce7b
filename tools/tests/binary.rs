//! The `kythera` binary as an operator runs it: the banner on stdout, the echo gear on
//! `/echo` and `/`, and SIGTERM drains it to exit status 0.

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use kythera_testkit::raw::{RawClient, masked};

use common::{Kythera, http_get};

/// Upgrades, sends one masked text frame and returns the echoed payload.
fn echo_once(addr: SocketAddr, path: &str, text: &str) -> Vec<u8> {
    let mut client = RawClient::open(addr, path);
    client.send(&masked(0x1, text.as_bytes()));
    let (opcode, payload) = client.read_frame();
    assert_eq!(opcode, 0x1);
    payload
}

#[test]
fn serves_echo_and_drains_on_sigterm() {
    let server = Kythera::start(&["--listen", "127.0.0.1:0", "--shards", "2"]);
    assert_eq!(server.shards, 2, "{}", server.banner);
    // The driver KYTHERA_IO names for the run (CI runs the suites on both), else
    // io_uring, which this machine has.
    let expected = match std::env::var("KYTHERA_IO").as_deref() {
        Ok("epoll") => "(2 shards, epoll)",
        _ => "(2 shards, io_uring)",
    };
    assert!(server.banner.ends_with(expected), "{}", server.banner);
    assert_eq!(echo_once(server.addr, "/echo", "hi"), b"hi");
    assert_eq!(echo_once(server.addr, "/", "root"), b"root");
    server.signal(libc::SIGTERM);
    let status = server.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn sigint_drains_too() {
    let server = Kythera::start(&["--listen", "127.0.0.1:0", "--shards", "1"]);
    assert!(
        server.banner.ends_with("(1 shard, io_uring)")
            || server.banner.ends_with("(1 shard, epoll)"),
        "{}",
        server.banner
    );
    server.signal(libc::SIGINT);
    let status = server.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn a_bad_flag_is_a_usage_error() {
    let status = Command::new(env!("CARGO_BIN_EXE_kythera"))
        .args(["--listen", "not-an-address"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}

/// A config file in the temp directory, removed when dropped.
struct TempConfig(std::path::PathBuf);

impl TempConfig {
    fn new(name: &str, text: &str) -> TempConfig {
        let path = std::env::temp_dir().join(format!("kythera-{name}-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempConfig(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn flags_over_environment_over_file() {
    let file = TempConfig::new("precedence", "shards = 1\nlisten = [\"127.0.0.1:0\"]\n");
    let server = Kythera::start_with(&["--config", file.path()], &[]);
    assert_eq!(server.shards, 1, "from the file");
    assert_eq!(echo_once(server.addr, "/echo", "f"), b"f");
    drop(server);
    let server = Kythera::start_with(&["--config", file.path()], &[("KYTHERA_SHARDS", "2")]);
    assert_eq!(server.shards, 2, "the environment over the file");
    let server = Kythera::start_with(
        &["--config", file.path(), "--shards", "1"],
        &[("KYTHERA_SHARDS", "2")],
    );
    assert_eq!(server.shards, 1, "the flag over the environment");
}

/// A second kythera on the address of a running one does not join its listeners
/// (SO_REUSEPORT would let it take a share of the connections): it refuses, exit 3.
#[test]
fn a_second_server_on_the_same_address_refuses_to_start() {
    let first = Kythera::start(&["--listen", "127.0.0.1:0", "--shards", "2"]);
    let addr = first.addr.to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_kythera"))
        .args(["--listen", &addr, "--shards", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("in use"),
        "{err}"
    );
    // The first one still has every connection.
    for _ in 0..20 {
        assert_eq!(echo_once(first.addr, "/echo", "mine"), b"mine");
    }
}

#[test]
fn an_invalid_variable_names_itself_and_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_kythera"))
        .env("KYTHERA_SHARDS", "banana")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value for `shards` (environment variable KYTHERA_SHARDS)")
            && err.contains("\"banana\""),
        "{err}"
    );
}

#[test]
fn logs_to_a_pipe_have_no_colour() {
    let mut server = Kythera::spawn(
        &["--listen", "127.0.0.1:0", "--shards", "1"],
        &[("RUST_LOG", "info")],
        Stdio::piped(),
    );
    assert_eq!(echo_once(server.addr, "/echo", "hi"), b"hi");
    server.signal(libc::SIGTERM);
    // Read to the end: the pipe closes when the server exits.
    let mut err = String::new();
    let mut pipe = server.child.stderr.take().unwrap();
    pipe.read_to_string(&mut err).unwrap();
    assert!(err.contains("CONNECTED"), "{err}");
    assert!(!err.contains('\x1b'), "escape codes in piped logs: {err:?}");
}

#[test]
fn an_invalid_value_in_the_file_names_the_key_and_exits_2() {
    for (text, key) in [
        ("recv_buffers = 1000\n", "recv_buffers"),
        ("no_such_option = 1\n", "no_such_option"),
        ("shards = \"two\"\n", "shards"),
    ] {
        let file = TempConfig::new(key, text);
        let out = Command::new(env!("CARGO_BIN_EXE_kythera"))
            .args(["--config", file.path()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{text}: {err}");
    }
}

/// The drain as a load balancer and clients see it: SIGTERM while 40 clients echo
/// as fast as they can; `/healthz` turns 503 (and upgrades are refused with 503) while
/// the connections are closed, every client receives close 1001, and the process
/// exits 0.
#[test]
fn drain_under_load_is_observable() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Barrier};
    use tungstenite::Message;
    use tungstenite::protocol::frame::coding::CloseCode;

    const CLIENTS: usize = 40;
    let server = Kythera::start(&[
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "2",
        "--drain-window-secs",
        "2",
    ]);
    let addr = server.addr;
    assert_eq!(http_get(addr, "/healthz", false).map(|r| r.0), Some(200));

    let ready = Arc::new(Barrier::new(CLIENTS + 1));
    let signalled = Arc::new(AtomicBool::new(false));
    let echoed_after_signal = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (ready, signalled, after) = (
                Arc::clone(&ready),
                Arc::clone(&signalled),
                Arc::clone(&echoed_after_signal),
            );
            std::thread::spawn(move || {
                let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/echo")).unwrap();
                let mut ready = Some(ready);
                for n in 0u64.. {
                    let text = format!("client {i} message {n}");
                    if ws.send(Message::text(text.clone())).is_err() {
                        return None;
                    }
                    loop {
                        match ws.read() {
                            Ok(Message::Text(t)) => {
                                assert_eq!(t.as_str(), text, "echo of client {i}");
                                break;
                            }
                            Ok(Message::Close(frame)) => {
                                // Answer the close and read until the server ends it.
                                while ws.read().is_ok() {}
                                return frame.map(|f| (f.code, f.reason.to_string()));
                            }
                            Ok(_) => {}
                            Err(e) => panic!("client {i}: {e} before a close frame"),
                        }
                    }
                    if n == 10
                        && let Some(r) = ready.take()
                    {
                        r.wait();
                    }
                    if signalled.load(Ordering::Relaxed) {
                        after.fetch_add(1, Ordering::Relaxed);
                    }
                }
                unreachable!()
            })
        })
        .collect();
    ready.wait();

    server.signal(libc::SIGTERM);
    signalled.store(true, Ordering::Relaxed);
    // The shards notice the flag within a loop turn; /healthz answers 503 from then on
    // while connections from before the drain remain.
    let deadline = Instant::now() + Duration::from_secs(2);
    let health = loop {
        let got = http_get(addr, "/healthz", false);
        if got.as_ref().is_some_and(|(status, _)| *status == 503) || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        health,
        Some((503, "draining\n".to_owned())),
        "/healthz during the drain"
    );
    let upgrade = http_get(addr, "/echo", true).expect("the listener is still open");
    assert_eq!(
        upgrade,
        (503, "ServerDraining".to_owned()),
        "an upgrade during the drain"
    );

    for (i, client) in clients.into_iter().enumerate() {
        let close = client.join().expect("client thread");
        let (code, reason) = close.unwrap_or_else(|| panic!("client {i}: no close frame"));
        assert_eq!(code, CloseCode::Away, "client {i}: {reason}");
        assert_eq!(reason, "server shutting down; please reconnect");
    }
    assert!(
        echoed_after_signal.load(Ordering::Relaxed) > 0,
        "connections kept working while the drain spread its closes"
    );
    let status = server.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
}
