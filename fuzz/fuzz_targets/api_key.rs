//! Any string as the `authorization` metadata of a call, and as an
//! IDENTITY_API_KEYS configuration line.
#![no_main]

use std::sync::LazyLock;

use identity::{
    domain::{ApiKeyRegistry, Scope, generate_api_key},
    fuzzing::bearer_key,
};
use libfuzzer_sys::fuzz_target;

static KEYS: LazyLock<ApiKeyRegistry> = LazyLock::new(|| {
    let (_, line) = generate_api_key("fuzz", &[Scope::Verify]);
    ApiKeyRegistry::parse(&line).expect("a generated key parses")
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(key) = bearer_key(text) {
        KEYS.authenticate(key);
    }
    let _ = ApiKeyRegistry::parse(text);
});
