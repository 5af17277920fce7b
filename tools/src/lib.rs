//! The kythera server binary's companions: the demo gears and page it serves, its
//! configuration, and the load generator behind `kythera-load`.
#![deny(missing_docs)]

pub mod config;
pub mod demo;
pub mod gears;
pub mod load;
