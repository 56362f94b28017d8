//! Any bytes as an `import-users` file, read as CSV and as JSON Lines.
#![no_main]

use identity::domain::import::{ImportFormat, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse(data, ImportFormat::Csv);
    let _ = parse(data, ImportFormat::JsonLines);
});
