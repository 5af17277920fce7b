//! The handshake phase: the upgrade request as it arrives, routing, the origin check,
//! `connect`, names that Redis decides, and the 101 with `init`, or a rejection.
//!
//! Separate because it is a phase of its own: a connection spends a few milliseconds
//! here, and what is here is done with once the 101 or a rejection is written.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};

use kythera_handler_api::{CloseCode, Conn, ConnId, RequestParts, TlsParts};
use tracing::{info, warn};

use super::callback::OutSink;
use super::output::tx;
use super::partial_frame::Partial;
use super::{Phase, Session, ms, panic_message};
use crate::gear::{Admission, App, Meta, Registries};
use crate::protocol::deflate::{Agreed, ConnDeflate, negotiate};
use crate::protocol::handshake::{
    MAX_HEADERS, Rejection, parse_request, validate_upgrade, write_response,
    write_switching_protocols,
};

/// A connection whose upgrade request is still arriving (the request's bytes so far
/// are in `Partial::pending`), or whose names Redis is deciding.
pub(super) struct Handshaking {
    pub(super) deadline_ms: u64,
    pub(super) peer: Option<SocketAddr>,
    /// The TLS session the request arrives over (`wss://`), for `connect`.
    pub(super) tls: Option<Box<TlsParts>>,
    /// `connect` accepted and claimed names of a clustered gear: the 101 waits for
    /// Redis to decide them ([`Session::on_names_decided`]).
    pub(super) awaiting: Option<Box<AwaitingNames>>,
}

/// A handshake that `connect` accepted, held until Redis decides the names it claimed:
/// everything needed to answer it then.
pub(super) struct AwaitingNames {
    conn: Conn,
    key: String,
    deflate: Option<Agreed>,
    admission: Admission,
    gear: usize,
    /// Where the client's first frames start in `Partial::pending` (after the head).
    head_len: usize,
}

/// At most this many bytes of frames may arrive after the request head while its names
/// are decided (clients wait for the 101; these are the ones that do not).
pub(super) const EARLY_BYTES_MAX: usize = 64 * 1024;

impl Session {
    /// The TLS session the connection runs over, once its TLS handshake is done (the
    /// shard calls this before the first decrypted byte): `connect` sees it in
    /// [`RequestParts::tls`]. Ignored after the upgrade request.
    pub fn set_tls(&mut self, parts: TlsParts) {
        let Some(hs) = self.tx.as_mut().and_then(|t| t.partial.as_mut()) else {
            return;
        };
        if let Some(h) = hs.handshake.as_mut() {
            h.tls = Some(Box::new(parts));
        }
    }

    /// When the upgrade request must be whole, during the handshake.
    pub(super) fn handshake_deadline_ms(&self) -> Option<u64> {
        let partial = self.tx.as_ref()?.partial.as_ref()?;
        let hs = partial.handshake.as_ref()?;
        Some(hs.deadline_ms)
    }

