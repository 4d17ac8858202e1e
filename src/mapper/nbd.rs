//! `rbd-nbd`: librbd in a per-image daemon, exposed through the kernel's nbd
//! driver as `/dev/nbdN`.
//!
//! `rbd-nbd map` forks a daemon that serves the device and survives us, so
//! a restarted driver adopts by matching `rbd-nbd list-mapped --format json`
//! (`[{"id":<pid>,"pool":..,"namespace":..,"image":..,"snap":..,"device":..}]`)
//! against its records.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::runner::{CommandLine, CommandRunner};
use super::{
    CephConnection, Error, ImageSpec, MapRequest, MappedDevice, MapperConfig, MapperKind,
    MappingHandle, Result, parse_error, run_checked,
};

/// Maps images with `rbd-nbd`.
#[derive(Debug, Clone)]
pub struct NbdMapper {
    runner: Arc<dyn CommandRunner>,
    rbd_nbd: String,
    ceph: CephConnection,
    timeout: Duration,
    host_root: PathBuf,
}

impl NbdMapper {
    /// An nbd mapper running `rbd_nbd` (program name or path) through
    /// `runner`.
    pub fn new(
        runner: Arc<dyn CommandRunner>,
        rbd_nbd: impl Into<String>,
        ceph: CephConnection,
    ) -> Self {
        Self {
            runner,
            rbd_nbd: rbd_nbd.into(),
            ceph,
            timeout: Duration::from_secs(120),
            host_root: PathBuf::from("/"),
        }
    }

    /// Built from the shared mapper configuration.
    pub fn from_config(config: &MapperConfig) -> Self {
        Self {
            runner: config.runner.clone(),
            rbd_nbd: config.rbd_nbd_program.clone(),
            ceph: config.ceph.clone(),
            timeout: config.command_timeout,
            host_root: config.host_root.clone(),
        }
    }

    fn command(&self) -> CommandLine {
        CommandLine::new(self.rbd_nbd.clone())
            .args(self.ceph.cli_args())
            .timeout(self.timeout)
    }

    /// The `rbd-nbd map` command line for `req`.
    pub fn map_command(&self, req: &MapRequest) -> Result<CommandLine> {
        let spec = req.spec();
        spec.validate()?;
        let mut cmd = self.command();
        if req.effective_read_only() {
            cmd = cmd.arg("--read-only");
        }
        if req.exclusive {
            cmd = cmd.arg("--exclusive");
        }
        Ok(cmd.arg("map").arg(spec.to_string()))
    }

    /// Maps `req`; returns `/dev/nbdN`.
    #[tracing::instrument(skip(self), fields(spec = %req.spec(), read_only = req.read_only, exclusive = req.exclusive))]
    pub fn map(&self, req: &MapRequest) -> Result<MappedDevice> {
        let cmd = self.map_command(req)?;
        let out = run_checked(self.runner.as_ref(), &cmd, None)?;
        let device = super::krbd::parse_map_output(&out.stdout)
            .ok_or_else(|| parse_error(&cmd, &out.stdout, "no /dev/ path in the output"))?;
        // The serving daemon's pid, for the record; a failed listing only
        // loses that detail.
        let pid = match self.list() {
            Ok(list) => {
                list.into_iter()
                    .find(|d| d.device == device)
                    .and_then(|d| match d.handle {
                        MappingHandle::Nbd { pid } => pid,
                        _ => None,
                    })
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list rbd-nbd mappings to find the daemon pid");
                None
            }
        };
        tracing::info!(device = %device.display(), ?pid, "mapped with rbd-nbd");
        Ok(MappedDevice {
            device,
            spec: req.spec(),
            read_only: req.effective_read_only(),
            handle: MappingHandle::Nbd { pid },
        })
    }

    /// Unmaps; [`Error::Busy`] while the device is mounted or open.
    /// Unmapping a device that is no longer mapped succeeds.
    #[tracing::instrument(skip(self, dev), fields(device = %dev.device.display(), spec = %dev.spec))]
    pub fn unmap(&self, dev: &MappedDevice) -> Result<()> {
        if !matches!(dev.handle, MappingHandle::Nbd { .. }) {
            return Err(Error::WrongMapper {
                expected: MapperKind::Nbd,
                found: dev.kind(),
            });
        }
        let cmd = self
            .command()
            .arg("unmap")
            .arg(dev.device.display().to_string());
        match run_checked(self.runner.as_ref(), &cmd, Some(&dev.device)) {
            Ok(_) => Ok(()),
            Err(e @ Error::CommandFailed { .. }) => {
                let still_mapped = self.list()?.iter().any(|d| d.device == dev.device);
                if still_mapped {
                    Err(e)
                } else {
                    tracing::info!(error = %e, "device was already unmapped");
                    Ok(())
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Every rbd-nbd mapping on this host.
    pub fn list(&self) -> Result<Vec<MappedDevice>> {
        let cmd = self.command().args(["list-mapped", "--format", "json"]);
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
                    handle: MappingHandle::Nbd { pid: e.pid },
                }
            })
            .collect())
    }

