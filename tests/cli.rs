//! Golden tests of the inspection CLI (`docker-rbd ls`, `info`, `tree`,
//! `children`, `du`, `containers`, `hosts`, `lock ls`): plain and JSON
//! output, exit codes, and one-line errno errors on bad input.
//!
//! The fleet is written as records straight into a fresh RADOS namespace
//! (two hosts, an image with two layers and a tag, two containers, one
//! layer whose record has no RBD image), with a real RBD image for the
//! base layer so `du` and `info` measure something.
//!
//! Needs the test cluster; skipped when run bare without it, failed under
//! `scripts/test`.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;

use ceph_client::rbd;
use ceph_client::{IoCtx, Rados};
use metadata::{
    ContainerRecord, ContainerState, DockerImageRecord, DockerLayerRecord, DockerTagRecord,
    HostRecord, LayerKind, LayerRecord, LayerState, Store,
};
use testkit::ceph::{CephEnv, unique_namespace};

const BIN: &str = env!("CARGO_BIN_EXE_docker-rbd");
const GIB: u64 = 1 << 30;

const BASE: &str = "base0000";
const TOP: &str = "top00000";
const WEB_INIT: &str = "web00000-init";
const WEB: &str = "web00000";
const DB: &str = "db000000";
const LOST: &str = "lost0000";

struct TestFleet {
    env: CephEnv,
    namespace: String,
    _rados: Rados,
    ioctx: Arc<IoCtx>,
    pool: IoCtx,
}

impl Drop for TestFleet {
    fn drop(&mut self) {
        testkit::driver::remove_namespace("cli", &self.ioctx, &self.pool, &self.namespace);
    }
}

fn set(hosts: &[&str]) -> BTreeSet<String> {
    hosts.iter().map(|h| h.to_string()).collect()
}

fn layer(
    parent: Option<&str>,
    id: &str,
    kind: LayerKind,
    size: u64,
    holders: &[&str],
) -> LayerRecord {
    LayerRecord {
        parent: parent.map(str::to_string),
        image: format!("docker-rbd.layer.{id}"),
        kind,
        state: LayerState::Created,
        depth: 0,
        size,
        quota: None,
        sealed: kind == LayerKind::Image,
        holders: set(holders),
        created_by: "host-a".into(),
        created_at: 1_700_000_000,
        init: None,
    }
}

fn container(
    name: &str,
    rw: &str,
    init: Option<&str>,
    running_on: Option<&str>,
    ran_on: &str,
) -> ContainerRecord {
    ContainerRecord {
        name: format!("/{name}"),
        config: r#"{"Config":{"Image":"busybox:latest"}}"#.into(),
        hostconfig: None,
        mount_id: rw.into(),
        init_id: init.map(str::to_string),
        parent: None,
        state: if running_on.is_some() {
            ContainerState::Running
        } else {
            ContainerState::Stopped
        },
        active_on: running_on.map(str::to_string),
        ran_on: ran_on.into(),
        started_at: String::new(),
        docker_root: "/var/lib/docker".into(),
        exported_by: ran_on.into(),
        generation: 1,
        holders: set(&[ran_on]),
        updated_at: 1_700_000_000,
    }
}

