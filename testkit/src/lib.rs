//! A test harness for gear authors (antikythera ships `Antikythera.Test.WebsocketClient`
//! for the same job): start a real kythera engine with the gear under test on an
//! ephemeral port, connect clients, send frames, and await frames and closes with
//! timeouts, in a few lines.
//!
//! ```
//! use kythera_handler_api::{Conn, Context, Message, Websocket};
//!
//! struct Echo;
//! impl Websocket for Echo {
//!     type State = ();
//!     type Message = ();
//!     fn init(&self, _: &mut Conn, _: &mut Context<'_, ()>) {}
//!     fn handle_client_message(&self, _: &mut (), msg: Message<'_>, ctx: &mut Context<'_, ()>) {
//!         if let Message::Text(t) = msg {
//!             ctx.send_text(t)
//!         }
//!     }
//!     fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}
//! }
//!
//! let server = kythera_testkit::TestServer::start(|b| b.mount("/echo", Echo));
//! let mut client = server.connect("/echo");
//! client.send_text("hi");
//! assert_eq!(client.recv_text(), "hi");
//! client.close();
//! ```
//!
//! Everything blocks with a timeout ([`DEFAULT_TIMEOUT`], or [`Client::with_timeout`])
//! and panics with a message that says what was awaited, which is what a failing test
//! should do. The server runs two shards (so that cross-shard paths are exercised) and
//! is drained when the [`TestServer`] is dropped.
#![deny(missing_docs)]

mod echo;
pub mod raw;
pub mod redis;

pub use echo::Echo;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use kythera_engine::{RegistryHandle, RunningServer, Server, ServerBuilder};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message as WsMessage, WebSocket};

/// How long a client waits for a frame, a close or a connection by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A kythera engine on 127.0.0.1 with an ephemeral port, running the gears a test
/// mounted. Dropping it drains and stops it.
#[derive(Debug)]
pub struct TestServer {
    server: RunningServer,
}

impl TestServer {
    /// Starts an engine with two shards on 127.0.0.1:0; `mount` adds the gears (and may
    /// set limits or anything else on the builder).
    pub fn start(mount: impl FnOnce(ServerBuilder) -> ServerBuilder) -> TestServer {
        TestServer::start_with_shards(2, mount)
    }

    /// As [`TestServer::start`], with `shards` shards.
    pub fn start_with_shards(
        shards: usize,
        mount: impl FnOnce(ServerBuilder) -> ServerBuilder,
    ) -> TestServer {
        let builder = Server::builder()
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .shards(shards);
        let server = mount(builder)
            .build()
            .unwrap_or_else(|e| panic!("the test engine did not start: {e}"))
            .spawn();
        TestServer { server }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `ws://ADDR` + `path_and_query`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{path_and_query}", self.addr())
    }

    /// Connects a client to `path_and_query`; panics if the upgrade is refused.
    pub fn connect(&self, path_and_query: &str) -> Client {
        match self.try_connect(path_and_query) {
            Ok(client) => client,
            Err(Rejected { status, body }) => panic!(
                "upgrade to {path_and_query} refused: {status} {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    /// Connects a client, or returns the HTTP response that refused the upgrade.
    pub fn try_connect(&self, path_and_query: &str) -> Result<Client, Rejected> {
        try_connect(self.addr(), path_and_query)
    }

    /// The running server (its handle: drain, stats, registries, the backplane).
    pub fn handle(&self) -> &kythera_engine::ServerHandle {
        self.server.handle()
    }

    /// A handle to the registry of the gear mounted on `pattern` (`M` is its message
    /// type), for sending to names and groups from the test.
    pub fn registry<M: Clone + Send + 'static>(&self, pattern: &str) -> RegistryHandle<M> {
        self.server
            .handle()
            .registry::<M>(pattern)
            .unwrap_or_else(|| panic!("no gear with this message type on {pattern}"))
    }

    /// Drains the server (every client gets 1001) and waits until it stopped.
    pub fn stop(self) {
        self.server.stop().expect("the test engine stopped cleanly");
    }
}

/// Connects a client to a server at `addr` (a `kythera` process, say); panics if the
/// upgrade is refused.
pub fn connect(addr: SocketAddr, path_and_query: &str) -> Client {
    match try_connect(addr, path_and_query) {
        Ok(client) => client,
        Err(Rejected { status, body }) => panic!(
            "upgrade to {path_and_query} refused: {status} {}",
            String::from_utf8_lossy(&body)
        ),
    }
}

/// Connects a client to a server at `addr`, or returns the HTTP response that refused
/// the upgrade.
pub fn try_connect(addr: SocketAddr, path_and_query: &str) -> Result<Client, Rejected> {
    let url = format!("ws://{addr}{path_and_query}");
    let tcp = TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tcp.set_read_timeout(Some(DEFAULT_TIMEOUT)).ok();
    tcp.set_nodelay(true).ok();
    match tungstenite::client(url.as_str(), MaybeTlsStream::Plain(tcp)) {
        Ok((ws, _)) => Ok(Client {
            ws,
            timeout: DEFAULT_TIMEOUT,
        }),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            Err(Rejected {
                status: resp.status().as_u16(),
                body: resp.body().clone().unwrap_or_default(),
            })
        }
        Err(e) => panic!("upgrade to {url}: {e}"),
    }
}

/// The HTTP response that refused an upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// A close frame with this code and reason (`None`: a close without a status).
    Frame(Option<(u16, String)>),
    /// The connection ended without a close frame.
    Dropped,
}

