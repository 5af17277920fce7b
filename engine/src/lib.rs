//! kythera's engine: shard-per-core executors on io_uring (or epoll where io_uring is
//! refused) that run gears.
//!
//! [`Server`] binds the listeners and runs one [`shard`] per core; each shard owns its
//! I/O [`driver`], its connections and their [`session`]s, which drive the sans-I/O [`protocol`]
//! core (handshake, frame codec, reassembly, UTF-8, closing handshake) and call the
//! gears mounted by [`route`]. The [`kythera_registry`] crate carries names and groups across
//! shards; [`observe`] answers `/metrics`, `/healthz` and static files.
//!
//! # Serving a gear, and reaching it from outside the shards
//!
//! ```
//! use kythera_engine::{IoChoice, Server};
//! use kythera_handler_api::{Conn, Context, Message, Websocket};
//!
//! /// Joins every connection to the group `all`; relays what other code publishes there.
//! struct Feed;
//!
//! impl Websocket for Feed {
//!     type State = ();
//!     type Message = String;
//!
//!     fn init(&self, _: &mut Conn, ctx: &mut Context<'_, String>) {
//!         ctx.join("all").expect("the registry takes the member");
//!         ctx.send_text("joined");
//!     }
//!     fn handle_client_message(&self, _: &mut (), _: Message<'_>, _: &mut Context<'_, String>) {}
//!     fn handle_server_message(&self, _: &mut (), news: String, ctx: &mut Context<'_, String>) {
//!         ctx.send_text(&news);
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::builder()
//!     .listen("127.0.0.1:0".parse()?)
//!     .shards(2)
//!     .io(IoChoice::Auto) // io_uring if this kernel lets us, else epoll
//!     .mount("/feed", Feed)
//!     .build()?;
//! println!("{:?} on {:?}", server.driver(), server.local_addrs());
//! let running = server.spawn();
//!
//! let mut client = kythera_testkit::connect(running.addr(), "/feed");
//! assert_eq!(client.recv_text(), "joined");
//! // Any thread: a registry handle publishes to the gear's groups.
//! let feed = running.handle().registry::<String>("/feed").expect("a gear on /feed");
//! assert_eq!(feed.publish("all", "news".to_string())?, 1);
//! assert_eq!(client.recv_text(), "news");
//! client.close();
//! running.stop()?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod config;
pub mod driver;
pub mod gear;
pub mod handover;
pub mod observe;
pub mod origin;
pub mod protocol;
pub mod route;
pub mod server;
pub mod session;
pub mod shard;
pub mod timer;
pub mod tls;
pub use driver::uring;

pub use driver::{DriverKind, IoChoice};
pub use kythera_registry::{RegistryConfig, RegistryHandle, RegistryStats};
pub use server::{
    RunError, RunningServer, Server, ServerBuilder, ServerHandle, StartError,
    disable_transparent_huge_pages,
};
pub use shard::ShardCounters;
pub use tls::{TlsConfig, TlsError};
