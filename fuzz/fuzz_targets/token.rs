//! Any string as the `token` of VerifyToken, through the real verifier
//! (legacy HS256 and Clerk RS256 routing, size limit, cache, claims).
#![no_main]

use std::sync::LazyLock;

use identity::fuzzing::TokenHarness;
use libfuzzer_sys::fuzz_target;

static HARNESS: LazyLock<TokenHarness> = LazyLock::new(|| TokenHarness::new().expect("the fuzzing harness"));

fuzz_target!(|data: &[u8]| {
    HARNESS.verify(&String::from_utf8_lossy(data));
});
