//! The edge: where client connections arrive. It binds the listeners, accepts
//! (bounded in number), terminates TLS, serves HTTP/1.1 (plain requests on its own
//! loop, `fast`; the rest on hyper) and h2 on each connection with header and
//! keep-alive limits, and lets through the gate only requests that
//! are well formed, within the limits and authorised. It owns the sockets and the
//! client connections' tasks; what a request asks for is the proxy's business.

pub mod auth;
pub mod fast;
pub mod gate;
pub mod listen;
pub mod path;
pub mod status;
pub mod tls;
pub mod uproot;
