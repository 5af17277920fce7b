//! What a kythera gear links.
//!
//! A gear implements [`Websocket`]; the engine runs it for every connection on the
//! shard (core) that owns the connection. Callbacks are plain synchronous functions.
//! Incoming messages are borrowed from the engine's buffers; outgoing frames go
//! through the [`Context`] the engine passes in, so nothing is allocated per message on
//! the engine's side.
//!
//! # An echo gear
//!
//! ```
//! use kythera_handler_api::{Context, Conn, Message, Websocket};
//!
//! /// Sends every message back as it came: text as text, binary as binary.
//! struct Echo;
//!
//! impl Websocket for Echo {
//!     type State = u64; // messages echoed so far
//!     type Message = ();
//!
//!     fn init(&self, _conn: &mut Conn, _ctx: &mut Context<'_, ()>) -> u64 {
//!         0
//!     }
//!
//!     fn handle_client_message(&self, n: &mut u64, msg: Message<'_>, ctx: &mut Context<'_, ()>) {
//!         *n += 1;
//!         match msg {
//!             Message::Text(text) => ctx.send_text(text),
//!             Message::Binary(data) => ctx.send_binary(data),
//!         }
//!     }
//!
//!     fn handle_server_message(&self, _: &mut u64, _: (), _: &mut Context<'_, ()>) {}
//! }
//!
//! // Drive it by hand, as a unit test of a gear would:
//! use kythera_handler_api::{ConnId, Frame, NoRegistry, RecordingSink, RequestParts};
//! let gear = Echo;
//! let mut conn = Conn::new(ConnId::new(0, 1), RequestParts::default());
//! let (mut sink, mut registry) = (RecordingSink::default(), NoRegistry);
//! let mut ctx = Context::new(conn.id(), false, &mut sink, &mut registry);
//! let mut state = gear.init(&mut conn, &mut ctx);
//! gear.handle_client_message(&mut state, Message::Text("hello"), &mut ctx);
//! assert_eq!(state, 1);
//! assert_eq!(sink.frames, vec![Frame::text("hello")]);
//! ```
#![deny(missing_docs)]

mod close;
mod conn;
mod context;
mod frame;
mod registry;
mod terminate;

pub use bytes::Bytes;
pub use close::{CloseCode, InvalidCloseCode, MAX_CLOSE_REASON_BYTES, truncate_reason};
pub use conn::{
    Conn, ConnId, InvalidHeader, NotOffered, RequestParts, Response, TlsParts, check_header,
};
pub use context::{Context, DataKind, FrameSink, RecordingSink};
pub use frame::{CloseFrame, Frame, Message, Utf8Bytes};
pub use registry::{
    ConnHandle, Deliver, DeliverError, NameTable, NoRegistry, RegistryError, RegistryOps,
};
pub use terminate::{TerminateError, TerminateReason};

/// A gear's websocket behaviour: five callbacks, run on the shard that owns the
/// connection (antikythera's `Antikythera.Websocket`).
///
/// One value of the implementing type serves every connection of the gear, from every
/// shard at once, hence `Send + Sync`; per-connection data lives in [`Self::State`],
/// which never leaves its shard and so need not be `Send`.
///
/// A panic in any callback is caught: that connection is closed with 1011 and
/// `terminate` is called with [`TerminateError::HandlerPanic`]; no other connection is
/// affected.
pub trait Websocket: Send + Sync + 'static {
    /// Per-connection state, built by [`init`](Self::init).
    type State: 'static;
    /// What other code sends this gear's connections through the registry or a
    /// [`ConnHandle`]. `Clone` because a publish gives each member its own copy (wrap
    /// large values in an `Arc`).
    type Message: Clone + Send + 'static;

    /// Called during the HTTP upgrade, before the 101 is written: read the request,
    /// attach data for `init` ([`Conn::set_data`]), pick a subprotocol, add response
    /// headers, or reject with an ordinary response. Default: accept.
    fn connect(&self, conn: &mut Conn) -> Result<(), Response> {
        let _ = conn;
        Ok(())
    }

    /// Called right after the 101 is written: build the connection's state, send first
    /// frames, register names, join groups. The request is available here for the last
    /// time.
    fn init(&self, conn: &mut Conn, ctx: &mut Context<'_, Self::Message>) -> Self::State;

    /// Called for each complete data message from the client.
    fn handle_client_message(
        &self,
        state: &mut Self::State,
        msg: Message<'_>,
        ctx: &mut Context<'_, Self::Message>,
    );

    /// Called for each message delivered through the registry or a [`ConnHandle`].
    fn handle_server_message(
        &self,
        state: &mut Self::State,
        msg: Self::Message,
        ctx: &mut Context<'_, Self::Message>,
    );

    /// Called exactly once per connection that reached `init`, whatever ended it.
    /// The connection's names and memberships are already gone; the registry can still
    /// be used (to tell a room someone left, say), but frames sent here are dropped
    /// because the connection is closed. Default: nothing.
    fn terminate(
        &self,
        state: Self::State,
        reason: &TerminateReason,
        ctx: &mut Context<'_, Self::Message>,
    ) {
        let _ = (state, reason, ctx);
    }

    /// Opts the gear in to live handover (`kythera --take-over`, see the README's
    /// "Deploying without disconnecting"): the connection's state as bytes, which the
    /// new process gives to [`Websocket::thaw`]. Called on the old process once the
    /// connection is quiet (nothing half received or queued); once the new process has
    /// taken the connection, the state is dropped there without `terminate`, which the
    /// new process calls when the connection ends.
    ///
    /// `None` (the default) keeps the connection out of the handover: it is closed with
    /// 1001 "please reconnect" on the old process and terminated there, as by a drain.
    ///
    /// Put a version in the bytes (a first byte, say, or a field of a serde struct),
    /// so that a newer build's `thaw` can convert an older format or refuse it. The
    /// bytes travel in one message of at most 256 KiB with the connection's other
    /// state: a larger state gets 1001 as if `None`.
    /// Names and group memberships are not part of the state: the engine moves them.
    fn freeze(&self, state: &Self::State) -> Option<Vec<u8>> {
        let _ = state;
        None
    }

    /// The state that [`Websocket::freeze`] gave on the old process, in the new one.
    /// `None` refuses it (a format this build does not know): the old process, which
    /// kept the connection until this answer, closes it with 1001 "please reconnect"
    /// and calls `terminate` there, as for a gear that does not opt in. Default:
    /// refuse.
    fn thaw(&self, frozen: &[u8]) -> Option<Self::State> {
        let _ = frozen;
        None
    }
}
