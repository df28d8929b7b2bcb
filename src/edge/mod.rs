//! The edge: where client connections arrive. It binds the listeners, accepts
//! (bounded in number), terminates TLS, serves HTTP/1.1 (its own session, `h1`)
//! and h2 (hyper's) on each connection with header and keep-alive limits, and lets
//! through the gate only requests that
//! are well formed, within the limits and authorised. It owns the sockets and the
//! client connections' tasks; what a request asks for is the proxy's business.

pub mod auth;
pub mod gate;
pub mod h1;
pub mod listen;
pub mod path;
pub mod status;
pub mod tls;
pub mod uproot;
