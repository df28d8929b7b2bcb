//! The path normaliser never panics and its output has no way back up the tree.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(p) = corral::fuzzing::normalise(raw) {
        assert!(p.starts_with('/'), "{p:?}");
        assert!(!p.contains("//"), "{p:?}");
        assert!(!p.contains('\\'), "{p:?}");
        assert!(!p.split('/').any(|s| s == ".." || s == "."), "{p:?}");
        assert!(!p.contains('\0'), "{p:?}");
    }
});
