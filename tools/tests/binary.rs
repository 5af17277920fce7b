//! The `kythera` binary as an operator runs it: the banner on stdout, the echo gear on
//! `/echo` and `/`, and SIGTERM drains it to exit status 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Kythera {
    child: Child,
    addr: SocketAddr,
}

impl Kythera {
    fn start(args: &[&str]) -> Kythera {
        Kythera::start_with(args, &[]).0
    }

    /// Starts with extra environment variables; also returns the shard count of the
    /// banner.
    fn start_with(args: &[&str], env: &[(&str, &str)]) -> (Kythera, usize) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kythera"))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start kythera");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let rest = line
            .strip_prefix("kythera listening on ws://")
            .unwrap_or_else(|| panic!("banner: {line:?}"));
        let (addr, shards) = rest.split_once(' ').unwrap();
        let shards = shards
            .trim()
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(" shards)"))
            .unwrap_or_else(|| panic!("banner: {line:?}"))
            .parse()
            .unwrap();
        (
            Kythera {
                child,
                addr: addr.parse().unwrap(),
            },
            shards,
        )
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let res = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(res, 0);
    }

    fn wait(mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "kythera did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Kythera {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Upgrades, sends one masked text frame and returns the echoed payload.
fn echo_once(addr: SocketAddr, path: &str, text: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).unwrap();
    let mut hdr = [0u8; 2];
    s.read_exact(&mut hdr).unwrap();
    assert_eq!(hdr[0], 0x81);
    let mut payload = vec![0u8; usize::from(hdr[1] & 0x7f)];
    s.read_exact(&mut payload).unwrap();
    payload
}

#[test]
fn serves_echo_and_drains_on_sigterm() {
    let server = Kythera::start(&["--listen", "127.0.0.1:0", "--shards", "2"]);
    assert_eq!(echo_once(server.addr, "/echo", "hi"), b"hi");
    assert_eq!(echo_once(server.addr, "/", "root"), b"root");
    server.signal(libc::SIGTERM);
    let status = server.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn sigint_drains_too() {
    let server = Kythera::start(&["--listen", "127.0.0.1:0", "--shards", "1"]);
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
    let (server, shards) = Kythera::start_with(&["--config", file.path()], &[]);
    assert_eq!(shards, 1, "from the file");
    assert_eq!(echo_once(server.addr, "/echo", "f"), b"f");
    drop(server);
    let (_server, shards) =
        Kythera::start_with(&["--config", file.path()], &[("KYTHERA_SHARDS", "2")]);
    assert_eq!(shards, 2, "the environment over the file");
    let (_server, shards) = Kythera::start_with(
        &["--config", file.path(), "--shards", "1"],
        &[("KYTHERA_SHARDS", "2")],
    );
    assert_eq!(shards, 1, "the flag over the environment");
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
