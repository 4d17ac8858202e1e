//! The kernel RBD client: `rbd device map|unmap|list`.
//!
//! Mapping and unmapping go through the `rbd` tool, which resolves monitor
//! addresses and cephx keys and writes the kernel's `add_single_major`
//! string for us. Listing and adoption read
//! `/sys/bus/rbd/devices/<id>/{pool,pool_ns,name,current_snap}` directly,
//! so a restarted daemon can check its devices without the cluster or udev
//! ([`KrbdMapper::list_cli`] asks `rbd device list` instead).
//! [`sysfs_add_string`] documents (and tests) the string the kernel takes,
//! for hosts that want to write it themselves.
//!
//! Errors: `rbd` prints `rbd: sysfs write failed` followed by
//! `In some cases useful info is found in syslog` and
//! `rbd: map failed: (N) <strerror>`; the errno is recovered by the
//! [`runner`](super::runner) and `EBUSY` on unmap becomes [`Error::Busy`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::runner::{CommandLine, CommandRunner};
use super::{
    CephConnection, Error, ImageSpec, MapRequest, MappedDevice, MapperConfig, MapperKind,
    MappingHandle, Result, parse_error, run_checked,
};

/// Maps images with the kernel RBD client.
#[derive(Debug, Clone)]
pub struct KrbdMapper {
    runner: Arc<dyn CommandRunner>,
    rbd: String,
    ceph: CephConnection,
    map_options: Vec<String>,
    timeout: Duration,
    host_root: PathBuf,
}

impl KrbdMapper {
    /// A krbd mapper running `rbd` (program name or path) through `runner`.
    pub fn new(
        runner: Arc<dyn CommandRunner>,
        rbd: impl Into<String>,
        ceph: CephConnection,
    ) -> Self {
        Self {
            runner,
            rbd: rbd.into(),
            ceph,
            map_options: Vec::new(),
            timeout: Duration::from_secs(120),
            host_root: PathBuf::from("/"),
        }
    }

    /// Built from the shared mapper configuration.
    pub fn from_config(config: &MapperConfig) -> Self {
        Self {
            runner: config.runner.clone(),
            rbd: config.rbd_program.clone(),
            ceph: config.ceph.clone(),
            map_options: config.krbd_map_options.clone(),
            timeout: config.command_timeout,
            host_root: config.host_root.clone(),
        }
    }

    /// Extra `-o` options for `rbd device map` (e.g. `noudev`).
    pub fn with_map_options(mut self, options: Vec<String>) -> Self {
        self.map_options = options;
        self
    }