/// What [`Client::next_event`] saw.
#[derive(Debug)]
pub enum Event {
    /// A data frame.
    Frame(WsMessage),
    /// The connection ended.
    Closed(Closed),
    /// Nothing arrived in time.
    Quiet,
}

/// A blocking WebSocket client (tungstenite, an independent implementation).
#[derive(Debug)]
pub struct Client {
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    timeout: Duration,
}

impl Client {
    /// Waits up to `timeout` for each frame or close from now on.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        if let MaybeTlsStream::Plain(s) = self.ws.get_mut() {
            s.set_read_timeout(Some(timeout)).ok();
        }
        self
    }

    /// Sends a text frame.
    pub fn send_text(&mut self, text: &str) {
        self.send(WsMessage::text(text));
    }

    /// Sends a binary frame.
    pub fn send_binary(&mut self, data: &[u8]) {
        self.send(WsMessage::binary(data.to_vec()));
    }

    fn send(&mut self, msg: WsMessage) {
        self.ws.send(msg).unwrap_or_else(|e| panic!("send: {e}"));
    }

    /// The next data frame (pings and pongs are skipped; the client answers pings).
    pub fn recv(&mut self) -> WsMessage {
        loop {
            match self.ws.read() {
                Ok(WsMessage::Ping(_) | WsMessage::Pong(_)) => continue,
                Ok(WsMessage::Close(c)) => panic!("expected a data frame, got close {c:?}"),
                Ok(msg) => return msg,
                Err(e) => panic!("expected a data frame within {:?}: {e}", self.timeout),
            }
        }
    }

    /// The next frame, which must be text.
    pub fn recv_text(&mut self) -> String {
        match self.recv() {
            WsMessage::Text(t) => t.to_string(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    /// The next frame, which must be binary.
    pub fn recv_binary(&mut self) -> Vec<u8> {
        match self.recv() {
            WsMessage::Binary(b) => b.to_vec(),
            other => panic!("expected binary, got {other:?}"),
        }
    }

    /// Whatever comes first within `wait`: a data frame, the end of the connection, or
    /// nothing.
    pub fn next_event(&mut self, wait: Duration) -> Event {
        if let MaybeTlsStream::Plain(s) = self.ws.get_mut() {
            s.set_read_timeout(Some(wait)).ok();
        }
        let event = loop {
            match self.ws.read() {
                Ok(WsMessage::Ping(_) | WsMessage::Pong(_)) => continue,
                Ok(WsMessage::Close(c)) => {
                    let closed =
                        Closed::Frame(c.map(|f| (u16::from(f.code), f.reason.to_string())));
                    while self.ws.read().is_ok() {}
                    break Event::Closed(closed);
                }
                Ok(msg) => break Event::Frame(msg),
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break Event::Quiet;
                }
                Err(_) => break Event::Closed(Closed::Dropped),
            }
        };
        if let MaybeTlsStream::Plain(s) = self.ws.get_mut() {
            s.set_read_timeout(Some(self.timeout)).ok();
        }
        event
    }

    /// Asserts that no data frame arrives within `quiet`.
    pub fn expect_silence(&mut self, quiet: Duration) {
        if let MaybeTlsStream::Plain(s) = self.ws.get_mut() {
            s.set_read_timeout(Some(quiet)).ok();
        }
        let got = self.ws.read();
        if let MaybeTlsStream::Plain(s) = self.ws.get_mut() {
            s.set_read_timeout(Some(self.timeout)).ok();
        }
        match got {
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("expected silence for {quiet:?}, got {other:?}"),
        }
    }

    /// Waits for the server to end the connection; data frames before the close are
    /// returned with it.
    pub fn recv_close(&mut self) -> (Closed, Vec<WsMessage>) {
        let mut before = Vec::new();
        loop {
            match self.ws.read() {
                Ok(WsMessage::Close(c)) => {
                    let closed =
                        Closed::Frame(c.map(|f| (u16::from(f.code), f.reason.to_string())));
                    // Let tungstenite answer and finish the closing handshake.
                    while self.ws.read().is_ok() {}
                    return (closed, before);
                }
                Ok(WsMessage::Ping(_) | WsMessage::Pong(_)) => {}
                Ok(msg) => before.push(msg),
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return (Closed::Dropped, before);
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("no close within {:?}", self.timeout)
                }
                Err(_) => return (Closed::Dropped, before),
            }
        }
    }

    /// Waits for a close frame with `code` and returns its reason.
    pub fn expect_close(&mut self, code: u16) -> String {
        match self.recv_close() {
            (Closed::Frame(Some((c, reason))), _) if c == code => reason,
            other => panic!("expected close {code}, got {other:?}"),
        }
    }

    /// Starts the closing handshake with 1000 and waits for the server's answer.
    pub fn close(mut self) {
        self.ws
            .close(Some(tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .ok();
        loop {
            match self.ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return;
                }
                Err(e) => panic!("closing handshake: {e}"),
            }
        }
    }
}