    /// Feeds the upgrade request; on success returns the bytes after its head.
    pub(super) fn handshake(
        &mut self,
        id: ConnId,
        hs: &mut Partial,
        data: &[u8],
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> Option<Vec<u8>> {
        hs.pending.extend_from_slice(data);
        let peer = hs.handshake.as_ref().and_then(|h| h.peer);
        let tls = hs.handshake.as_mut().and_then(|h| h.tls.take());
        let head = &hs.pending;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let req = match parse_request(head, &mut headers, app.limits().max_head_bytes) {
            Ok(Some(req)) => req,
            Ok(None) => return None,
            Err(rej) => return self.reject(rej, regs),
        };
        if !is_upgrade(&req)
            && let Some(answer) = app.http_answer(req.method, req.path)
        {
            let headers = [
                ("content-type", answer.content_type),
                ("cache-control", "no-store"),
            ];
            write_response(
                &mut tx(&mut self.tx).out,
                answer.status,
                headers,
                &answer.body,
            );
            return self.end_handshake();
        }
        let Some(routed) = app.route(req.path) else {
            return self.reject(Rejection::NotFound, regs);
        };
        self.gear = routed.gear as u32;
        let up = match validate_upgrade(&req) {
            Ok(up) => up,
            Err(rej) => return self.reject(rej, regs),
        };
        if !app.origin_allowed(routed.gear, req.header("origin"), req.header("host")) {
            return self.reject(Rejection::ForbiddenOrigin, regs);
        }
        let deflate = negotiate(
            req.header_all("sec-websocket-extensions"),
            &app.limits().deflate,
        );
        if app.is_draining() {
            return self.reject(Rejection::Draining, regs);
        }
        let Some(admission) = app.admit(routed.gear) else {
            return self.reject(Rejection::TooManyConnections, regs);
        };
        let parts = RequestParts {
            method: req.method.to_owned(),
            path: req.path.to_owned(),
            query: req.query.to_owned(),
            path_params: routed.params,
            headers: req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
            peer,
            tls: tls.map(|t| *t),
        };
        let key = up.key.to_owned();
        let head_len = req.head_len;
        let mut conn = match app.names(routed.gear) {
            Some(names) => Conn::with_names(id, parts, names),
            None => Conn::new(id, parts),
        };
        let gear = routed.gear;
        match catch_unwind(AssertUnwindSafe(|| app.connect(gear, &mut conn))) {
            Ok(Ok(())) => {}
            Ok(Err(resp)) => {
                release_names(&mut conn, app, gear);
                if let Some(c) = regs.counters(Some(gear)) {
                    c.rejected(resp.status());
                }
                let headers = resp.headers().iter().map(|(k, v)| (k.as_str(), v.as_str()));
                let out = &mut tx(&mut self.tx).out;
                write_response(out, resp.status(), headers, resp.body_bytes());
                return self.end_handshake();
            }
            Err(panic) => {
                release_names(&mut conn, app, gear);
                warn!(conn = %id, gear = app.pattern(gear), panic = panic_message(&panic), "connect panicked");
                write_response(&mut tx(&mut self.tx).out, 500, [], b"internal error");
                return self.end_handshake();
            }
        }
        let waiting = AwaitingNames {
            conn,
            key,
            deflate,
            admission,
            gear,
            head_len,
        };
        if regs.await_names(gear, id, waiting.conn.registered()) {
            if let Some(h) = hs.handshake.as_mut() {
                h.awaiting = Some(Box::new(waiting));
            }
            return None; // still handshaking: Redis decides the names
        }
        self.open(id, waiting, peer, now_ms, app, regs)
            .then(|| hs.pending[head_len..].to_vec())
    }

    /// Redis decided the names `connect` claimed (`lost`: one it lost): the handshake
    /// is answered with the 101 and `init` runs, or with 409. Returns false if the
    /// session was not waiting.
    pub fn on_names_decided(
        &mut self,
        id: ConnId,
        lost: Option<&str>,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> bool {
        if self.finished || !self.handshaking {
            return false;
        }
        let Some(mut hs) = self.take_partial() else {
            return false;
        };
        let Some(h) = hs.handshake.as_mut() else {
            self.put_partial(hs);
            return false;
        };
        let (peer, Some(waiting)) = (h.peer, h.awaiting.take()) else {
            self.put_partial(hs);
            return false;
        };
        let head_len = waiting.head_len;
        match lost {
            None => {
                if self.open(id, *waiting, peer, now_ms, app, regs) && hs.pending.len() > head_len {
                    let mut rest = hs.pending.split_off(head_len);
                    self.feed(id, &mut rest, now_ms, app, regs);
                }
            }
            Some(name) => {
                let AwaitingNames { mut conn, gear, .. } = *waiting;
                release_names(&mut conn, app, gear);
                if let Some(c) = regs.counters(Some(gear)) {
                    c.rejected(409);
                }
                let body = format!("name \"{name}\" is already taken");
                let headers = [("content-type", "text/plain; charset=utf-8")];
                write_response(&mut tx(&mut self.tx).out, 409, headers, body.as_bytes());
                self.end_handshake();
            }
        }
        true
    }

    /// Ends the handshake without an answer (timeout, peer gone, drain, shutdown).
    pub(super) fn give_up_handshake(&mut self, app: &App) {
        match self.take_partial() {
            Some(mut hs) => {
                self.abandon_handshake(&mut hs, app);
                self.put_partial(hs);
            }
            None => self.finished = true,
        }
    }

    /// Gives up a handshake (timeout, peer gone, drain, too many early bytes): the
    /// names it claimed are given back.
    pub(super) fn abandon_handshake(&mut self, hs: &mut Partial, app: &App) {
        if let Some(w) = hs.handshake.as_mut().and_then(|h| h.awaiting.take()) {
            let AwaitingNames { mut conn, gear, .. } = *w;
            release_names(&mut conn, app, gear);
        }
        self.finished = true;
    }

    /// Answers an accepted handshake with the 101 and runs `init`. Returns false if
    /// `init` panicked (the connection is closing with 1011).
    fn open(
        &mut self,
        id: ConnId,
        waiting: AwaitingNames,
        peer: Option<SocketAddr>,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> bool {
        let AwaitingNames {
            mut conn,
            key,
            deflate,
            admission,
            gear,
            ..
        } = waiting;
        let headers = conn
            .response_headers()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        let extensions = deflate.map(|agreed| agreed.response());
        write_switching_protocols(
            &mut tx(&mut self.tx).out,
            &key,
            conn.subprotocol(),
            extensions.as_deref(),
            headers,
        );
        self.pmd = deflate.map(|agreed| Box::new(ConnDeflate::new(agreed, &app.limits().deflate)));
        self.idle_deadline_ms = now_ms.saturating_add(ms(app.limits().idle_timeout));
        self.handshaking = false;
        self.phase = Phase::Done;
        let mut sink = OutSink::new(&mut self.tx, self.pmd.as_deref_mut());
        let init = catch_unwind(AssertUnwindSafe(|| {
            app.init(
                gear,
                &mut conn,
                &mut sink,
                Meta::new(peer, now_ms),
                admission,
                regs,
            )
        }));
        let outcome = sink.finish();
        match init {
            Ok(mut live) => {
                live.meta().frames_out += outcome.frames;
                if let Some(c) = regs.counters(Some(gear)) {
                    c.opened.add(1);
                    c.frames_out.add(outcome.frames);
                    c.bytes_out.add(outcome.bytes);
                }
                info!(conn = %id, gear = app.pattern(gear), peer = ?peer, "CONNECTED");
                self.phase = Phase::Open(live);
                self.after_callback(id, outcome, now_ms, app, regs);
                true
            }
            Err(panic) => {
                // No state was built, so there is nothing to terminate; what the
                // connection took in the registry is given back.
                release_names(&mut conn, app, gear);
                regs.remove_conn(gear, id);
                warn!(conn = %id, gear = app.pattern(gear), panic = panic_message(&panic), "init panicked");
                self.send_close(Some(CloseCode::INTERNAL_ERROR), "", regs);
                self.finished = true;
                false
            }
        }
    }

    fn reject(&mut self, rej: Rejection, regs: &mut Registries) -> Option<Vec<u8>> {
        if let Some(c) = regs.counters(self.gear()) {
            c.rejected(rej.status());
        }
        rej.write_response(&mut tx(&mut self.tx).out);
        self.end_handshake()
    }

    fn end_handshake(&mut self) -> Option<Vec<u8>> {
        self.handshaking = false;
        self.phase = Phase::Done;
        self.finished = true;
        None
    }
}

/// Whether the request asks for a WebSocket upgrade at all (plain GETs of the metrics,
/// health and static paths do not).
fn is_upgrade(req: &crate::protocol::handshake::Request<'_>) -> bool {
    req.header("upgrade").is_some_and(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"))
    })
}

/// Gives back the names `connect` or `init` registered, when the handshake fails.
fn release_names(conn: &mut Conn, app: &App, gear: usize) {
    let names = conn.take_registered();
    if let (Some(table), false) = (app.names(gear), names.is_empty()) {
        for name in names {
            let _ = table.unregister(conn.id(), &name);
        }
    }
}
