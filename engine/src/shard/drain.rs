//! The graceful drain of a shard: closes (1001) spread over the drain window, the
//! listeners closed once the connections from before the drain are gone, and the end
//! of the shard once nothing is open or in flight.

use std::collections::VecDeque;
use std::io;

use tracing::{debug, info, warn};

use crate::driver::Driver;

use super::conn::{ConnFlags, conn_id, conn_in};
use super::{FORCED_CLOSE_GRACE_MS, Shard, ms};

/// The progress of a drain on this shard.
pub(super) struct Drain {
    pub(super) started_ms: u64,
    /// Connections to send the drain close to, in order.
    queue: VecDeque<(u32, u32)>,
    total: usize,
    forced: bool,
    /// Connections open when the drain started that are not closed yet.
    pub(super) before_left: usize,
    /// The listeners were closed (accepts cancelled).
    pub(super) listeners_closed: bool,
}

impl<D: Driver> Shard<D> {
    /// Starts the drain. The listeners stay open until the connections open now are
    /// gone or the drain window is over, so that `/healthz` can answer 503 to load
    /// balancers meanwhile; upgrades that arrive during the drain are refused with 503
    /// (`ServerDraining`) by the session.
    pub(super) fn start_drain(&mut self) -> io::Result<()> {
        info!(
            shard = self.index,
            connections = self.open,
            "draining: refusing upgrades, closing connections"
        );
        let mut queue = VecDeque::new();
        for (i, c) in self.conns.iter_mut().enumerate() {
            if let Some(c) = c {
                c.flags.set(ConnFlags::BEFORE_DRAIN, true);
                queue.push_back((i as u32, c.generation));
            }
        }
        self.drain = Some(Drain {
            started_ms: self.now_ms,
            total: queue.len(),
            before_left: queue.len(),
            queue,
            forced: false,
            listeners_closed: false,
        });
        self.close_listeners_when_done()
    }

    /// Closes the listeners once every connection open when the drain started is gone,
    /// or the drain window is over.
    pub(super) fn close_listeners_when_done(&mut self) -> io::Result<()> {
        let window_ms = ms(self.app.limits().drain_window);
        let Some(drain) = self.drain.as_mut() else {
            return Ok(());
        };
        let elapsed = self.now_ms.saturating_sub(drain.started_ms);
        if drain.listeners_closed || (drain.before_left > 0 && elapsed < window_ms) {
            return Ok(());
        }
        drain.listeners_closed = true;
        debug!(shard = self.index, "drain: closing the listeners");
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if l.armed {
                // The listener closes when the accept's last event arrives.
                if let Some(socket) = &l.socket {
                    self.driver.cancel_accept(i as u32, socket)?;
                }
            } else {
                l.socket = None;
            }
        }
        Ok(())
    }

    /// Sends the drain close to the share of connections due by now, and forces the
    /// rest closed once the window and the closing timeout have passed.
    pub(super) fn drain_step(&mut self) {
        let now_ms = self.now_ms;
        let window_ms = ms(self.app.limits().drain_window);
        let closing_ms = ms(self.app.limits().closing_timeout);
        let Some(drain) = self.drain.as_mut() else {
            return;
        };
        let elapsed = now_ms.saturating_sub(drain.started_ms);
        let due = if window_ms == 0 || elapsed >= window_ms {
            drain.total
        } else {
            // Proportional to the time elapsed, rounded up: the first ones go at once.
            ((drain.total as u128 * (u128::from(elapsed) + 1)).div_ceil(u128::from(window_ms)))
                as usize
        };
        let started = drain.total - drain.queue.len();
        let mut to_start = Vec::new();
        for _ in started..due.min(drain.total) {
            if let Some(item) = drain.queue.pop_front() {
                to_start.push(item);
            }
        }
        let force_now = !drain.forced && elapsed >= window_ms + closing_ms;
        if force_now {
            drain.forced = true;
        }
        for (index, generation) in to_start {
            // Sent to a new process (`handover`): it is the new process's to close,
            // unless that one goes away, when it comes back here to be drained.
            if conn_in(&mut self.conns, index).is_some_and(|c| c.flags.has(ConnFlags::PARKED)) {
                if let Some(drain) = self.drain.as_mut() {
                    drain.queue.push_back((index, generation));
                }
                continue;
            }
            let Some(conn) = conn_in(&mut self.conns, index) else {
                continue;
            };
            if conn.generation != generation {
                continue;
            }
            let id = conn_id(self.index, index, generation);
            if let Some(session) = conn.live_session() {
                session.start_drain(id, now_ms, &self.app, &mut self.regs);
            }
            self.touch(index);
        }
        if force_now {
            let open: Vec<u32> = self
                .conns
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    c.as_ref().is_some_and(|c| {
                        !c.flags.has(ConnFlags::CLOSE_SENT) && !c.flags.has(ConnFlags::PARKED)
                    })
                })
                .map(|(i, _)| i as u32)
                .collect();
            if !open.is_empty() {
                warn!(
                    shard = self.index,
                    connections = open.len(),
                    "drain window over: closing the remaining connections"
                );
            }
            for index in open {
                self.force(index);
            }
        }
    }

    /// Whether the shard may stop: draining, and nothing left open or in flight (or
    /// the grace after forcing closes has run out).
    pub(super) fn drained(&self) -> bool {
        if self.handing.is_some()
            && self.shared.handover.committed()
            && self.open == 0
            && self.driver.in_flight() == 0
        {
            // Everything was handed over (or closed), and the new process has it all.
            return true;
        }
        let Some(drain) = &self.drain else {
            return false;
        };
        if self.open == 0 && self.driver.in_flight() == 0 {
            return true;
        }
        let limits = self.app.limits();
        let give_up = ms(limits.drain_window) + ms(limits.closing_timeout) + FORCED_CLOSE_GRACE_MS;
        let elapsed = self.now_ms.saturating_sub(drain.started_ms);
        if elapsed >= give_up {
            warn!(
                shard = self.index,
                connections = self.open,
                in_flight = self.driver.in_flight(),
                "drain: giving up on operations that did not complete"
            );
            return true;
        }
        false
    }
}
