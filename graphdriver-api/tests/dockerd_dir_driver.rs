//! The protocol end to end: the example directory driver
//! (`examples/dir_driver.rs`, served in-process by `server::serve` with
//! `diff::NaiveDiff`) under a real private dockerd 20.10 driving import,
//! load, run, commit, diff, export, rm and rmi through it.

#[allow(dead_code)]
#[path = "../examples/dir_driver.rs"]
mod dir_driver;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dir_driver::DirDriver;
use graphdriver_api::server::{self, ServerConfig};
use testkit::dockerd::{Dockerd, DockerdConfig};
use testkit::images;

/// The driver served on `/run/docker/plugins/<name>.sock` from a thread of
/// the test; stopped (and its socket removed) on drop.
struct Plugin {
    driver: Arc<DirDriver>,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Plugin {
    fn start(name: &str) -> Plugin {
        Plugin::start_at(ServerConfig::for_plugin(name))
    }

    fn start_at(mut config: ServerConfig) -> Plugin {
        config.shutdown_grace = Some(Duration::from_secs(10));
        let socket = config.socket.clone();
        let driver = Arc::new(DirDriver::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = Arc::clone(&driver);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("runtime: {e}"))?;
            rt.block_on(server::serve(served, config, async move {
                let _ = stopped.await;
            }))
            .map_err(|e| format!("serve: {e}"))
        });
        let mut plugin = Plugin {
            driver,
            socket,
            stop: Some(stop),
            thread: Some(thread),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&plugin.socket).is_err() {
            if plugin.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let result = plugin.thread.take().map(|t| t.join());
                panic!("the plugin server ended before listening: {result:?}");
            }
            assert!(
                Instant::now() < deadline,
                "{} never accepted connections",
                plugin.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        plugin
    }

    /// Stops the server; returns how it ended.
    fn stop(&mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| "the plugin server panicked".to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("dir driver plugin: {e}");
        }
    }
}

fn lines_sorted(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text.lines().map(str::to_string).collect();
    v.sort();
    v
}

#[test]
fn dockerd_drives_the_dir_driver() {
    if !testkit::dockerd::require("dockerd_drives_the_dir_driver") {
        return;
    }
    let scratch = testkit::scratch_dir("dirdrv").unwrap();
    let rootfs = scratch.path().join("rootfs.tar");
    images::write_busybox_rootfs_tar(&rootfs).unwrap();
    let special = format!("{}:1", testkit::unique_name("special"));

    // A unique plugin name: tests in parallel each have their own socket.
    let name = testkit::unique_name("dirdrv");
    // Declared before dockerd, so dropped (stopped) after it.
    let mut plugin = Plugin::start(&name);
    let mut cfg = DockerdConfig::new(&name);
    cfg.name = "dirdrv".to_string();
    let d = Dockerd::start(cfg).unwrap();
    let status = d.docker_ok(["info", "--format", "{{json .DriverStatus}}"]);
    assert!(
        status.contains("Home") && status.contains(&name),
        "{status}"
    );
    let layers_dir = d.driver_home().join("layers");

    // docker import: one layer through Create + ApplyDiff.
    d.docker_ok([
        "import".as_ref(),
        rootfs.as_os_str(),
        "dirdrv-busybox:1".as_ref(),
    ]);
    assert_eq!(
        d.run_sh("dirdrv-busybox:1", "echo hi; ls /bin/sh"),
        "hi\n/bin/sh\n"
    );

    // docker load: three layers with whiteouts, an opaque directory,
    // hardlinks, a device node, setuid, an xattr (id, diff ids and every
    // special entry checked by load_special).
    d.load_special(&special, scratch.path());
    assert_eq!(d.run_sh(&special, "cat /x"), "layer3\n");

    // docker export: dockerd tars the container layer it gets from us.
    d.docker_ok(["create", "--network", "none", "--name", "fresh", &special]);
    images::check_special_export(&d.export("fresh", scratch.path())).unwrap();
    // A fresh container has no changes.
    assert_eq!(d.docker_ok(["diff", "fresh"]), "");

    // docker diff: Changes of the container layer against its -init layer.
    d.docker_ok([
        "run",
        "--network",
        "none",
        "--name",
        "changed",
        &special,
        "sh",
        "-c",
        "echo changed > /data/keep && rm /data/added && rm -r /data/opq && chmod 700 /data/owned \
         && mkdir /newdir && echo a > /newdir/f",
    ]);
    let diff = d.docker_ok(["diff", "changed"]);
    assert_eq!(
        lines_sorted(&diff),
        vec![
            "A /newdir",
            "A /newdir/f",
            "C /data",
            "C /data/keep",
            "C /data/owned",
            "D /data/added",
            "D /data/opq"
        ],
        "docker diff printed:\n{diff}"
    );
    // DiffSize (docker ps -s) answers.
    let size = d.docker_ok([
        "ps",
        "-a",
        "-s",
        "--filter",
        "name=changed",
        "--format",
        "{{.Size}}",
    ]);
    assert!(
        !size.trim().is_empty() && !size.starts_with("-1"),
        "size {size:?}"
    );

    // docker commit: Diff of the container layer applied to a new image layer.
    let committed = format!("{}:1", testkit::unique_name("committed"));
    d.docker_ok(["commit", "changed", &committed]);
    let layers = d.docker_ok([
        "image",
        "inspect",
        "-f",
        "{{len .RootFS.Layers}}",
        &committed,
    ]);
    assert_eq!(layers.trim(), "4");
    let out = d.run_sh(
        &committed,
        "cat /data/keep /newdir/f; ls /data; stat -c '%a %u:%g' /data/owned; cat /x",
    );
    assert_eq!(
        out,
        "changed\na\ncap\nfifo\nhard1\nhard2\nkeep\nlink\nnull\nowned\nsetuid\n700 1000:1000\nlayer3\n"
    );
    // The committed layer itself: exactly the container's changes.
    let save = scratch.path().join("committed.tar");
    d.docker_ok([
        "save".as_ref(),
        "-o".as_ref(),
        save.as_os_str(),
        committed.as_ref(),
    ]);
    let top = top_layer_entries(&std::fs::read(&save).unwrap());
    assert_eq!(
        top,
        vec![
            "data",
            "data/.wh.added",
            "data/.wh.opq",
            "data/keep",
            "data/owned",
            "newdir",
            "newdir/f"
        ],
        "top layer of the committed image"
    );

    // docker rm, docker rmi: every layer goes.
    d.docker_ok(["rm", "fresh", "changed"]);
    d.docker_ok(["rmi", &committed, &special, "dirdrv-busybox:1"]);
    assert_eq!(d.docker_ok(["images", "-aq"]), "");
    assert_eq!(d.docker_ok(["ps", "-aq"]), "");
    let left: Vec<_> = std::fs::read_dir(&layers_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "layers left in {}: {left:?}",
        layers_dir.display()
    );
    assert_eq!(
        plugin.driver.held(),
        Default::default(),
        "layers still held"
    );

    d.shutdown().unwrap();
    assert_eq!(
        plugin.driver.held(),
        Default::default(),
        "layers held after dockerd stopped"
    );
    plugin.stop().unwrap();
    assert!(
        !plugin.socket.exists(),
        "{} left behind",
        plugin.socket.display()
    );
}

