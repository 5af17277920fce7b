//! A session leaving for another process, or arriving from one (live handover, see
//! [`crate::handover`]): what it must look like to move, and what moves.

use kythera_handler_api::ConnId;
use tracing::info;

use super::output::Tx;
use super::partial_frame::{Partial, unmask_started};
use super::{Phase, Session, ms};
use crate::gear::{App, LiveConn, Meta, Millis40, PeerAddr, Registries};
use crate::handover::FrozenConn;
use crate::protocol::codec::{OpCode, RSV1, encode_frame_into};
use crate::protocol::deflate::ConnDeflate;

/// The most received bytes a connection takes along to the new process (a frame half
/// received, a fragmented message in progress). With more it waits for the frame or
/// message to complete (or for the deadline): the handover socket carries one message
/// of at most 256 KiB per connection, gear state included.
pub(crate) const MAX_INPUT_MOVED: usize = 96 * 1024;

/// The most output a connection takes along to the new process (queued, or left
/// unsent by the send in flight, which is stopped); with more it waits for the client
/// to read.
pub(crate) const MAX_OUTPUT_MOVED: usize = 96 * 1024;

/// The most a connection's gear state, received bytes and output may take together on
/// the handover socket: one message, less room for its names, groups and fields
/// (checked again, exactly, once frozen).
const MAX_CARRIED: usize = crate::handover::socket::MAX_MESSAGE - 16 * 1024;

/// What was received of a frame or message not whole yet, as the client sent it: the
/// fragments of a message in progress as one frame (FIN clear, masked with a zero key,
/// RSV1 if it is compressed: still compressed, it is inflated once whole), then the
/// frame that is arriving, masked again. The new process reads these bytes first, as
/// if it had received them, before what the socket holds; so its decoder, UTF-8 check
/// and limits see the same message.
fn received_so_far(partial: &Partial) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some((binary, compressed, so_far)) = partial.decoder.assembler().message_so_far() {
        let opcode = if binary { OpCode::Binary } else { OpCode::Text };
        let rsv = if compressed { RSV1 } else { 0 };
        encode_frame_into(&mut out, false, rsv, opcode, so_far, Some([0; 4]));
    }
    let at = out.len();
    out.extend_from_slice(&partial.pending);
    // The payload there is unmasked already: unmasking is its own inverse.
    unmask_started(&mut out[at..], partial.decoder.config());
    out
}

/// How many received bytes [`received_so_far`] would carry.
fn received_len(partial: &Partial) -> usize {
    partial.pending.len() + partial.decoder.assembler().buffered_len()
}

/// Whether a session can be handed over now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Open, not closing, and its gear opts in; what was received of a frame or
    /// message and the output not sent yet move along (up to [`MAX_INPUT_MOVED`] and
    /// [`MAX_OUTPUT_MOVED`]; a send in flight is stopped first).
    Movable,
    /// Not now: a handshake, a closing handshake, more input or output than moves;
    /// ask again later (it finishes on this process if it closes).
    Busy,
    /// Never: its gear does not opt in, or permessage-deflate with context takeover
    /// (the compressor windows do not move): it is closed with 1001 instead.
    Never,
}

/// A handed-over connection's gear state, thawed, waiting for its socket's slot.
pub(crate) struct Thawed {
    gear: usize,
    live: Box<dyn LiveConn>,
    frozen: FrozenConn,
}

impl Thawed {
    /// Its connection id in the old process.
    pub(crate) fn origin(&self) -> u64 {
        self.frozen.origin
    }

    /// What the old process had received of a frame or message not whole yet, for
    /// [`Session::replay_input`].
    pub(crate) fn take_input(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.frozen.input)
    }
}

