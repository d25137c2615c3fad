//! Fuzz target: the NBD server's transmission phase (request headers,
//! validation, WRITE payloads, DISC), after a fixed negotiation. The first
//! byte's low bit makes the export read-only; the rest is the client's
//! request stream.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, requests)) = data.split_first() else {
        return;
    };
    let mut stream = ferry_fuzz::nbd_export_name_prelude();
    stream.extend_from_slice(requests);
    ferry_fuzz::nbd_session(&stream, first & 1 != 0);
});
