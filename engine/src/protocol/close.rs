//! Close frames: payload rules (RFC 6455 sections 5.5.1 and 7.4) and the closing
//! handshake, started by either side.
//!
//! The state machine keeps no clock: deadlines are milliseconds on whatever monotonic
//! clock the caller passes in.

use kythera_handler_api::CloseCode;

use super::error::ProtocolError;

/// A valid close frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosePayload<'a> {
    /// The status, or `None` for an empty payload.
    pub code: Option<CloseCode>,
    /// The reason (empty without a status).
    pub reason: &'a str,
}

/// Parses and validates a close payload: empty, or a valid code and a UTF-8 reason.
pub fn parse_close_payload(payload: &[u8]) -> Result<ClosePayload<'_>, ProtocolError> {
    match payload.len() {
        0 => Ok(ClosePayload {
            code: None,
            reason: "",
        }),
        1 => Err(ProtocolError::CloseFrameTooShort),
        _ => {
            let raw = u16::from_be_bytes([payload[0], payload[1]]);
            let code = CloseCode::new(raw).ok_or(ProtocolError::InvalidCloseCode(raw))?;
            let reason = simdutf8::basic::from_utf8(&payload[2..])
                .map_err(|_| ProtocolError::InvalidCloseReason)?;
            Ok(ClosePayload {
                code: Some(code),
                reason,
            })
        }
    }
}

/// Writes a close payload (code then reason) into `out`, returning its length. The
/// reason is cut to 123 bytes at a character boundary.
pub fn encode_close_payload(code: Option<CloseCode>, reason: &str, out: &mut [u8; 125]) -> usize {
    let Some(code) = code else { return 0 };
    let reason = kythera_handler_api::truncate_reason(reason);
    out[..2].copy_from_slice(&code.get().to_be_bytes());
    out[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
    2 + reason.len()
}

/// Where a connection is in the closing handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseState {
    /// Data flows both ways.
    Open,
    /// We sent close and wait for the peer's until `deadline_ms`; incoming data frames
    /// are read and dropped, control frames still count.
    CloseSent {
        /// When to give up waiting and close the socket.
        deadline_ms: u64,
    },
    /// Both closes have been exchanged (or we gave up): close the socket.
    Closed,
}

/// What to do after the peer's close frame arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerCloseAction {
    /// The peer started the handshake: answer with this close (its code echoed, per RFC
    /// 6455 section 5.5.1), then close the socket.
    Reply(Option<CloseCode>),
    /// The peer answered our close: close the socket.
    Finished,
}

/// The closing handshake of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    state: CloseState,
}

impl Default for Closing {
    fn default() -> Self {
        Closing {
            state: CloseState::Open,
        }
    }
}

impl Closing {
    /// The current state.
    pub fn state(&self) -> CloseState {
        self.state
    }

    /// Whether data messages should still reach the gear.
    pub fn is_open(&self) -> bool {
        self.state == CloseState::Open
    }

    /// We send close now. Returns false if a close was already sent (send nothing).
    pub fn local_close(&mut self, now_ms: u64, timeout_ms: u64) -> bool {
        match self.state {
            CloseState::Open => {
                self.state = CloseState::CloseSent {
                    deadline_ms: now_ms.saturating_add(timeout_ms),
                };
                true
            }
            _ => false,
        }
    }

    /// The peer's close frame arrived.
    pub fn peer_close(&mut self, code: Option<CloseCode>) -> PeerCloseAction {
        let action = match self.state {
            CloseState::Open => PeerCloseAction::Reply(code),
            _ => PeerCloseAction::Finished,
        };
        self.state = CloseState::Closed;
        action
    }

    /// The deadline for the peer's close, if one is running.
    pub fn deadline_ms(&self) -> Option<u64> {
        match self.state {
            CloseState::CloseSent { deadline_ms } => Some(deadline_ms),
            _ => None,
        }
    }

    /// Time passes: returns true when the peer's close is overdue (close the socket).
    pub fn poll_timeout(&mut self, now_ms: u64) -> bool {
        match self.state {
            CloseState::CloseSent { deadline_ms } if now_ms >= deadline_ms => {
                self.state = CloseState::Closed;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_rules() {
        assert_eq!(parse_close_payload(&[]).unwrap().code, None);
        assert_eq!(
            parse_close_payload(&[0x03]),
            Err(ProtocolError::CloseFrameTooShort)
        );
        let ok = parse_close_payload(&[0x03, 0xe8, b'b', b'y', b'e']).unwrap();
        assert_eq!(
            (ok.code.map(CloseCode::get), ok.reason),
            (Some(1000), "bye")
        );
        for bad in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let p = bad.to_be_bytes();
            let e = parse_close_payload(&p).unwrap_err();
            assert_eq!(e, ProtocolError::InvalidCloseCode(bad));
            assert_eq!(e.close_code().get(), 1002);
        }
        for good in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            assert!(parse_close_payload(&good.to_be_bytes()).is_ok(), "{good}");
        }
        let e = parse_close_payload(&[0x03, 0xe8, 0xff]).unwrap_err();
        assert_eq!(
            (e, e.close_code().get()),
            (ProtocolError::InvalidCloseReason, 1007)
        );
    }

    #[test]
    fn encode_round_trip() {
        let mut buf = [0u8; 125];
        let n = encode_close_payload(
            Some(CloseCode::GOING_AWAY),
            "server shutting down",
            &mut buf,
        );
        let p = parse_close_payload(&buf[..n]).unwrap();
        assert_eq!(p.code, Some(CloseCode::GOING_AWAY));
        assert_eq!(p.reason, "server shutting down");
        assert_eq!(encode_close_payload(None, "ignored", &mut buf), 0);
        let long = "ü".repeat(100);
        let n = encode_close_payload(Some(CloseCode::NORMAL), &long, &mut buf);
        assert!(n <= 125);
        assert!(parse_close_payload(&buf[..n]).is_ok());
    }

    #[test]
    fn peer_starts() {
        let mut c = Closing::default();
        assert_eq!(
            c.peer_close(Some(CloseCode::NORMAL)),
            PeerCloseAction::Reply(Some(CloseCode::NORMAL))
        );
        assert_eq!(c.state(), CloseState::Closed);
        assert!(
            !c.local_close(0, 1000),
            "no close after the handshake ended"
        );
    }

    #[test]
    fn server_starts_and_peer_answers() {
        let mut c = Closing::default();
        assert!(c.local_close(100, 5000));
        assert!(!c.is_open());
        assert!(!c.local_close(200, 5000), "close is sent once");
        assert!(!c.poll_timeout(5099));
        assert_eq!(c.peer_close(None), PeerCloseAction::Finished);
        assert_eq!(c.state(), CloseState::Closed);
    }

    #[test]
    fn server_starts_and_peer_never_answers() {
        let mut c = Closing::default();
        c.local_close(100, 5000);
        assert_eq!(c.deadline_ms(), Some(5100));
        assert!(!c.poll_timeout(5099));
        assert!(c.poll_timeout(5100));
        assert_eq!(c.state(), CloseState::Closed);
    }
}
