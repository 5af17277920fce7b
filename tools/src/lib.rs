//! The kythera server binary's companions: the demo gears it mounts, and the load
//! generator behind `kythera-load`.
#![deny(missing_docs)]

pub mod config;
pub mod gears;
pub mod load;
