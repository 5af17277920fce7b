//! Running a gear callback: its frames go through an [`OutSink`] straight into the
//! output (or are left to be echoed in place), a panic is caught, and what it left
//! behind (a close, a gear error, a panic, too much output) is acted on.
//!
//! Separate because every callback that may send (`init`, client and server
//! messages, and `terminate` with its [`Discard`] sink) goes through it, whatever
//! started it.

use std::panic::{AssertUnwindSafe, catch_unwind};

use kythera_handler_api::{
    CloseCode, ConnId, DataKind, Frame, FrameSink, TerminateError, TerminateReason,
};
use tracing::warn;

use super::output::{Tx, tx};
use super::{Phase, Session, panic_message};
use crate::gear::{App, LiveConn, Registries};
use crate::protocol::close::encode_close_payload;
use crate::protocol::codec::{MAX_HEADER_BYTES, OpCode, encode_frame_into, unmasked_header_len};
use crate::protocol::deflate::ConnDeflate;

impl Session {
    /// Runs one gear callback on an open connection: its frames go to the output, a
    /// panic is caught, and what it left behind is acted on. False if the gear is not
    /// running.
    pub(super) fn run_callback(
        &mut self,
        id: ConnId,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
        call: impl FnOnce(&mut dyn LiveConn, usize, ConnId, &mut dyn FrameSink, &mut Registries),
    ) -> bool {
        let Phase::Open(live) = &mut self.phase else {
            return false;
        };
        let gear = self.gear as usize;
        let outcome = with_sink(&mut self.tx, self.pmd.as_deref_mut(), None, |sink| {
            call(&mut **live, gear, id, sink, regs)
        });
        live.meta().frames_out += outcome.frames;
        if let Some(c) = regs.counters(self.gear()) {
            c.frames_out.add(outcome.frames);
            c.bytes_out.add(outcome.bytes);
        }
        self.after_callback(id, outcome, now_ms, app, regs);
        true
    }

    /// What a callback left behind: a close, a gear bug, a panic, too much output.
    #[inline(always)]
    pub(super) fn after_callback(
        &mut self,
        id: ConnId,
        outcome: SinkOutcome,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        // Inlined for the usual outcome (frames queued, nothing else), so that the
        // outcome is not moved into a call per message.
        if outcome.panic.is_none() && outcome.gear_error.is_none() && !outcome.closed {
            self.check_outgoing(id, now_ms, app, regs);
            return;
        }
        self.after_callback_rare(id, outcome, now_ms, app, regs);
    }

    /// [`Session::after_callback`] when the callback closed, failed or panicked.
    #[cold]
    #[inline(never)]
    fn after_callback_rare(
        &mut self,
        id: ConnId,
        outcome: SinkOutcome,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        if let Some(msg) = outcome.panic {
            warn!(conn = %id, panic = %msg, "handler panicked; closing with 1011");
            self.close(CloseCode::INTERNAL_ERROR, "", now_ms, app, regs);
            self.terminate(
                id,
                TerminateReason::Error(TerminateError::HandlerPanic(msg)),
                now_ms,
                app,
                regs,
            );
            return;
        }
        if let Some(err) = outcome.gear_error {
            warn!(conn = %id, error = %err, "gear error; closing");
            // The context already queued the close frame (1011).
            self.local_close(now_ms, app);
            self.terminate(id, TerminateReason::Error(err), now_ms, app, regs);
            return;
        }
        if outcome.closed {
            if let Some(c) = regs.counters(self.gear()) {
                c.close_sent(outcome.close_code);
            }
            self.local_close(now_ms, app);
            self.terminate(id, TerminateReason::Stop, now_ms, app, regs);
        }
    }
}

/// Runs a gear callback with an [`OutSink`] into the connection's output (`tx`),
/// `echo_candidate` the incoming payload whose echo may be left to the session (see
/// [`OutSink::echo_candidate`]); a panic is caught and recorded in what it returns.
/// For client messages and [`Session::run_callback`]'s callbacks (`init`, which
/// returns the gear's state, runs its own).
#[inline(always)]
pub(super) fn with_sink<'p>(
    tx: &mut Option<Box<Tx>>,
    pmd: Option<&mut ConnDeflate>,
    echo_candidate: Option<&'p [u8]>,
    call: impl FnOnce(&mut OutSink<'_, 'p>),
) -> SinkOutcome {
    let mut sink = OutSink::new(tx, pmd);
    sink.echo_candidate = echo_candidate;
    let result = catch_unwind(AssertUnwindSafe(|| call(&mut sink)));
    let mut outcome = sink.finish();
    if let Err(panic) = result {
        outcome.panic = Some(panic_message(&panic));
    }
    outcome
}

