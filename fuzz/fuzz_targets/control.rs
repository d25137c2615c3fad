//! Fuzz target: the control socket's request parser
//! (`ferry_core::ControlRequest::parse`), on the first line of the input
//! as the pull reads it. A parsed request must print back to a line that
//! parses to the same request; nothing may panic.
#![no_main]

use ferry_core::{ControlParseError, ControlRequest, MAX_RATE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let line = data.split(|b| *b == b'\n').next().unwrap_or(data);
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    match ControlRequest::parse(line) {
        Ok(req) => {
            let printed = req.to_string();
            assert!(!printed.contains('\n'));
            assert_eq!(ControlRequest::parse(&printed), Ok(req));
        }
        // The error names the word as typed.
        Err(ControlParseError::BadRate(e)) => assert!(
            line.split_whitespace()
                .nth(1)
                .is_some_and(|w| e.to_string().contains(&format!("{w:?}"))),
            "{e}"
        ),
        Err(ControlParseError::RateTooHigh(v)) => assert!(v > MAX_RATE),
        Err(ControlParseError::Unknown(l)) => assert_eq!(l, line.trim()),
    }
});
