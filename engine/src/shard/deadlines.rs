//! A shard's deadlines: the timer wheel's entries (closing timeouts, forced closes,
//! accept back-offs) and the idle sweep that stands in for a timer per connection.

use std::io;

use crate::driver::{Driver, bump};
use crate::gear::App;
use crate::timer;

use super::conn::{ConnFlags, conn_id, conn_in};
use super::{Shard, ShardTuning, ms};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimerKey {
    /// A session deadline.
    Session { index: u32, generation: u32 },
    /// The session finished but a send is still in flight: stop waiting for it.
    ForceClose { index: u32, generation: u32 },
    /// Arm a listener's accept again after a back-off.
    AcceptRetry { listener: u32 },
}

impl<D: Driver> Shard<D> {
    pub(super) fn on_timer(&mut self, entry: timer::Entry<TimerKey>) -> io::Result<()> {
        match entry.key {
            TimerKey::Session { index, generation } => {
                let now_ms = self.now_ms;
                let Some(conn) = conn_in(&mut self.conns, index) else {
                    return Ok(());
                };
                // Lazy cancellation: an entry of an earlier connection in this slot
                // means nothing.
                if conn.generation != generation {
                    return Ok(());
                }
                conn.flags.set(ConnFlags::TIMER_ARMED, false);
                let id = conn_id(self.index, index, generation);
                if let Some(session) = conn.live_session()
                    && session.next_deadline_ms().is_some_and(|d| d <= now_ms)
                {
                    session.on_tick(id, now_ms, &self.app, &mut self.regs);
                }
                self.touch(index);
            }
            TimerKey::ForceClose { index, generation } => {
                let Some(conn) = conn_in(&mut self.conns, index) else {
                    return Ok(());
                };
                if conn.generation != generation
                    || conn.flags.has(ConnFlags::CLOSE_SENT)
                    || conn.flags.has(ConnFlags::FORCED)
                    || conn.flags.has(ConnFlags::PARKED)
                {
                    return Ok(());
                }
                self.force(index);
            }
            TimerKey::AcceptRetry { listener } => {
                if let Some(l) = self.listeners.get_mut(listener as usize) {
                    l.backing_off = false;
                }
                if self.drain.as_ref().is_some_and(|d| d.listeners_closed) {
                    if let Some(l) = self.listeners.get_mut(listener as usize) {
                        l.socket = None;
                    }
                } else {
                    self.arm_accept(listener)?;
                }
            }
        }
        Ok(())
    }

    /// The coarse deadlines every connection has (handshake, idle, ping, pong, the
    /// return of quiet output buffers: [`Session::swept_deadline_ms`]) are not in the
    /// timer wheel: an entry per connection would cost 24 bytes per idle connection,
    /// and the idle deadline moves with every message. Instead every slot is looked at
    /// once per `sweep_ms`, a share of them at each turn in proportion to the time
    /// since the last, so such a deadline is acted on at most `sweep_ms` (plus a tick)
    /// after it passed. The wheel keeps the closing timeouts, which are rare.
    pub(super) fn sweep_idle(&mut self) {
        let len = self.conns.len();
        let elapsed = self.now_ms.saturating_sub(self.swept_ms);
        self.swept_ms = self.now_ms;
        if len == 0 {
            return;
        }
        self.sweep_credit += len as u64 * elapsed;
        let due = self.sweep_credit / self.sweep_ms;
        if due == 0 {
            return;
        }
        self.sweep_credit -= due * self.sweep_ms;
        let due = if due >= len as u64 {
            self.sweep_credit = 0;
            len
        } else {
            due as usize
        };
        let now_ms = self.now_ms;
        for _ in 0..due {
            let index = self.sweep_next % len;
            self.sweep_next = index + 1;
            let Some(conn) = self.conns[index].as_mut() else {
                continue;
            };
            let id = conn_id(self.index, index as u32, conn.generation);
            let tls = conn.flags.has(ConnFlags::TLS) && !conn.flags.has(ConnFlags::SENDING);
            let Some(session) = conn.live_session() else {
                continue;
            };
            // A quiet TLS connection keeps no send buffer: once its session has given
            // its own output buffers back (a second without output). Giving it back
            // whenever nothing was queued at the sweep's pass cost a busy connection a
            // new buffer (zeroed, its pages faulted in) once per pass.
            if tls
                && !session.holds_output_buffers()
                && let Some(state) = self.tls_conns.get_mut(&(index as u32))
            {
                state.release_idle();
            }
            if session
                .swept_deadline_ms(&self.app)
                .is_some_and(|d| d <= now_ms)
            {
                session.on_tick(id, now_ms, &self.app, &mut self.regs);
                self.touch(index as u32);
            }
        }
    }

    /// Stops waiting for the connection's sends and closes it.
    pub(super) fn force(&mut self, index: u32) {
        if let Some(conn) = conn_in(&mut self.conns, index) {
            conn.flags.set(ConnFlags::FORCED, true);
            bump(&self.shared.stats[self.index].forced_closes, 1);
            self.touch(index);
        }
    }
}

/// How long one pass of the sweep takes: an eighth of the shortest swept timeout, at
/// least a tick and at most a second (so with the defaults a 60 s idle connection is
/// closed within 61 s).
pub(super) fn idle_sweep_ms(app: &App, tuning: &ShardTuning) -> u64 {
    let l = app.limits();
    let shortest = [
        Some(l.idle_timeout),
        Some(l.handshake_timeout),
        Some(l.pong_timeout),
        l.ping_interval,
    ]
    .into_iter()
    .flatten()
    .map(ms)
    .min()
    .unwrap_or(u64::MAX);
    (shortest / 8).clamp(tuning.tick_ms.max(1), 1_000)
}