impl Session {
    /// Whether the session can be handed over now.
    pub(crate) fn handover_readiness(&self) -> Readiness {
        match (self.movable_state(), &self.phase) {
            // The gear's consent last: `freeze` serializes the state to say it. A state
            // too large to send never moves; one that fits only without what the
            // connection carries waits for that to shrink, before anything is taken
            // from it (its names would leave Redis and come back each turn).
            (Readiness::Movable, Phase::Open(live)) => match live.freeze() {
                None => Readiness::Never,
                Some(state) if state.len() > MAX_CARRIED => Readiness::Never,
                Some(state) if state.len() + self.carried_len() > MAX_CARRIED => Readiness::Busy,
                Some(_) => Readiness::Movable,
            },
            (r, _) => r,
        }
    }

    /// The received bytes and output a connection would carry to the new process
    /// (with room for the header of the frame its fragments become).
    fn carried_len(&self) -> usize {
        self.tx.as_ref().map_or(0, |tx| {
            tx.output_len() + tx.partial.as_deref().map_or(0, |p| received_len(p) + 14)
        })
    }

    /// [`Session::handover_readiness`] without asking the gear (which serializes its
    /// state): what the shard checks on every flush of a connection being handed over.
    pub(crate) fn movable_state(&self) -> Readiness {
        if self.handshaking || self.finished || self.terminated || self.abandoned {
            return Readiness::Busy;
        }
        if !matches!(self.phase, Phase::Open(_)) {
            return Readiness::Busy;
        }
        if let Some(pmd) = &self.pmd {
            let agreed = pmd.agreed();
            if !(agreed.server_no_context_takeover && agreed.client_no_context_takeover) {
                return Readiness::Never;
            }
        }
        if let Some(tx) = &self.tx
            && (!tx.closing.is_open()
                || tx.output_len() > MAX_OUTPUT_MOVED
                || tx
                    .partial
                    .as_deref()
                    .is_some_and(|p| received_len(p) > MAX_INPUT_MOVED))
        {
            return Readiness::Busy;
        }
        Readiness::Movable
    }

    /// What the new process needs of a [`Readiness::Movable`] session: its gear's
    /// frozen state, and its names, which leave this process's registry now, and
    /// memberships, which stay until the new process took it (what is published to
    /// them meanwhile cannot be delivered while it is parked, and is counted as
    /// dropped). The session stays
    /// until the new process says it took it ([`Session::handed_over`]) or not
    /// ([`Session::restore_holdings`]). `None` if the gear refused after all.
    pub(crate) fn freeze(
        &mut self,
        id: ConnId,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> Option<FrozenConn> {
        let gear = self.gear()?;
        let Phase::Open(live) = &mut self.phase else {
            return None;
        };
        let state = live.freeze()?;
        let meta = live.meta();
        let input = self
            .tx
            .as_ref()
            .and_then(|tx| tx.partial.as_deref())
            .map(received_so_far)
            .unwrap_or_default();
        let output = self
            .tx
            .as_ref()
            .map(|tx| tx.queued_copy())
            .unwrap_or_default();
        let (names, groups) = regs.take_holdings(gear, id);
        Some(FrozenConn {
            gear: app.pattern(gear).to_owned(),
            origin: id.get(),
            peer: meta.peer.get(),
            age_ms: now_ms.saturating_sub(meta.opened.get()),
            frames_in: meta.frames_in,
            frames_out: meta.frames_out,
            deflate: self.pmd.as_ref().map(|p| *p.agreed()),
            names: names.into_iter().map(String::from).collect(),
            groups: groups.into_iter().map(String::from).collect(),
            state,
            input,
            output,
        })
    }

    /// The connection stays after all (the new process went away, or refused it):
    /// its names and memberships come back.
    pub(crate) fn restore_holdings(
        &mut self,
        id: ConnId,
        regs: &mut Registries,
        names: &[String],
        groups: &[String],
    ) {
        // A session that ended meanwhile must not hold names again.
        if let Some(gear) = self.gear()
            && !self.terminated
            && matches!(self.phase, Phase::Open(_))
        {
            regs.restore(gear, id, names, groups);
        }
    }

    /// The new process took the connection: its state is dropped here without
    /// `terminate` (the new process calls it when the connection ends there), which
    /// gives back its place in the gear's limit.
    pub(crate) fn handed_over(&mut self, id: ConnId, app: &App, regs: &mut Registries) {
        // Nothing more is written here, whatever was queued: the new process owns the
        // socket now.
        if let Some(tx) = self.tx.as_mut() {
            tx.discard_queued();
        }
        self.finished = true;
        let was_open = !self.terminated;
        self.terminated = true;
        let Phase::Open(live) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return;
        };
        let mut live = live;
        let meta = live.meta();
        let (peer, frames_in, frames_out) = (meta.peer.get(), meta.frames_in, meta.frames_out);
        drop(live);
        if let Some(gear) = self.gear()
            && was_open
        {
            // Its connection handles answer `Closed` from now on.
            regs.remove_conn(gear, id);
            if let Some(c) = regs.counters(Some(gear)) {
                c.terminated.add(1);
            }
            info!(conn = %id, gear = app.pattern(gear), peer = ?peer, frames_in, frames_out, "HANDED OVER");
        }
    }

