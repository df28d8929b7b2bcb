//! corral as a process: the serving threads ([`lanes`]), the lifetime tree that owns
//! every task and thread and gives the one stop ([`life`]), and systemd's readiness
//! protocol ([`notify`]). Leaves: they use no other part of corral.

pub mod forker;
pub mod handover;
pub mod lanes;
pub mod life;
pub mod notify;
