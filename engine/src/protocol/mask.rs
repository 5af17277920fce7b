//! Unmasking client payloads (RFC 6455 section 5.3), in place.
//!
//! [`unmask`] is the fast path (16 bytes per step, which the compiler turns into SIMD
//! loads and XORs); [`unmask_reference`] is the byte-by-byte definition that tests and
//! the fuzz target compare it with. Both take `offset`, the position of `buf[0]` within
//! the payload, so that a payload can be unmasked in pieces as it arrives.

/// Byte-by-byte unmasking: `buf[i] ^= mask[(offset + i) % 4]`.
pub fn unmask_reference(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(offset + i) % 4];
    }
}

/// Unmasks `buf` in place, 16 bytes at a time; same result as [`unmask_reference`].
#[inline]
pub fn unmask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    // Rotate the key so that it starts at buf[0]; from then on the pattern repeats
    // every 4 bytes, so a 16-byte word is the key four times over.
    let r = offset % 4;
    let key = [
        mask[r],
        mask[(r + 1) % 4],
        mask[(r + 2) % 4],
        mask[(r + 3) % 4],
    ];
    if buf.len() < 16 {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
        return;
    }
    let mut wide = [0u8; 16];
    for (i, b) in wide.iter_mut().enumerate() {
        *b = key[i % 4];
    }
    let key128 = u128::from_ne_bytes(wide);
    let mut chunks = buf.chunks_exact_mut(64);
    for chunk in &mut chunks {
        for lane in chunk.chunks_exact_mut(16) {
            xor16(lane, key128);
        }
    }
    let rest = chunks.into_remainder();
    let mut lanes = rest.chunks_exact_mut(16);
    for lane in &mut lanes {
        xor16(lane, key128);
    }
    // Whole 16-byte lanes keep the key aligned, so the tail starts at key[0] again.
    for (i, b) in lanes.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

#[inline(always)]
fn xor16(lane: &mut [u8], key: u128) {
    let mut word = [0u8; 16];
    word.copy_from_slice(lane);
    let x = u128::from_ne_bytes(word) ^ key;
    lane.copy_from_slice(&x.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

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