    /// New process: the gear state of a connection handed over, thawed, with a place
    /// in its gear's limit; `None` if this build refuses it (the gear is not mounted
    /// here, is full, or `thaw` said no).
    pub(crate) fn thaw_state(
        frozen: FrozenConn,
        now_ms: u64,
        app: &App,
    ) -> Result<Thawed, Box<FrozenConn>> {
        let Some(gear) = app.gear_by_pattern(&frozen.gear) else {
            return Err(Box::new(frozen));
        };
        let meta = Meta {
            frames_in: frozen.frames_in,
            frames_out: frozen.frames_out,
            peer: PeerAddr::new(frozen.peer),
            opened: Millis40::new(now_ms.saturating_sub(frozen.age_ms)),
        };
        let Some(admission) = app.admit(gear) else {
            return Err(Box::new(frozen));
        };
        match app.thaw(gear, &frozen.state, meta, admission) {
            Some(live) => Ok(Thawed { gear, live, frozen }),
            None => Err(Box::new(frozen)),
        }
    }

    /// New process: reads what the old process had received of a frame or message not
    /// whole yet ([`Thawed::take_input`]), before anything the socket holds; the shard
    /// then treats the session as after a receive.
    pub(crate) fn replay_input(
        &mut self,
        id: ConnId,
        input: &mut [u8],
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        if !input.is_empty() && !self.finished {
            self.feed(id, input, now_ms, app, regs);
        }
    }

    /// New process: the session of a connection handed over, once its socket has a
    /// slot here (`id`): open, with its names and memberships taken again.
    pub(crate) fn adopted(
        thawed: Thawed,
        id: ConnId,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> Session {
        let Thawed {
            gear,
            live,
            mut frozen,
        } = thawed;
        // What the old process had not sent goes first.
        let output = std::mem::take(&mut frozen.output);
        let tx = (!output.is_empty()).then(|| {
            let mut tx = Box::<Tx>::default();
            tx.out = output;
            tx
        });
        let failed = regs.restore(gear, id, &frozen.names, &frozen.groups);
        if failed > 0 {
            tracing::warn!(conn = %id, failed, "handover: names or groups not taken again");
        }
        if let Some(c) = regs.counters(Some(gear)) {
            c.opened.add(1);
        }
        info!(conn = %id, gear = frozen.gear, peer = ?frozen.peer, "TAKEN OVER");
        Session {
            gear: gear as u32,
            phase: Phase::Open(live),
            handshaking: false,
            abandoned: false,
            finished: false,
            terminated: false,
            idle_deadline_ms: now_ms.saturating_add(ms(app.limits().idle_timeout)),
            pmd: frozen
                .deflate
                .map(|agreed| Box::new(ConnDeflate::new(agreed, &app.limits().deflate))),
            tx,
        }
    }
}
