//! `Request::parse` + `classify` on any 28 header bytes and any export rules: never panics,
//! and whatever `classify` lets through obeys the spec (range inside the export, payload at
//! most `MAX_PAYLOAD`, no writes on a read-only export, documented flags only).
#![no_main]

use libfuzzer_sys::fuzz_target;
use thinpool_fuzz::harness::{check_request, rules_from};

fuzz_target!(|input: ([u8; 28], u64, u8)| {
    let (header, size, flags) = input;
    if let Err(e) = check_request(&header, &rules_from(size, flags)) {
        panic!("{e}");
    }
});
