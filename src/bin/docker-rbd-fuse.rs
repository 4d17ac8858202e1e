//! `docker-rbd-fuse`: the FUSE server process of docker-rbd's fuse mapper.
//! One process serves one RBD image; the mapper starts it (see
//! `docker_rbd::mapper::fuse`).

fn main() -> std::process::ExitCode {
    docker_rbd::mapper::fuse::serve_main(std::env::args_os())
}
