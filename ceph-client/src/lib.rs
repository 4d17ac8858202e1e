//! Safe Rust over librados and librbd.