    /// Where `/sys` is looked for (tests).
    pub fn with_host_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.host_root = root.into();
        self
    }

    fn command(&self) -> CommandLine {
        CommandLine::new(self.rbd.clone())
            .args(self.ceph.cli_args())
            .timeout(self.timeout)
    }

    fn sysfs_devices(&self) -> PathBuf {
        self.host_root.join("sys/bus/rbd/devices")
    }

    /// The `rbd device map` command line for `req`.
    pub fn map_command(&self, req: &MapRequest) -> Result<CommandLine> {
        let spec = req.spec();
        spec.validate()?;
        for opt in &self.map_options {
            if opt.is_empty() || opt.contains(',') || opt.chars().any(char::is_whitespace) {
                return Err(Error::InvalidRequest {
                    field: "krbd map option",
                    value: opt.clone(),
                    reason: "must be one non-empty option without ',' or whitespace",
                });
            }
        }
        let mut cmd = self.command().args(["device", "map"]);
        if req.effective_read_only() {
            cmd = cmd.arg("--read-only");
        }
        if req.exclusive {
            cmd = cmd.arg("--exclusive");
        }
        if !self.map_options.is_empty() {
            cmd = cmd.args(["--options".to_string(), self.map_options.join(",")]);
        }
        Ok(cmd.arg(spec.to_string()))
    }

    /// Maps `req`; returns `/dev/rbdN`.
    #[tracing::instrument(skip(self), fields(spec = %req.spec(), read_only = req.read_only, exclusive = req.exclusive))]
    pub fn map(&self, req: &MapRequest) -> Result<MappedDevice> {
        let cmd = self.map_command(req)?;
        let out = run_checked(self.runner.as_ref(), &cmd, None)?;
        let device = parse_map_output(&out.stdout)
            .ok_or_else(|| parse_error(&cmd, &out.stdout, "no /dev/ path in the output"))?;
        let id = device_id(&device).ok_or_else(|| {
            parse_error(
                &cmd,
                &out.stdout,
                format!("{} is not an rbd device name", device.display()),
            )
        })?;
        tracing::info!(device = %device.display(), %id, "mapped with krbd");
        Ok(MappedDevice {
            device,
            spec: req.spec(),
            read_only: req.effective_read_only(),
            handle: MappingHandle::Krbd { id },
        })
    }

    /// Unmaps; [`Error::Busy`] while the device is mounted or open.
    /// Unmapping a device that is already gone succeeds.
    #[tracing::instrument(skip(self, dev), fields(device = %dev.device.display(), spec = %dev.spec))]
    pub fn unmap(&self, dev: &MappedDevice) -> Result<()> {
        let MappingHandle::Krbd { id } = &dev.handle else {
            return Err(Error::WrongMapper {
                expected: MapperKind::Krbd,
                found: dev.kind(),
            });
        };
        let cmd = self
            .command()
            .args(["device", "unmap"])
            .arg(dev.device.display().to_string());
        match run_checked(self.runner.as_ref(), &cmd, Some(&dev.device)) {
            Ok(_) => {
                tracing::info!("unmapped");
                Ok(())
            }
            Err(Error::CommandFailed {
                errno: Some(errno), ..
            }) if (errno == libc::ENOENT || errno == libc::EINVAL || errno == libc::ENODEV)
                && !self.sysfs_devices().join(id).exists() =>
            {
                tracing::info!(errno, "device was already unmapped");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Every krbd mapping on this host, read from sysfs (the kernel's own
    /// record; needs neither the cluster nor udev, which `rbd device list`
    /// enumerates through and containers often lack).
    pub fn list(&self) -> Result<Vec<MappedDevice>> {
        self.list_sysfs()
    }

    /// Every krbd mapping as `rbd device list --format json` reports it.
    pub fn list_cli(&self) -> Result<Vec<MappedDevice>> {
        let cmd = self.command().args(["device", "list", "--format", "json"]);
        let out = run_checked(self.runner.as_ref(), &cmd, None)?;
        let entries = parse_list_json(&out.stdout)
            .map_err(|reason| parse_error(&cmd, &out.stdout, reason))?;
        Ok(entries
            .into_iter()
            .map(|e| {
                let read_only = e.spec.snap.is_some() || self.block_read_only(&e.device);
                MappedDevice {
                    device: e.device,
                    spec: e.spec,
                    read_only,
                    handle: MappingHandle::Krbd { id: e.id },
                }
            })
            .collect())
    }

    /// Every krbd mapping, from `/sys/bus/rbd/devices`.
    pub fn list_sysfs(&self) -> Result<Vec<MappedDevice>> {
        let dir = self.sysfs_devices();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read", dir, e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read", &dir, e))?;
            let id = entry.file_name().to_string_lossy().into_owned();
            if let Some(dev) = self.read_sysfs_device(&id)? {
                found.push(dev);
            }
        }
        found.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(found)
    }

    fn read_sysfs_device(&self, id: &str) -> Result<Option<MappedDevice>> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            return Ok(None);
        }
        let dir = self.sysfs_devices().join(id);
        let read = |name: &str| -> Result<Option<String>> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok(Some(s.trim_end_matches('\n').to_string())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("read", path, e)),
            }
        };
        let (Some(pool), Some(name)) = (read("pool")?, read("name")?) else {
            return Ok(None);
        };
        let namespace = read("pool_ns")?.filter(|ns| !ns.is_empty());
        let snap = read("current_snap")?.filter(|s| s != "-" && !s.is_empty());
        let device = PathBuf::from(format!("/dev/rbd{id}"));
        let read_only = snap.is_some() || self.block_read_only(&device);
        Ok(Some(MappedDevice {
            device,
            spec: ImageSpec {
                pool,
                namespace,
                image: name,
                snap,
            },
            read_only,
            handle: MappingHandle::Krbd { id: id.to_string() },
        }))
    }

    fn block_read_only(&self, device: &Path) -> bool {
        let Some(name) = device.file_name() else {
            return false;
        };
        std::fs::read_to_string(self.host_root.join("sys/block").join(name).join("ro"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    /// Checks in sysfs that the recorded device still maps the recorded
    /// image.
    pub fn adopt(&self, dev: &MappedDevice) -> Result<MappedDevice> {
        let MappingHandle::Krbd { id } = &dev.handle else {
            return Err(Error::WrongMapper {
                expected: MapperKind::Krbd,
                found: dev.kind(),
            });
        };
        let stale = |reason: String| Error::Stale {
            spec: dev.spec.to_string(),
            device: dev.device.clone(),
            reason,
        };
        let Some(current) = self.read_sysfs_device(id)? else {
            return Err(stale(format!(
                "no krbd device {id} in /sys/bus/rbd/devices"
            )));
        };
        if current.spec != dev.spec {
            return Err(stale(format!("krbd device {id} now maps {}", current.spec)));
        }
        if current.device != dev.device {
            return Err(stale(format!(
                "krbd device {id} is {}",
                current.device.display()
            )));
        }
        Ok(current)
    }
}

/// The device path `rbd device map` printed: its last line that starts with
/// `/dev/`.
pub fn parse_map_output(stdout: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| l.starts_with("/dev/") && !l.contains(char::is_whitespace))
        .map(PathBuf::from)
}

/// `/dev/rbd7` → `7`.
fn device_id(device: &Path) -> Option<String> {
    let name = device.file_name()?.to_str()?;
    let id = name.strip_prefix("rbd")?;
    (!id.is_empty() && id.chars().all(|c| c.is_ascii_digit())).then(|| id.to_string())
}

/// One line of `rbd device list --format json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// Kernel device id.
    pub id: String,
    /// The mapped image.
    pub spec: ImageSpec,
    /// `/dev/rbdN`.
    pub device: PathBuf,
}

