//! Inputs shared by the benchmarks: the same client frames for every implementation.

/// A masked client frame (FIN, one opcode, payload of `len` bytes), as a browser would
/// send it. Text payloads are ASCII so that every implementation validates the same
/// bytes.
pub fn masked_frame(len: usize, text: bool) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
    let opcode = if text {
        engine::protocol::OpCode::Text
    } else {
        engine::protocol::OpCode::Binary
    };
    let mut out = Vec::with_capacity(len + 14);
    engine::protocol::codec::encode_frame_into(
        &mut out,
        true,
        0,
        opcode,
        &payload,
        Some([0x37, 0xfa, 0x21, 0x3d]),
    );
    out
}
