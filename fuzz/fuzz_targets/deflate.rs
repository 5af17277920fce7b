//! permessage-deflate: negotiation of arbitrary `Sec-WebSocket-Extensions` values, and
//! inflation of arbitrary bytes under a size limit.
//!
//! - `negotiate` never panics; an agreement is within the server's settings (windows
//!   9 to 15 and at most the configured ones, no-context-takeover where configured) and
//!   its response header parses back to the same agreement, as a client reads it.
//! - `Inflater::inflate` never panics, never grows its output past limit + 1 bytes of
//!   capacity, and fails with `MessageTooBig` exactly when the data inflates to more
//!   than the limit (checked against an unlimited inflation of the same bytes).
//! - Whatever the bytes, compressing them and inflating the result gives them back,
//!   for every window, with and without context takeover across two messages.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use kythera_engine::protocol::deflate::{Agreed, DeflateConfig, Deflater, Inflater, negotiate};
use kythera_engine::protocol::error::ProtocolError;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    headers: Vec<&'a [u8]>,
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_bits: u8,
    client_bits: u8,
    limit: u16,
    bits: u8,
    data: &'a [u8],
}

fuzz_target!(|data: &[u8]| {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(input);
    }
});

fn run(input: Input<'_>) {
    let cfg = DeflateConfig {
        server_no_context_takeover: input.server_no_context_takeover,
        client_no_context_takeover: input.client_no_context_takeover,
        server_max_window_bits: 9 + input.server_bits % 7,
        client_max_window_bits: 9 + input.client_bits % 7,
        ..DeflateConfig::default()
    };
    if let Some(agreed) = negotiate(input.headers.iter().copied(), &cfg) {
        assert!((9..=cfg.server_max_window_bits).contains(&agreed.server_max_window_bits));
        assert!((9..=15).contains(&agreed.client_max_window_bits));
        assert!(agreed.client_max_window_bits <= cfg.client_max_window_bits || agreed.client_max_window_bits == 15);
        if cfg.server_no_context_takeover {
            assert!(agreed.server_no_context_takeover);
        }
        if cfg.client_no_context_takeover {
            assert!(agreed.client_no_context_takeover);
        }
        let response = agreed.response();
        assert_eq!(Agreed::from_response(response.as_bytes()), Some(agreed), "{response}");
    }

    // Inflating arbitrary bytes under a limit.
    let limit = usize::from(input.limit);
    let mut limited = Vec::new();
    let got = Inflater::default().inflate(input.data, &mut limited, limit, true);
    assert!(limited.capacity() <= limit + 1, "{} > {limit} + 1", limited.capacity());
    let mut whole = Vec::new();
    let reference = Inflater::default().inflate(input.data, &mut whole, 1 << 24, true);
    match (&got, &reference) {
        (Ok(()), Ok(())) => assert_eq!(limited, whole),
        (Err(ProtocolError::MessageTooBig), Ok(())) => assert!(whole.len() > limit),
        (Err(ProtocolError::MessageTooBig), Err(_)) => {}
        (Err(e), Err(r)) => assert_eq!(e, r),
        (Ok(()), Err(r)) => panic!("inflated under the limit, refused without it: {r}"),
        (Err(e), Ok(())) => panic!("refused under the limit ({e}), inflated without it"),
    }

    // Round trips.
    let bits = 9 + input.bits % 7;
    for reset in [true, false] {
        let (mut d, mut i) = (Deflater::new(1, bits), Inflater::new(bits));
        for _ in 0..2 {
            let mut wire = Vec::new();
            d.compress(input.data, &mut wire, reset);
            let mut back = Vec::new();
            i.inflate(&wire, &mut back, input.data.len(), reset)
                .expect("our own compression inflates");
            assert_eq!(back, input.data);
        }
    }
}
