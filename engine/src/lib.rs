//! kythera's engine: shard-per-core executors on io_uring (or epoll where io_uring is
//! refused) that run gears.
//!
//! [`Server`] binds the listeners and runs one [`shard`] per core; each shard owns its
//! I/O [`driver`], its connections and their [`session`]s, which drive the sans-I/O [`protocol`]
//! core (handshake, frame codec, reassembly, UTF-8, closing handshake) and call the
//! gears mounted by [`route`]. The [`registry`] crate carries names and groups across
//! shards; [`observe`] answers `/metrics`, `/healthz` and static files.
#![deny(missing_docs)]

pub mod config;
pub mod driver;
pub mod gear;
pub mod observe;
pub mod origin;
pub mod protocol;
pub mod route;
pub mod server;
pub mod session;
pub mod shard;
pub mod timer;
pub use driver::uring;

pub use driver::{DriverKind, IoChoice};
pub use registry::{RegistryConfig, RegistryHandle, RegistryStats};
pub use server::{
    RunError, RunningServer, Server, ServerBuilder, ServerHandle, StartError,
    disable_transparent_huge_pages,
};
pub use shard::ShardCounters;
