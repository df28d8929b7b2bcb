//! How bytes travel: the body adapters requests and answers stream through, and
//! the kept-alive connections to workers, and the HTTP/1.1 exchange the request
//! path uses for requests whose body is in hand. It knows nothing of routing or
//! sessions.

pub mod body;
pub mod http1;
pub mod moving;
pub mod upstream;