fn build() -> Option<TestFleet> {
    let env = testkit::ceph::require("cli")?;
    let namespace = unique_namespace("cli");
    let rados = Rados::connect(&env.connect_config()).expect("connect");
    let pool = rados.ioctx(&env.pool, None).expect("pool");
    rbd::namespace_create(&pool, &namespace).expect("rbd namespace");
    let ioctx = Arc::new(rados.ioctx(&env.pool, Some(&namespace)).expect("ioctx"));
    let fleet = TestFleet {
        env,
        namespace,
        _rados: rados,
        ioctx: ioctx.clone(),
        pool,
    };
    let store = Store::new(ioctx.clone(), "docker-rbd.");
    // The base layer has a real image: 8 MiB provisioned, 1 MiB written.
    rbd::create(
        &ioctx,
        "docker-rbd.layer.base0000",
        8 << 20,
        &rbd::ImageOptions::default(),
    )
    .expect("create image");
    let img = rbd::Image::open(&ioctx, "docker-rbd.layer.base0000", None).expect("open");
    img.write_all_at(0, &vec![7u8; 1 << 20]).expect("write");
    drop(img);
    let mut base = layer(None, BASE, LayerKind::Image, 8 << 20, &["host-a", "host-b"]);
    base.sealed = true;
    let layers = store.layers();
    layers.create(BASE, &base).unwrap();
    layers
        .create(
            TOP,
            &layer(
                Some(BASE),
                TOP,
                LayerKind::Image,
                10 * GIB,
                &["host-a", "host-b"],
            ),
        )
        .unwrap();
    layers
        .create(
            WEB_INIT,
            &layer(Some(TOP), WEB_INIT, LayerKind::Init, 10 * GIB, &["host-a"]),
        )
        .unwrap();
    layers
        .create(
            WEB,
            &layer(
                Some(WEB_INIT),
                WEB,
                LayerKind::ReadWrite,
                10 * GIB,
                &["host-a"],
            ),
        )
        .unwrap();
    layers
        .create(
            DB,
            &layer(Some(TOP), DB, LayerKind::ReadWrite, 10 * GIB, &["host-b"]),
        )
        .unwrap();
    layers
        .create(
            LOST,
            &layer(Some("gone0000"), LOST, LayerKind::Image, 512 << 20, &[]),
        )
        .unwrap();
    let d1 = format!("sha256:{}", "1".repeat(64));
    let d2 = format!("sha256:{}", "2".repeat(64));
    let c1 = d1.clone();
    let c2 = docker_rbd::fleet::hydrate::chain_id(&[&d1, &d2]).unwrap();
    let dl = |diff: &str, cache: &str, parent: Option<&str>| DockerLayerRecord {
        diff_id: diff.into(),
        size: 0,
        cache_id: cache.into(),
        parent: parent.map(str::to_string),
        descriptor: None,
        tar_split: None,
        holders: set(&["host-a", "host-b"]),
    };
    store
        .docker_layers()
        .create(&c1, &dl(&d1, BASE, None))
        .unwrap();
    store
        .docker_layers()
        .create(&c2, &dl(&d2, TOP, Some(&c1)))
        .unwrap();
    let image_id = format!("sha256:{}", "f".repeat(64));
    store
        .docker_images()
        .create(
            &image_id,
            &DockerImageRecord {
                config: format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{d1}","{d2}"]}}}}"#),
                parent: None,
                last_updated: None,
                holders: set(&["host-a", "host-b"]),
            },
        )
        .unwrap();
    store
        .docker_tags()
        .create(
            "busybox:latest",
            &DockerTagRecord {
                repository: "busybox".into(),
                image: image_id,
                holders: set(&["host-a", "host-b"]),
            },
        )
        .unwrap();
    let web_id = format!("aaaa{}", "0".repeat(60));
    let db_id = format!("bbbb{}", "0".repeat(60));
    store
        .containers()
        .create(
            &web_id,
            &container("web", WEB, Some(WEB_INIT), Some("host-a"), "host-a"),
        )
        .unwrap();
    store
        .containers()
        .create(&db_id, &container("db", DB, None, None, "host-b"))
        .unwrap();
    for (id, addr) in [("host-a", "10.0.0.1:0/1"), ("host-b", "10.0.0.2:0/2")] {
        store
            .hosts()
            .create(
                id,
                &HostRecord {
                    hostname: id.into(),
                    version: "0.1.0".into(),
                    heartbeat: 1_700_000_000,
                    client_addr: addr.into(),
                    home: "/var/lib/docker/rbd".into(),
                    lease_secs: 30,
                    started: 1_700_000_000,
                },
            )
            .unwrap();
    }
    Some(fleet)
}

struct Out {
    stdout: String,
    stderr: String,
    code: i32,
}

