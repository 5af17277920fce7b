//! kythera's registry: unique names and groups per gear, sharded across cores.
//!
//! Not built yet (issue 4). The operations a gear calls are already fixed by
//! [`handler_api::RegistryOps`]; until this crate implements them the engine wires in
//! [`handler_api::NoRegistry`], which answers [`RegistryError::Unavailable`].
#![deny(missing_docs)]

pub use handler_api::{RegistryError, RegistryOps};
