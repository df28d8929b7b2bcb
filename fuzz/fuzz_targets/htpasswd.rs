//! The htpasswd parser never panics, and what it accepts can be verified.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(users) = corral::fuzzing::parse_htpasswd(text) {
        for hash in users.values() {
            // bcrypt is skipped: its cost would slow the fuzzer to a crawl.
            if !matches!(hash, corral::fuzzing::Hash::Bcrypt(_)) {
                let _ = corral::fuzzing::verify(hash, "password");
            }
        }
    }
});
