//! kythera's engine.
//!
//! Today it holds the sans-I/O protocol core ([`protocol`]): the handshake, the frame
//! codec, reassembly, UTF-8 and the closing handshake, as plain functions and state
//! machines over bytes. The io_uring shards that drive it arrive with the engine issue.
#![deny(missing_docs)]

pub mod protocol;
