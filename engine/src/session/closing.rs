//! How a connection ends: the closing handshake from our side, failing on a protocol
//! error, the peer gone, drain and shutdown, and the gear's `terminate`, run exactly
//! once.
//!
//! Separate because every other part of the session ends a connection through these,
//! and `terminate` running exactly once is checked in one place.

use std::panic::{AssertUnwindSafe, catch_unwind};

use kythera_handler_api::{CloseCode, ConnId, TerminateError, TerminateReason};
use tracing::{info, warn};

use super::callback::Discard;
use super::output::tx;
use super::{DRAIN_REASON, Phase, Session, ms, panic_message};
use crate::gear::{App, Registries};
use crate::protocol::ProtocolError;
use crate::protocol::close::encode_close_payload;
use crate::protocol::codec::{OpCode, encode_frame_into};

impl Session {
    /// The peer is gone: `None` for EOF, `Some(errno)` for a socket error.
    pub fn on_peer_gone(
        &mut self,
        id: ConnId,
        errno: Option<i32>,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        let reason = match errno {
            Some(e) => TerminateReason::Error(TerminateError::Io(e)),
            None => TerminateReason::Remote,
        };
        if self.handshaking {
            self.give_up_handshake(app);
        }
        self.terminate(id, reason, now_ms, app, regs);
        if let Some(tx) = &mut self.tx {
            tx.discard_queued();
        }
        self.finished = true;
    }

    /// The server drains: close 1001, terminate `Stop`.
    pub fn start_drain(&mut self, id: ConnId, now_ms: u64, app: &App, regs: &mut Registries) {
        let core = &mut *self;
        match core.phase {
            _ if core.handshaking => core.give_up_handshake(app),
            Phase::Open(_) if core.closing_open() => {
                core.close(CloseCode::GOING_AWAY, DRAIN_REASON, now_ms, app, regs);
                core.terminate(id, TerminateReason::Stop, now_ms, app, regs);
            }
            _ => {}
        }
    }

    /// The shard stops with this session still open (the end of a drain): `terminate`
    /// runs with `Stop`, with the registry at hand so that names and groups are freed.
    pub fn shut_down(&mut self, id: ConnId, now_ms: u64, app: &App, regs: &mut Registries) {
        if self.handshaking {
            self.give_up_handshake(app);
        }
        self.terminate(id, TerminateReason::Stop, now_ms, app, regs);
        self.finished = true;
    }

    /// Whether no close has been sent or received: data still flows both ways.
    pub(super) fn closing_open(&self) -> bool {
        self.tx.as_ref().is_none_or(|t| t.closing.is_open())
    }

    /// Starts the closing handshake from our side; false if a close was sent already.
    pub(super) fn local_close(&mut self, now_ms: u64, app: &App) -> bool {
        tx(&mut self.tx)
            .closing
            .local_close(now_ms, ms(app.limits().closing_timeout))
    }

    /// A protocol error: close with its code and close the socket without waiting for
    /// the peer's answer (RFC 6455 section 7.1.7, failing the connection).
    pub(super) fn fail(
        &mut self,
        id: ConnId,
        e: ProtocolError,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        if self.local_close(now_ms, app) {
            self.send_close(Some(e.close_code()), e.as_str(), regs);
        }
        self.terminate(
            id,
            TerminateReason::Error(e.to_terminate_error()),
            now_ms,
            app,
            regs,
        );
        self.finished = true;
    }

    /// Starts the closing handshake from our side.
    pub(super) fn close(
        &mut self,
        code: CloseCode,
        reason: &str,
        now_ms: u64,
        app: &App,
        regs: &Registries,
    ) {
        if self.local_close(now_ms, app) {
            self.send_close(Some(code), reason, regs);
        }
    }

    pub(super) fn send_close(&mut self, code: Option<CloseCode>, reason: &str, regs: &Registries) {
        if let Some(c) = regs.counters(self.gear()) {
            c.close_sent(code.map(CloseCode::get));
        }
        let mut payload = [0u8; 125];
        let n = encode_close_payload(code, reason, &mut payload);
        let out = &mut tx(&mut self.tx).out;
        encode_frame_into(out, true, 0, OpCode::Close, &payload[..n], None);
    }

    /// Calls the gear's `terminate` once and logs the DISCONNECTED line.
    pub(super) fn terminate(
        &mut self,
        id: ConnId,
        reason: TerminateReason,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        if self.terminated {
            return;
        }
        self.terminated = true;
        let Phase::Open(mut live) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return;
        };
        let meta = live.meta();
        let gear = self.gear as usize;
        if let Some(c) = regs.counters(Some(gear)) {
            c.terminated.add(1);
        }
        info!(
            conn = %id,
            gear = app.pattern(gear),
            peer = ?meta.peer.get(),
            frames_in = meta.frames_in,
            frames_out = meta.frames_out,
            duration_ms = now_ms.saturating_sub(meta.opened.get()),
            reason = %reason,
            "DISCONNECTED"
        );
        let mut sink = Discard;
        if let Err(panic) = catch_unwind(AssertUnwindSafe(move || {
            live.terminate(gear, id, &reason, &mut sink, regs)
        })) {
            warn!(conn = %id, panic = panic_message(&panic), "terminate panicked");
        }
    }
}
