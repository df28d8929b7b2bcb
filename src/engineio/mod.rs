//! Engine.IO: what a request on the Engine.IO path asks for ([`protocol`]), sids that
//! carry their route ([`sidtag`]), and the session table that sends every request of
//! a session to the worker that made it ([`router`]).

pub mod protocol;
pub mod router;
pub mod sidtag;
