//! kythera's engine.
//!
//! Today it holds the sans-I/O protocol core ([`protocol`]): the handshake, the frame
//! codec, reassembly, UTF-8 and the closing handshake, as plain functions and state
//! machines over bytes. Beside it sits the io_uring layer ([`uring`]): ring setup, provided
//! buffer rings, sockets and completions, from which the shards will be built.
#![deny(missing_docs)]

pub mod config;
pub mod gear;
pub mod observe;
pub mod protocol;
pub mod route;
pub mod server;
pub mod session;
pub mod shard;
pub mod timer;
pub mod uring;

pub use registry::{RegistryConfig, RegistryHandle, RegistryStats};
pub use server::{RunError, RunningServer, Server, ServerBuilder, ServerHandle, StartError};
