//! What the tests of the `kythera` binary share: the binary as a child process, and
//! plain HTTP requests to it.
// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `kythera` binary on the address its banner names, killed on drop.
pub struct Kythera {
    pub child: Child,
    pub addr: SocketAddr,
    /// The shard count of the banner.
    pub shards: usize,
    /// The node id of the banner (cluster nodes only).
    pub node: Option<String>,
    /// The I/O driver of the banner: `io_uring` or `epoll`.
    pub driver: String,
    /// The banner line, without its newline.
    pub banner: String,
}

impl Kythera {
    /// Starts it with `args`, logging warnings and errors to the test's stderr.
    pub fn start(args: &[&str]) -> Kythera {
        Kythera::start_with(args, &[])
    }

    /// Starts it with extra environment variables.
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Kythera {
        Kythera::spawn(args, env, Stdio::inherit())
    }

    /// Starts it with its stderr going to `stderr`.
    pub fn spawn(args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Kythera {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kythera"))
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start kythera");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let Banner {
            addr,
            shards,
            driver,
            node,
        } = parse_banner(&line).unwrap_or_else(|| panic!("banner: {line:?}"));
        Kythera {
            child,
            addr,
            shards,
            node,
            driver,
            banner: line.trim_end().to_owned(),
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let res = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(res, 0);
    }

    /// Waits for it to exit.
    pub fn wait(mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "kythera did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// A metric's value from `/metrics`: the first line that starts with `series`
    /// (name and labels, as `kythera_x{gear="/chat"}`) followed by a space.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = http_get(self.addr, "/metrics", false)?;
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }
}

impl Drop for Kythera {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the banner says.
pub struct Banner {
    pub addr: SocketAddr,
    pub shards: usize,
    /// `io_uring` or `epoll`.
    pub driver: String,
    pub node: Option<String>,
}

/// `kythera listening on ws://ADDR (N shards, DRIVER[, node ID])`.
pub fn parse_banner(line: &str) -> Option<Banner> {
    let rest = line.trim().strip_prefix("kythera listening on ws://")?;
    let (addr, rest) = rest.split_once(' ')?;
    let inside = rest.strip_prefix('(')?.strip_suffix(')')?;
    let (inside, node) = match inside.split_once(", node ") {
        Some((s, n)) => (s, Some(n.to_owned())),
        None => (inside, None),
    };
    let (shards, driver) = inside.split_once(", ")?;
    let shards = shards
        .strip_suffix(" shards")
        .or_else(|| shards.strip_suffix(" shard"))?
        .parse()
        .ok()?;
    Some(Banner {
        addr: addr.parse().ok()?,
        shards,
        driver: driver.to_owned(),
        node,
    })
}

/// A plain HTTP GET; returns the status and the body.
pub fn http_get(addr: SocketAddr, path: &str, upgrade: bool) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let extra = if upgrade {
        format!(
            "Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
            kythera_testkit::raw::KEY
        )
    } else {
        String::new()
    };
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let status = response.get(9..12)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}
