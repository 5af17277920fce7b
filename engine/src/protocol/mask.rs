//! Unmasking client payloads (RFC 6455 section 5.3), in place or while copying.
//!
//! [`unmask`] is the fast path (SSE2 on x86-64, 64 then 16 bytes per step, then a
//! word-wide tail); [`unmask_ascii`] is the same pass for a whole text frame, telling
//! ASCII text apart so that it needs no UTF-8 pass; [`extend_unmasked`] unmasks while
//! appending (the same SSE2 loop), for frames gathered across receives and messages
//! staged in the output as their own echo, and [`extend_unmasked_text`] tells ASCII
//! apart as it goes. [`unmask_reference`] is the byte-by-byte definition that tests
//! and the fuzz target compare them with. [`unmask`] and [`extend_unmasked`] take
//! `offset`, the position of the first byte within the payload, so that a payload can
//! be unmasked in pieces as it arrives.

/// Byte-by-byte unmasking: `buf[i] ^= mask[(offset + i) % 4]`.
pub fn unmask_reference(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(offset + i) % 4];
    }
}

/// The key in phase with `offset` (the position of the first byte within the
/// payload): byte `i` is `mask[(offset + i) % 4]`. Rotating the little-endian word right
/// by 8 bits moves byte 1 to byte 0, so `offset % 4` such steps do it in one
/// instruction.
#[inline]
fn key_at(mask: [u8; 4], offset: usize) -> [u8; 4] {
    u32::from_le_bytes(mask)
        .rotate_right(8 * (offset % 4) as u32)
        .to_le_bytes()
}

/// Unmasks `buf` in place, 64 and then 16 bytes at a time (SSE2 XORs on x86-64, where
/// SSE2 is part of the baseline, so no feature detection is needed), whatever the
/// alignment of `buf`, then 8, 4 and single bytes; same result as [`unmask_reference`].
/// There is no aligned view to set up, so a short payload (a chat message of 20 bytes)
/// costs one chunk and a word rather than an alignment prologue and epilogue.
#[inline]
pub fn unmask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    unmask_and_check::<false>(buf, mask, offset);
}

/// Unmasks a whole text payload in place (as [`unmask`], `offset` 0) and, if every
/// byte is ASCII, returns it as text: the pass that unmasks also ORs the unmasked
/// chunks together (one more SSE2 instruction per 16 bytes), so that ASCII text, the
/// common case of chat and JSON messages, needs no second pass to be validated as
/// UTF-8. Anything else comes back as bytes, unmasked, for the caller to validate.
#[inline]
pub fn unmask_ascii(buf: &mut [u8], mask: [u8; 4]) -> Result<&str, &[u8]> {
    if unmask_and_check::<true>(buf, mask, 0) {
        return Err(buf);
    }
    // SAFETY: no byte of `buf` has its high bit set (just checked while unmasking), so
    // `buf` is ASCII, and ASCII is valid UTF-8.
    Ok(unsafe { std::str::from_utf8_unchecked(buf) })
}

/// [`unmask`], returning (when `CHECK`) whether any unmasked byte has its high bit set
/// (is not ASCII), else `false`.
#[inline(always)]
fn unmask_and_check<const CHECK: bool>(buf: &mut [u8], mask: [u8; 4], offset: usize) -> bool {
    let key = key_at(mask, offset);
    let whole = buf.len() & !15;
    let (body, mut rest) = buf.split_at_mut(whole);
    let mut high = chunks16::<CHECK>(body, key);
    // Under 16 bytes left: 8 and 4 at a time, then bytes. Every step takes a multiple
    // of 4 bytes, so the key stays in phase from its start.
    let k32 = u32::from_ne_bytes(key);
    let mut wide = 0u64;
    if rest.len() >= 8 {
        let (word, tail) = rest.split_at_mut(8);
        let k64 = (u64::from(k32) << 32) | u64::from(k32);
        let w = u64::from_ne_bytes((&*word).try_into().expect("8 bytes")) ^ k64;
        word.copy_from_slice(&w.to_ne_bytes());
        wide |= w;
        rest = tail;
    }
    if rest.len() >= 4 {
        let (word, tail) = rest.split_at_mut(4);
        let w = u32::from_ne_bytes((&*word).try_into().expect("4 bytes")) ^ k32;
        word.copy_from_slice(&w.to_ne_bytes());
        wide |= u64::from(w);
        rest = tail;
    }
    for (b, k) in rest.iter_mut().zip(key) {
        *b ^= k;
        wide |= u64::from(*b);
    }
    high |= wide & 0x8080_8080_8080_8080 != 0;
    CHECK && high
}

