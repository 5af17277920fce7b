//! Close codes and close frames (RFC 6455 section 7.4).

use std::fmt;

/// A close status code that is valid on the wire.
///
/// Only codes that RFC 6455 and the IANA registry allow in a close frame can be held:
/// 1000-1003, 1007-1014 and 3000-4999. Codes 1004-1006 and 1015 are reserved for
/// local use and never sent; everything else is unassigned.
///
/// ```
/// use kythera_handler_api::CloseCode;
/// assert_eq!(CloseCode::new(4000).map(CloseCode::get), Some(4000));
/// assert!(CloseCode::new(1005).is_none());
/// assert_eq!(CloseCode::NORMAL.get(), 1000);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(u16);

impl CloseCode {
    /// 1000: the purpose of the connection has been fulfilled.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the server is going down (drain) or the client navigates away.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: the peer broke the protocol.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1003: a data type the endpoint cannot accept.
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// 1007: data inconsistent with the message type (invalid UTF-8 in a text message).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: a policy was violated (kythera: the peer stopped reading, slow consumer).
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    /// 1009: a message exceeded the configured size limit.
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// 1010: the client expected an extension the server did not negotiate.
    pub const MANDATORY_EXTENSION: CloseCode = CloseCode(1010);
    /// 1011: the server hit an unexpected condition (kythera: a gear panicked).
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// 1012: the service is restarting.
    pub const SERVICE_RESTART: CloseCode = CloseCode(1012);
    /// 1013: try again later.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
    /// 1014: a gateway received an invalid response from upstream.
    pub const BAD_GATEWAY: CloseCode = CloseCode(1014);
    /// 3409: kythera's code for a connection that lost one of its names to a
    /// connection on another node of the cluster (the two claimed it at the same time,
    /// or while the nodes could not reach Redis; Redis decided). From the range RFC 6455
    /// leaves to frameworks; 409 as in HTTP's Conflict.
    pub const NAME_CONFLICT: CloseCode = CloseCode(3409);

    /// The code, if it is valid on the wire.
    pub const fn new(code: u16) -> Option<CloseCode> {
        if Self::is_valid(code) {
            Some(CloseCode(code))
        } else {
            None
        }
    }

    /// Whether `code` may appear in a close frame.
    pub const fn is_valid(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }

    /// The numeric code.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Debug for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CloseCode({})", self.0)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl TryFrom<u16> for CloseCode {
    type Error = InvalidCloseCode;
    fn try_from(code: u16) -> Result<Self, Self::Error> {
        CloseCode::new(code).ok_or(InvalidCloseCode(code))
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> u16 {
        code.0
    }
}

/// A number that is not a valid close code on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidCloseCode(pub u16);

impl fmt::Display for InvalidCloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not a valid websocket close code", self.0)
    }
}

impl std::error::Error for InvalidCloseCode {}

/// The longest close reason that fits a control frame (125 bytes minus the 2-byte code).
pub const MAX_CLOSE_REASON_BYTES: usize = 123;

/// Cuts `reason` to at most [`MAX_CLOSE_REASON_BYTES`], at a character boundary, so that
/// a close frame never exceeds the control-frame limit and stays valid UTF-8.
pub fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON_BYTES {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_matches_rfc_ranges() {
        let valid: Vec<u16> = (0..=u16::MAX).filter(|&c| CloseCode::is_valid(c)).collect();
        assert_eq!(valid.len(), 4 + 8 + 2000);
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX] {
            assert!(CloseCode::new(bad).is_none(), "{bad}");
        }
        for good in [1000, 1003, 1007, 1014, 3000, 4999] {
            assert_eq!(CloseCode::try_from(good).unwrap().get(), good);
        }
    }

    #[test]
    fn reason_truncated_at_char_boundary() {
        let long = "é".repeat(100); // 200 bytes
        let cut = truncate_reason(&long);
        assert!(cut.len() <= MAX_CLOSE_REASON_BYTES);
        assert_eq!(cut.len(), 122);
        assert_eq!(truncate_reason("bye"), "bye");
    }
}
