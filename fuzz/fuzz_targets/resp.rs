//! The RESP command parser never panics, whatever a client sends, and never hands
//! back more than it was given.
#![no_main]
use bytes::BytesMut;
use corral::fuzzing::{parse_resp as parse, Caps};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let caps = Caps {
        max_bulk: 1 << 16,
        max_args: 1 << 10,
        max_command: 1 << 17,
        unauthenticated: data.first() == Some(&0),
    };
    let mut total = 0;
    while let Ok(Some(args)) = parse(&mut buf, caps) {
        total += args.iter().map(|a| a.len()).sum::<usize>();
        assert!(total <= data.len());
    }
});
