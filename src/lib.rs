//! docker-rbd: a Docker storage driver that keeps container root filesystems
//! on Ceph RBD.

pub mod localstate;
pub mod mapper;
pub mod names;
pub mod units;
