//! Unmasking client payloads (RFC 6455 section 5.3), in place.
//!
//! [`unmask`] is the fast path (aligned 8-byte words, which the compiler unrolls into
//! SIMD XORs: 16 bytes per instruction with the baseline x86-64 SSE2); [`unmask_reference`] is the byte-by-byte definition that tests and
//! the fuzz target compare it with. Both take `offset`, the position of `buf[0]` within
//! the payload, so that a payload can be unmasked in pieces as it arrives.

/// Byte-by-byte unmasking: `buf[i] ^= mask[(offset + i) % 4]`.
pub fn unmask_reference(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(offset + i) % 4];
    }
}

/// Unmasks `buf` in place, a machine word at a time (which the compiler unrolls into
/// SIMD XORs); same result as [`unmask_reference`].
#[inline]
pub fn unmask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    if buf.len() < 16 {
        unmask_reference(buf, mask, offset);
        return;
    }
    // SAFETY: `align_to_mut` splits `buf` into three disjoint parts, the middle one of
    // aligned u64 words; every bit pattern is a valid u8 and a valid u64, so viewing
    // the middle as words creates no invalid value.
    let (head, words, tail) = unsafe { buf.align_to_mut::<u64>() };
    unmask_reference(head, mask, offset);
    // The key starts the words where the head left off; 8-byte words keep the 4-byte
    // key in phase, so the tail continues from the same point.
    let phase = offset + head.len();
    let mut wide = [0u8; 8];
    for (i, b) in wide.iter_mut().enumerate() {
        *b = mask[(phase + i) % 4];
    }
    let key = u64::from_ne_bytes(wide);
    for w in words.iter_mut() {
        *w ^= key;
    }
    unmask_reference(tail, mask, phase);
}

/// Appends `src` to `dst` unmasked, in one pass: the same bytes as
/// `dst.extend_from_slice(src)` followed by [`unmask`] over them, with `offset` the
/// position of `src[0]` within the payload. This is how a payload that arrives in
/// pieces is gathered: each byte is read and written once.
#[inline]
pub fn extend_unmasked(dst: &mut Vec<u8>, src: &[u8], mask: [u8; 4], offset: usize) {
    let n = src.len();
    dst.reserve(n);
    let old_len = dst.len();
    let spare = &mut dst.spare_capacity_mut()[..n];
    // The key for 16 bytes at a time, in phase with `offset`.
    let mut key = [0u8; 16];
    for (i, k) in key.iter_mut().enumerate() {
        *k = mask[(offset + i) % 4];
    }
    let mut out = spare.chunks_exact_mut(16);
    let mut inp = src.chunks_exact(16);
    for (o, s) in (&mut out).zip(&mut inp) {
        for j in 0..16 {
            o[j].write(s[j] ^ key[j]);
        }
    }
    // 16 is a multiple of 4: the tail continues the same key from its start.
    for (j, (o, s)) in out
        .into_remainder()
        .iter_mut()
        .zip(inp.remainder())
        .enumerate()
    {
        o.write(s ^ key[j]);
    }
    // SAFETY: `spare` is the first `n` elements of `dst`'s spare capacity (reserved
    // above), and both loops together wrote every one of them: the chunks of 16 and
    // the remainder cover `spare` and `src` alike, which have the same length `n`.
    unsafe { dst.set_len(old_len + n) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extend_unmasked_equals_copy_then_reference() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let src: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..=100 {
            for start in 0..8 {
                for offset in 0..4 {
                    let piece = &src[start..start + len];
                    let mut want = vec![0xaa; 3];
                    want.extend_from_slice(piece);
                    unmask_reference(&mut want[3..], mask, offset);
                    let mut got = vec![0xaa; 3];
                    extend_unmasked(&mut got, piece, mask, offset);
                    assert_eq!(got, want, "len {len} start {start} offset {offset}");
                }
            }
        }
    }

    #[test]
    fn fast_equals_reference_every_length_and_alignment() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let src: Vec<u8> = (0..400u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..=300 {
            for align in 0..16 {
                for offset in 0..4 {
                    let mut a = src[align..align + len].to_vec();
                    // Put the slice at the same misalignment in a fresh buffer.
                    let mut backing = vec![0u8; len + 16];
                    backing[align..align + len].copy_from_slice(&a);
                    let b = &mut backing[align..align + len];
                    unmask_reference(&mut a, mask, offset);
                    unmask(b, mask, offset);
                    assert_eq!(&a[..], &b[..], "len {len} align {align} offset {offset}");
                }
            }
        }
    }

    #[test]
    fn unmasking_twice_is_identity() {
        let orig: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut buf = orig.clone();
        unmask(&mut buf, [1, 2, 3, 4], 0);
        assert_ne!(buf, orig);
        unmask(&mut buf, [1, 2, 3, 4], 0);
        assert_eq!(buf, orig);
    }

    #[test]
    fn pieces_equal_whole() {
        let mask = [9, 8, 7, 6];
        let orig: Vec<u8> = (0..257u32).map(|i| (i * 13) as u8).collect();
        let mut whole = orig.clone();
        unmask(&mut whole, mask, 0);
        for split in 0..orig.len() {
            let mut parts = orig.clone();
            let (a, b) = parts.split_at_mut(split);
            unmask(a, mask, 0);
            unmask(b, mask, split);
            assert_eq!(parts, whole, "split {split}");
        }
    }
}
