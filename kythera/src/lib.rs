//! kythera: a WebSocket engine for Linux, on io_uring (epoll where io_uring is refused),
//! that runs your gears.
//!
//! A *gear* is your application code: one value implementing [`Websocket`], whose five
//! callbacks (`connect`, `init`, `handle_client_message`, `handle_server_message`,
//! `terminate`) the engine runs for every connection on the shard (core) that owns it.
//! A [`Server`] binds the listeners, runs one shard per core and mounts gears on paths;
//! each gear has a registry of unique names and groups, which its callbacks reach
//! through the [`Context`] and other threads through a [`RegistryHandle`].
//!
//! This crate is the one a server author depends on. It re-exports what building a
//! server needs at its root, and the crates behind it whole:
//!
//! | module | crate | what it holds |
//! |---|---|---|
//! | [`handler_api`] | `kythera-handler-api` | the [`Websocket`] trait and what its callbacks get |
//! | [`engine`] | `kythera-engine` | the server, its shards and I/O drivers, the protocol core |
//! | [`registry`] | `kythera-registry` | names and groups per gear, across shards |
//! | `cluster` (feature `cluster`) | `kythera-cluster` | the registry across nodes, through Redis |
//!
//! A crate that only defines gears can depend on `kythera-handler-api` alone: it is
//! small, and it is the crate whose semver promises are kept most strictly (see the
//! repository's CHANGELOG).
//!
//! # A server with one gear
//!
//! ```
//! use kythera::{Context, Conn, Message, Server, Websocket};
//!
//! /// Answers every text message in capitals.
//! struct Shout;
//!
//! impl Websocket for Shout {
//!     type State = ();
//!     type Message = ();
//!
//!     fn init(&self, _conn: &mut Conn, _ctx: &mut Context<'_, ()>) {}
//!
//!     fn handle_client_message(&self, _: &mut (), msg: Message<'_>, ctx: &mut Context<'_, ()>) {
//!         if let Message::Text(text) = msg {
//!             ctx.send_text(&text.to_uppercase());
//!         }
//!     }
//!
//!     fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::builder()
//!     .listen("127.0.0.1:0".parse()?) // port 0: any free port
//!     .shards(1)
//!     .mount("/shout", Shout)
//!     .build()?;
//! // `server.run()` would serve on this thread until drained; here it runs on a thread
//! // of its own for as long as `running` lives.
//! let running = server.spawn();
//! let mut client = kythera_testkit::connect(running.addr(), "/shout");
//! client.send_text("hello");
//! assert_eq!(client.recv_text(), "HELLO");
//! client.close();
//! running.stop()?; // drains, and waits for the shards to stop
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! - `cluster`: the `cluster` module (`kythera-cluster`), a Redis backplane that spreads
//!   names and groups over several kythera processes
//!   ([`ServerBuilder::cluster`], [`ServerBuilder::mount_clustered`]).
#![deny(missing_docs)]

pub use kythera_engine as engine;
pub use kythera_handler_api as handler_api;
pub use kythera_registry as registry;

#[cfg(feature = "cluster")]
pub use kythera_cluster as cluster;

pub use kythera_engine::{
    DriverKind, IoChoice, RegistryConfig, RegistryHandle, RunError, RunningServer, Server,
    ServerBuilder, ServerHandle, StartError,
};
pub use kythera_handler_api::{
    Bytes, CloseCode, Conn, ConnHandle, ConnId, Context, Frame, Message, RegistryError, Response,
    TerminateReason, Websocket,
};
