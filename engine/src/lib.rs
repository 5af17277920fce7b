//! kythera's engine: shard-per-core io_uring executors that run gears.
//!
//! [`Server`] binds the listeners and runs one [`shard`] per core; each shard owns its
//! ring, its connections and their [`session`]s, which drive the sans-I/O [`protocol`]
//! core (handshake, frame codec, reassembly, UTF-8, closing handshake) and call the
//! gears mounted by [`route`]. The [`registry`] crate carries names and groups across
//! shards; [`observe`] answers `/metrics`, `/healthz` and static files.
#![deny(missing_docs)]

pub mod config;
pub mod gear;
pub mod observe;
pub mod origin;
pub mod protocol;
pub mod route;
pub mod server;
pub mod session;
pub mod shard;
mod side_table;
pub mod timer;
pub mod uring;

pub use registry::{RegistryConfig, RegistryHandle, RegistryStats};
pub use server::{
    RunError, RunningServer, Server, ServerBuilder, ServerHandle, StartError,
    disable_transparent_huge_pages,
};
pub use shard::ShardCounters;
