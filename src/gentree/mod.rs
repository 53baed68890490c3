//! Test-tree generator (being written).
