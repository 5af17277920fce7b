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

/// Validates text that arrives in pieces that are not kept together (a frame's
/// payload as it is appended to a buffer that also holds its header): remembers the
/// 1-3 bytes of a code point cut at the end of a piece and completes it with the first
/// bytes of the next.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChunkedUtf8 {
    carry: [u8; 4],
    carry_len: u8,
}

impl ChunkedUtf8 {
    /// A validator that goes on after `tail`: the unfinished code point at the end of
    /// what was validated before (at most 3 bytes; see [`StreamingUtf8::tail`]).
    pub fn after(tail: &[u8]) -> ChunkedUtf8 {
        let mut v = ChunkedUtf8::default();
        let n = tail.len().min(3);
        v.carry[..n].copy_from_slice(&tail[tail.len() - n..]);
        v.carry_len = n as u8;
        v
    }

    /// Validates the next piece.
    pub fn feed(&mut self, mut piece: &[u8]) -> Utf8State {
        if self.carry_len > 0 {
            // Complete the cut code point from the piece's first bytes, one at a time
            // (at most 3): it is valid once some prefix of 2-4 bytes is.
            let mut n = usize::from(self.carry_len);
            while n < 4 {
                let Some((&b, rest)) = piece.split_first() else {
                    self.carry_len = n as u8;
                    return match from_utf8(&self.carry[..n]) {
                        Err(e) if e.error_len().is_some() => Utf8State::Invalid,
                        _ => Utf8State::Incomplete,
                    };
                };
                self.carry[n] = b;
                n += 1;
                piece = rest;
                match from_utf8(&self.carry[..n]) {
                    Ok(_) => break,
                    Err(e) if e.error_len().is_some() => return Utf8State::Invalid,
                    Err(_) => {}
                }
            }
            if from_utf8(&self.carry[..n]).is_err() {
                return Utf8State::Invalid;
            }
            self.carry_len = 0;
        }
        match from_utf8(piece) {
            Ok(_) => Utf8State::Complete,
            Err(e) => match e.error_len() {
                Some(_) => Utf8State::Invalid,
                None => {
                    let tail = &piece[e.valid_up_to()..];
                    self.carry[..tail.len()].copy_from_slice(tail);
                    self.carry_len = tail.len() as u8;
                    Utf8State::Incomplete
                }
            },
        }
    }
}

impl StreamingUtf8 {
    /// The bytes at the end of `buf` (what [`StreamingUtf8::feed`] saw) that begin a
    /// code point not finished yet.
    pub fn tail<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.valid_up_to.min(buf.len())..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way of cutting valid and invalid texts into three pieces gives the
    /// answer of validating them whole, and an invalid one fails at the piece that
    /// holds the first bad byte.
    #[test]
    fn chunked_matches_whole_at_every_cut() {
        let texts: [&[u8]; 5] = [
            "κόσμε € 𝄞 ok".as_bytes(),
            b"abc\xed\xa0\x80def",
            b"\xf0\x9d\x84",
            b"ab\xc0\xafcd",
            "€".as_bytes(),
        ];
        for text in texts {
            let whole = std::str::from_utf8(text).is_ok();
            for i in 0..=text.len() {
                for j in i..=text.len() {
                    let mut v = ChunkedUtf8::default();
                    let states = [v.feed(&text[..i]), v.feed(&text[i..j]), v.feed(&text[j..])];
                    let invalid = states.contains(&Utf8State::Invalid);
                    let done = states[2] == Utf8State::Complete;
                    assert_eq!(
                        !invalid && done,
                        whole,
                        "{text:?} cut at {i}, {j}: {states:?}"
                    );
                }
            }
        }
        let mut v = ChunkedUtf8::after(&"€".as_bytes()[..2]);
        assert_eq!(v.feed(&"€".as_bytes()[2..]), Utf8State::Complete);
    }

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
