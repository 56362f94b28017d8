//! A header and claims of any bytes (split at the first newline), correctly
//! signed with the legacy secret, so that claim parsing is reached.
#![no_main]

use std::sync::LazyLock;

use identity::fuzzing::TokenHarness;
use libfuzzer_sys::fuzz_target;

static HARNESS: LazyLock<TokenHarness> = LazyLock::new(|| TokenHarness::new().expect("the fuzzing harness"));

fuzz_target!(|data: &[u8]| {
    let (header, claims) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], data),
    };
    HARNESS.verify(&TokenHarness::signed(header, claims));
});
