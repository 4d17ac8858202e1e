//! The RADOS-backed metadata store of docker-rbd.
