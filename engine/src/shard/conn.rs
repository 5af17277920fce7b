//! A connection's slot in its shard, the connection ids the registry routes by, and
//! the shard's side of registry deliveries.

use std::any::Any;

use kythera_handler_api::{CloseFrame, ConnId};
use kythera_registry::SharedFrame;

use crate::driver::Slot;
use crate::gear::{App, Deliveries, Registries};
use crate::session::Session;

/// The largest generation a connection id keeps (24 bits): enough that a message for
/// an old connection does not reach a later one in the same slot unless 2^24
/// connections used the slot in between.
pub(crate) const MAX_GENERATION: u32 = (1 << 24) - 1;

/// A connection's slot. Its socket is not stored: the slot's index is the socket's
/// (its direct descriptor, or its fd), and the driver knows which kind it uses.
pub(super) struct Conn {
    /// `None` while the peer address is read.
    pub(super) session: Option<Session>,
    /// Distinguishes this connection from earlier ones in the same slot (timers).
    pub(super) generation: u32,
    pub(super) flags: ConnFlags,
}

/// A connection's state bits (one `u32` rather than a `bool` each: memory per idle
/// connection is counted in bytes).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ConnFlags(u32);

impl ConnFlags {
    pub(super) const RECV_ARMED: u32 = 1;
    /// The recv saw end-of-file or an error: never re-armed.
    pub(super) const RECV_ENDED: u32 = 1 << 1;
    pub(super) const SHUTDOWN_SENT: u32 = 1 << 2;
    pub(super) const SHUTDOWN_IN_FLIGHT: u32 = 1 << 3;
    pub(super) const CLOSE_SENT: u32 = 1 << 4;
    /// Stop waiting for sends: shut down and close.
    pub(super) const FORCED: u32 = 1 << 5;
    pub(super) const FORCE_SCHEDULED: u32 = 1 << 6;
    /// A timer entry stands for the session's next deadline.
    pub(super) const TIMER_ARMED: u32 = 1 << 7;
    /// In the shard's list of connections to flush after this turn.
    pub(super) const TOUCHED: u32 = 1 << 8;
    /// Open when the drain started: the listeners stay open until every such
    /// connection is gone (or the drain window is over).
    pub(super) const BEFORE_DRAIN: u32 = 1 << 9;
    /// The recv was cancelled (a slow consumer: nothing it sends is read any more).
    pub(super) const RECV_CANCELLED: u32 = 1 << 10;
    /// The peer address is being read (the session starts when it arrives).
    pub(super) const PEER_PENDING: u32 = 1 << 11;
    /// A send is in flight (the driver holds its output).
    pub(super) const SENDING: u32 = 1 << 12;
    /// The connection speaks TLS (its state is in the shard's `tls_conns`).
    pub(super) const TLS: u32 = 1 << 13;
    /// Its recv was cancelled (or its socket is being detached) to hand it over to
    /// another process (`handover`).
    pub(super) const HANDOVER: u32 = 1 << 14;
    /// Handed over: the session is over here without `terminate`; only the close of
    /// this process's descriptor is left.
    pub(super) const MOVED: u32 = 1 << 15;
    /// Sent to a new process, which has not answered yet (`handover`): nothing may
    /// act on its session here (no timer, no delivery, no write), since the new
    /// process may own it already.
    pub(super) const PARKED: u32 = 1 << 16;
    /// Its send in flight is being stopped to hand it over (`handover`): the
    /// connection waits for the send's last event before it is detached.
    pub(super) const SEND_STOPPING: u32 = 1 << 17;

    pub(super) fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }

    pub(super) fn set(&mut self, bit: u32, on: bool) {
        if on {
            self.0 |= bit;
        } else {
            self.0 &= !bit;
        }
    }
}

impl Conn {
    /// Whether the connection is to be closed (by the session, or by force).
    pub(super) fn finished(&self) -> bool {
        if self.flags.has(ConnFlags::FORCED) {
            return true;
        }
        match &self.session {
            Some(session) => session.should_close(),
            None => !self.flags.has(ConnFlags::PEER_PENDING),
        }
    }

