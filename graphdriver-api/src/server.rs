//! The plugin HTTP server on a unix socket.
