//! UTF-8 validation for text that arrives in pieces.
//!
//! A piece may end inside a code point; the validator remembers where the last complete
//! code point ended and goes on from there when more bytes come, and fails at the first
//! byte that can never be valid, without waiting for the rest of the message.

use simdutf8::compat::from_utf8;

/// Outcome of validating what has arrived so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Utf8State {
    /// Everything so far is valid and ends on a code point boundary.
    Complete,
    /// Valid so far, but the last 1-3 bytes start a code point not finished yet.
    Incomplete,
    /// Invalid: no continuation can fix it.
    Invalid,
}

/// Validates a growing buffer, rescanning only what is new (plus at most 3 bytes of an
/// unfinished code point).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamingUtf8 {
    valid_up_to: usize,
}

impl StreamingUtf8 {
    /// Checks `buf[self.valid_up_to..]`; `buf` is everything received so far.
    pub fn feed(&mut self, buf: &[u8]) -> Utf8State {
        debug_assert!(self.valid_up_to <= buf.len());
        match from_utf8(&buf[self.valid_up_to..]) {
            Ok(_) => {
                self.valid_up_to = buf.len();
                Utf8State::Complete
            }
            Err(e) => match e.error_len() {
                // An invalid sequence: fail fast.
                Some(_) => Utf8State::Invalid,
                // The input ended inside a code point that may still complete.
                None => {
                    self.valid_up_to += e.valid_up_to();
                    Utf8State::Incomplete
                }
            },
        }
    }

    /// Forgets what was validated, for the next message.
    pub fn reset(&mut self) {
        self.valid_up_to = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_code_points() {
        let text = "κόσμε € 𝄞".as_bytes();
        for split in 0..=text.len() {
            let mut v = StreamingUtf8::default();
            let first = v.feed(&text[..split]);
            assert_ne!(first, Utf8State::Invalid, "split {split}");
            assert_eq!(v.feed(text), Utf8State::Complete, "split {split}");
        }
    }

    #[test]
    fn fails_at_first_bad_byte() {
        let mut v = StreamingUtf8::default();
        // "κόσμε" then 0xED 0xA0 0x80 (a UTF-16 surrogate: never valid), then more.
        let mut bytes = "κόσμε".as_bytes().to_vec();
        bytes.extend_from_slice(&[0xed, 0xa0]);
        assert_eq!(v.feed(&bytes), Utf8State::Invalid);
        let mut v = StreamingUtf8::default();
        assert_eq!(v.feed(&[0xf4, 0x90]), Utf8State::Invalid); // above U+10FFFF
        let mut v = StreamingUtf8::default();
        assert_eq!(v.feed(&[0xc0]), Utf8State::Invalid); // overlong, never valid
    }
}
