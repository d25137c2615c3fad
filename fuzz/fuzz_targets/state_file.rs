//! Fuzz target: the state-file loader (`ferry_store::StateFile::open_on_boot`)
//! on files made through the public API and then damaged, or on raw bytes.
//! See `ferry_fuzz::state_file` for the input's layout.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_fuzz::state_file(data);
});
