//! mirrormesh-alpine: what the project knows about real Alpine repositories, shared by the test-tree generator
//! (`mirrormesh gen-tree`, in the daemon crate) and the simulator (`mirrormesh-sim`), which must not depend on the
//! daemon.
//!
//! # Layout
//! - [`apkindex`]: reading `APKINDEX.tar.gz` (signed or unsigned) into packages (name, version, size, ...), and
//!   encoding the unsigned form the test-tree generator writes.
//! - [`profile`]: the package-size profile of a real index, so trees can be generated without any external file.

#![forbid(unsafe_code)]

pub mod apkindex;
pub mod profile;
