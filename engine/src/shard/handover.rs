//! A shard's part of a live handover ([`crate::handover`]): on the old process,
//! moving its connections out one by one as each can move; on the new one, adopting
//! the sockets that arrive and thawing their sessions.
//!
//! Out, per connection: the session says it can move ([`Readiness::Movable`]) → its
//! recv is cancelled (bytes that arrive meanwhile wait in the socket), and its send in
//! flight, if any, is stopped (what it did not send is queued again; nothing more is
//! sent meanwhile) → once both have ended, if it can still move, the driver makes a
//! plain descriptor of its socket → the session is frozen (with what it received of a
//! frame not whole yet and the output not sent) and the pair goes to the handover
//! thread → this process's descriptor is closed as for any connection, without
//! `terminate`. A connection that cannot move after all is read again and tried
//! later. One whose gear does not opt in gets 1001 as in a drain.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::mpsc;

use tracing::{debug, info, warn};

use crate::driver::{Driver, bump};
use crate::handover::{DEADLINE, Moved, ToNew, Verdict, socket};
use crate::session::{Readiness, Session};

use kythera_handler_api::ConnId;

use super::conn::{Conn, ConnFlags, conn_id, conn_in, conn_slot};
use super::{Shard, ms};

/// Connections looked at per turn, so that a shard with many keeps serving the others
/// while it hands over.
const VISIT_PER_TURN: usize = 1024;

/// Connections of a shard on their way to the new process at a time (recv cancelled,
/// not yet answered for).
const MAX_MOVING: usize = 64;

/// A connection sent to the new process, kept until it answers.
pub(super) struct Parked {
    generation: u32,
    /// Its names and groups, taken back should it stay.
    holdings: (Vec<String>, Vec<String>),
}

/// A handover under way on the old process.
pub(super) struct Handing {
    attempt: u64,
    started_ms: u64,
    /// Where frozen connections go (`None` once the attempt failed).
    outbox: Option<mpsc::Sender<ToNew>>,
    /// The next slot to look at.
    cursor: usize,
    /// The deadline passed: the rest were given 1001.
    expired: bool,
}