/// XORs `body` (a multiple of 16 bytes long) with `key` repeated; returns (when
/// `CHECK`) whether any resulting byte has its high bit set. SSE2 on x86-64, 64 bytes
/// per loop turn while that many are left (four independent XORs, so that one turn's
/// loads and stores overlap), then 16. Written with intrinsics because the compiler,
/// left to itself, rebuilds the broadcast key and the OR of the chunks byte by byte
/// around its vector loop (callgrind: 80 instructions more per 20-byte message).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn chunks16<const CHECK: bool>(body: &mut [u8], key: [u8; 4]) -> bool {
    debug_assert_eq!(body.len() % 16, 0);
    let base = body.as_mut_ptr();
    // SAFETY: `base` is valid for reads and writes of `body.len()` bytes (`body` is
    // borrowed mutably here), a multiple of 16; source and destination are the same.
    unsafe { xor_chunks16::<CHECK>(base, base, body.len(), key) }
}

/// The SSE2 loop of [`chunks16`] and [`copy_chunks16`]: writes the `len` bytes at
/// `from` XORed with `key` repeated to `to`, 64 bytes per loop turn while that many
/// are left (four independent XORs, so that one turn's loads and stores overlap), then
/// 16; returns (when `CHECK`) whether any byte written has its high bit set.
///
/// # Safety
/// `len` is a multiple of 16; `from` is valid for reads and `to` for writes of `len`
/// bytes; the two are the same pointer (in place) or the ranges do not overlap.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn xor_chunks16<const CHECK: bool>(
    from: *const u8,
    to: *mut u8,
    len: usize,
    key: [u8; 4],
) -> bool {
    use std::arch::x86_64::{
        __m128i, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi32,
        _mm_setzero_si128, _mm_storeu_si128, _mm_xor_si128,
    };
    // Every load and store below is unaligned and covers 16 bytes at `at` with
    // `at + 16 <= len` (the 64-byte turn runs while `at + 64 <= len`, the 16-byte one
    // while `at + 16 <= len`); a turn loads before it stores, so in place is fine.
    // SAFETY: SSE2 is in the x86-64 baseline, all these intrinsics need; every access
    // stays inside the `len` bytes the caller vouches for (above).
    unsafe {
        let k = _mm_set1_epi32(i32::from_le_bytes(key));
        let mut acc = _mm_setzero_si128();
        let mut at = 0;
        while at + 64 <= len {
            let p = from.add(at).cast::<__m128i>();
            let q = to.add(at).cast::<__m128i>();
            let a = _mm_xor_si128(_mm_loadu_si128(p), k);
            let b = _mm_xor_si128(_mm_loadu_si128(p.add(1)), k);
            let c = _mm_xor_si128(_mm_loadu_si128(p.add(2)), k);
            let d = _mm_xor_si128(_mm_loadu_si128(p.add(3)), k);
            _mm_storeu_si128(q, a);
            _mm_storeu_si128(q.add(1), b);
            _mm_storeu_si128(q.add(2), c);
            _mm_storeu_si128(q.add(3), d);
            if CHECK {
                acc = _mm_or_si128(acc, _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d)));
            }
            at += 64;
        }
        while at + 16 <= len {
            let v = _mm_xor_si128(_mm_loadu_si128(from.add(at).cast::<__m128i>()), k);
            _mm_storeu_si128(to.add(at).cast::<__m128i>(), v);
            if CHECK {
                acc = _mm_or_si128(acc, v);
            }
            at += 16;
        }
        CHECK && _mm_movemask_epi8(acc) != 0
    }
}

/// [`chunks16`] elsewhere: the same, a byte at a time (the compiler vectorises the XOR).
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn chunks16<const CHECK: bool>(body: &mut [u8], key: [u8; 4]) -> bool {
    let mut acc = 0u8;
    for chunk in body.chunks_exact_mut(16) {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b ^= key[i % 4];
            acc |= *b;
        }
    }
    CHECK && acc & 0x80 != 0
}

/// Appends `src` to `dst` unmasked, in one pass: the same bytes as
/// `dst.extend_from_slice(src)` followed by [`unmask`] over them, with `offset` the
/// position of `src[0]` within the payload. This is how a payload that arrives in
/// pieces is gathered, and how a whole one is staged as its own echo: each byte is
/// read and written once.
#[inline]
pub fn extend_unmasked(dst: &mut Vec<u8>, src: &[u8], mask: [u8; 4], offset: usize) {
    extend_unmasked_and_check::<false>(dst, src, mask, offset);
}

/// [`extend_unmasked`] for a whole text payload (`offset` 0), returning what it
/// appended as text if every byte is ASCII (the same OR of the unmasked bytes as in
/// [`unmask_ascii`]), else as bytes, for the caller to validate.
#[inline]
pub fn extend_unmasked_text<'a>(
    dst: &'a mut Vec<u8>,
    src: &[u8],
    mask: [u8; 4],
) -> Result<&'a str, &'a [u8]> {
    let at = dst.len();
    let high = extend_unmasked_and_check::<true>(dst, src, mask, 0);
    let text = &dst[at..];
    if high {
        return Err(text);
    }
    // SAFETY: no byte of `text` (the bytes just appended) has its high bit set (checked
    // while they were written), so it is ASCII, and ASCII is valid UTF-8.
    Ok(unsafe { std::str::from_utf8_unchecked(text) })
}

