//! The workers: the pool (each worker's state, load and health, and the choice of a
//! worker) and the supervisor (the worker processes: start, readiness, restart,
//! rolling restart, stop). The supervisor tells the pool what its processes do
//! through the pool's small interface; neither reaches into the other's state.

pub mod health;
pub mod pool;
pub mod procs;
pub mod supervisor;
