//! The two HTTP/1.1 readers of the fast paths (both in `http1::head`): a client's request head
//! and a worker's response head and chunked body (`http1::chunked`). Neither
//! panics, loses a byte, or lets a request with body framing through.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    corral::fuzzing::fuzz_request(data);
    corral::fuzzing::fuzz_response(data);
});
