//! The HTTP/1 vocabulary corral's one HTTP/1.1 stack speaks on both sides
//! (`edge::h1` serving clients, `transport::http1` to workers): each rule about a
//! message's framing and header fields is written here once, and every part that
//! needs it calls it. What a Content-Length says (digits only), the tokens of a
//! Connection header, whether a coding ends in `chunked`, the hop-by-hop fields,
//! the request target as a worker gets it, reading request and response heads
//! (`httparse`) and what a request head is refused for, reading a request body by
//! its framing (`body`), the chunked body reader, writing a request and a response
//! head, and the rules a request head must meet before corral acts on it (`check`).
//!
//! It is a leaf: it imports nothing else of corral, holds no state and does no I/O.
//! It must not decide policy (which forwarding headers a worker gets is the proxy's;
//! limits come from the config, passed in).

pub mod body;
pub mod check;
pub mod chunked;
pub mod encode;
pub mod fields;
pub mod framing;
#[doc(hidden)]
pub mod fuzz;
pub mod head;

pub use fields::{is_websocket_upgrade, origin_form, strip_hop_by_hop, wants_close};
pub use framing::{content_length, Error};
pub use head::{make_room, READ_SIZE};
