//! Any bytes as the body of a Clerk webhook (what a signed delivery may carry).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    identity::fuzzing::parse_webhook(data);
});
