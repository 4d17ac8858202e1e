//! docker-rbd: a Docker storage driver that keeps container root filesystems
//! on Ceph RBD.

pub mod config;
pub mod engine;
pub mod fs;
pub mod localstate;
pub mod mapper;
pub mod names;
pub mod plugin;
pub mod units;
