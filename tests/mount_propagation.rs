//! The plugin's Home is a private mount (`docker_rbd::fs::make_private`):
//! what is mounted below it stays in this mount namespace. Needs root;
//! skipped (not failed) when run bare without it, failed under
//! scripts/test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Mounts made by the test, and a process holding another mount
/// namespace; all undone on drop, failed test or not.
struct Cleanup {
    mounts: Vec<PathBuf>,
    holder: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(holder) = &mut self.holder {
            let _ = testkit::process::terminate(holder.id() as i32, Duration::from_secs(5));
            let _ = holder.wait();
        }
        for m in self.mounts.iter().rev() {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
    }
}

fn tmpfs(at: &Path, cleanup: &mut Cleanup) {
    std::fs::create_dir_all(at).unwrap();
    mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap_or_else(|e| panic!("mount tmpfs at {}: {e}", at.display()));
    cleanup.mounts.push(at.to_path_buf());
}

/// Whether the mount namespace of process `pid` has a mount at `at`.
fn seen_in(pid: u32, at: &Path) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(at.to_str().unwrap()))
}

#[test]
fn mounts_below_a_private_home_do_not_reach_other_namespaces() {
    let test = "mounts_below_a_private_home_do_not_reach_other_namespaces";
    if !testkit::require::check(test, testkit::require::root()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().canonicalize().unwrap();
    let mut cleanup = Cleanup {
        mounts: Vec::new(),
        holder: None,
    };
    // A shared mount, as dockerd's data root is on a systemd host, so that
    // what is mounted below it reaches every namespace that copied it.
    mount(
        Some(&top),
        &top,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    cleanup.mounts.push(top.clone());
    mount(
        None::<&str>,
        &top,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .unwrap();
    let (home, elsewhere) = (top.join("home"), top.join("elsewhere"));
    std::fs::create_dir_all(&home).unwrap();

    // Another mount namespace, made before the mounts below (a systemd
    // service's, a container's).
    let mut holder = Command::new("unshare")
        .args(["--mount", "--propagation", "unchanged", "sleep", "300"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn unshare");
    let pid = holder.id();
    let ns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/mnt")).ok();
    let started = std::time::Instant::now();
    while ns(pid) == ns(std::process::id())
        || std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| !exe.ends_with("sleep"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "unshare did not start sleep in a new namespace"
        );
        if let Ok(Some(status)) = holder.try_wait() {
            panic!("unshare exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cleanup.holder = Some(holder);

    docker_rbd::fs::make_private(&home).unwrap();
    cleanup.mounts.push(home.clone());
    assert_eq!(docker_rbd::fs::is_private_mount(&home), Some(true));
    // Again: nothing changes, nothing is stacked.
    docker_rbd::fs::make_private(&home).unwrap();
    let stacked = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(home.to_str().unwrap()))
        .count();
    assert_eq!(stacked, 1, "one bind mount of the Home");

    let (layer, control) = (home.join("mnt/layer"), elsewhere.join("mnt"));
    tmpfs(&layer, &mut cleanup);
    tmpfs(&control, &mut cleanup);
    assert!(
        seen_in(pid, &control),
        "the test's shared mount propagates (else it proves nothing)"
    );
    assert!(
        !seen_in(pid, &layer),
        "a mount below the private Home reached another namespace"
    );
    umount2(&layer, MntFlags::empty()).expect("the layer unmounts");
    cleanup.mounts.retain(|m| m != &layer);
}
