//! Acceptance tests of the fleet: several dockerd hosts on one machine
//! (each its own mount namespace, data root, `docker-rbd serve` and host
//! id; [`testkit::fleet`]) sharing one Ceph cluster and RADOS namespace.
//! Images and containers made on one host appear on hosts that boot with
//! an empty data root, and containers start there with their data.
//!
//! Needs root, /dev/fuse, /dev/loop-control, dockerd and the test cluster;
//! skipped when run bare without them, failed under `scripts/test`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use ceph_client::WriteOp;
use metadata::{ContainerRecord, ContainerState, Store};
use testkit::fleet::{Fleet, FleetHost};
use testkit::images;

const PLUGIN_BIN: &str = env!("CARGO_BIN_EXE_docker-rbd");

/// How long a test waits for the fleet to show a change. Exports land in
/// milliseconds (the tests print the figures); the bound is generous
/// because CI machines are slow and run several fleets at once.
const RECORD_WAIT: Duration = Duration::from_secs(60);

/// The moving container's program: the first run writes 50 MiB and its
/// checksum (synced: `sync -f`, which syncs this filesystem only; a plain
/// `sync` would wait on every filesystem of the machine, another host's
/// frozen one too); every run checks the checksum, adds a line to a log
/// and prints how many runs the log holds.
const MOVER: &str = "[ -f /data/sum ] || { mkdir -p /data && \
     dd if=/dev/urandom of=/data/blob bs=1M count=50 conv=fsync 2>/dev/null && \
     sha256sum /data/blob > /data/sum && sync -f /data; }; \
     sha256sum -c /data/sum && echo run >> /data/log && sync -f /data && echo runs=$(wc -l < /data/log)";

fn store(fleet: &Fleet) -> Store {
    Store::new(fleet.ioctx().clone(), "docker-rbd.")
}

fn container_id(h: &FleetHost, name: &str) -> String {
    h.ok(["inspect", "-f", "{{.Id}}", name]).trim().to_string()
}