impl<D: Driver> Shard<D> {
    /// Starts, continues or abandons handing over, as the handover thread says.
    pub(super) fn handover_step(&mut self) -> io::Result<()> {
        let attempt = self.shared.handover.attempt();
        match &self.handing {
            None if attempt == 0 || self.drain.is_some() => return Ok(()),
            None => self.start_handover(attempt)?,
            Some(h) if h.attempt == attempt => {}
            Some(_) => {
                self.abort_handover()?;
                return Ok(());
            }
        }
        // Holding nothing, it says so, and stays up until the handover thread commits
        // (it might yet have to take connections back).
        if self.handing.is_some() {
            let empty = self.open == 0 && self.driver.in_flight() == 0;
            self.shared.handover.set_empty(self.index, empty);
        }
        let now_ms = self.now_ms;
        let Some(h) = self.handing.as_mut() else {
            return Ok(());
        };
        if !h.expired && now_ms.saturating_sub(h.started_ms) >= ms(DEADLINE) {
            h.expired = true;
            warn!(
                shard = self.index,
                connections = self.open,
                "handover deadline: closing the connections not handed over with 1001"
            );
            self.close_the_rest();
            return Ok(());
        }
        if h.expired {
            return Ok(());
        }
        let len = self.conns.len();
        if len == 0 {
            return Ok(());
        }
        // A connection's pause runs from its recv's cancel until the new process
        // reads it: with every connection cancelled at once, the last would wait for
        // all the others to cross. A few in transit at a time keep each pause short.
        let moving = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.flags.has(ConnFlags::HANDOVER) && !c.flags.has(ConnFlags::MOVED))
            .count();
        let mut budget = MAX_MOVING.saturating_sub(moving);
        let mut cursor = h.cursor.min(len);
        let mut visited = 0;
        while budget > 0 && visited < VISIT_PER_TURN.min(len) {
            if self.offer(cursor as u32)? {
                budget -= 1;
            }
            cursor = (cursor + 1) % len;
            visited += 1;
        }
        if let Some(h) = self.handing.as_mut() {
            h.cursor = cursor;
        }
        Ok(())
    }

    fn start_handover(&mut self, attempt: u64) -> io::Result<()> {
        let Some(outbox) = self.shared.handover.outbox() else {
            return Ok(());
        };
        info!(
            shard = self.index,
            connections = self.open,
            "handover: the new process accepts now; handing the connections over"
        );
        self.handing = Some(Handing {
            attempt,
            started_ms: self.now_ms,
            outbox: Some(outbox),
            cursor: 0,
            expired: false,
        });
        // The new process accepts on these sockets now; they stay open here so that
        // accepting can resume should it go away.
        for (i, l) in self.listeners.iter().enumerate() {
            if l.armed
                && let Some(socket) = &l.socket
            {
                self.driver.cancel_accept(i as u32, socket)?;
            }
        }
        Ok(())
    }

    /// The new process went away: keep everything not handed over, accept again.
    fn abort_handover(&mut self) -> io::Result<()> {
        warn!(
            shard = self.index,
            connections = self.open,
            parked = self.parked.len(),
            "handover aborted: serving the connections kept here, accepting again"
        );
        self.handing = None;
        self.shared.handover.set_empty(self.index, false);
        // Every answer the new process gave arrived before the abort was published:
        // settle those first, then take back the rest.
        self.take_acks();
        let parked: Vec<(u32, Parked)> = self.parked.drain().collect();
        for (index, parked) in parked {
            self.unpark(index, parked.holdings);
        }
        for listener in 0..self.listeners.len() as u32 {
            self.arm_accept(listener)?;
        }
        // Connections whose recv was cancelled are read again when its last event
        // arrives (`recv_paused`); those being detached, at `on_detached`.
        Ok(())
    }

    /// Closes every connection still here with 1001 (the deadline passed).
    fn close_the_rest(&mut self) {
        for index in 0..self.conns.len() as u32 {
            let now_ms = self.now_ms;
            let shard = self.index;
            let Some(conn) = conn_in(&mut self.conns, index) else {
                continue;
            };
            // Parked ones wait for the new process's answer: it may have them.
            if conn.flags.has(ConnFlags::MOVED) || conn.flags.has(ConnFlags::PARKED) {
                continue;
            }
            let id = conn_id(shard, index, conn.generation);
            if let Some(session) = conn.live_session() {
                session.start_drain(id, now_ms, &self.app, &mut self.regs);
                bump(&self.shared.stats[shard].handover_closed, 1);
            }
            self.touch(index);
        }
    }

    /// Starts moving one connection if it can move now (then `true`).
    fn offer(&mut self, index: u32) -> io::Result<bool> {
        let now_ms = self.now_ms;
        let shard = self.index;
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return Ok(false);
        };
        // A send in flight is no obstacle: it is stopped, and what it did not send
        // moves with the connection.
        let busy = ConnFlags::HANDOVER
            | ConnFlags::MOVED
            | ConnFlags::PEER_PENDING
            | ConnFlags::CLOSE_SENT
            | ConnFlags::FORCED;
        if conn.flags.has(busy) || !conn.flags.has(ConnFlags::RECV_ARMED) {
            return Ok(false);
        }
        let tls = conn.flags.has(ConnFlags::TLS);
        let id = conn_id(shard, index, conn.generation);
        let slot = conn.slot(index);
        let Some(session) = conn.live_session() else {
            return Ok(false);
        };
        let readiness = match session.handover_readiness() {
            // rustls cannot carry a connection's keys and sequence numbers over.
            Readiness::Movable if tls => Readiness::Never,
            r => r,
        };
        match readiness {
            Readiness::Busy => {}
            Readiness::Never => {
                debug!(conn = %id, "handover: cannot move; closing with 1001");
                session.start_drain(id, now_ms, &self.app, &mut self.regs);
                bump(&self.shared.stats[shard].handover_closed, 1);
                self.touch(index);
            }
            Readiness::Movable => {
                conn.flags.set(ConnFlags::HANDOVER, true);
                if conn.flags.has(ConnFlags::SENDING) {
                    conn.flags.set(ConnFlags::SEND_STOPPING, true);
                    self.driver.cancel_send(slot)?;
                }
                self.driver.cancel_recv(slot)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The recv of a connection being handed over has ended (and its send, if one was
    /// being stopped): detach its socket if it can still move, else read it again and
    /// try later.
    pub(super) fn recv_paused(&mut self, index: u32) {
        let still = self.handing.as_ref().is_some_and(|h| h.outbox.is_some());
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return;
        };
        if conn.flags.has(ConnFlags::SEND_STOPPING) {
            return; // `send_stopped` goes on once the send has stopped
        }
        let movable = still
            && !conn.flags.has(ConnFlags::SENDING)
            && conn
                .live_session()
                .is_some_and(|s| s.handover_readiness() == Readiness::Movable);
        if movable {
            let slot = conn.slot(index);
            if let Err(err) = self.driver.detach(slot) {
                warn!(shard = self.index, error = %err, "handover: cannot detach a socket");
                self.resume(index);
            }
        } else {
            self.resume(index);
        }
    }

    /// A send is over (`Sent`) or stopped (`Unsent`): if it was being stopped to hand
    /// the connection over and the recv has paused already, the handover goes on.
    pub(super) fn send_stopped(&mut self, index: u32) {
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return;
        };
        if !conn.flags.has(ConnFlags::SEND_STOPPING) {
            return;
        }
        conn.flags.set(ConnFlags::SEND_STOPPING, false);
        if conn.flags.has(ConnFlags::HANDOVER) && !conn.flags.has(ConnFlags::RECV_ARMED) {
            self.recv_paused(index);
        }
    }

    /// The send stopped to hand the connection over: what it did not send is queued
    /// again, to move with it (or to go out here if it stays).
    pub(super) fn on_unsent(&mut self, index: u32, output: crate::session::Output, sent: usize) {
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return;
        };
        conn.flags.set(ConnFlags::SENDING, false);
        if let Some(session) = conn.session.as_mut() {
            session.unsent(output, sent);
        }
        self.send_stopped(index);
        self.touch(index);
    }

    /// A connection stays: read it again.
    fn resume(&mut self, index: u32) {
        if let Some(conn) = conn_in(&mut self.conns, index) {
            conn.flags.set(ConnFlags::HANDOVER, false);
            self.rearm.push(index);
            self.touch(index);
        }
    }

    /// The connection's socket has a descriptor of its own now: freeze the session
    /// and send both; the connection is parked until the new process answers.
    pub(super) fn on_detached(
        &mut self,
        index: u32,
        result: Result<OwnedFd, i32>,
    ) -> io::Result<()> {
        let fd = match result {
            Ok(fd) => fd,
            Err(errno) if matches!(errno, libc::EINVAL | libc::EOPNOTSUPP) => {
                // IORING_OP_FIXED_FD_INSTALL needs Linux 6.8: without it no direct
                // descriptor can move, and asking again would only loop.
                warn!(
                    shard = self.index,
                    errno, "handover: this kernel cannot detach a socket; closing with 1001"
                );
                self.resume(index);
                self.close_with_1001(index);
                return Ok(());
            }
            Err(errno) => {
                warn!(
                    shard = self.index,
                    errno, "handover: detaching a socket failed"
                );
                self.resume(index);
                return Ok(());
            }
        };
        let now_ms = self.now_ms;
        let shard = self.index;
        let outbox = self.handing.as_ref().and_then(|h| h.outbox.clone());
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return Ok(());
        };
        let generation = conn.generation;
        let id = conn_id(shard, index, generation);
        let quiet = !conn.flags.has(ConnFlags::SENDING)
            && conn
                .live_session()
                .is_some_and(|s| s.handover_readiness() == Readiness::Movable);
        let frozen = match (&outbox, quiet) {
            (Some(_), true) => conn
                .session
                .as_mut()
                .and_then(|s| s.freeze(id, now_ms, &self.app, &mut self.regs)),
            _ => None,
        };
        let (Some(outbox), Some(frozen)) = (outbox, frozen) else {
            // Aborted meanwhile, or something came for it: it stays.
            drop(fd);
            self.resume(index);
            return Ok(());
        };
        let holdings = (frozen.names.clone(), frozen.groups.clone());
        if frozen.approximate_size() > socket::MAX_MESSAGE - 1024 {
            drop(fd);
            self.unpark(index, holdings);
            let carried = frozen.input.len() + frozen.output.len();
            if frozen.approximate_size() - carried > socket::MAX_MESSAGE - 1024 {
                // Too large for one message on the handover socket, however long it
                // waits.
                warn!(conn = %id, bytes = frozen.state.len(), "handover: the gear's frozen state is too large; closing with 1001");
                self.close_with_1001(index);
            }
            // Else the input or output it carries makes it too large: it waits for
            // them to shrink.
            return Ok(());
        }
        if outbox
            .send(ToNew::Conn(Moved { fd, conn: frozen }))
            .is_err()
        {
            // The handover thread gave up on this attempt at this moment.
            if let Some(h) = self.handing.as_mut() {
                h.outbox = None;
            }
            self.unpark(index, holdings);
            return Ok(());
        }
        if let Some(conn) = conn_in(&mut self.conns, index) {
            conn.flags.set(ConnFlags::PARKED, true);
        }
        self.parked.insert(
            index,
            Parked {
                generation,
                holdings,
            },
        );
        Ok(())
    }

    /// Closes a connection that cannot move with 1001, as a drain would (`terminate`
    /// runs here).
    fn close_with_1001(&mut self, index: u32) {
        let (now_ms, shard) = (self.now_ms, self.index);
        if let Some(conn) = conn_in(&mut self.conns, index) {
            let id = conn_id(shard, index, conn.generation);
            if let Some(session) = conn.live_session() {
                session.start_drain(id, now_ms, &self.app, &mut self.regs);
                bump(&self.shared.stats[shard].handover_closed, 1);
            }
        }
        self.touch(index);
    }

    /// A parked connection stays here after all: its names and memberships come back
    /// and it is read again.
    fn unpark(&mut self, index: u32, (names, groups): (Vec<String>, Vec<String>)) {
        let shard = self.index;
        if let Some(conn) = conn_in(&mut self.conns, index) {
            conn.flags.set(ConnFlags::PARKED, false);
            let id = conn_id(shard, index, conn.generation);
            if let Some(session) = conn.session.as_mut() {
                session.restore_holdings(id, &mut self.regs, &names, &groups);
            }
        }
        self.resume(index);
    }

    /// Old process: the new process's answers about parked connections.
    pub(super) fn take_acks(&mut self) {
        if !self.shared.handover.has_acks(self.index) {
            return;
        }
        let shard = self.index;
        for (origin, verdict) in self.shared.handover.take_acks(shard) {
            let (index, generation) = conn_slot(ConnId::new((origin >> 56) as u8, origin));
            let Some(parked) = self.parked.remove(&index) else {
                continue;
            };
            if parked.generation != generation {
                self.parked.insert(index, parked);
                continue;
            }
            match verdict {
                Verdict::Taken => {
                    let Some(conn) = conn_in(&mut self.conns, index) else {
                        continue;
                    };
                    conn.flags.set(ConnFlags::PARKED, false);
                    conn.flags.set(ConnFlags::MOVED, true);
                    let id = conn_id(shard, index, generation);
                    if let Some(session) = conn.session.as_mut() {
                        session.handed_over(id, &self.app, &mut self.regs);
                    }
                    bump(&self.shared.stats[shard].handover_moved, 1);
                    // The session is finished: the flush closes this process's
                    // descriptor (no shutdown: the socket is the new process's).
                    self.touch(index);
                }
                Verdict::Refused => {
                    // The new build refused it: 1001 from here, `terminate` here.
                    self.unpark(index, parked.holdings);
                    self.close_with_1001(index);
                }
                // Its message never left: it stays, read again.
                Verdict::Kept => self.unpark(index, parked.holdings),
            }
        }
    }

    /// New process: thaws the connections the handover thread left for this shard and
    /// asks the driver to adopt their sockets.
    pub(super) fn take_incoming(&mut self) -> io::Result<()> {
        if !self.shared.handover.has_incoming(self.index) {
            return Ok(());
        }
        // Frames relayed from the old process ahead of these connections wait in the
        // registry queues; a connection joins its groups only at a later turn
        // (`on_adopted`), and this turn's delivery must have emptied the queues by
        // then, or it could get a frame the old process already gave it. Under a
        // backlog larger than one turn's batch, the connections wait.
        if self.regs.inbound_len() > super::REGISTRY_BATCH {
            return Ok(());
        }
        for moved in self.shared.handover.take_incoming(self.index) {
            match Session::thaw_state(moved.conn, self.now_ms, &self.app) {
                Ok(thawed) => {
                    let token = self.next_adopt_token;
                    self.next_adopt_token = self.next_adopt_token.wrapping_add(1);
                    self.adopting.insert(token, thawed);
                    self.driver.adopt(moved.fd, token)?;
                }
                Err(frozen) => {
                    // The old process keeps it (and closes it with 1001).
                    info!(gear = frozen.gear, peer = ?frozen.peer, "handover: this build refuses the connection's state");
                    bump(&self.stats().handover_refused, 1);
                    self.shared.handover.answer(frozen.origin, Verdict::Refused);
                }
            }
        }
        Ok(())
    }

    /// New process: a socket from the old process has a slot; its session opens.
    pub(super) fn on_adopted(&mut self, token: u32, result: Result<u32, i32>) -> io::Result<()> {
        let Some(thawed) = self.adopting.remove(&token) else {
            return Ok(());
        };
        let origin = thawed.origin();
        let index = match result {
            Ok(index) => index,
            Err(errno) => {
                warn!(
                    shard = self.index,
                    errno, "handover: cannot adopt a socket; the old process keeps it"
                );
                bump(&self.stats().handover_failed, 1);
                self.shared.handover.answer(origin, Verdict::Refused);
                return Ok(());
            }
        };
        let generation = self.claim_slot(index);
        let id = conn_id(self.index, index, generation);
        let mut thawed = thawed;
        let mut input = thawed.take_input();
        let mut session = Session::adopted(thawed, id, self.now_ms, &self.app, &mut self.regs);
        // A frame half received there goes on here, ahead of what the socket holds.
        session.replay_input(id, &mut input, self.now_ms, &self.app, &mut self.regs);
        self.conns[index as usize] = Some(Conn {
            session: Some(session),
            generation,
            flags: Default::default(),
        });
        self.open += 1;
        // Counted as accepted here, so that open = accepted - closed holds.
        bump(&self.stats().accepted, 1);
        bump(&self.stats().handover_taken, 1);
        self.release.churned(self.now_ms);
        self.shared.handover.answer(origin, Verdict::Taken);
        self.touch(index);
        self.arm_recv(index)
    }
}
