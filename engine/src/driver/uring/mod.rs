//! The io_uring driver (`UringDriver`) and the layer below it: a ring, a
//! provided-buffer ring, sockets, completions.
//!
//! This is the only part of the engine with `unsafe` around buffers and descriptors;
//! every block says why it holds. The pieces:
//!
//! | module | holds |
//! |---|---|
//! | [`mod@probe`] | whether io_uring is usable here, and an error saying how to fix it when not |
//! | [`ring`] | [`Ring`]: setup with `SINGLE_ISSUER \| DEFER_TASKRUN` (or the best fallback), push, submit and wait |
//! | [`buf_ring`] | [`BufRing`]: the provided-buffer ring that multishot recv picks from |
//! | [`net`] | [`Socket`] (plain fd or direct descriptor) and the SQEs on it |
//! | [`completion`] | the `user_data` encoding ([`UserData`]) and the flags of multishot completions |
//! | `driver` | `UringDriver`: the shard's I/O on these (`crate::driver::Driver`) |
//!
//! Threads: a [`Ring`] and a [`BufRing`] are neither `Send` nor `Sync`; create them on
//! the thread that drives them (see [`ring`] for why).

pub mod buf_ring;
pub mod completion;
pub(crate) mod driver;
pub mod net;
pub mod probe;
pub mod ring;

pub use buf_ring::BufRing;
pub use completion::{Op, UserData};
pub(crate) use driver::UringDriver;
pub use net::Socket;
pub use probe::{Features, Unavailable, probe};
pub use ring::{Ring, RingFlags};
