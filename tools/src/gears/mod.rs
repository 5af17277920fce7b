//! Demo gears, mounted by the `kythera` binary.

pub mod echo;

pub use echo::Echo;
