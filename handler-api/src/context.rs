//! The callback context: how a gear sends frames and reaches the registry.

use bytes::Bytes;

use crate::close::{CloseCode, truncate_reason};
use crate::conn::ConnId;
use crate::frame::{Frame, Utf8Bytes};
use crate::registry::{ConnHandle, RegistryError, RegistryOps};
use crate::terminate::TerminateError;

/// The type of a data frame written from a borrowed payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    /// Text (the payload is valid UTF-8).
    Text,
    /// Binary.
    Binary,
}

/// Where a context's frames go: implemented by the engine, which encodes them straight
/// into the connection's outgoing queue.
pub trait FrameSink {
    /// Writes a data frame whose payload is copied from `payload` (no allocation when
    /// the connection's outgoing buffer has room). For `DataKind::Text` the payload
    /// is valid UTF-8.
    fn send_copied(&mut self, kind: DataKind, payload: &[u8]);
    /// Queues an owned or shared frame, without copying its payload.
    fn send_frame(&mut self, frame: Frame);
    /// Records a gear bug that the engine logs and reports as the terminate reason.
    fn gear_error(&mut self, error: TerminateError);
}

/// A [`FrameSink`] that keeps what it is given: for unit tests of a gear's callbacks.
#[derive(Debug, Default)]
pub struct RecordingSink {
    /// The frames sent, in order (copied payloads as owned frames).
    pub frames: Vec<Frame>,
    /// Gear bugs reported.
    pub errors: Vec<TerminateError>,
}

impl FrameSink for RecordingSink {
    fn send_copied(&mut self, kind: DataKind, payload: &[u8]) {
        let bytes = Bytes::copy_from_slice(payload);
        self.frames.push(match kind {
            DataKind::Text => match Utf8Bytes::try_from_bytes(bytes) {
                Ok(t) => Frame::Text(t),
                Err(_) => unreachable!("send_copied(Text) is given valid UTF-8"),
            },
            DataKind::Binary => Frame::Binary(bytes),
        });
    }
    fn send_frame(&mut self, frame: Frame) {
        self.frames.push(frame);
    }
    fn gear_error(&mut self, error: TerminateError) {
        self.errors.push(error);
    }
}

/// What a callback uses to send frames and reach the registry.
///
/// Frames are sent in the order of the calls. After a close frame nothing more is sent:
/// later sends in the same callback (and later callbacks) are ignored, as in
/// antikythera, and [`Context::is_closed`] turns true.
///
/// Sending borrowed text or bytes ([`send_text`](Self::send_text),
/// [`send_binary`](Self::send_binary)) copies them into the connection's outgoing
/// buffer; [`send`](Self::send) with a [`Frame`] holding [`Bytes`] shares them instead,
/// which is the way to send one large payload to many connections.
pub struct Context<'a, M> {
    id: ConnId,
    closed: bool,
    sink: &'a mut dyn FrameSink,
    registry: &'a mut dyn RegistryOps<M>,
}

impl<M> std::fmt::Debug for Context<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.id)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl<'a, M> Context<'a, M> {
    /// A context for one callback of connection `id`. `closed` says whether the
    /// connection already sent its close frame. Engines and test harnesses call this.
    pub fn new(
        id: ConnId,
        closed: bool,
        sink: &'a mut dyn FrameSink,
        registry: &'a mut dyn RegistryOps<M>,
    ) -> Self {
        Context {
            id,
            closed,
            sink,
            registry,
        }
    }

    /// This connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Whether a close frame has been sent: further frames are dropped.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Sends a text frame, copying `text`.
    pub fn send_text(&mut self, text: &str) {
        if !self.closed {
            self.sink.send_copied(DataKind::Text, text.as_bytes());
        }
    }

    /// Sends a binary frame, copying `data`.
    pub fn send_binary(&mut self, data: &[u8]) {
        if !self.closed {
            self.sink.send_copied(DataKind::Binary, data);
        }
    }

    /// Sends an owned or shared frame. A close frame ends the connection.
    pub fn send(&mut self, frame: Frame) {
        if self.closed {
            return;
        }
        if let Frame::Close(Some(close)) = &frame
            && close.reason.as_bytes().len() > crate::close::MAX_CLOSE_REASON_BYTES
        {
            self.closed = true;
            self.sink
                .send_frame(Frame::close(close.code, close.reason.as_str()));
            return;
        }
        self.closed = frame.is_close();
        self.sink.send_frame(frame);
    }

    /// Closes the connection with a close frame without a status.
    pub fn close(&mut self) {
        self.send(Frame::Close(None));
    }

    /// Closes the connection with `code` and `reason` (cut to 123 bytes at a character
    /// boundary).
    pub fn close_with(&mut self, code: CloseCode, reason: &str) {
        self.send(Frame::close(code, truncate_reason(reason)));
    }

