//! Demo gears, mounted by the `kythera` binary.

pub mod chat;
pub mod echo;
pub mod stats;

pub use chat::Chat;
pub use echo::{Echo, PrefixEcho};
pub use stats::Stats;
