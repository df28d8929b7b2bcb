//! corral as a process: the serving threads ([`lanes`]), the owner of background
//! tasks ([`tasks`]) and systemd's readiness protocol ([`notify`]). Leaves: they
//! use no other part of corral.

pub mod lanes;
pub mod notify;
pub mod tasks;