/// `docker images` as `id repo:tag` lines.
fn image_list(h: &FleetHost) -> BTreeSet<String> {
    h.ok([
        "images",
        "--no-trunc",
        "--format",
        "{{.ID}} {{.Repository}}:{{.Tag}}",
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

/// `docker ps -a` as `id name status-word` lines (`Up` or `Exited`...).
fn containers(h: &FleetHost) -> BTreeSet<String> {
    h.ok([
        "ps",
        "-a",
        "--no-trunc",
        "--format",
        "{{.ID}} {{.Names}} {{.State}}",
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

fn import_busybox(h: &FleetHost, dir: &Path, tag: &str) {
    let rootfs = dir.join("busybox-rootfs.tar");
    if !rootfs.exists() {
        images::write_busybox_rootfs_tar(&rootfs).unwrap();
    }
    h.ok(["import".as_ref(), rootfs.as_os_str(), tag.as_ref()]);
}

/// Waits until `check` holds for container `id`'s fleet record; returns how
/// long that took.
#[track_caller]
fn wait_record(
    fleet: &Fleet,
    id: &str,
    timeout: Duration,
    check: impl Fn(&ContainerRecord) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let last = store(fleet).containers().get(id).unwrap();
        if let Some(r) = &last
            && check(&r.value)
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "container {id}: the fleet record did not get there within {timeout:?}; it is {:?}",
            last.map(|r| (
                config_running(&r.value),
                r.value.state,
                r.value.active_on,
                r.value.exported_by
            ))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until host `host` no longer holds tag `reference` in the fleet:
/// its plugin has seen the `rmi` and dropped what it no longer has.
fn wait_tag_released(fleet: &Fleet, reference: &str, host: &str) {
    let deadline = Instant::now() + RECORD_WAIT;
    loop {
        let tags = store(fleet).docker_tags().list().unwrap();
        let held = tags.iter().any(|(key, r)| {
            key.ends_with(reference) && r.as_ref().is_ok_and(|r| r.value.holders.contains(host))
        });
        if !held {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host} still holds {reference} in the fleet"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `fsck.ext4 -n -f` of RBD image `image` of the fleet, mapped read-only
/// through a fuse mapper of the test's own; the fsck output, or why it
/// found the filesystem damaged.
fn fsck_image(fleet: &Fleet, image: &str) -> Result<String, String> {
    use docker_rbd::mapper::fuse::{FuseConfig, FuseMapper, HelperCommand};
    use docker_rbd::mapper::{CephConnection, MapRequest};
    let ceph = testkit::ceph::env()?;
    let dir = testkit::scratch_dir("fleet-fsck")?;
    let mut config = FuseConfig::new(CephConnection {
        conf: Some(ceph.conf.clone()),
        id: Some(ceph.id.clone()),
        keyring: Some(ceph.keyring.clone()),
        cluster: None,
    });
    config.run_dir = dir.path().join("run");
    config.helper = HelperCommand::binary(env!("CARGO_BIN_EXE_docker-rbd-fuse"));
    let mapper = FuseMapper::new(config).map_err(|e| e.to_string())?;
    let mut req = MapRequest::new(
        ceph.pool.clone(),
        Some(fleet.namespace().to_string()),
        image,
    );
    req.read_only = true;
    let dev = mapper.map(&req).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("fsck.ext4")
        .args(["-n", "-f"])
        .arg(&dev.device)
        .output();
    let unmapped = mapper.unmap(&dev);
    let out = out.map_err(|e| format!("fsck.ext4: {e}"))?;
    unmapped.map_err(|e| e.to_string())?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("fsck.ext4 -n: {}: {text}", out.status))
    }
}

/// The RBD image of container `id`'s read-write layer.
fn rw_image(fleet: &Fleet, id: &str) -> String {
    let rec = store(fleet).containers().get(id).unwrap().unwrap().value;
    format!("docker-rbd.layer.{}", rec.mount_id)
}

/// The RBD images of the fleet's namespace.
fn rbd_images(fleet: &Fleet) -> BTreeSet<String> {
    ceph_client::rbd::list(fleet.ioctx())
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect()
}

/// Waits until container `name`'s log holds `text`.
fn wait_logs(h: &FleetHost, name: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !h.ok(["logs", name]).contains(text) {
        assert!(Instant::now() < deadline, "{name} did not log {text:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Removes every container and image of `h`'s dockerd.
fn clear(h: &FleetHost) {
    for id in h.ok(["ps", "-aq", "--no-trunc"]).split_whitespace() {
        h.ok(["rm", "-f", id]);
    }
    for id in h
        .ok(["images", "-q", "--no-trunc"])
        .split_whitespace()
        .collect::<BTreeSet<_>>()
    {
        h.ok(["rmi", "-f", id]);
    }
}

fn config_running(r: &ContainerRecord) -> bool {
    let v: serde_json::Value = serde_json::from_str(&r.config).unwrap();
    v["State"]["Running"].as_bool().unwrap_or(true)
}

#[test]
fn containers_and_images_move_between_diskless_hosts() {
    let test = "containers_and_images_move_between_diskless_hosts";
    let Some(fleet) = Fleet::start(test, Path::new(PLUGIN_BIN), &[]) else {
        return;
    };
    let files = testkit::scratch_dir("fleet-files").unwrap();
    let mut a = fleet.host("a", &["--host-id", "host-a"]);
    fleet.phase("host a up");

    import_busybox(&a, files.path(), "busy:1");
    let special = a.dockerd().load_special("special:1", files.path());
    a.ok([
        "create",
        "--name",
        "mover",
        "--network",
        "none",
        "busy:1",
        "sh",
        "-c",
        MOVER,
    ]);
    let out = a.ok(["start", "-a", "mover"]);
    assert!(
        out.contains("/data/blob: OK") && out.contains("runs=1"),
        "{out}"
    );
    let mover = container_id(&a, "mover");

    // A stopped container is in the fleet, stopped, when `docker stop`
    // returns; its final config.v2.json follows within the next pass.
    a.ok([
        "run",
        "-d",
        "--name",
        "sleeper",
        "--network",
        "none",
        "busy:1",
        "sleep",
        "600",
    ]);
    let sleeper = container_id(&a, "sleeper");
    wait_record(&fleet, &sleeper, RECORD_WAIT, |r| {
        r.state == ContainerState::Running && config_running(r)
    });
    a.ok(["stop", "-t", "1", "sleeper"]);
    let state_after = wait_record(&fleet, &sleeper, RECORD_WAIT, |r| {
        r.state == ContainerState::Stopped && r.active_on.is_none()
    });
    let config_after = wait_record(&fleet, &sleeper, RECORD_WAIT, |r| !config_running(r));
    eprintln!(
        "[{test}] after `docker stop` returned: recorded stopped in {} ms, final config.v2.json exported in {} ms",
        state_after.as_millis(),
        config_after.as_millis()
    );

    // `always` containers running on a live host are not taken elsewhere.
    a.ok([
        "run",
        "-d",
        "--restart",
        "always",
        "--name",
        "keeper",
        "--network",
        "none",
        "busy:1",
        "sleep",
        "600",
    ]);
    let keeper = container_id(&a, "keeper");
    wait_record(&fleet, &keeper, RECORD_WAIT, |r| {
        r.state == ContainerState::Running
    });
    fleet.phase("host a has images and containers");

    // B boots with an empty data root.
    let b = fleet.host("b", &["--host-id", "host-b"]);
    fleet.phase("host b up");
    assert_eq!(
        image_list(&b),
        image_list(&a),
        "the same image ids and tags"
    );
    let on_b = containers(&b);
    assert!(on_b.contains(&format!("{mover} mover exited")), "{on_b:?}");
    assert!(
        on_b.contains(&format!("{sleeper} sleeper exited")),
        "{on_b:?}"
    );
    assert!(
        !on_b.iter().any(|c| c.contains("keeper")),
        "a container running on live host a is not on b: {on_b:?}"
    );
    let out = b.ok(["start", "-a", "mover"]);
    assert!(
        out.contains("/data/blob: OK") && out.contains("runs=2"),
        "b sees a's data: {out}"
    );
    assert_eq!(
        b.dockerd()
            .run_sh("special:1", images::SPECIAL_CHECK_SCRIPT),
        images::SPECIAL_CHECK_EXPECTED
    );
    // Loading the same image on b re-creates no layer: b has the fleet's.
    let before = rbd_images(&fleet);
    let tar = files.path().join("special.tar");
    b.ok(["load".as_ref(), "-i".as_ref(), tar.as_os_str()]);
    // (Layers of the `run --rm` above may still be purged meanwhile.)
    let made: Vec<String> = rbd_images(&fleet).difference(&before).cloned().collect();
    assert!(
        made.is_empty(),
        "no RBD layer made for content the fleet has: {made:?}"
    );
    // The tar-split came along: b saves the image byte for byte as a did.
    let saved = files.path().join("special-from-b.tar");
    b.ok([
        "save".as_ref(),
        "-o".as_ref(),
        saved.as_os_str(),
        "special:1".as_ref(),
    ]);
    let (config, layers) = images::read_saved(&std::fs::read(&saved).unwrap()).unwrap();
    assert_eq!(config, special.config, "b's save holds the same config");
    assert_eq!(layers, special.diff_ids, "and the same layer bytes");

    // B runs it again and stops; A, restarted, starts it with B's writes.
    let out = b.ok(["start", "-a", "mover"]);
    assert!(out.contains("runs=3"), "{out}");
    wait_record(&fleet, &mover, RECORD_WAIT, |r| {
        r.exported_by == "host-b" && r.state == ContainerState::Stopped
    });
    a.restart_dockerd();
    fleet.phase("host a restarted");
    let out = a.ok(["start", "-a", "mover"]);
    assert!(
        out.contains("/data/blob: OK") && out.contains("runs=4"),
        "a sees b's runs: {out}"
    );
    assert!(
        containers(&a).contains(&format!("{keeper} keeper running")),
        "a's own `always` container came back with a's dockerd: {:?}",
        containers(&a)
    );

    // rmi -f on A takes nothing from B.
    a.ok(["rmi", "-f", "busy:1"]);
    wait_tag_released(&fleet, "busy:1", "host-a");
    let out = b.ok(["start", "-a", "mover"]);
    assert!(out.contains("runs=5"), "{out}");
    assert_eq!(b.dockerd().run_sh("busy:1", "echo ran"), "ran\n");

    // Created on A while B is up; and one name on two hosts.
    a.ok([
        "create",
        "--name",
        "late",
        "--network",
        "none",
        "special:1",
        "true",
    ]);
    let late = container_id(&a, "late");
    a.ok([
        "create",
        "--name",
        "dup",
        "--network",
        "none",
        "special:1",
        "true",
    ]);
    b.ok([
        "create",
        "--name",
        "dup",
        "--network",
        "none",
        "special:1",
        "true",
    ]);
    let dup_a = container_id(&a, "dup");
    let dup_b = container_id(&b, "dup");
    for id in [&late, &dup_a, &dup_b] {
        wait_record(&fleet, id, RECORD_WAIT, |_| true);
    }
    let c = fleet.host("c", &["--host-id", "host-c"]);
    fleet.phase("host c up");
    let on_c = containers(&c);
    assert!(on_c.contains(&format!("{late} late created")), "{on_c:?}");
    let dups: Vec<&String> = on_c.iter().filter(|l| l.contains(" dup ")).collect();
    assert_eq!(dups.len(), 1, "one of the two `dup` containers: {on_c:?}");
    let log = c.plugin_log();
    assert!(
        log.contains("named \\\"/dup\\\"") || log.contains("named \"/dup\""),
        "the skipped one is named in the log"
    );
    assert!(
        log.contains(&dup_a) && log.contains(&dup_b),
        "the log names both dup containers"
    );
    assert!(!on_c.iter().any(|l| l.contains("keeper")), "{on_c:?}");
    assert!(containers(&b).iter().all(|l| !l.contains("keeper")));

    // Every host removes everything it has: then the fleet is empty.
    for h in [&a, &b, &c] {
        clear(h);
    }
    // Each host's exporter drops it from the records in its next pass.
    let left = || {
        let s = store(&fleet);
        (
            s.containers().list().unwrap().len(),
            s.docker_images().list().unwrap().len(),
            s.docker_layers().list().unwrap().len(),
        )
    };
    let deadline = Instant::now() + RECORD_WAIT;
    while left() != (0, 0, 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(left(), (0, 0, 0), "container, image and layer records left");
    while !layer_images(&fleet).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        layer_images(&fleet).is_empty(),
        "layers left: {:?}",
        layer_images(&fleet)
    );
    drop(c);
    drop(b);
    a.crash();
}

#[test]
fn a_host_killed_right_after_docker_stop_hands_its_container_over() {
    let test = "a_host_killed_right_after_docker_stop_hands_its_container_over";
    let Some(fleet) = Fleet::start(test, Path::new(PLUGIN_BIN), &[]) else {
        return;
    };
    let files = testkit::scratch_dir("fleet-files").unwrap();
    let mut a = fleet.host("a", &["--host-id", "host-a"]);
    import_busybox(&a, files.path(), "busy:1");
    let script = format!("{MOVER}; exec sleep 600");
    a.ok([
        "run",
        "-d",
        "--name",
        "writer",
        "--network",
        "none",
        "busy:1",
        "sh",
        "-c",
        &script,
    ]);
    wait_logs(&a, "writer", "runs=1");
    a.ok(["stop", "-t", "1", "writer"]);
    a.crash();
    fleet.phase("host a stopped its container and died");
    let b = fleet.host("b", &["--host-id", "host-b"]);
    b.ok(["start", "writer"]);
    wait_logs(&b, "writer", "runs=2");
    let out = b.ok(["logs", "writer"]);
    assert!(
        out.contains("/data/blob: OK"),
        "b has all that a synced: {out}"
    );
    b.ok(["stop", "-t", "1", "writer"]);
    drop(b);
}

#[test]
fn broken_fleet_records_are_skipped_and_named() {
    let test = "broken_fleet_records_are_skipped_and_named";
    let Some(fleet) = Fleet::start(test, Path::new(PLUGIN_BIN), &[]) else {
        return;
    };
    let files = testkit::scratch_dir("fleet-files").unwrap();
    let a = fleet.host("a", &["--host-id", "host-a"]);
    import_busybox(&a, files.path(), "busy:1");
    a.ok([
        "create",
        "--name",
        "fine",
        "--network",
        "none",
        "busy:1",
        "echo",
        "fine",
    ]);
    let fine = container_id(&a, "fine");
    let rec = wait_record(&fleet, &fine, RECORD_WAIT, |_| true);
    let _ = rec;
    let store = store(&fleet);
    let good = store.containers().get(&fine).unwrap().unwrap().value;
    // A container whose layers are gone, a value from a newer docker-rbd,
    // an undecodable image, a truncated tar-split.
    let orphan = "e".repeat(64);
    let mut missing = good.clone();
    missing.name = "/orphan".into();
    missing.mount_id = "f".repeat(64);
    missing.init_id = Some(format!("{}-init", "f".repeat(64)));
    store.containers().create(&orphan, &missing).unwrap();
    let future = "d".repeat(64);
    let bogus_image = format!("sha256:{}", "c".repeat(64));
    fleet
        .ioctx()
        .operate(
            store.containers().object(),
            WriteOp::new()
                .omap_set(&[(future.as_str(), br#"{"v":99,"name":"/future"}"#.as_slice())]),
        )
        .unwrap();
    fleet
        .ioctx()
        .operate(
            store.docker_images().object(),
            WriteOp::new().omap_set(&[(bogus_image.as_str(), b"{not json".as_slice())]),
        )
        .unwrap();
    let layers = store.docker_layers().list().unwrap();
    let blob = layers
        .iter()
        .find_map(|(_, r)| r.as_ref().ok()?.value.tar_split.clone())
        .expect("the busybox layer has a tar-split");
    let bytes = fleet.ioctx().read(&blob.object).unwrap();
    fleet
        .ioctx()
        .write_full(&blob.object, &bytes[..bytes.len() / 2])
        .unwrap();

    let b = fleet.host("b", &["--host-id", "host-b"]);
    let on_b = containers(&b);
    assert!(on_b.contains(&format!("{fine} fine created")), "{on_b:?}");
    assert!(!on_b.iter().any(|l| l.contains("orphan")), "{on_b:?}");
    assert_eq!(b.ok(["start", "-a", "fine"]), "fine\n");
    assert_eq!(b.dockerd().run_sh("busy:1", "echo ran"), "ran\n");
    let log = b.plugin_log();
    for named in [&orphan, &future, &bogus_image, &blob.object] {
        assert!(log.contains(named.as_str()), "b's log names {named}");
    }
    let status = b.ok(["info", "--format", "{{json .DriverStatus}}"]);
    assert!(status.contains("4 skipped"), "{status}");
}

#[test]
fn a_second_live_daemon_with_the_same_host_id_is_refused() {
    let test = "a_second_live_daemon_with_the_same_host_id_is_refused";
    let Some(fleet) = Fleet::start(test, Path::new(PLUGIN_BIN), &[]) else {
        return;
    };
    let a = fleet.host("a", &["--host-id", "twin"]);
    let err = match fleet.try_host("b", &["--host-id", "twin"]) {
        Ok(_) => panic!("a second daemon with host id twin booted"),
        Err(e) => e,
    };
    assert!(
        err.contains("host id \"twin\" is in use by another live docker-rbd")
            || err.contains("host id \\\"twin\\\" is in use by another live docker-rbd"),
        "{err}"
    );
    drop(a);
}

#[test]
fn a_dead_hosts_container_is_taken_over_and_the_zombie_is_fenced() {
    let test = "a_dead_hosts_container_is_taken_over_and_the_zombie_is_fenced";
    // Short leases, so that the test waits seconds, not half a minute.
    let Some(fleet) = Fleet::start(
        test,
        Path::new(PLUGIN_BIN),
        &["--lease-duration", "6", "--lease-renew", "2"],
    ) else {
        return;
    };
    let files = testkit::scratch_dir("fleet-files").unwrap();
    let mut a = fleet.host("a", &["--host-id", "host-a"]);
    import_busybox(&a, files.path(), "busy:1");
    // On its first run (host a) the container keeps writing ticks.
    let script = format!(
        "{MOVER}; if [ \"$(wc -l < /data/log)\" = 1 ]; then \
         while :; do echo t >> /data/tick; sync -f /data; sleep 0.2; done & fi; exec sleep 600"
    );
    a.ok([
        "run",
        "-d",
        "--name",
        "writer",
        "--network",
        "none",
        "busy:1",
        "sh",
        "-c",
        &script,
    ]);
    wait_logs(&a, "writer", "runs=1");
    std::thread::sleep(Duration::from_secs(1));
    let id = container_id(&a, "writer");
    wait_record(&fleet, &id, RECORD_WAIT, |r| {
        r.active_on.as_deref() == Some("host-a")
    });

    // Host a hangs with the container running.
    a.freeze();
    fleet.phase("host a frozen");
    let mut b = fleet.host("b", &["--host-id", "host-b"]);
    assert!(
        !containers(&b).iter().any(|l| l.contains("writer")),
        "a container in use on a host whose lease is live is not hydrated"
    );
    let refused = b.docker_rbd("takeover", &["writer"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "takeover while a's lease is live"
    );
    assert!(
        stderr.contains("in use on host host-a, whose lease is live"),
        "{stderr}"
    );
    // Once the lease lapses, b takes it over: a is fenced.
    let started = Instant::now();
    let taken = loop {
        let out = b.docker_rbd("takeover", &["writer"]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            started.elapsed() < RECORD_WAIT,
            "takeover still refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    fleet.phase(&format!(
        "taken over {:.1}s after the first refusal",
        started.elapsed().as_secs_f64()
    ));
    assert!(
        taken.contains("from host host-a") && taken.contains("fenced: "),
        "{taken}"
    );
    b.restart_dockerd();
    b.ok(["start", "writer"]);
    wait_logs(&b, "writer", "runs=2");
    assert!(b.ok(["logs", "writer"]).contains("/data/blob: OK"));
    let ticks = |h: &FleetHost| h.ok(["exec", "writer", "sh", "-c", "wc -l < /data/tick"]);
    let ticks_at_takeover = ticks(&b);
    assert!(
        ticks_at_takeover.trim().parse::<u32>().unwrap() > 0,
        "a ticked"
    );
    b.ok(["stop", "-t", "1", "writer"]);

    // The zombie wakes up and tries to write: nothing reaches the image.
    a.thaw();
    let zombie = a.dockerd().docker([
        "exec",
        "writer",
        "sh",
        "-c",
        "echo zombie > /data/zombie; sync -f /data",
    ]);
    eprintln!(
        "[{test}] the fenced host's write: {} {}",
        zombie.status,
        String::from_utf8_lossy(&zombie.stderr).trim()
    );
    std::thread::sleep(Duration::from_secs(3));
    b.ok(["start", "writer"]);
    wait_logs(&b, "writer", "runs=3");
    let listing = b.ok(["exec", "writer", "ls", "/data"]);
    assert!(
        !listing.contains("zombie"),
        "the fenced host wrote: {listing}"
    );
    assert_eq!(
        ticks(&b),
        ticks_at_takeover,
        "the fenced host's container kept ticking for seconds: none of it landed"
    );
    assert!(b.ok(["logs", "writer"]).matches("/data/blob: OK").count() >= 2);
    b.ok(["stop", "-t", "1", "writer"]);
    let fsck = fsck_image(&fleet, &rw_image(&fleet, &id));
    assert!(
        fsck.is_ok(),
        "the fenced host damaged the filesystem: {fsck:?}"
    );
    b.ok(["start", "writer"]);
    wait_logs(&b, "writer", "runs=4");
    assert!(
        a.plugin_log().contains("this docker-rbd was fenced"),
        "the fenced host noticed, and says why"
    );
    let fuse_logs = a.fuse_server_logs();
    assert!(
        fuse_logs.contains("this client is blocklisted"),
        "the fenced host's FUSE server says why it no longer serves the layer: {fuse_logs}"
    );

    // A reboots while b runs the container: it connects with a new client,
    // and leaves b's container alone.
    a.crash();
    a.start_again();
    fleet.phase("host a rebooted");
    let err = a.fails(["start", "writer"]);
    assert!(err.contains("is in use on host host-b"), "{err}");
    assert_eq!(
        b.ok(["inspect", "-f", "{{.State.Running}}", "writer"])
            .trim(),
        "true"
    );
    b.ok([
        "exec",
        "writer",
        "sh",
        "-c",
        "echo after > /data/after && sync -f /data && sha256sum -c /data/sum",
    ]);
    wait_record(&fleet, &id, RECORD_WAIT, |r| {
        r.active_on.as_deref() == Some("host-b")
    });
    // Once b stops it, a may run it again, with all of b's writes.
    b.ok(["stop", "-t", "1", "writer"]);
    a.ok(["start", "writer"]);
    wait_logs(&a, "writer", "runs=5");
    let listing = a.ok(["exec", "writer", "ls", "/data"]);
    assert!(listing.contains("after"), "a sees b's write: {listing}");
    a.ok(["stop", "-t", "1", "writer"]);
    a.ok(["rm", "writer"]);
    b.ok(["rm", "writer"]);
}

#[test]
fn one_host_at_a_time_runs_a_container_even_when_two_race_to_start_it() {
    let test = "one_host_at_a_time_runs_a_container_even_when_two_race_to_start_it";
    let Some(fleet) = Fleet::start(test, Path::new(PLUGIN_BIN), &[]) else {
        return;
    };
    let files = testkit::scratch_dir("fleet-files").unwrap();
    let a = fleet.host("a", &["--host-id", "host-a"]);
    import_busybox(&a, files.path(), "busy:1");
    a.ok([
        "create",
        "--name",
        "solo",
        "--network",
        "none",
        "busy:1",
        "sleep",
        "600",
    ]);
    let id = container_id(&a, "solo");
    wait_record(&fleet, &id, RECORD_WAIT, |_| true);
    let b = fleet.host("b", &["--host-id", "host-b"]);

    // While a runs it, b's start fails fast, naming a.
    a.ok(["start", "solo"]);
    let started = Instant::now();
    let err = b.fails(["start", "solo"]);
    let took = started.elapsed();
    assert!(err.contains("is in use on host host-a"), "{err}");
    assert!(took < Duration::from_secs(2), "refused in {took:?}");
    eprintln!(
        "[{test}] b's start refused in {} ms: {}",
        took.as_millis(),
        err.trim()
    );
    a.ok(["stop", "-t", "0", "solo"]);
    b.ok(["start", "solo"]);
    b.ok(["stop", "-t", "0", "solo"]);

    let rounds = 100;
    let (mut won_a, mut won_b) = (0, 0);
    for round in 0..rounds {
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| a.dockerd().docker(["start", "solo"]));
            let tb = s.spawn(|| b.dockerd().docker(["start", "solo"]));
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let (oka, okb) = (ra.status.success(), rb.status.success());
        let why = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).trim().to_string();
        assert!(
            oka != okb,
            "round {round}: a {}: {}; b {}: {}",
            oka,
            why(&ra),
            okb,
            why(&rb)
        );
        let (winner, loser, loser_out, other) = if oka {
            won_a += 1;
            (&a, "b", &rb, "host-a")
        } else {
            won_b += 1;
            (&b, "a", &ra, "host-b")
        };
        assert!(
            why(loser_out).contains(&format!("is in use on host {other}")),
            "round {round}: {loser} failed for another reason: {}",
            why(loser_out)
        );
        winner.ok(["stop", "-t", "0", "solo"]);
    }
    eprintln!("[{test}] {rounds} races: a won {won_a}, b won {won_b}, never both, never neither");
    a.ok(["rm", "solo"]);
    b.ok(["rm", "solo"]);
}

#[test]
fn bad_ownership_states_have_defined_outcomes() {
    let test = "bad_ownership_states_have_defined_outcomes";
    let Some(fleet) = Fleet::start(
        test,
        Path::new(PLUGIN_BIN),
        &["--lease-duration", "6", "--lease-renew", "2"],
    ) else {
        return;
    };
    let files = testkit::scratch_dir("fleet-files").unwrap();
    let a = fleet.host("a", &["--host-id", "host-a"]);
    import_busybox(&a, files.path(), "busy:1");
    a.ok([
        "create",
        "--name",
        "odd",
        "--network",
        "none",
        "busy:1",
        "echo",
        "ran",
    ]);
    let odd = container_id(&a, "odd");
    wait_record(&fleet, &odd, RECORD_WAIT, |_| true);

    // 1. The record names a host the fleet has no record of: treated as a
    // dead owner, named as unknown; a takeover fences whoever holds the
    // layer's lock (nobody here) and takes it.
    store(&fleet)
        .containers()
        .modify(&odd, |r| {
            r.active_on = Some("ghost".into());
            r.state = ContainerState::Running;
        })
        .unwrap();
    let err = a.fails(["start", "odd"]);
    assert!(
        err.contains("in use on host ghost, which has no host record in the fleet"),
        "{err}"
    );
    let out = a.docker_rbd("takeover", &["odd"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("from host ghost"),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.ok(["start", "-a", "odd"]), "ran\n");

    // 2. The layer's exclusive lock is held by a client that no host
    // claims (an `rbd` tool, a leftover mapping): `Get` fails, naming the
    // holder, and takes nothing from it; once it lets go, the start works.
    let image = rbd_images(&fleet)
        .into_iter()
        .find(|n| {
            let mount = store(&fleet).containers().get(&odd).unwrap().unwrap();
            n.ends_with(&format!("layer.{}", mount.value.mount_id))
        })
        .expect("the container's layer image");
    let stray = ceph_client::rbd::Image::open(fleet.ioctx(), &image, None).unwrap();
    stray.lock_acquire_exclusive().unwrap();
    let started = Instant::now();
    let err = a.fails(["start", "odd"]);
    eprintln!(
        "[{test}] start under a stray lock refused in {} ms: {}",
        started.elapsed().as_millis(),
        err.trim()
    );
    assert!(err.contains("exclusive lock"), "{err}");
    assert!(
        stray.lock_owners().unwrap().len() == 1,
        "the stray client keeps its lock"
    );
    drop(stray);
    assert_eq!(a.ok(["start", "-a", "odd"]), "ran\n");
    wait_record(&fleet, &odd, RECORD_WAIT, |r| r.active_on.is_none());

    // 3. A host whose lease lapses while it is alive (frozen longer than
    // the lease) and then renews late keeps what it runs, if nobody took
    // it over meanwhile (when somebody did, it is fenced: the takeover
    // test), and says so.
    a.ok([
        "run",
        "-d",
        "--name",
        "steady",
        "--network",
        "none",
        "busy:1",
        "sleep",
        "600",
    ]);
    let steady = container_id(&a, "steady");
    wait_record(&fleet, &steady, RECORD_WAIT, |r| {
        r.active_on.as_deref() == Some("host-a")
    });
    let b = fleet.host("b", &["--host-id", "host-b"]);
    a.freeze();
    std::thread::sleep(Duration::from_secs(9));
    a.thaw();
    let deadline = Instant::now() + RECORD_WAIT;
    while !a.plugin_log().contains("the host lease had lapsed") {
        assert!(Instant::now() < deadline, "a did not say its lease lapsed");
        std::thread::sleep(Duration::from_millis(200));
    }
    a.ok([
        "exec",
        "steady",
        "sh",
        "-c",
        "echo still > /still && sync -f /",
    ]);
    let refused = b.docker_rbd("takeover", &["steady"]);
    assert!(!refused.status.success(), "a renewed: no takeover");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("whose lease is live"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    a.ok(["rm", "-f", "steady", "odd"]);
    drop(b);
}

/// The RBD images of the fleet other than the shared base.
fn layer_images(fleet: &Fleet) -> Vec<String> {
    rbd_images(fleet)
        .into_iter()
        .filter(|n| !n.contains(".base."))
        .collect()
}

#[test]
fn two_hosts_removing_at_once_remove_only_what_nobody_needs() {
    let test = "two_hosts_removing_at_once_remove_only_what_nobody_needs";
    let Some(fleet) = Fleet::start(test, Path::new(PLUGIN_BIN), &[]) else {
        return;
    };
    let files = testkit::scratch_dir("fleet-files").unwrap();
    let a = fleet.host("a", &["--host-id", "host-a"]);
    let b = fleet.host("b", &["--host-id", "host-b"]);
    let create = |h: &FleetHost, name: &str| {
        h.ok([
            "create",
            "--name",
            name,
            "--network",
            "none",
            "busy:1",
            "echo",
            "ran",
        ]);
        let id = container_id(h, name);
        wait_record(&fleet, &id, RECORD_WAIT, |_| true);
    };
    let remove = |h: &FleetHost, name: &str| {
        let rm = h.dockerd().docker(["rm", "-f", name]);
        let rmi = h.dockerd().docker(["rmi", "-f", "busy:1"]);
        (rm, rmi)
    };
    let succeeded = |what: &str, o: &std::process::Output| {
        assert!(
            o.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };

    // Both hosts have the image and a container over it, and remove both
    // at the same moment: both succeed, and nothing is left.
    for round in 0..3 {
        import_busybox(&a, files.path(), "busy:1");
        import_busybox(&b, files.path(), "busy:1");
        create(&a, "mine");
        create(&b, "mine");
        let ((rm_a, rmi_a), (rm_b, rmi_b)) = std::thread::scope(|s| {
            let ta = s.spawn(|| remove(&a, "mine"));
            let tb = s.spawn(|| remove(&b, "mine"));
            (ta.join().unwrap(), tb.join().unwrap())
        });
        for (what, o) in [
            ("a rm", &rm_a),
            ("a rmi", &rmi_a),
            ("b rm", &rm_b),
            ("b rmi", &rmi_b),
        ] {
            succeeded(&format!("round {round}: {what}"), o);
        }
        let deadline = Instant::now() + RECORD_WAIT;
        while !(store(&fleet).containers().list().unwrap().is_empty()
            && layer_images(&fleet).is_empty())
        {
            assert!(
                Instant::now() < deadline,
                "round {round}: left behind: {:?}",
                layer_images(&fleet)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // While a removes its container and the image, b, which has the same
    // image through the fleet, keeps creating and running containers over
    // it: every one of b's runs works, and b's layers survive a's removal.
    import_busybox(&a, files.path(), "busy:1");
    create(&a, "theirs");
    let mut b = b;
    b.restart_dockerd();
    assert!(image_list(&b).iter().any(|l| l.ends_with(" busy:1")));
    let (removed, runs) = std::thread::scope(|s| {
        let ta = s.spawn(|| remove(&a, "theirs"));
        let tb = s.spawn(|| {
            (0..3)
                .map(|i| {
                    b.dockerd().docker([
                        "run",
                        "--name",
                        &format!("b{i}"),
                        "--network",
                        "none",
                        "busy:1",
                        "echo",
                        "ran",
                    ])
                })
                .collect::<Vec<_>>()
        });
        (ta.join().unwrap(), tb.join().unwrap())
    });
    succeeded("a rm", &removed.0);
    succeeded("a rmi", &removed.1);
    for (i, run) in runs.iter().enumerate() {
        succeeded(&format!("b run {i}"), run);
        assert_eq!(String::from_utf8_lossy(&run.stdout), "ran\n");
    }
    for i in 0..3 {
        assert_eq!(b.ok(["start", "-a", &format!("b{i}")]), "ran\n");
    }
    assert_eq!(b.dockerd().run_sh("busy:1", "echo ran"), "ran\n");
    clear(&b);
    let deadline = Instant::now() + RECORD_WAIT;
    while !layer_images(&fleet).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            layer_images(&fleet)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_host_killed_while_its_container_writes_is_taken_over_with_all_it_synced() {
    let test = "a_host_killed_while_its_container_writes_is_taken_over_with_all_it_synced";
    let Some(fleet) = Fleet::start(
        test,
        Path::new(PLUGIN_BIN),
        &["--lease-duration", "6", "--lease-renew", "2"],
    ) else {
        return;
    };
    let files = testkit::scratch_dir("fleet-files").unwrap();
    let mut a = fleet.host("a", &["--host-id", "host-a"]);
    import_busybox(&a, files.path(), "busy:1");
    // The first run keeps writing synced, checksummed chunks until killed.
    let script = format!(
        "{MOVER}; if [ \"$(wc -l < /data/log)\" = 1 ]; then i=0; while :; do \
         i=$((i+1)); dd if=/dev/urandom of=/data/c.$i bs=64k count=4 2>/dev/null; \
         sha256sum /data/c.$i >> /data/chunks; sync -f /data; done & fi; exec sleep 600"
    );
    a.ok([
        "run",
        "-d",
        "--name",
        "writer",
        "--network",
        "none",
        "busy:1",
        "sh",
        "-c",
        &script,
    ]);
    wait_logs(&a, "writer", "runs=1");
    std::thread::sleep(Duration::from_secs(2));
    let id = container_id(&a, "writer");
    wait_record(&fleet, &id, RECORD_WAIT, |r| {
        r.active_on.as_deref() == Some("host-a")
    });
    // Power cut: plugin, dockerd, containerd, the container, its FUSE
    // server, all SIGKILLed mid-write.
    a.crash();
    fleet.phase("host a killed");
    let mut b = fleet.host("b", &["--host-id", "host-b"]);
    let refused = b.docker_rbd("takeover", &["writer"]);
    assert!(
        !refused.status.success(),
        "takeover while a's lease is live"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("whose lease is live"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let started = Instant::now();
    while !b.docker_rbd("takeover", &["writer"]).status.success() {
        assert!(started.elapsed() < RECORD_WAIT, "takeover still refused");
        std::thread::sleep(Duration::from_millis(500));
    }
    fleet.phase(&format!(
        "taken over {:.1}s after the first refusal",
        started.elapsed().as_secs_f64()
    ));
    b.restart_dockerd();
    b.ok(["start", "writer"]);
    wait_logs(&b, "writer", "runs=2");
    let out = b.ok(["logs", "writer"]);
    assert!(out.contains("/data/blob: OK"), "{out}");
    // Every chunk whose checksum a synced is there, intact.
    let check = b.ok([
        "exec",
        "writer",
        "sh",
        "-c",
        "n=$(wc -l < /data/chunks); sha256sum -c /data/chunks > /dev/null 2>&1 && echo ok $n || \
         { head -n $((n-1)) /data/chunks | sha256sum -c > /dev/null && echo ok $((n-1)); }",
    ]);
    assert!(check.starts_with("ok "), "synced chunks damaged: {check}");
    let chunks: u32 = check.trim()[3..].parse().unwrap();
    assert!(chunks > 0, "a synced chunks before the kill");
    eprintln!("[{test}] {chunks} chunks synced by the killed host, all intact on b");
    b.ok(["stop", "-t", "1", "writer"]);
    b.ok(["rm", "writer"]);
}

#[test]
fn a_dead_fuse_server_is_noticed_and_its_layer_mapped_again() {
    let test = "a_dead_fuse_server_is_noticed_and_its_layer_mapped_again";
    let Some(fleet) = Fleet::start(test, Path::new(PLUGIN_BIN), &[]) else {
        return;
    };
    let files = testkit::scratch_dir("fleet-files").unwrap();
    let a = fleet.host("a", &["--host-id", "host-a"]);
    import_busybox(&a, files.path(), "busy:1");
    let script = format!("{MOVER}; exec sleep 600");
    a.ok([
        "run",
        "-d",
        "--name",
        "worker",
        "--network",
        "none",
        "busy:1",
        "sh",
        "-c",
        &script,
    ]);
    wait_logs(&a, "worker", "runs=1");
    // The FUSE server of the container's own layer (the image's layer may
    // have another, idle since the container was made).
    let spec = a.ok(["inspect", "-f", "{{.GraphDriver.Data.Image}}", "worker"]);
    let image = spec.trim().rsplit('/').next().unwrap().to_string();
    let run_dir = a.host().path(a.driver_home().join("fuse"));
    let servers = testkit::driver::fuse_servers_of_image(&run_dir, &image);
    assert_eq!(servers.len(), 1, "one mapping of {image}: {servers:?}");
    testkit::process::signal(servers[0], nix::sys::signal::Signal::SIGKILL).unwrap();
    let stop = a.dockerd().docker(["stop", "-t", "1", "worker"]);
    eprintln!(
        "[{test}] docker stop after the FUSE server died: {} {}",
        stop.status,
        String::from_utf8_lossy(&stop.stderr).trim()
    );
    a.ok(["start", "worker"]);
    wait_logs(&a, "worker", "runs=2");
    assert!(
        a.ok(["logs", "worker"]).matches("/data/blob: OK").count() == 2,
        "every synced byte is there"
    );
    a.ok(["rm", "-f", "worker"]);
}