fn run(fleet: Option<&TestFleet>, args: &[&str]) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for var in [
        "DOCKER_RBD_CEPH_CONF",
        "DOCKER_RBD_CEPH_ID",
        "DOCKER_RBD_CEPH_KEYRING",
        "DOCKER_RBD_POOL",
    ] {
        cmd.env_remove(var);
    }
    if let Some(f) = fleet {
        cmd.args(["-c", f.env.conf.to_str().unwrap()])
            .args(["--id", &f.env.id])
            .args(["-k", f.env.keyring.to_str().unwrap()])
            .args(["-p", &f.env.pool])
            .args(["--namespace", &f.namespace]);
    }
    let out = cmd.output().expect("run docker-rbd");
    let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&out.status) {
        stderr.push_str(&format!(
            "[docker-rbd {args:?} was killed by signal {signal}]"
        ));
    }
    Out {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
        code: out.status.code().unwrap_or(-1),
    }
}

fn ok(f: &TestFleet, args: &[&str]) -> String {
    let out = run(Some(f), args);
    assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
    assert_eq!(out.stderr, "", "{args:?}");
    out.stdout
}

fn fails(f: Option<&TestFleet>, args: &[&str], code: i32, message: &str) {
    let out = run(f, args);
    assert_eq!(out.code, code, "{args:?}: {}", out.stderr);
    assert_eq!(out.stdout, "", "{args:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
    assert!(
        out.stderr.starts_with(message),
        "{args:?}: {:?} does not start with {message:?}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

fn json(f: &TestFleet, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    serde_json::from_str(&ok(f, &all)).expect("JSON output")
}

#[test]
fn inspection_commands_print_the_fleet() {
    let Some(f) = build() else { return };

    assert_eq!(
        ok(&f, &["ls"]),
        "base0000\ndb000000\nlost0000\ntop00000\nweb00000\nweb00000-init\n"
    );
    assert_eq!(
        json(&f, &["ls"]),
        serde_json::json!([BASE, DB, LOST, TOP, WEB, WEB_INIT])
    );
    assert_eq!(
        ok(&f, &["list", "-l"]),
        "\
NAME           SIZE     PARENT         KIND   USED BY         HOSTS          LOCK
base0000       8 MiB    -              image  -               host-a,host-b  -
db000000       10 GiB   top00000       rw     db              host-b         -
lost0000       512 MiB  gone0000       image  -               -              -
top00000       10 GiB   base0000       image  busybox:latest  host-a,host-b  -
web00000       10 GiB   web00000-init  rw     web             host-a         host-a
web00000-init  10 GiB   top00000       init   web             host-a         -
"
    );
    let long = json(&f, &["ls", "-l"]);
    assert_eq!(long[3]["layer"], TOP);
    assert_eq!(long[3]["size"], 10 * GIB);
    assert_eq!(long[3]["used_by"], serde_json::json!(["busybox:latest"]));
    assert_eq!(long[4]["kind"], "rw");
    assert_eq!(long[4]["lock"], "host-a");

    assert_eq!(
        ok(&f, &["tree"]),
        "\
base0000 (image)
|-- top00000 (image) [busybox:latest]
    |-- db000000 (rw) [db]
    `-- web00000-init (init) [web]
        `-- web00000 (rw) [web]
lost0000 (image)
"
        .replace("|-- top", "`-- top")
    );
    assert_eq!(
        ok(&f, &["tree", "db"]),
        "base0000 (image)\n`-- top00000 (image) [busybox:latest]\n    `-- db000000 (rw) [db]\n"
    );
    assert_eq!(json(&f, &["tree", "db"])[0]["children"][0]["layer"], TOP);

    assert_eq!(
        ok(&f, &["children", "busybox"]),
        "db000000\nweb00000-init\n"
    );
    assert_eq!(json(&f, &["children", WEB]), serde_json::json!([]));
    assert_eq!(ok(&f, &["children", WEB]), "");

    assert_eq!(
        ok(&f, &["du", BASE]),
        "NAME      PROVISIONED  USED\nbase0000  8 MiB        1 MiB\n<TOTAL>   8 MiB        1 MiB\n"
    );
    let du = json(&f, &["disk-usage"]);
    assert_eq!(du["images"].as_array().unwrap().len(), 6);
    assert_eq!(
        du["total_provisioned_size"],
        8 * (1 << 20) + 40 * GIB + (512 << 20)
    );
    assert_eq!(du["total_used_size"], 1 << 20);

    let info = ok(&f, &["info", "web"]);
    assert!(
        info.starts_with("layer 'web00000':\n\trbd image: docker-rbd.layer.web00000\n\tkind: rw\n"),
        "{info}"
    );
    assert!(info.contains("\towner: host-a\n"), "{info}");
    assert!(info.contains("\tparent 1: web00000-init (depth 0)\n\tparent 2: top00000 (depth 0)\n\tparent 3: base0000 (depth 0)\n"), "{info}");
    let info = json(&f, &["info", "busybox:latest", "--pretty-format"]);
    assert_eq!(info["layer"], TOP);
    assert_eq!(info["provisioned"], 10 * GIB);
    let info = json(&f, &["info", BASE]);
    assert_eq!(info["used"], 1 << 20);

    assert_eq!(
        ok(&f, &["containers"]),
        "\
ID            NAME  IMAGE           STATE    OWNER   LAST HOST
aaaa00000000  web   busybox:latest  running  host-a  host-a
bbbb00000000  db    busybox:latest  stopped  -       host-b
"
    );
    let cs = json(&f, &["containers"]);
    assert_eq!(cs[1]["state"], "stopped");
    assert_eq!(cs[1]["owner"], serde_json::Value::Null);

    // The lease column counts from now: normalise it.
    let hosts: String = ok(&f, &["hosts"])
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .map(|w| {
            let w: Vec<&str> = w
                .iter()
                .map(|c| {
                    if c.ends_with("s") && c.chars().next().unwrap().is_ascii_digit() {
                        "Ns"
                    } else {
                        c
                    }
                })
                .collect();
            w.join(" ") + "\n"
        })
        .collect();
    assert_eq!(
        hosts,
        "ID ADDRESS ALIVE LEASE CONTAINERS\nhost-a 10.0.0.1:0/1 no Ns ago web\nhost-b 10.0.0.2:0/2 no Ns ago -\n"
    );
    let hs = json(&f, &["hosts"]);
    assert_eq!(hs[0]["lease_expires"], 1_700_000_030u64);
    assert_eq!(hs[0]["alive"], false);
    assert_eq!(hs[0]["containers"], serde_json::json!(["web"]));

    // The web container's layer has a record but no RBD image here.
    fails(
        Some(&f),
        &["lock", "ls", "web"],
        2,
        "docker-rbd: lock ls failed: (2) No such file or directory: lock of image docker-rbd.layer.web00000",
    );
}

#[test]
fn bad_input_is_one_line_with_errno() {
    let Some(f) = build() else { return };
    fails(
        Some(&f),
        &["info", "nosuchthing"],
        2,
        "docker-rbd: info failed: (2) No such file or directory: ",
    );
    fails(
        Some(&f),
        &["children", "nosuchthing"],
        2,
        "docker-rbd: children failed: (2) ",
    );
    fails(
        Some(&f),
        &["lock", "ls", "nosuchthing"],
        2,
        "docker-rbd: lock ls failed: (2) ",
    );
    fails(
        Some(&f),
        &["ls", "--format", "xml"],
        22,
        "docker-rbd: invalid arguments: (22) Invalid argument: invalid value 'xml'",
    );
    fails(
        Some(&f),
        &["ls", "--pretty-format"],
        22,
        "docker-rbd: ls failed: (22) Invalid argument: --pretty-format needs --format json",
    );
    fails(
        None,
        &[
            "ls",
            "-c",
            f.env.conf.to_str().unwrap(),
            "--id",
            &f.env.id,
            "-k",
            "/nonexistent/keyring",
        ],
        2,
        "docker-rbd: ls failed: (2) No such file or directory: ",
    );
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(conf.path(), "[global]\nmon_host = 127.0.0.1:9\n").unwrap();
    let start = std::time::Instant::now();
    fails(
        None,
        &[
            "ls",
            "-c",
            conf.path().to_str().unwrap(),
            "-k",
            f.env.keyring.to_str().unwrap(),
            "--connect-timeout",
            "2",
        ],
        110,
        "docker-rbd: ls failed: (110) Connection timed out: ",
    );
    assert!(start.elapsed().as_secs() < 10);
    // `docker rbd ...` passes `rbd` first; the metadata is JSON.
    let meta = run(None, &["docker-cli-plugin-metadata"]);
    let v: serde_json::Value = serde_json::from_str(&meta.stdout).unwrap();
    assert_eq!(v["SchemaVersion"], "0.1.0");
    assert_eq!(ok(&f, &["rbd", "ls"]).lines().count(), 6);
}

#[test]
fn an_empty_fleet_prints_nothing_or_an_empty_list() {
    let Some(f) = build() else { return };
    let store = Store::new(f.ioctx.clone(), "docker-rbd.");
    for t in ["layers", "hosts", "containers"] {
        f.ioctx.remove(&format!("{}{t}", store.prefix())).unwrap();
    }
    for args in [
        &["ls"][..],
        &["ls", "-l"],
        &["containers"],
        &["hosts"],
        &["tree"],
    ] {
        assert_eq!(ok(&f, args), "", "{args:?}");
        assert_eq!(json(&f, args), serde_json::json!([]), "{args:?}");
    }
}

/// Makes RBD image `name` of 4 MiB; with `snap`, snapshots it `sealed`.
fn image(ioctx: &IoCtx, name: &str, snap: bool) {
    rbd::create(ioctx, name, 4 << 20, &rbd::ImageOptions::default()).expect("create image");
    if snap {
        rbd::Image::open(ioctx, name, None)
            .and_then(|img| img.snap_create("sealed"))
            .expect("snapshot");
    }
}

/// (problem, name, collectable) of each problem `fsck` prints.
fn problems(f: &TestFleet) -> BTreeSet<(String, String, bool)> {
    let mut args = vec!["fsck", "--format", "json"];
    let out = run(Some(f), &args);
    assert_eq!(out.code, 1, "fsck finds problems: {}", out.stderr);
    let listed: serde_json::Value = serde_json::from_str(&out.stdout).expect("fsck JSON");
    args.truncate(1);
    let plain = run(Some(f), &args);
    assert_eq!(plain.code, 1, "{}", plain.stderr);
    let rows = listed.as_array().expect("a list");
    assert_eq!(
        plain.stdout.lines().count(),
        rows.len() + 1,
        "one line per problem under a header:\n{}",
        plain.stdout
    );
    rows.iter()
        .map(|p| {
            let name = p["layer"].as_str().or(p["host"].as_str()).unwrap_or("-");
            (
                p["kind"].as_str().unwrap().to_string(),
                name.to_string(),
                p["collectable"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn row(kind: &str, name: &str, collectable: bool) -> (String, String, bool) {
    (kind.to_string(), name.to_string(), collectable)
}

#[test]
fn fsck_finds_each_problem_and_gc_removes_only_what_nothing_needs() {
    let Some(f) = build() else { return };
    let store = Store::new(f.ioctx.clone(), "docker-rbd.");
    let layers = store.layers();
    // Images without records: one alone, one with a clone (also unrecorded).
    image(&f.ioctx, "docker-rbd.layer.stray000", false);
    image(&f.ioctx, "docker-rbd.layer.stparent", true);
    rbd::clone(
        &f.ioctx,
        "docker-rbd.layer.stparent",
        "sealed",
        &f.ioctx,
        "docker-rbd.layer.stchild0",
        &rbd::ImageOptions::default(),
    )
    .expect("clone");
    // A create its host (dead) never finished.
    let mut stuck = layer(Some(BASE), "stuck000", LayerKind::ReadWrite, GIB, &[]);
    stuck.state = LayerState::Creating;
    stuck.created_by = "host-b".into();
    layers.create("stuck000", &stuck).unwrap();
    // A shared init layer over the base, used by one container's init
    // layer: healthy, though no host holds it and its user has no image.
    let shared_id = "s0000000-init";
    let shared_image = format!("docker-rbd.layer.{shared_id}");
    image(&f.ioctx, &shared_image, true);
    let mut shared = layer(Some(BASE), shared_id, LayerKind::SharedInit, 4 << 20, &[]);
    shared.sealed = true;
    layers.create(shared_id, &shared).unwrap();
    let mut user = layer(
        Some(BASE),
        "user0000-init",
        LayerKind::Init,
        4 << 20,
        &["host-a"],
    );
    user.image = shared_image.clone();
    user.init = Some(metadata::InitContent::Shared {
        layer: shared_id.into(),
    });
    layers.create("user0000-init", &user).unwrap();
    // A pending init layer: no image yet, by design.
    let mut pending = layer(
        Some(BASE),
        "pend0000-init",
        LayerKind::Init,
        4 << 20,
        &["host-a"],
    );
    pending.init = Some(metadata::InitContent::Pending);
    layers.create("pend0000-init", &pending).unwrap();

    let expected = BTreeSet::from([
        row("unrecorded-image", "stray000", true),
        row("unrecorded-image", "stparent", false),
        row("unrecorded-image", "stchild0", true),
        row("dangling-parent", LOST, false),
        // Records of containers and of the image: needed, so kept.
        row("missing-image", TOP, false),
        row("missing-image", WEB_INIT, false),
        row("missing-image", WEB, false),
        row("missing-image", DB, false),
        row("missing-image", LOST, true),
        row("stale-lease", "host-a", false),
        row("stuck-creating", "stuck000", true),
    ]);
    assert_eq!(problems(&f), expected);

    // A dry run lists what would go and removes nothing.
    let dry = json(&f, &["gc", "--dry-run"]);
    let would: BTreeSet<String> = dry
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["action"], "would_remove", "{r}");
            r["layer"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        would,
        BTreeSet::from(["stray000", "stchild0", LOST, "stuck000"].map(String::from))
    );
    assert_eq!(problems(&f), expected);

    let done = ok(&f, &["gc"]);
    assert_eq!(
        done.lines().count(),
        5,
        "a header and four removals:\n{done}"
    );
    assert!(
        done.lines().skip(1).all(|l| l.starts_with("removed")),
        "{done}"
    );
    let images: BTreeSet<String> = rbd::list(&f.ioctx)
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(
        images,
        BTreeSet::from([
            "docker-rbd.layer.base0000".to_string(),
            "docker-rbd.layer.stparent".to_string(),
            shared_image.clone(),
        ]),
        "gc removes the unneeded images and nothing else"
    );
    let records: BTreeSet<String> = layers.list().unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(!records.contains(LOST) && !records.contains("stuck000"));
    assert!(records.contains(shared_id) && records.contains("user0000-init"));

    // With its clone gone, the stray parent is collectable: a second gc
    // takes it, and what is left is only what something needs.
    assert!(problems(&f).contains(&row("unrecorded-image", "stparent", true)));
    let again = json(&f, &["gc"]);
    assert_eq!(again.as_array().unwrap().len(), 1, "{again}");
    assert_eq!(again[0]["action"], "removed");
    assert!(problems(&f).iter().all(|(_, _, collectable)| !collectable));
    assert_eq!(json(&f, &["gc", "--dry-run"]), serde_json::json!([]));
}

/// Runs docker-rbd on the fleet under a pseudo-terminal (util-linux
/// `script`), as someone at a terminal would: what reached the terminal,
/// and the exit status.
fn run_on_terminal(f: &TestFleet, args: &[&str]) -> (String, i32) {
    let mut words: Vec<String> = vec![BIN.to_string()];
    words.extend(args.iter().map(|a| a.to_string()));
    words.extend([
        "-c".into(),
        f.env.conf.display().to_string(),
        "--id".into(),
        f.env.id.clone(),
        "-k".into(),
        f.env.keyring.display().to_string(),
        "-p".into(),
        f.env.pool.clone(),
        "--namespace".into(),
        f.namespace.clone(),
    ]);
    for w in &words {
        assert!(
            w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c)),
            "{w:?} would need shell quoting"
        );
    }
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &words.join(" "), "/dev/null"])
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script (util-linux)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

#[test]
fn flatten_copies_a_layer_out_of_its_chain_with_progress_on_a_terminal() {
    let Some(f) = build() else { return };
    // The base layer's image, sealed, and three unsealed clones of it.
    let base = rbd::Image::open(&f.ioctx, "docker-rbd.layer.base0000", None).expect("open base");
    base.snap_create("sealed").expect("seal the base");
    drop(base);
    let store = Store::new(f.ioctx.clone(), "docker-rbd.");
    let tips = ["tip00000", "tip00001", "tip00002"];
    for tip in tips {
        let image = format!("docker-rbd.layer.{tip}");
        rbd::clone(
            &f.ioctx,
            "docker-rbd.layer.base0000",
            "sealed",
            &f.ioctx,
            &image,
            &rbd::ImageOptions::default(),
        )
        .expect("clone");
        let mut rec = layer(Some(BASE), tip, LayerKind::ReadWrite, 8 << 20, &["host-a"]);
        rec.depth = 1;
        store.layers().create(tip, &rec).unwrap();
    }
    let standalone = |tip: &str| {
        let img = rbd::Image::open(&f.ioctx, &format!("docker-rbd.layer.{tip}"), None).unwrap();
        let mut head = vec![0u8; 4096];
        img.read_exact_at(0, &mut head).unwrap();
        assert!(head.iter().all(|&b| b == 7), "{tip} lost its parent's data");
        let depth = store.layers().get(tip).unwrap().unwrap().value.depth;
        (img.parent().unwrap().is_none(), depth)
    };
    assert_eq!(standalone("tip00000"), (false, 1));

    // Plain: nothing printed, like `rbd flatten`; the image stands alone.
    assert_eq!(ok(&f, &["flatten", "tip00000"]), "");
    assert_eq!(standalone("tip00000"), (true, 0));
    let base_children =
        rbd::Image::open_read_only(&f.ioctx, "docker-rbd.layer.base0000", Some("sealed"))
            .unwrap()
            .children()
            .unwrap();
    assert_eq!(base_children.len(), 2, "{base_children:?}");
    // JSON names what it was cloned from.
    let out = json(&f, &["flatten", "tip00001"]);
    assert_eq!(out["layer"], "tip00001");
    assert_eq!(out["image"], "docker-rbd.layer.tip00001");
    assert_eq!(
        out["parent_image"],
        format!(
            "{}/{}/docker-rbd.layer.base0000@sealed",
            f.env.pool, f.namespace
        )
    );
    assert_eq!(standalone("tip00001"), (true, 0));

    // What cannot be flattened says why, with EINVAL; unknown names ENOENT.
    fails(
        Some(&f),
        &["flatten", "tip00000"],
        libc::EINVAL,
        "docker-rbd: flatten failed: (22) Invalid argument: layer tip00000 cannot be flattened: its image docker-rbd.layer.tip00000 has no parent",
    );
    fails(
        Some(&f),
        &["flatten", BASE],
        libc::EINVAL,
        "docker-rbd: flatten failed: (22) Invalid argument: layer base0000 cannot be flattened: it is sealed",
    );
    fails(
        Some(&f),
        &["flatten", "nosuch"],
        libc::ENOENT,
        "docker-rbd: flatten failed: (2) No such file or directory: no layer",
    );
    fails(
        Some(&f),
        &["flatten", WEB],
        libc::ENOENT,
        "docker-rbd: flatten failed: (2) No such file or directory: open image docker-rbd.layer.web00000",
    );

    // On a terminal, a progress bar (cleared when done); piped, none (the
    // `ok` calls above check stderr is empty).
    let (screen, code) = run_on_terminal(&f, &["flatten", "tip00002"]);
    assert_eq!(code, 0, "{screen}");
    assert!(
        screen.contains("flatten") && screen.contains('%'),
        "no progress bar on the terminal: {screen:?}"
    );
    assert_eq!(standalone("tip00002"), (true, 0));

    // gc's, too: an image no record names is removed with a bar.
    rbd::create(
        &f.ioctx,
        "docker-rbd.layer.orphan00",
        4 << 20,
        &rbd::ImageOptions::default(),
    )
    .expect("create an unrecorded image");
    let (screen, code) = run_on_terminal(&f, &["gc"]);
    assert_eq!(code, 0, "{screen}");
    assert!(
        screen.contains("gc "),
        "no progress bar on the terminal: {screen:?}"
    );
    assert!(screen.contains("orphan00"), "{screen:?}");
    assert!(
        rbd::Image::open_read_only(&f.ioctx, "docker-rbd.layer.orphan00", None).is_err(),
        "gc left the unrecorded image"
    );
}
