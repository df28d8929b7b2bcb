//! The request path, once the edge has let a request in: which worker it goes to
//! (the router on the Engine.IO path, the pool elsewhere), the request and headers
//! as the worker gets them, one exchange with the retry rule, corral's own short
//! answers, and websocket tunnels. It owns the tunnels and the header and retry
//! rules; it keeps no session state and never marks a worker up.

pub mod answer;
pub mod forward;
pub(crate) mod frames;
pub mod relay;
pub mod route;
pub mod tunnel;
