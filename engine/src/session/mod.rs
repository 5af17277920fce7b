//! One connection's websocket life, without I/O: bytes in, callbacks run, bytes out.
//!
//! The shard moves bytes between the socket and a `Session`; everything else is here:
//! the upgrade, routing, `connect`/`init`, frames, pongs, the closing handshake in both
//! directions, timeouts, the slow-consumer limit, panics in callbacks, and `terminate`
//! exactly once. Time comes in as milliseconds on the shard's monotonic clock.
//!
//! Copies on the receive side: a frame that lies whole in the received bytes is
//! unmasked in place and handed to the gear from there. Only the tail of a frame that
//! continues in the next receive is copied, into `pending`, and processed from there
//! once complete; fragmented messages are copied by the reassembler. Once the header of
//! such a frame is in `pending`, its payload is unmasked piece by piece as it is
//! appended (while the piece is still in the cache), so completing the frame takes no
//! separate unmasking pass. When the gear echoes that frame's payload as it is (the
//! echo gear does), the frame's own buffer becomes the output: the server's header is
//! written in front of the payload, over the end of the client's longer header, and the
//! payload is sent from where it lies instead of being copied into the output.
//!
//! The session is one type, [`Session`], whose methods are spread over files by what
//! they look after: `handshake` (the upgrade request, `connect` and the 101),
//! `receive` (received bytes to frames) with `partial_frame` (a frame that continues
//! in the next receive), `events` (what a received frame does), `from_server` (what
//! the server side sends a connection), `callback` (running a gear callback and acting
//! on what it left behind), `output` (the queue of bytes for the shard), `closing`
//! (the closing handshake and `terminate`) and `deadlines` (timeouts and pings).

use std::any::Any;
use std::net::SocketAddr;

use crate::gear::{App, LiveConn};
use crate::protocol::deflate::ConnDeflate;

mod callback;
mod closing;
mod deadlines;
mod events;
mod from_server;
mod handover;
mod handshake;
mod output;
mod partial_frame;
mod receive;
mod staged_echo;
#[cfg(test)]
mod tests;

pub(crate) use handover::{Readiness, Thawed};
use handshake::Handshaking;
use output::Tx;
pub use output::{Chunk, Output, TX_QUIET_MS};

/// The close reason sent to every connection on drain (SPEC section 3).
pub const DRAIN_REASON: &str = "server shutting down; please reconnect";

/// Whether the gear runs. Two variants, so that the enum is the size of its box
/// pointer; the handshake is `Done` with `Session::handshaking` set.
enum Phase {
    /// The gear runs.
    Open(Box<dyn LiveConn>),
    /// Reading the upgrade request (`Session::handshaking`; what it needs is in the
    /// `Tx` box's `partial`: it is short-lived, and an open connection should not carry
    /// its size), or `terminate` has run (or the gear never started): only the closing
    /// handshake and flushing are left.
    Done,
}

/// One connection, from the accept to the close of its socket.
///
/// What an idle connection needs is all that is kept inline; receive and send state
/// live in the `Tx` box, which exists only while it holds something, so that memory
/// per idle connection stays small (docs/architecture.md, "Memory per idle
/// connection").
pub struct Session {
    /// The gear, once routed (for its counters); `u32::MAX` before.
    gear: u32,
    /// Close the socket once the output is flushed.
    finished: bool,
    terminated: bool,
    /// The upgrade request is still arriving.
    handshaking: bool,
    /// The peer stopped reading (slow consumer): the shard stops reading from it and
    /// closes the socket after a short grace instead of the closing timeout.
    abandoned: bool,
    phase: Phase,
    /// When the idle timeout closes the connection: the last receive plus the idle
    /// timeout (pings are due `ping_interval` after the last receive: see
    /// [`Session::ping_due_ms`]).
    idle_deadline_ms: u64,
    /// permessage-deflate, when agreed (boxed: most connections have none, and an
    /// idle connection's size matters).
    pmd: Option<Box<ConnDeflate>>,
    /// Output, closing and partial receive state; `None` while there is none (see
    /// [`Tx`]).
    tx: Option<Box<Tx>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("finished", &self.finished)
            .field("terminated", &self.terminated)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session for a socket just accepted.
    pub fn new(peer: Option<SocketAddr>, now_ms: u64, app: &App) -> Session {
        let mut session = Session {
            gear: u32::MAX,
            phase: Phase::Done,
            handshaking: true,
            abandoned: false,
            finished: false,
            terminated: false,
            idle_deadline_ms: u64::MAX,
            pmd: None,
            tx: None,
        };
        // The request arrives into the partial box's `pending`.
        let mut partial = session.new_partial(app);
        partial.handshake = Some(Handshaking {
            deadline_ms: now_ms + ms(app.limits().handshake_timeout),
            peer,
            tls: None,
            awaiting: None,
        });
        session.put_partial(partial);
        session
    }

    /// Whether the socket should be closed once the output is flushed.
    pub fn should_close(&self) -> bool {
        self.finished
    }

    /// Whether `terminate` has run (or the connection never reached `init`).
    pub fn is_terminated(&self) -> bool {
        self.terminated || matches!(self.phase, Phase::Done)
    }

    /// The routed gear, if any.
    fn gear(&self) -> Option<usize> {
        (self.gear != u32::MAX).then_some(self.gear as usize)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The session does not hold its id (the shard derives it from the slot and its
        // generation), so it cannot run a terminate still owed here: the shard runs it
        // ([`Session::shut_down`]) before it drops a session. Catch a path that does
        // not in the tests.
        debug_assert!(
            std::thread::panicking() || self.is_terminated(),
            "session dropped with its gear running"
        );
    }
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
