//! Any bytes as the JWKS document Clerk serves.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    identity::fuzzing::parse_jwks(data);
});