#[derive(Deserialize)]
struct RawListEntry {
    id: serde_json::Value,
    pool: String,
    #[serde(default)]
    namespace: String,
    name: String,
    #[serde(default)]
    snap: String,
    device: String,
}

/// Parses `rbd device list --format json` (Ceph 14+:
/// `[{"id":"0","pool":"rbd","namespace":"","name":"img","snap":"-","device":"/dev/rbd0"}]`;
/// `id` is a string in Pacific and may be a number elsewhere). Empty output
/// is an empty list.
pub fn parse_list_json(stdout: &str) -> std::result::Result<Vec<ListEntry>, String> {
    if stdout.trim().is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<RawListEntry> = serde_json::from_str(stdout).map_err(|e| e.to_string())?;
    raw.into_iter()
        .map(|r| {
            let id = match r.id {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                other => return Err(format!("unexpected id {other}")),
            };
            Ok(ListEntry {
                id,
                spec: ImageSpec {
                    pool: r.pool,
                    namespace: (!r.namespace.is_empty()).then_some(r.namespace),
                    image: r.name,
                    snap: (!r.snap.is_empty() && r.snap != "-").then_some(r.snap),
                },
                device: PathBuf::from(r.device),
            })
        })
        .collect()
}

/// How the kernel authenticates a sysfs `add`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsAuth {
    /// cephx client id without `client.`.
    pub name: String,
    /// The base64 key (`secret=`), or `None` when the key is in the kernel
    /// keyring as `key=client.<name>`.
    pub secret: Option<String>,
}

/// The string to write to `/sys/bus/rbd/add_single_major` (see the kernel's
/// `Documentation/ABI/testing/sysfs-bus-rbd`):
/// `<mon_addrs> name=<id>,secret=<key>[,_pool_ns=<ns>][,read_only][,exclusive][,<opt>...] <pool> <image> <snap|->`.
/// Monitor addresses are v1 `ip:port` joined by commas.
pub fn sysfs_add_string(
    mon_addrs: &[String],
    auth: &SysfsAuth,
    extra_options: &[String],
    req: &MapRequest,
) -> Result<String> {
    let spec = req.spec();
    spec.validate()?;
    if mon_addrs.is_empty() {
        return Err(Error::InvalidRequest {
            field: "mon_addrs",
            value: String::new(),
            reason: "at least one monitor address is needed",
        });
    }
    let check = |field: &'static str, v: &str| -> Result<()> {
        if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == ',') {
            return Err(Error::InvalidRequest {
                field,
                value: v.to_string(),
                reason: "must be non-empty without whitespace or ','",
            });
        }
        Ok(())
    };
    for m in mon_addrs {
        check("mon_addr", m)?;
    }
    check("name", &auth.name)?;
    let mut options = vec![format!("name={}", auth.name)];
    match &auth.secret {
        Some(secret) => {
            check("secret", secret)?;
            options.push(format!("secret={secret}"));
        }
        None => options.push(format!("key=client.{}", auth.name)),
    }
    if let Some(ns) = &spec.namespace {
        options.push(format!("_pool_ns={ns}"));
    }
    if req.effective_read_only() {
        options.push("read_only".to_string());
    }
    if req.exclusive {
        options.push("exclusive".to_string());
    }
    for opt in extra_options {
        check("option", opt)?;
        options.push(opt.clone());
    }
    Ok(format!(
        "{} {} {} {} {}",
        mon_addrs.join(","),
        options.join(","),
        spec.pool,
        spec.image,
        spec.snap.as_deref().unwrap_or("-")
    ))
}

