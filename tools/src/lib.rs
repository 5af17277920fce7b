//! The kythera server binary's companions: the demo gears it mounts.
#![deny(missing_docs)]

pub mod gears;
