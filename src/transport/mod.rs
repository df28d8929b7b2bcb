//! How bytes travel: the body adapters requests and answers stream through, and
//! the kept-alive connections to workers. It knows nothing of routing or sessions.

pub mod body;
pub mod upstream;