/// [`extend_unmasked`], returning (when `CHECK`) whether any byte appended has its
/// high bit set.
#[inline(always)]
fn extend_unmasked_and_check<const CHECK: bool>(
    dst: &mut Vec<u8>,
    src: &[u8],
    mask: [u8; 4],
    offset: usize,
) -> bool {
    let n = src.len();
    dst.reserve(n);
    let old_len = dst.len();
    let spare = &mut dst.spare_capacity_mut()[..n];
    let key = key_at(mask, offset);
    let whole = n & !15;
    let (body, tail) = spare.split_at_mut(whole);
    let mut high = copy_chunks16::<CHECK>(body, &src[..whole], key);
    // 16 is a multiple of 4: the tail continues the same key from its start.
    let mut acc = 0u8;
    for ((o, s), k) in tail.iter_mut().zip(&src[whole..]).zip(key.iter().cycle()) {
        let b = s ^ k;
        o.write(b);
        acc |= b;
    }
    high |= acc & 0x80 != 0;
    // SAFETY: `spare` is the first `n` elements of `dst`'s spare capacity (reserved
    // above), and `copy_chunks16` (its first `whole` bytes) and the tail loop (the
    // rest: `tail` and `src[whole..]` have the same length) wrote every one of them.
    unsafe { dst.set_len(old_len + n) };
    CHECK && high
}

/// Writes `src` XORed with `key` repeated into `dst` (both a multiple of 16 bytes
/// long, the same length); returns (when `CHECK`) whether any byte written has its
/// high bit set. SSE2 on x86-64, the loop of [`chunks16`] (left to itself, the
/// compiler did not vectorise the copy with the ASCII check: 7 µs of user time per
/// 16 KiB echo instead of under 1). Elsewhere a byte at a time.
#[inline(always)]
fn copy_chunks16<const CHECK: bool>(
    dst: &mut [std::mem::MaybeUninit<u8>],
    src: &[u8],
    key: [u8; 4],
) -> bool {
    assert_eq!(dst.len(), src.len());
    debug_assert_eq!(src.len() % 16, 0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `src` is valid for reads and `dst` for writes (writing initialises it) of
    // `src.len()` bytes (equal lengths, asserted above), a multiple of 16; they do not
    // overlap, as `dst` is borrowed mutably while `src` is borrowed.
    return unsafe { xor_chunks16::<CHECK>(src.as_ptr(), dst.as_mut_ptr().cast(), src.len(), key) };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let mut acc = 0u8;
        for (i, (o, s)) in dst.iter_mut().zip(src).enumerate() {
            let b = s ^ key[i % 4];
            o.write(b);
            acc |= b;
        }
        CHECK && acc & 0x80 != 0
    }
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
    fn extend_unmasked_text_appends_unmasked_and_tells_ascii_from_the_rest() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let text: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        for len in 0..=80 {
            let plain = &text[..len];
            let mut masked = plain.to_vec();
            unmask_reference(&mut masked, mask, 0);
            let mut dst = vec![0xff; 5];
            let got = extend_unmasked_text(&mut dst, &masked, mask);
            assert_eq!(got, Ok(std::str::from_utf8(plain).unwrap()), "len {len}");
            assert_eq!(&dst[5..], plain);
            // One byte with the high bit set, anywhere (the chunks and the tail).
            for at in 0..len {
                let mut other = plain.to_vec();
                other[at] = 0xc3;
                let mut masked = other.clone();
                unmask_reference(&mut masked, mask, 0);
                let mut dst = Vec::new();
                let got = extend_unmasked_text(&mut dst, &masked, mask);
                assert_eq!(got, Err(&other[..]), "len {len} at {at}");
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
    fn unmask_ascii_is_unmask_and_tells_ascii_from_the_rest() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let text: Vec<u8> = (0..300u32).map(|i| b'a' + (i % 26) as u8).collect();
        for len in 0..=100 {
            for start in 0..16 {
                let plain = &text[start..start + len];
                let mut masked = plain.to_vec();
                unmask_reference(&mut masked, mask, 0);
                let mut buf = masked.clone();
                assert_eq!(
                    unmask_ascii(&mut buf, mask),
                    Ok(std::str::from_utf8(plain).unwrap())
                );
                // One byte with the high bit set, anywhere: bytes come back, unmasked.
                for at in 0..len {
                    let mut other = plain.to_vec();
                    other[at] = 0xc3;
                    let mut buf = other.clone();
                    unmask_reference(&mut buf, mask, 0);
                    assert_eq!(
                        unmask_ascii(&mut buf, mask),
                        Err(&other[..]),
                        "len {len} at {at}"
                    );
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