#[cfg(test)]
mod tests {
    use super::super::runner::CommandOutput;
    use super::super::runner::fake::{Answer, FakeRunner};
    use super::*;

    fn ceph() -> CephConnection {
        CephConnection {
            conf: Some("/etc/ceph/t.conf".into()),
            id: Some("docker".into()),
            keyring: Some("/etc/ceph/t.keyring".into()),
            cluster: None,
        }
    }

    fn req() -> MapRequest {
        MapRequest::new("rbd", Some("fleet".into()), "layer-1")
    }

    fn mapper(answers: Vec<Answer>) -> (Arc<FakeRunner>, KrbdMapper) {
        let fake = Arc::new(FakeRunner::new(answers));
        (fake.clone(), KrbdMapper::new(fake, "rbd", ceph()))
    }

    const BUSY: &str = "rbd: sysfs write failed\nrbd: unmap failed: (16) Device or resource busy\n";

    #[test]
    fn map_command_line() {
        let (fake, m) = mapper(vec![Answer::Output(CommandOutput::ok("/dev/rbd3\n"))]);
        let mut r = req();
        r.exclusive = true;
        let dev = m.map(&r).unwrap();
        assert_eq!(
            fake.rendered(),
            [
                "rbd --id docker --conf /etc/ceph/t.conf --keyring /etc/ceph/t.keyring device map --exclusive rbd/fleet/layer-1"
            ]
        );
        assert_eq!(dev.device, PathBuf::from("/dev/rbd3"));
        assert_eq!(dev.handle, MappingHandle::Krbd { id: "3".into() });
        assert!(!dev.read_only);
        assert_eq!(dev.kind(), MapperKind::Krbd);
    }

    #[test]
    fn snapshot_maps_read_only_with_options() {
        let (fake, m) = mapper(vec![Answer::Output(CommandOutput::ok("/dev/rbd0\n"))]);
        let m = m.with_map_options(vec!["noudev".into(), "queue_depth=128".into()]);
        let mut r = MapRequest::new("rbd", None, "base");
        r.snap = Some("sealed".into());
        let dev = m.map(&r).unwrap();
        assert!(dev.read_only);
        assert_eq!(
            fake.calls()[0].args[6..],
            [
                "device",
                "map",
                "--read-only",
                "--options",
                "noudev,queue_depth=128",
                "rbd/base@sealed"
            ]
        );
    }

