//! corral's HTTP/1.1 readers (`http1::head`, `http1::framing`, `http1::chunked`): a
//! client's request head and body, and a worker's response head and chunked body.
//! None panics or loses a byte.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    corral::fuzzing::fuzz_request(data);
    corral::fuzzing::fuzz_response(data);
});