    /// The session, while the shard still talks to it.
    pub(super) fn live_session(&mut self) -> Option<&mut Session> {
        if self.flags.has(ConnFlags::FORCED) || self.flags.has(ConnFlags::PARKED) {
            return None;
        }
        self.session.as_mut().filter(|s| !s.should_close())
    }

    /// The connection as its driver names it.
    pub(super) fn slot(&self, index: u32) -> Slot {
        Slot {
            index,
            generation: self.generation,
        }
    }
}

pub(super) fn conn_in(conns: &mut [Option<Conn>], index: u32) -> Option<&mut Conn> {
    conns.get_mut(index as usize)?.as_mut()
}

/// A connection's id: the shard, the slot and the slot's generation, so that a
/// registry message finds its connection without a lookup table and never reaches a
/// later connection in the same slot (unless 2^24 connections used the slot between).
pub(super) fn conn_id(shard: usize, index: u32, generation: u32) -> ConnId {
    ConnId::new(
        shard as u8,
        (u64::from(generation & MAX_GENERATION) << 32) | u64::from(index),
    )
}

/// The slot and generation in a connection id made by [`conn_id`].
pub(super) fn conn_slot(id: ConnId) -> (u32, u32) {
    let raw = id.get();
    (raw as u32, ((raw >> 32) as u32) & MAX_GENERATION)
}

/// The shard's side of [`Deliveries`]: finds the connection by id and runs its session.
pub(super) struct ShardDeliveries<'a> {
    pub(super) conns: &'a mut Vec<Option<Conn>>,
    pub(super) touched: &'a mut Vec<u32>,
    pub(super) app: &'a App,
    pub(super) now_ms: u64,
}

impl ShardDeliveries<'_> {
    fn session(&mut self, id: ConnId) -> Option<(u32, &mut Session)> {
        let (index, generation) = conn_slot(id);
        let conn = conn_in(self.conns, index)?;
        if conn.generation != generation {
            return None;
        }
        if !conn.flags.has(ConnFlags::TOUCHED) {
            conn.flags.set(ConnFlags::TOUCHED, true);
            self.touched.push(index);
        }
        Some((index, conn.live_session()?))
    }
}

impl Deliveries for ShardDeliveries<'_> {
    fn message(&mut self, conn: ConnId, msg: &mut dyn Any, regs: &mut Registries) -> bool {
        let (now, app) = (self.now_ms, self.app);
        self.session(conn)
            .is_some_and(|(_, s)| s.on_server_message(conn, msg, now, app, regs))
    }

    fn frame(&mut self, conn: ConnId, frame: &SharedFrame, regs: &mut Registries) -> bool {
        let (now, app) = (self.now_ms, self.app);
        self.session(conn)
            .is_some_and(|(_, s)| s.on_published_frame(conn, frame, now, app, regs))
    }

    fn close(&mut self, conn: ConnId, close: Option<CloseFrame>, regs: &mut Registries) -> bool {
        let (now, app) = (self.now_ms, self.app);
        self.session(conn)
            .is_some_and(|(_, s)| s.on_published_close(conn, close, now, app, regs))
    }

    fn name_lost(&mut self, conn: ConnId, name: &str, regs: &mut Registries) -> bool {
        let (now, app) = (self.now_ms, self.app);
        self.session(conn)
            .is_some_and(|(_, s)| s.on_name_lost(conn, name, now, app, regs))
    }

    fn names_decided(&mut self, conn: ConnId, lost: Option<&str>, regs: &mut Registries) -> bool {
        let (now, app) = (self.now_ms, self.app);
        self.session(conn)
            .is_some_and(|(_, s)| s.on_names_decided(conn, lost, now, app, regs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory per idle connection is a goal in bytes (README, "Memory"): the slot of
    /// an open, idle connection is 56 bytes (with the session's 48), and the echo
    /// gear's state box 48 (`gear::tests`). Growing either should be a decision.
    #[test]
    fn an_idle_connection_slot_is_56_bytes() {
        assert_eq!(size_of::<Session>(), 48);
        assert_eq!(size_of::<Option<Conn>>(), 56);
    }

    #[test]
    fn conn_ids_round_trip() {
        let id = conn_id(3, 77, MAX_GENERATION);
        assert_eq!(conn_slot(id), (77, MAX_GENERATION));
    }
}
