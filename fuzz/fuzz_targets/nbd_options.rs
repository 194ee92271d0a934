//! `parse_go` / `parse_meta_query` on any option data (no panic; what parses re-encodes to the
//! same bytes), and round trips of well-formed encodings (whose truncations must be refused).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use thinpool_fuzz::harness::{check_go_round_trip, check_meta_round_trip, check_options};

#[derive(Debug, Arbitrary)]
enum Input {
    Raw(Vec<u8>),
    Go {
        name: Vec<u8>,
        infos: Vec<u16>,
    },
    Meta {
        name: Vec<u8>,
        queries: Vec<Vec<u8>>,
    },
}

fuzz_target!(|input: Input| {
    let r = match &input {
        Input::Raw(d) => check_options(d),
        Input::Go { name, infos } => check_go_round_trip(name, infos),
        Input::Meta { name, queries } => check_meta_round_trip(name, queries),
    };
    if let Err(e) = r {
        panic!("{e}");
    }
});
