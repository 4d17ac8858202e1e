//! docker-rbd: a Docker storage driver that keeps container root filesystems
//! on Ceph RBD.
//!
//! Each image layer and container layer is an RBD image, a clone of its
//! parent layer's single `sealed` snapshot, so creating a layer costs the
//! same whatever its size. The pieces, from the bottom up:
//!
//! - [`config`]: the settings (`rbd.*` keys), where they come from and their
//!   precedence; every problem reported at once.
//! - [`names`]: validated Docker layer ids and the Ceph names derived from
//!   them; nothing a client sends names an object we do not own.
//! - [`mapper`]: how an RBD image becomes a block device here (krbd, nbd, or
//!   a FUSE file plus a loop device), behind one command-runner seam.
//! - [`fs`]: formatting, mounting, freezing and resizing layer filesystems.
//! - [`localstate`]: this host's crash-safe record of its mounts (redb).
//! - [`engine`]: the layer lifecycle on top of those and of the RADOS
//!   metadata store (`metadata` crate): create, seal, remove, get and put,
//!   startup recovery. It knows nothing of Docker's protocol.
//! - [`fleet`]: dockerd's image graph and containers mirrored into RADOS
//!   (export) and written into a booting dockerd's root (hydrate), so any
//!   host starts any stopped container of the fleet.
//! - [`crashpoint`]: named points where a debug build dies on request, for
//!   the tests that prove crash recovery.
//! - [`plugin`]: Docker's graphdriver protocol (`graphdriver-api` crate) on
//!   top of the engine; `docker-rbd serve` serves it on a unix socket.
//!
//! Boundaries: Ceph is reached only through the `ceph-client` crate, tools
//! and syscalls with side effects only through [`mapper::runner`] and
//! [`fs`], and Docker only through [`plugin`].

pub mod config;
pub mod crashpoint;
pub mod digest;
pub mod engine;
pub mod fleet;
pub mod fs;
pub mod localstate;
pub mod mapper;
pub mod names;
pub mod plugin;
pub mod units;

/// An error and its sources on one line, `a: b: c`, for a log field or a
/// message that carries another error's whole story.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
