//! mirrormesh: the daemon and command-line shell around the protocol core (`mirrormesh-proto`).

pub mod gentree;
