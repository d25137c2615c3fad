//! Fuzz target: the NBD server's negotiation (fixed newstyle: client
//! flags, options, `NBD_OPT_INFO`/`GO` requests), driven through
//! `ferry_nbd::serve_connection` over an in-memory pipe. The input is the
//! client's whole byte stream; the server must end without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_fuzz::nbd_session(data, false);
});