/// What a callback did through its sink.
#[derive(Default)]
pub(super) struct SinkOutcome {
    pub(super) frames: u64,
    /// Bytes of the frames encoded.
    pub(super) bytes: u64,
    pub(super) closed: bool,
    /// The code of the gear's close frame (`None`: a close without a status).
    close_code: Option<u16>,
    /// The callback's first send echoed the incoming payload (the sink's
    /// `echo_candidate`) with this opcode, and nothing was sent after it: not queued.
    pub(super) echo: Option<OpCode>,
    pub(super) gear_error: Option<TerminateError>,
    pub(super) panic: Option<String>,
}

/// Encodes a callback's frames straight into the connection's output (allocating its
/// `Tx` only if the callback sends something).
pub(super) struct OutSink<'a, 'p> {
    tx: &'a mut Option<Box<Tx>>,
    /// permessage-deflate, when agreed: data frames from its threshold on are
    /// compressed.
    pmd: Option<&'a mut ConnDeflate>,
    outcome: SinkOutcome,
    /// The incoming payload, when an echo of it as the callback's first frame may be
    /// left to the session to queue in place ([`Session::echo_in_place`], or staged
    /// already: `staged_echo`).
    echo_candidate: Option<&'p [u8]>,
}

impl<'a, 'p> OutSink<'a, 'p> {
    pub(super) fn new(tx: &'a mut Option<Box<Tx>>, pmd: Option<&'a mut ConnDeflate>) -> Self {
        OutSink {
            tx,
            pmd,
            outcome: SinkOutcome::default(),
            echo_candidate: None,
        }
    }

    pub(super) fn finish(self) -> SinkOutcome {
        self.outcome
    }

    fn out(&mut self) -> &mut Vec<u8> {
        &mut tx(self.tx).out
    }

    /// Queues the deferred echo, if any, before anything else is queued.
    #[cold]
    #[inline(never)]
    fn undefer(&mut self) {
        if let (Some(op), Some(payload)) = (self.outcome.echo.take(), self.echo_candidate) {
            encode_frame_into(self.out(), true, 0, op, payload, None);
        }
    }

    /// With an echo candidate: defers this frame if it is the first and echoes the
    /// candidate as it is (true), or else queues a deferred echo first (false).
    #[cold]
    #[inline(never)]
    fn defer_echo(&mut self, op: OpCode, payload: &[u8]) -> bool {
        if let Some(candidate) = self.echo_candidate
            && self.outcome.frames == 0
            && payload.as_ptr() == candidate.as_ptr()
            && payload.len() == candidate.len()
        {
            self.outcome.echo = Some(op);
            self.outcome.frames += 1;
            let header = unmasked_header_len(payload.len() as u64);
            self.outcome.bytes += (payload.len() + header) as u64;
            return true;
        }
        self.undefer();
        false
    }

    fn data(&mut self, op: OpCode, payload: &[u8]) {
        if self.outcome.closed {
            return;
        }
        if self.echo_candidate.is_some() && self.defer_echo(op, payload) {
            return;
        }
        // The frame's length at most (a compressed one is shorter, or stored).
        let out = tx(self.tx).room(payload.len() + MAX_HEADER_BYTES);
        let before = out.len();
        match self.pmd.as_deref_mut() {
            Some(pmd) if pmd.compresses(payload.len()) => pmd.encode_frame(out, op, payload, None),
            _ => encode_frame_into(out, true, 0, op, payload, None),
        }
        self.outcome.frames += 1;
        self.outcome.bytes += (out.len() - before) as u64;
    }
}

impl FrameSink for OutSink<'_, '_> {
    fn send_copied(&mut self, kind: DataKind, payload: &[u8]) {
        let op = match kind {
            DataKind::Text => OpCode::Text,
            DataKind::Binary => OpCode::Binary,
        };
        self.data(op, payload);
    }

    fn send_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Text(t) => self.data(OpCode::Text, t.as_bytes()),
            Frame::Binary(b) => self.data(OpCode::Binary, &b),
            Frame::Close(close) => {
                if self.outcome.closed {
                    return;
                }
                if self.echo_candidate.is_some() {
                    self.undefer();
                }
                let mut payload = [0u8; 125];
                let n = match &close {
                    Some(c) => encode_close_payload(Some(c.code), c.reason.as_str(), &mut payload),
                    None => 0,
                };
                encode_frame_into(self.out(), true, 0, OpCode::Close, &payload[..n], None);
                self.outcome.frames += 1;
                self.outcome.bytes += 2 + n as u64;
                self.outcome.closed = true;
                self.outcome.close_code = close.as_ref().map(|c| c.code.get());
            }
        }
    }

    fn gear_error(&mut self, error: TerminateError) {
        self.outcome.gear_error = Some(error);
    }
}

/// The sink of `terminate`: the connection is closed, frames go nowhere.
pub(super) struct Discard;

impl FrameSink for Discard {
    fn send_copied(&mut self, _: DataKind, _: &[u8]) {}
    fn send_frame(&mut self, _: Frame) {}
    fn gear_error(&mut self, _: TerminateError) {}
}
