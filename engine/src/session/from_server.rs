//! What reaches an open connection from the server side rather than from its peer:
//! messages from the registry or a connection handle, frames and closes published to
//! a group, and a name lost to a connection on another node.
//!
//! Separate because these arrive at any time between receives, from other
//! connections, the registry or the cluster, and each must first check that the
//! connection still takes them.

use std::any::Any;

use kythera_handler_api::{CloseCode, ConnId, Frame, FrameSink, TerminateError, TerminateReason};
use kythera_registry::SharedFrame;

use super::callback::OutSink;
use super::output::tx;
use super::{Phase, Session};
use crate::gear::{App, Registries};
use crate::protocol::codec::OpCode;

impl Session {
    /// A message from the registry or a connection handle: runs
    /// `handle_server_message`. `msg` is an `Option` of the gear's message type.
    /// Returns false if the connection no longer takes messages (closing or closed).
    pub fn on_server_message(
        &mut self,
        id: ConnId,
        msg: &mut dyn Any,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> bool {
        let core = &mut *self;
        core.accepts_frames()
            && core.run_callback(id, now_ms, app, regs, |live, gear, id, sink, regs| {
                live.server_message(gear, id, msg, sink, regs)
            })
    }

    /// Frame bytes of a `publish_frame`, encoded once for every member: appended to
    /// the output as they are. Returns false if the connection no longer takes frames.
    pub fn on_published_frame(
        &mut self,
        id: ConnId,
        frame: &SharedFrame,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> bool {
        let core = &mut *self;
        if !core.accepts_frames() {
            return false;
        }
        if let Phase::Open(live) = &mut core.phase {
            live.meta().frames_out += 1;
        }
        let payload = frame.payload();
        let out = tx(&mut core.tx).room(frame.encoded.len());
        let before = out.len();
        match core.pmd.as_deref_mut() {
            Some(pmd) if pmd.compresses(payload.len()) => {
                let op = match frame.frame {
                    Frame::Binary(_) => OpCode::Binary,
                    _ => OpCode::Text,
                };
                // Compressed once for every member that would compress it the same way;
                // with context takeover (or other parameters) for this member alone.
                let shared = pmd.shared_key().and_then(|key| {
                    frame.compressed(key, || {
                        let mut wire = Vec::new();
                        pmd.encode_frame(&mut wire, op, payload, None);
                        wire.into()
                    })
                });
                match shared {
                    Some(bytes) => out.extend_from_slice(bytes),
                    None => pmd.encode_frame(out, op, payload, None),
                }
            }
            _ => out.extend_from_slice(&frame.encoded),
        }
        let bytes = (out.len() - before) as u64;
        if let Some(c) = regs.counters(core.gear()) {
            c.frames_out.add(1);
            c.bytes_out.add(bytes);
        }
        core.check_outgoing(id, now_ms, app, regs);
        true
    }

    /// The connection lost `name` to a connection on another node: close 3409,
    /// terminate with [`TerminateError::NameConflict`]. Returns false if the connection
    /// was closing or closed already.
    pub fn on_name_lost(
        &mut self,
        id: ConnId,
        name: &str,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> bool {
        if !self.accepts_frames() {
            return false;
        }
        let reason = format!("name {name:?} is held by a connection on another node");
        self.close(CloseCode::NAME_CONFLICT, &reason, now_ms, app, regs);
        self.terminate(
            id,
            TerminateReason::Error(TerminateError::NameConflict(name.to_owned())),
            now_ms,
            app,
            regs,
        );
        true
    }

    /// A `publish_frame` of a close: the connection closes as if its gear had sent it.
    pub fn on_published_close(
        &mut self,
        id: ConnId,
        close: Option<kythera_handler_api::CloseFrame>,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> bool {
        let core = &mut *self;
        if !core.accepts_frames() {
            return false;
        }
        let mut sink = OutSink::new(&mut core.tx, core.pmd.as_deref_mut());
        sink.send_frame(kythera_handler_api::Frame::Close(close));
        let outcome = sink.finish();
        core.after_callback(id, outcome, now_ms, app, regs);
        true
    }

    /// Whether the gear is running and no close has been sent: the connection takes
    /// server messages and published frames.
    fn accepts_frames(&self) -> bool {
        !self.finished && self.closing_open() && matches!(self.phase, Phase::Open(_))
    }
}