/// dockerd in a host finds the plugin through a spec file in the host's
/// `/etc/docker/plugins`, pointing at a socket outside `/run/docker/plugins`.
#[test]
fn dir_driver_found_through_a_spec_file_in_a_host() {
    if !testkit::dockerd::require("dir_driver_found_through_a_spec_file_in_a_host") {
        return;
    }
    let scratch = testkit::scratch_dir("dirdrv-spec").unwrap();
    let rootfs = scratch.path().join("rootfs.tar");
    images::write_busybox_rootfs_tar(&rootfs).unwrap();
    let socket = scratch.path().join("plugin.sock");
    let mut plugin = Plugin::start_at(ServerConfig::at(&socket));
    let host = testkit::host::Host::new("spec").unwrap();
    let name = testkit::unique_name("dirspec");
    let mut cfg = DockerdConfig::new(&name).in_host(&host);
    cfg.plugin_specs
        .push((name.clone(), format!("unix://{}", socket.display())));
    let d = Dockerd::start(cfg).unwrap();
    assert!(
        host.path(format!("/etc/docker/plugins/{name}.spec"))
            .exists()
    );
    assert!(!std::path::Path::new(&format!("/etc/docker/plugins/{name}.spec")).exists());
    d.docker_ok([
        "import".as_ref(),
        rootfs.as_os_str(),
        "spec-busybox:1".as_ref(),
    ]);
    let out = d.docker_ok([
        "run",
        "--rm",
        "--network",
        "none",
        "spec-busybox:1",
        "cat",
        "/etc/group",
    ]);
    assert!(out.starts_with("root:x:0:"), "{out}");
    d.docker_ok(["rmi", "spec-busybox:1"]);
    let left = std::fs::read_dir(d.driver_home().join("layers"))
        .unwrap()
        .count();
    assert_eq!(left, 0);
    d.shutdown().unwrap();
    assert_eq!(host.processes(), Vec::<i32>::new());
    plugin.stop().unwrap();
    assert!(!socket.exists());
}

/// Entry names of the top layer of a `docker save` tarball, sorted.
fn top_layer_entries(save: &[u8]) -> Vec<String> {
    use std::io::Read;
    let mut files = std::collections::BTreeMap::new();
    for e in tar::Archive::new(save).entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        files.insert(path, data);
    }
    let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    let top = manifest[0]["Layers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let mut names: Vec<String> = tar::Archive::new(files[&top].as_slice())
        .entries()
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches('/')
                .to_string()
        })
        .collect();
    names.sort();
    names
}