    #[test]
    fn map_failure_carries_errno_and_stderr() {
        let stderr = "rbd: sysfs write failed\nIn some cases useful info is found in syslog - try \"dmesg | tail\".\nrbd: map failed: (6) No such device or address\n";
        let (_, m) = mapper(vec![Answer::Output(CommandOutput::failed(6, stderr))]);
        let err = m.map(&req()).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENXIO));
        let text = err.to_string();
        assert!(text.contains("device map"), "{text}");
        assert!(text.contains("No such device or address"), "{text}");
    }

    #[test]
    fn map_output_without_device_is_a_parse_error() {
        let (_, m) = mapper(vec![Answer::Output(CommandOutput::ok("something else\n"))]);
        assert!(matches!(m.map(&req()), Err(Error::Parse { .. })));
        let (_, m) = mapper(vec![Answer::Output(CommandOutput::ok("/dev/nbd0\n"))]);
        assert!(matches!(m.map(&req()), Err(Error::Parse { .. })));
    }

    #[test]
    fn missing_rbd_tool_and_timeouts_are_errors() {
        let (_, m) = mapper(vec![Answer::NotFound]);
        assert!(matches!(m.map(&req()), Err(Error::Spawn { .. })));
        let (_, m) = mapper(vec![Answer::Timeout]);
        let err = m.map(&req()).unwrap_err();
        assert!(matches!(err, Error::CommandTimeout { .. }));
        assert_eq!(err.errno(), Some(libc::ETIMEDOUT));
    }

    #[test]
    fn bad_names_are_refused_before_running_anything() {
        let (fake, m) = mapper(vec![]);
        for (pool, image) in [
            ("", "x"),
            ("rbd", "a/b"),
            ("rbd", "a@b"),
            ("rbd", "-x"),
            ("rbd", "a b"),
        ] {
            let err = m.map(&MapRequest::new(pool, None, image)).unwrap_err();
            assert!(matches!(err, Error::InvalidRequest { .. }), "{err}");
        }
        let m = m.with_map_options(vec!["a,b".into()]);
        assert!(matches!(m.map(&req()), Err(Error::InvalidRequest { .. })));
        assert!(fake.calls().is_empty());
    }

    #[test]
    fn unmap_busy_is_busy() {
        let (fake, m) = mapper(vec![
            Answer::Output(CommandOutput::ok("/dev/rbd1\n")),
            Answer::Output(CommandOutput::failed(16, BUSY)),
        ]);
        let dev = m.map(&req()).unwrap();
        let err = m.unmap(&dev).unwrap_err();
        assert!(matches!(err, Error::Busy { .. }), "{err}");
        assert_eq!(err.errno(), Some(libc::EBUSY));
        assert_eq!(fake.calls()[1].args[6..], ["device", "unmap", "/dev/rbd1"]);
    }

    #[test]
    fn unmap_of_a_vanished_device_succeeds() {
        let root = tempfile::tempdir().unwrap();
        let (_, m) = mapper(vec![Answer::Output(CommandOutput::failed(
            22,
            "rbd: '/dev/rbd9' is not an rbd device\nrbd: unmap failed: (22) Invalid argument\n",
        ))]);
        let m = m.with_host_root(root.path());
        let dev = MappedDevice {
            device: "/dev/rbd9".into(),
            spec: req().spec(),
            read_only: false,
            handle: MappingHandle::Krbd { id: "9".into() },
        };
        m.unmap(&dev).unwrap();
        // but not while sysfs still shows it
        std::fs::create_dir_all(root.path().join("sys/bus/rbd/devices/9")).unwrap();
        let (_, m) = mapper(vec![Answer::Output(CommandOutput::failed(
            22,
            "rbd: unmap failed: (22) Invalid argument",
        ))]);
        let m = m.with_host_root(root.path());
        assert!(matches!(
            m.unmap(&dev),
            Err(Error::CommandFailed {
                errno: Some(22),
                ..
            })
        ));
    }

    #[test]
    fn unmap_refuses_other_mappers_records() {
        let (fake, m) = mapper(vec![]);
        let dev = MappedDevice {
            device: "/dev/nbd0".into(),
            spec: req().spec(),
            read_only: false,
            handle: MappingHandle::Nbd { pid: Some(7) },
        };
        assert!(matches!(m.unmap(&dev), Err(Error::WrongMapper { .. })));
        assert!(fake.calls().is_empty());
    }

    #[test]
    fn list_parses_pacific_json() {
        let json = r#"[{"id":"0","pool":"rbd","namespace":"","name":"base","snap":"sealed","device":"/dev/rbd0"},{"id":"1","pool":"rbd","namespace":"fleet","name":"layer-1","snap":"-","device":"/dev/rbd1"}]"#;
        let (fake, m) = mapper(vec![Answer::Output(CommandOutput::ok(json))]);
        let list = m.list_cli().unwrap();
        assert_eq!(
            fake.calls()[0].args[6..],
            ["device", "list", "--format", "json"]
        );
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].spec.to_string(), "rbd/base@sealed");
        assert!(list[0].read_only);
        assert_eq!(list[1].spec.to_string(), "rbd/fleet/layer-1");
        assert_eq!(list[1].handle, MappingHandle::Krbd { id: "1".into() });
    }

    #[test]
    fn list_json_variants() {
        assert_eq!(parse_list_json("").unwrap(), vec![]);
        assert_eq!(parse_list_json("[]\n").unwrap(), vec![]);
        let numeric =
            parse_list_json(r#"[{"id":4,"pool":"p","name":"i","snap":"-","device":"/dev/rbd4"}]"#)
                .unwrap();
        assert_eq!(numeric[0].id, "4");
        assert_eq!(numeric[0].spec.namespace, None);
        assert!(parse_list_json("{").is_err());
        assert!(
            parse_list_json(r#"[{"id":[],"pool":"p","name":"i","device":"/dev/rbd4"}]"#).is_err()
        );
        let (_, m) = mapper(vec![Answer::Output(CommandOutput::ok("not json"))]);
        assert!(matches!(m.list_cli(), Err(Error::Parse { .. })));
    }

    fn write_sysfs(root: &Path, id: &str, pool: &str, ns: &str, name: &str, snap: &str) {
        let dir = root.join("sys/bus/rbd/devices").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        for (f, v) in [
            ("pool", pool),
            ("pool_ns", ns),
            ("name", name),
            ("current_snap", snap),
        ] {
            std::fs::write(dir.join(f), format!("{v}\n")).unwrap();
        }
    }

    #[test]
    fn adopt_and_list_from_sysfs() {
        let root = tempfile::tempdir().unwrap();
        write_sysfs(root.path(), "2", "rbd", "fleet", "layer-1", "-");
        write_sysfs(root.path(), "5", "rbd", "", "base", "sealed");
        let ro = root.path().join("sys/block/rbd2");
        std::fs::create_dir_all(&ro).unwrap();
        std::fs::write(ro.join("ro"), "1\n").unwrap();
        let (fake, m) = mapper(vec![]);
        let m = m.with_host_root(root.path());
        let list = m.list().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].device, PathBuf::from("/dev/rbd2"));
        assert!(list[0].read_only);
        assert_eq!(list[1].spec.snap.as_deref(), Some("sealed"));

        let recorded = MappedDevice {
            device: "/dev/rbd2".into(),
            spec: req().spec(),
            read_only: true,
            handle: MappingHandle::Krbd { id: "2".into() },
        };
        assert_eq!(m.adopt(&recorded).unwrap().spec, recorded.spec);
        let mut other = recorded.clone();
        other.spec.image = "layer-2".into();
        assert!(matches!(m.adopt(&other), Err(Error::Stale { .. })));
        let mut gone = recorded.clone();
        gone.handle = MappingHandle::Krbd { id: "7".into() };
        assert!(matches!(m.adopt(&gone), Err(Error::Stale { .. })));
        assert!(fake.calls().is_empty(), "adoption needs no rbd tool");
    }

    #[test]
    fn sysfs_add_strings() {
        let mons = vec!["10.0.0.1:6789".to_string(), "10.0.0.2:6789".to_string()];
        let auth = SysfsAuth {
            name: "docker".into(),
            secret: Some("AQB==".into()),
        };
        let mut r = req();
        r.exclusive = true;
        assert_eq!(
            sysfs_add_string(&mons, &auth, &["queue_depth=128".into()], &r).unwrap(),
            "10.0.0.1:6789,10.0.0.2:6789 name=docker,secret=AQB==,_pool_ns=fleet,exclusive,queue_depth=128 rbd layer-1 -"
        );
        let mut r = MapRequest::new("rbd", None, "base");
        r.snap = Some("s".into());
        let keyring_auth = SysfsAuth {
            name: "docker".into(),
            secret: None,
        };
        assert_eq!(
            sysfs_add_string(&mons[..1], &keyring_auth, &[], &r).unwrap(),
            "10.0.0.1:6789 name=docker,key=client.docker,read_only rbd base s"
        );
        assert!(sysfs_add_string(&[], &auth, &[], &r).is_err());
        assert!(sysfs_add_string(&mons, &auth, &["a b".into()], &r).is_err());
    }

    #[test]
    fn map_output_parsing() {
        assert_eq!(parse_map_output("/dev/rbd0\n"), Some("/dev/rbd0".into()));
        assert_eq!(
            parse_map_output("warning\n/dev/rbd12\n\n"),
            Some("/dev/rbd12".into())
        );
        assert_eq!(parse_map_output(""), None);
        assert_eq!(device_id(Path::new("/dev/rbd12")), Some("12".into()));
        assert_eq!(device_id(Path::new("/dev/rbd")), None);
        assert_eq!(device_id(Path::new("/dev/nbd1")), None);
    }
}