    fn block_read_only(&self, device: &std::path::Path) -> bool {
        let Some(name) = device.file_name() else {
            return false;
        };
        std::fs::read_to_string(self.host_root.join("sys/block").join(name).join("ro"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    /// Finds the recorded device in `rbd-nbd list-mapped` still serving the
    /// recorded image.
    pub fn adopt(&self, dev: &MappedDevice) -> Result<MappedDevice> {
        let MappingHandle::Nbd { pid: recorded_pid } = &dev.handle else {
            return Err(Error::WrongMapper {
                expected: MapperKind::Nbd,
                found: dev.kind(),
            });
        };
        let stale = |reason: String| Error::Stale {
            spec: dev.spec.to_string(),
            device: dev.device.clone(),
            reason,
        };
        let list = self.list()?;
        let Some(current) = list.into_iter().find(|d| d.device == dev.device) else {
            return Err(stale("rbd-nbd no longer lists the device".to_string()));
        };
        if current.spec != dev.spec {
            return Err(stale(format!("the device now maps {}", current.spec)));
        }
        if let (Some(old), MappingHandle::Nbd { pid: Some(new) }) = (recorded_pid, &current.handle)
            && old != new
        {
            tracing::info!(old_pid = old, new_pid = new, "rbd-nbd daemon was replaced");
        }
        Ok(current)
    }
}

/// One line of `rbd-nbd list-mapped --format json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// The serving `rbd-nbd` process.
    pub pid: Option<i64>,
    /// The mapped image.
    pub spec: ImageSpec,
    /// `/dev/nbdN`.
    pub device: PathBuf,
}

#[derive(Deserialize)]
struct RawListEntry {
    #[serde(default)]
    id: Option<serde_json::Value>,
    pool: String,
    #[serde(default)]
    namespace: String,
    image: String,
    #[serde(default)]
    snap: String,
    device: String,
}

/// Parses `rbd-nbd list-mapped --format json`; empty output is an empty list.
pub fn parse_list_json(stdout: &str) -> std::result::Result<Vec<ListEntry>, String> {
    if stdout.trim().is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<RawListEntry> = serde_json::from_str(stdout).map_err(|e| e.to_string())?;
    Ok(raw
        .into_iter()
        .map(|r| ListEntry {
            pid: match r.id {
                Some(serde_json::Value::Number(n)) => n.as_i64().filter(|p| *p > 0),
                Some(serde_json::Value::String(s)) => s.parse().ok().filter(|p| *p > 0),
                _ => None,
            },
            spec: ImageSpec {
                pool: r.pool,
                namespace: (!r.namespace.is_empty()).then_some(r.namespace),
                image: r.image,
                snap: (!r.snap.is_empty() && r.snap != "-").then_some(r.snap),
            },
            device: PathBuf::from(r.device),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::runner::CommandOutput;
    use super::super::runner::fake::{Answer, FakeRunner};
    use super::*;

    fn mapper(answers: Vec<Answer>) -> (Arc<FakeRunner>, NbdMapper) {
        let fake = Arc::new(FakeRunner::new(answers));
        let ceph = CephConnection {
            conf: Some("/c.conf".into()),
            id: Some("docker".into()),
            keyring: Some("/k".into()),
            cluster: Some("ceph".into()),
        };
        (fake.clone(), NbdMapper::new(fake, "/usr/bin/rbd-nbd", ceph))
    }

    const LIST: &str = r#"[{"id":4242,"pool":"rbd","namespace":"fleet","image":"layer-1","snap":"-","device":"/dev/nbd0","cookie":"c"}]"#;

    #[test]
    fn map_command_lines_and_pid() {
        let (fake, m) = mapper(vec![
            Answer::Output(CommandOutput::ok("/dev/nbd0\n")),
            Answer::Output(CommandOutput::ok(LIST)),
        ]);
        let mut req = MapRequest::new("rbd", Some("fleet".into()), "layer-1");
        req.read_only = true;
        req.exclusive = true;
        let dev = m.map(&req).unwrap();
        assert_eq!(
            fake.rendered(),
            [
                "/usr/bin/rbd-nbd --cluster ceph --id docker --conf /c.conf --keyring /k --read-only --exclusive map rbd/fleet/layer-1",
                "/usr/bin/rbd-nbd --cluster ceph --id docker --conf /c.conf --keyring /k list-mapped --format json",
            ]
        );
        assert_eq!(dev.device, PathBuf::from("/dev/nbd0"));
        assert_eq!(dev.handle, MappingHandle::Nbd { pid: Some(4242) });
        assert!(dev.read_only);
    }

    #[test]
    fn map_survives_a_failed_listing() {
        let (_, m) = mapper(vec![
            Answer::Output(CommandOutput::ok("/dev/nbd3\n")),
            Answer::Output(CommandOutput::failed(1, "boom")),
        ]);
        let dev = m.map(&MapRequest::new("rbd", None, "x")).unwrap();
        assert_eq!(dev.handle, MappingHandle::Nbd { pid: None });
    }

    #[test]
    fn map_errors() {
        let stderr = "rbd-nbd: failed to open image: (2) No such file or directory\n";
        let (_, m) = mapper(vec![Answer::Output(CommandOutput::failed(2, stderr))]);
        let err = m.map(&MapRequest::new("rbd", None, "x")).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOENT));
        let (_, m) = mapper(vec![Answer::NotFound]);
        assert!(matches!(
            m.map(&MapRequest::new("rbd", None, "x")),
            Err(Error::Spawn { .. })
        ));
    }

    #[test]
    fn unmap_busy_and_already_gone() {
        let dev = MappedDevice {
            device: "/dev/nbd0".into(),
            spec: MapRequest::new("rbd", Some("fleet".into()), "layer-1").spec(),
            read_only: false,
            handle: MappingHandle::Nbd { pid: Some(4242) },
        };
        let (fake, m) = mapper(vec![Answer::Output(CommandOutput::failed(
            16,
            "rbd-nbd: failed to unmap: (16) Device or resource busy",
        ))]);
        assert!(matches!(m.unmap(&dev), Err(Error::Busy { .. })));
        assert_eq!(fake.calls()[0].args[8..], ["unmap", "/dev/nbd0"]);

        let (_, m) = mapper(vec![
            Answer::Output(CommandOutput::failed(
                22,
                "rbd-nbd: /dev/nbd0 is not mapped: (22) Invalid argument",
            )),
            Answer::Output(CommandOutput::ok("[]")),
        ]);
        m.unmap(&dev).unwrap();

        let (_, m) = mapper(vec![
            Answer::Output(CommandOutput::failed(
                5,
                "rbd-nbd: failed: (5) Input/output error",
            )),
            Answer::Output(CommandOutput::ok(LIST)),
        ]);
        assert!(matches!(
            m.unmap(&dev),
            Err(Error::CommandFailed { errno: Some(5), .. })
        ));
    }

    #[test]
    fn adopt_matches_device_and_image() {
        let dev = MappedDevice {
            device: "/dev/nbd0".into(),
            spec: MapRequest::new("rbd", Some("fleet".into()), "layer-1").spec(),
            read_only: false,
            handle: MappingHandle::Nbd { pid: Some(1) },
        };
        let (_, m) = mapper(vec![Answer::Output(CommandOutput::ok(LIST))]);
        assert_eq!(
            m.adopt(&dev).unwrap().handle,
            MappingHandle::Nbd { pid: Some(4242) }
        );
        let mut other = dev.clone();
        other.spec.image = "layer-2".into();
        let (_, m) = mapper(vec![Answer::Output(CommandOutput::ok(LIST))]);
        assert!(matches!(m.adopt(&other), Err(Error::Stale { .. })));
        let (_, m) = mapper(vec![Answer::Output(CommandOutput::ok("[]"))]);
        assert!(matches!(m.adopt(&dev), Err(Error::Stale { .. })));
    }

    #[test]
    fn list_json_variants() {
        let l = parse_list_json(
            r#"[{"id":"17","pool":"p","image":"i","snap":"s1","device":"/dev/nbd2"},{"pool":"p","namespace":"n","image":"j","snap":"","device":"/dev/nbd3"}]"#,
        )
        .unwrap();
        assert_eq!(l[0].pid, Some(17));
        assert_eq!(l[0].spec.to_string(), "p/i@s1");
        assert_eq!(l[1].pid, None);
        assert_eq!(l[1].spec.to_string(), "p/n/j");
        assert!(parse_list_json("").unwrap().is_empty());
        assert!(parse_list_json("[{}]").is_err());
    }
}
