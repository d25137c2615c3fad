//! Fuzz target: the QUIC wire decoder (`ferry_transport::wire`) and the
//! manifest decoder (`ferry_core::Manifest::decode`, whose input arrives
//! as `ManifestBytes` frames). Whatever decodes must re-encode to the same
//! bytes; nothing may panic.
#![no_main]

use ferry_core::Manifest;
use ferry_transport::wire::{self, HEADER_LEN, MAX_FRAME_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A stream of frames, as a reader of a QUIC stream sees it.
    let mut rest = data;
    while let Ok((msg, used)) = wire::decode(rest) {
        assert!(used > HEADER_LEN && used <= rest.len());
        assert_eq!(msg.encode(), &rest[..used], "re-encoding differs");
        rest = &rest[used..];
    }
    // The body alone, by reference and by value (the reader's path).
    let by_ref = wire::decode_body(data);
    assert_eq!(wire::decode_body_owned(data.to_vec()), by_ref);
    // The header check with any limit.
    if let Some(h) = data.get(..HEADER_LEN) {
        let header: [u8; HEADER_LEN] = h.try_into().expect("4 bytes");
        let max = data
            .get(HEADER_LEN)
            .map_or(MAX_FRAME_LEN, |b| usize::from(*b) << 8);
        if let Ok(len) = wire::frame_len(header, max) {
            assert!(len > 0 && len <= max.min(MAX_FRAME_LEN));
        }
    }
    // The manifest, as the destination decodes what it was sent.
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(Manifest::decode(&m.encode()).as_ref(), Ok(&m));
    }
});
