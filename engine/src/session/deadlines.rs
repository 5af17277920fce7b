//! Time: the handshake, idle, ping/pong and closing deadlines, the coarse ones that the
//! shard's sweep looks after and the closing one that needs a timer, and what happens
//! when one passes ([`Session::on_tick`]).
//!
//! Separate because which deadline comes next and what each one does when it passes
//! are read together here (each is moved where the event that moves it is handled).

use std::num::NonZeroU64;

use kythera_handler_api::{CloseCode, ConnId, TerminateError, TerminateReason};

use super::output::{TX_QUIET_MS, tx};
use super::{Session, ms};
use crate::gear::{App, Registries};
use crate::protocol::codec::{OpCode, encode_frame_into};

/// A deadline at `at_ms` (`None` only for 0, which no deadline is).
fn deadline(at_ms: u64) -> Option<NonZeroU64> {
    NonZeroU64::new(at_ms.max(1))
}

impl Session {
    /// Timers: handshake, idle, ping/pong and closing deadlines.
    pub fn on_tick(&mut self, id: ConnId, now_ms: u64, app: &App, regs: &mut Registries) {
        let handshake_deadline = self.handshake_deadline_ms();
        let core = &mut *self;
        if core.finished {
            return;
        }
        if core.handshaking {
            if handshake_deadline.is_none_or(|d| now_ms >= d) {
                core.give_up_handshake(app);
            }
            return;
        }
        if core
            .tx
            .as_mut()
            .is_some_and(|t| t.closing.poll_timeout(now_ms))
        {
            if !core.terminated {
                core.terminate(
                    id,
                    TerminateReason::Error(TerminateError::ClosingTimeout),
                    now_ms,
                    app,
                    regs,
                );
            }
            core.finished = true;
            return;
        }
        if !core.closing_open() {
            return;
        }
        if now_ms >= core.idle_deadline_ms {
            core.close(CloseCode::NORMAL, "idle timeout", now_ms, app, regs);
            core.terminate(id, TerminateReason::Timeout, now_ms, app, regs);
            return;
        }
        let pong_deadline = core.tx.as_ref().and_then(|t| t.pong_deadline_ms);
        if pong_deadline.is_some_and(|d| now_ms >= d.get()) {
            core.terminate(
                id,
                TerminateReason::Error(TerminateError::PongTimeout),
                now_ms,
                app,
                regs,
            );
            core.finished = true;
            return;
        }
        if core.ping_due_ms(app).is_some_and(|at| now_ms >= at) {
            let tx = tx(&mut core.tx);
            encode_frame_into(&mut tx.out, true, 0, OpCode::Ping, b"kythera", None);
            tx.pong_deadline_ms = deadline(now_ms + ms(app.limits().pong_timeout));
        }
        core.trim(now_ms);
    }

    /// The earliest of the deadlines that the shard's sweep looks after: the
    /// handshake's, the idle timeout, the next ping, the pong awaited, and the return
    /// of the output buffers once quiet. Every open connection has one, so keeping a
    /// timer entry for each would cost memory per idle connection; they are coarse
    /// (a second late is fine), so the shard looks at every connection once per sweep
    /// instead and calls [`Session::on_tick`] when this has passed.
    pub fn swept_deadline_ms(&self, app: &App) -> Option<u64> {
        let core = self;
        if core.finished {
            return None;
        }
        if core.handshaking {
            return self.handshake_deadline_ms();
        }
        if !core.closing_open() {
            return None;
        }
        let tx = core.tx.as_deref();
        [
            Some(core.idle_deadline_ms),
            core.ping_due_ms(app),
            tx.and_then(|t| t.pong_deadline_ms).map(NonZeroU64::get),
            // Give the output buffers back once quiet.
            tx.filter(|t| t.is_empty())
                .map(|t| t.active_ms.saturating_add(TX_QUIET_MS)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The deadline that needs a timer's precision, if any: the end of the wait for
    /// the peer's close. Call [`Session::on_tick`] once it has passed.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if self.finished {
            return None;
        }
        self.tx.as_ref()?.closing.deadline_ms()
    }

    /// When to ping, with pings on and no pong awaited: `ping_interval` after the last
    /// receive. A connection that keeps sending is known to be there and is not
    /// pinged; a quiet one is pinged once per interval (a pong counts as a receive).
    fn ping_due_ms(&self, app: &App) -> Option<u64> {
        let every = app.limits().ping_interval?;
        if self
            .tx
            .as_ref()
            .is_some_and(|t| t.pong_deadline_ms.is_some())
        {
            return None;
        }
        let last_receive = self
            .idle_deadline_ms
            .saturating_sub(ms(app.limits().idle_timeout));
        Some(last_receive.saturating_add(ms(every)))
    }
}
