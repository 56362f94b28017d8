//! The committed fuzz corpus (`fuzz/corpus/<target>`, grown by `fuzz/run.sh`)
//! replayed through the same entry points as the fuzz targets, so that an
//! input that once crashed stays fixed in the ordinary test run.

use identity::{
    domain::{
        ApiKeyRegistry,
        import::{ImportFormat, parse},
    },
    fuzzing::{KNOWN_USER, TokenHarness, bearer_key, parse_jwks, parse_webhook},
};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = format!("{}/fuzz/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.display().to_string(), std::fs::read(&path).unwrap())
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{dir} is empty");
    inputs
}

#[test]
fn the_fuzz_corpus_replays_without_a_panic() {
    let harness = TokenHarness::new().unwrap();
    for (_, input) in corpus("token") {
        harness.verify(&String::from_utf8_lossy(&input));
    }
    for (_, input) in corpus("token_signed") {
        let (header, claims) = match input.iter().position(|b| *b == b'\n') {
            Some(at) => (&input[..at], &input[at + 1..]),
            None => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], &input[..]),
        };
        harness.verify(&TokenHarness::signed(header, claims));
    }
    for (_, input) in corpus("jwks") {
        parse_jwks(&input);
    }
    for (_, input) in corpus("import") {
        let _ = parse(&input[..], ImportFormat::Csv);
        let _ = parse(&input[..], ImportFormat::JsonLines);
    }
    for (_, input) in corpus("webhook") {
        parse_webhook(&input);
    }
    for (_, input) in corpus("api_key") {
        if let Ok(text) = std::str::from_utf8(&input) {
            let _ = bearer_key(text);
            let _ = ApiKeyRegistry::parse(text);
        }
    }
}

#[test]
fn the_fuzzing_verifier_accepts_and_refuses_like_the_server() {
    // The harness is a working verifier, so the fuzzer explores real paths:
    // the known user's token is accepted, the same claims for an unknown
    // user or with a bad signature are not.
    let harness = TokenHarness::new().unwrap();
    let claims = |sub: &str| format!(r#"{{"sub":"{sub}","exp":4102444800,"iat":1700000000}}"#);
    let header = br#"{"alg":"HS256","typ":"JWT"}"#;
    let known = TokenHarness::signed(header, claims(KNOWN_USER).as_bytes());
    assert!(harness.verify(&known));
    assert!(harness.verify(&format!("Bearer {known}")));
    let unknown = TokenHarness::signed(header, claims(&uuid::Uuid::new_v4().to_string()).as_bytes());
    assert!(!harness.verify(&unknown));
    let at = known.rfind('.').unwrap() + 1;
    let flipped = if known.as_bytes()[at] == b'A' { 'B' } else { 'A' };
    let tampered = format!("{}{flipped}{}", &known[..at], &known[at + 1..]);
    assert!(!harness.verify(&tampered));
    assert!(!harness.verify("not-a-jwt"));
    let key = std::fs::read_to_string(format!(
        "{}/tests/fixtures/clerk_a.jwk.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    assert!(parse_jwks(format!(r#"{{"keys":[{key}]}}"#).as_bytes()));
    assert!(!parse_jwks(b"{\"keys\":[]}"));
    assert_eq!(bearer_key("Bearer  idk_x "), Some("idk_x"));
    assert_eq!(bearer_key("Basic abc"), None);
    // The webhook seeds: the events the endpoint acts on read, garbage does not.
    for (name, input) in corpus("webhook") {
        let expected = !name.ends_with("bad_email.json");
        assert_eq!(parse_webhook(&input), expected, "{name}");
    }
}
