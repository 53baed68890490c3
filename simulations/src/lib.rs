//! mirrormesh-sim: a discrete-event simulator that drives the same protocol core (`mirrormesh-proto`) as the daemon,
//! in virtual time over a simulated network. The engine, scenarios and checkers arrive with the simulation issue;
//! today this crate only pins the dependency direction: the simulator depends on the core, never on the daemon.

pub use mirrormesh_proto as proto;
