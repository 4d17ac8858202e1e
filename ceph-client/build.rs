// Debian's librados-dev and librbd-dev ship no pkg-config files, so link by
// name. The libraries come from `scripts/install-deps`.
fn main() {
    println!("cargo:rustc-link-lib=dylib=rbd");
    println!("cargo:rustc-link-lib=dylib=rados");
}
