//! A live server (one per process: a memory pool with one 1 MiB volume, on a unix socket) and
//! the input as a client. The first byte picks how:
//!
//! - 0..=3: the rest is a raw byte stream, from the first byte of the handshake (0) or behind a
//!   valid handshake (1 plain, 2 structured replies, 3 + `base:allocation`); the server must
//!   close once the client has (no hang);
//! - otherwise: the rest decodes to a `Script` run by the model client, which checks every
//!   reply (magics, cookies, errnos, chunk layout, data against a model of the volume).
//!
//! Either way a well-behaved client must then still complete a handshake and a READ.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thinpool_fuzz::fixture;
use thinpool_fuzz::harness::{Script, handshake_prefix};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fx = fixture();
    let r = match mode {
        0 => fx.raw_session(&[], rest).map(|_| ()),
        1..=3 => fx
            .raw_session(&handshake_prefix(mode >= 2, mode == 3), rest)
            .map(|_| ()),
        _ => fx.script_session(&Script::from_bytes(rest)).map(|_| ()),
    };
    if let Err(e) = r {
        panic!("{e}");
    }
});