    /// Closes with a numeric code, for codes that come from configuration or another
    /// system. A code that is not valid on the wire is a gear bug: the engine logs it,
    /// closes with 1011 and reports [`TerminateError::InvalidCloseCode`].
    pub fn close_with_code(&mut self, code: u16, reason: &str) {
        match CloseCode::new(code) {
            Some(code) => self.close_with(code, reason),
            None if !self.closed => {
                self.sink.gear_error(TerminateError::InvalidCloseCode(code));
                self.close_with(CloseCode::INTERNAL_ERROR, "");
            }
            None => {}
        }
    }

    /// Registers `name` for this connection in the gear's namespace.
    pub fn register(&mut self, name: &str) -> Result<(), RegistryError> {
        self.registry.register(self.id, name)
    }

    /// Gives up `name`.
    pub fn unregister(&mut self, name: &str) -> Result<(), RegistryError> {
        self.registry.unregister(self.id, name)
    }

    /// Which connection holds `name`.
    pub fn lookup(&mut self, name: &str) -> Result<Option<ConnId>, RegistryError> {
        self.registry.lookup(name)
    }

    /// Queues `msg` for the holder of `name`: `Ok(true)` if queued, `Ok(false)` if
    /// nobody holds it.
    pub fn send_message(&mut self, name: &str, msg: M) -> Result<bool, RegistryError> {
        self.registry.send_message(name, msg)
    }

    /// Joins `group`.
    pub fn join(&mut self, group: &str) -> Result<(), RegistryError> {
        self.registry.join(self.id, group)
    }

    /// Leaves `group`.
    pub fn leave(&mut self, group: &str) -> Result<(), RegistryError> {
        self.registry.leave(self.id, group)
    }

    /// Queues `msg` for every member of `group` (this connection too, if a member);
    /// returns for how many.
    pub fn publish(&mut self, group: &str, msg: M) -> Result<usize, RegistryError> {
        self.registry.publish(group, msg)
    }

    /// Sends `frame` to every member of `group`, encoded once, without calling their
    /// handlers; returns for how many.
    pub fn publish_frame(&mut self, group: &str, frame: Frame) -> Result<usize, RegistryError> {
        self.registry.publish_frame(group, frame)
    }

    /// How many members `group` has.
    pub fn count(&mut self, group: &str) -> Result<usize, RegistryError> {
        self.registry.count(group)
    }

    /// A handle to this connection for other threads.
    pub fn handle(&mut self) -> Result<ConnHandle<M>, RegistryError> {
        self.registry.handle(self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::NoRegistry;

    #[test]
    fn nothing_after_close() {
        let mut sink = RecordingSink::default();
        let mut reg = NoRegistry;
        let mut ctx: Context<'_, ()> = Context::new(ConnId::new(0, 1), false, &mut sink, &mut reg);
        ctx.send_text("a");
        ctx.close_with(CloseCode::NORMAL, "bye");
        ctx.send_text("b");
        ctx.send(Frame::binary(&b"c"[..]));
        ctx.close();
        assert!(ctx.is_closed());
        assert_eq!(
            sink.frames,
            vec![Frame::text("a"), Frame::close(CloseCode::NORMAL, "bye")]
        );
    }

    #[test]
    fn invalid_close_code_is_a_gear_bug() {
        let mut sink = RecordingSink::default();
        let mut reg = NoRegistry;
        let mut ctx: Context<'_, ()> = Context::new(ConnId::new(0, 1), false, &mut sink, &mut reg);
        ctx.close_with_code(1005, "nope");
        assert_eq!(sink.errors, vec![TerminateError::InvalidCloseCode(1005)]);
        assert_eq!(
            sink.frames,
            vec![Frame::close(CloseCode::INTERNAL_ERROR, "")]
        );
    }

    #[test]
    fn long_reason_is_cut() {
        let mut sink = RecordingSink::default();
        let mut reg = NoRegistry;
        let mut ctx: Context<'_, ()> = Context::new(ConnId::new(0, 1), false, &mut sink, &mut reg);
        let reason = "x".repeat(500);
        ctx.send(Frame::Close(Some(crate::CloseFrame {
            code: CloseCode::NORMAL,
            reason: reason.clone().into(),
        })));
        match &sink.frames[0] {
            Frame::Close(Some(c)) => assert_eq!(c.reason.as_bytes().len(), 123),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn registry_unavailable_without_backend() {
        let mut sink = RecordingSink::default();
        let mut reg = NoRegistry;
        let mut ctx: Context<'_, u8> = Context::new(ConnId::new(0, 1), false, &mut sink, &mut reg);
        assert_eq!(ctx.register("x"), Err(RegistryError::Unavailable));
        assert_eq!(ctx.publish("g", 1), Err(RegistryError::Unavailable));
    }
}
