//! The driver's settings and where they come from.
//!
//! Settings have one name each, the key dockerd passes as
//! `--storage-opt rbd.<key>=<value>` (which arrives in `GraphDriver.Init`'s
//! `Opts`). The same keys may appear, one `key = value` per line, in a config
//! file, and most have a `docker-rbd serve` flag named like the `rbd` tool's
//! option. Precedence, lowest first:
//!
//! 1. built-in defaults,
//! 2. the config file (`docker-rbd serve --config FILE`),
//! 3. `docker-rbd serve` flags,
//! 4. `Init.Opts` from dockerd (`dockerd --storage-opt rbd.*`).
//!
//! Every problem (unknown key, bad value, duplicate) is collected and reported
//! at once, naming the key and where it came from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::mapper::MapperKind;
use crate::names::Naming;
use crate::units::{format_size, parse_size};

/// A filesystem the driver can format layers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext4 (default): project quotas for `size=` below the base size.
    Ext4,
    /// xfs: clones share the base's UUID, so mounts need `nouuid`.
    Xfs,
}

impl FsType {
    /// The name `mount -t` and `mkfs.<name>` use.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

impl FromStr for FsType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(format!(
                "unknown filesystem {other:?} (expected ext4 or xfs)"
            )),
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to reach the Ceph cluster, named as the `rbd` tool names it (`conf`,
/// `id`, `keyring`, `cluster`); the mappers hand the same to the tools.
pub type CephSettings = crate::mapper::CephConnection;

/// The driver's complete, validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Cluster connection.
    pub ceph: CephSettings,
    /// `rbd.pool`: pool holding layers and metadata.
    pub pool: String,
    /// `rbd.namespace`: RADOS namespace; one namespace is one fleet.
    pub namespace: String,
    /// `rbd.fs`: filesystem of the base image.
    pub fs: FsType,
    /// `rbd.basesize`: size of the base image, so of every parentless layer.
    pub base_size: u64,
    /// `rbd.mapper`: how images become block devices.
    pub mapper: MapperKind,
    /// `rbd.flattendepth`: a layer with more ancestors than this is
    /// flattened when created (krbd maps at most 16).
    pub flatten_depth: u32,
    /// `rbd.imageprefix`: leads every image and object name.
    pub naming: Naming,
    /// `rbd.connecttimeout`: bound on connecting to the cluster.
    pub connect_timeout: Duration,
    /// `rbd.hostid`: this host's id in the fleet; `None` derives it from
    /// `/etc/machine-id` (then the host name) when the engine opens.
    pub host_id: Option<String>,
    /// `rbd.leaseduration`: how long a host's lease lasts without renewal;
    /// past it the host is presumed dead.
    pub lease_duration: Duration,
    /// `rbd.leaserenew`: how often the lease is renewed.
    pub lease_renew: Duration,
    /// `rbd.autotakeover`: `Get` of a container whose host died (lease
    /// lapsed) fences that host and takes the container over.
    pub auto_takeover: bool,
    /// `rbd.sharedinit`: containers whose init layers hold the same files
    /// share one init layer per image layer (no snapshot per container).
    pub shared_init: bool,
    /// `rbd.mountlinger`: how long a read-only layer stays mounted after
    /// its last `Put`, for the next container over it; zero unmounts at
    /// once.
    pub mount_linger: Duration,
    /// `rbd.mountroot`: the directory under which each Home's layers are
    /// mounted ([`Settings::mount_dir`]), outside dockerd's data root.
    pub mount_root: PathBuf,
    /// `rbd.objectsize`: the RADOS object size of new layer images, as a
    /// power of two (RBD's `order`: 18 is 256 KiB, the default). A layer's
    /// first write to an object copies the whole parent object up, so small
    /// objects keep small layers small.
    pub object_order: u8,
    /// `rbd.objectmap`: new layer images keep an object map (RBD features
    /// object-map and fast-diff): removals delete only the objects that
    /// exist, reads of absent objects go straight to the parent, `rbd du`
    /// is exact. krbd maps such images from Linux 5.3 on.
    pub object_map: bool,
}

/// One settings key: its name, its default (as text) and what it means.
pub struct Key {
    /// The key without the `rbd.` prefix.
    pub name: &'static str,
    /// Default value, as the text a user would write.
    pub default: &'static str,
    /// One line of documentation.
    pub doc: &'static str,
}

/// Every key the driver accepts. `docs/configuration.md` lists the same.
pub const KEYS: &[Key] = &[
    Key {
        name: "conf",
        default: "(librados search path)",
        doc: "ceph.conf path (`-c/--conf`)",
    },
    Key {
        name: "id",
        default: "admin",
        doc: "cephx client id, without `client.` (`--id`)",
    },
    Key {
        name: "keyring",
        default: "(from ceph.conf)",
        doc: "keyring path (`-k/--keyring`)",
    },
    Key {
        name: "cluster",
        default: "ceph",
        doc: "cluster name (`--cluster`)",
    },
    Key {
        name: "pool",
        default: "rbd",
        doc: "pool for layers and metadata (`-p/--pool`)",
    },
    Key {
        name: "namespace",
        default: "(none)",
        doc: "RADOS namespace; one namespace is one fleet (`--namespace`)",
    },
    Key {
        name: "fs",
        default: "ext4",
        doc: "filesystem of layers: ext4 or xfs (`--fs`)",
    },
    Key {
        name: "basesize",
        default: "10G",
        doc: "size of the base image and so of parentless layers (`--basesize`)",
    },
    Key {
        name: "mapper",
        default: "auto",
        doc: "auto, krbd, nbd or fuse (`--mapper`)",
    },
    Key {
        name: "flattendepth",
        default: "8",
        doc: "flatten layers with more ancestors than this, at most 15 (`--flatten-depth`)",
    },
    Key {
        name: "imageprefix",
        default: "docker-rbd.",
        doc: "prefix of every image and object name (`--image-prefix`)",
    },
    Key {
        name: "connecttimeout",
        default: "10",
        doc: "seconds to wait for the cluster before failing (`--connect-timeout`)",
    },
    Key {
        name: "hostid",
        default: "(from /etc/machine-id, else the host name)",
        doc: "this host's id in the fleet: 1 to 63 letters, digits, `-`, `_` (`--host-id`)",
    },
    Key {
        name: "leaseduration",
        default: "30",
        doc: "seconds a host's lease lasts unrenewed; then it is presumed dead (`--lease-duration`)",
    },
    Key {
        name: "leaserenew",
        default: "5",
        doc: "seconds between lease renewals, at most a third of the duration (`--lease-renew`)",
    },
    Key {
        name: "autotakeover",
        default: "false",
        doc: "starting a container whose host died fences that host and takes it over (`--auto-takeover`)",
    },
    Key {
        name: "sharedinit",
        default: "true",
        doc: "containers whose init layers hold the same files share one per image layer (`--shared-init`)",
    },
    Key {
        name: "mountlinger",
        default: "10",
        doc: "seconds a read-only layer stays mounted after its last Put, 0 to 600 (`--mount-linger`)",
    },
    Key {
        name: "objectsize",
        default: "256K",
        doc: "RADOS object size of new layer images: a power of two from 64K to 32M (`--object-size`)",
    },
    Key {
        name: "objectmap",
        default: "true",
        doc: "new layer images keep an object map (object-map, fast-diff; krbd needs Linux 5.3) (`--object-map`)",
    },
    Key {
        name: "mountroot",
        default: DEFAULT_MOUNT_ROOT,
        doc: "absolute directory, outside the data root, under which layers are mounted (`--mount-root`)",
    },
];

/// Where layers are mounted by default: a tmpfs, emptied at boot as the
/// mounts are.
pub const DEFAULT_MOUNT_ROOT: &str = "/run/docker-rbd";

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Line `line` of a config file.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A `docker-rbd serve` flag.
    Flag,
    /// dockerd's `--storage-opt` (Init.Opts).
    StorageOpt,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File { path, line } => write!(f, "{}:{line}", path.display()),
            Source::Flag => f.write_str("command-line flag"),
            Source::StorageOpt => f.write_str("dockerd --storage-opt"),
        }
    }
}

/// One problem with the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the offending value came from.
    pub source: Source,
    /// What is wrong.
    pub message: String,
}

/// Why settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One or more keys or values were wrong; all of them are listed.
    #[error("invalid docker-rbd settings:{}", list(.problems))]
    Invalid {
        /// Every problem found.
        problems: Vec<Problem>,
    },
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("\n  - {} ({})", p.message, p.source))
        .collect()
}

/// Settings as given, before defaults: key (without `rbd.`) to value and
/// source. Later layers override earlier ones key by key.
#[derive(Debug, Clone, Default)]
pub struct RawSettings {
    values: BTreeMap<&'static str, (String, Source)>,
    problems: Vec<Problem>,
}

impl RawSettings {
    /// Reads a config file of `key = value` lines (`#` starts a comment;
    /// keys may be written with or without the `rbd.` prefix).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        let mut raw = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let source = Source::File {
                path: path.to_path_buf(),
                line: n + 1,
            };
            match line.split_once('=') {
                Some((k, v)) => {
                    let key = k.trim();
                    let key = key.strip_prefix("rbd.").unwrap_or(key);
                    raw.set(key, v.trim(), source);
                }
                None => raw.problems.push(Problem {
                    source,
                    message: format!("line {line:?} is not `key = value`"),
                }),
            }
        }
        Ok(raw)
    }

    /// Reads dockerd's `Init.Opts`: `rbd.<key>=<value>` strings.
    pub fn from_storage_opts(opts: &[String]) -> Self {
        let mut raw = Self::default();
        for opt in opts {
            let Some((k, v)) = opt.split_once('=') else {
                raw.problems.push(Problem {
                    source: Source::StorageOpt,
                    message: format!("storage option {opt:?} is not `rbd.<key>=<value>`"),
                });
                continue;
            };
            match k.trim().strip_prefix("rbd.") {
                Some(key) => raw.set(key, v.trim(), Source::StorageOpt),
                None => raw.problems.push(Problem {
                    source: Source::StorageOpt,
                    message: format!(
                        "unknown storage option {:?} (docker-rbd's keys start with rbd.)",
                        k.trim()
                    ),
                }),
            }
        }
        raw
    }

    /// Sets `key` (without `rbd.`), recording a problem for unknown keys and
    /// for a key given twice by one source.
    pub fn set(&mut self, key: &str, value: &str, source: Source) {
        let Some(known) = KEYS.iter().find(|k| k.name == key) else {
            self.problems.push(Problem {
                source,
                message: format!("unknown key \"rbd.{key}\""),
            });
            return;
        };
        if let Some((_, earlier)) = self.values.get(known.name)
            && same_origin(earlier, &source)
        {
            self.problems.push(Problem {
                source,
                message: format!("key \"rbd.{key}\" given twice (also at {earlier})"),
            });
            return;
        }
        self.values.insert(known.name, (value.to_string(), source));
    }

    /// Overlays `over` on `self`: its values win.
    pub fn overlay(mut self, over: RawSettings) -> Self {
        self.values.extend(over.values);
        self.problems.extend(over.problems);
        self
    }

    /// Applies defaults and validates every value.
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        let mut r = Resolver {
            values: self.values,
            problems: self.problems,
        };
        let text = |v: &str| Ok::<_, String>(v.to_string());
        let optional = |v: &str| Ok::<_, String>((!v.is_empty()).then(|| v.to_string()));
        let ceph = CephSettings {
            conf: r.take("conf", "", optional).flatten().map(PathBuf::from),
            id: r.take("id", "", optional).flatten(),
            keyring: r.take("keyring", "", optional).flatten().map(PathBuf::from),
            cluster: r.take("cluster", "", optional).flatten(),
        };
        let pool = r.take("pool", "rbd", |v| {
            if v.is_empty() {
                Err("must not be empty".to_string())
            } else {
                Ok(v.to_string())
            }
        });
        let namespace = r.take("namespace", "", text);
        let fs = r.take("fs", "ext4", str::parse::<FsType>);
        let base_size = r.take("basesize", "10G", |v| {
            let size = parse_size(v).map_err(|e| e.to_string())?;
            if size < 64 << 20 {
                return Err(format!("{} is below the 64 MiB minimum", format_size(size)));
            }
            Ok(size)
        });
        let mapper = r.take("mapper", "auto", |v| {
            v.parse::<MapperKind>().map_err(|e| e.to_string())
        });
        let flatten_depth = r.take("flattendepth", "8", |v| {
            let depth = v
                .parse::<u32>()
                .map_err(|_| format!("{v:?} is not a whole number"))?;
            if !(1..=15).contains(&depth) {
                return Err(format!(
                    "{depth} is outside 1..=15 (krbd maps at most 16 ancestors)"
                ));
            }
            Ok(depth)
        });
        let naming = r.take("imageprefix", Naming::DEFAULT_PREFIX, Naming::new);
        let connect_timeout = r.take("connecttimeout", "10", |v| {
            v.parse::<u64>()
                .ok()
                .filter(|s| (1..=600).contains(s))
                .map(Duration::from_secs)
                .ok_or_else(|| format!("{v:?} is not a number of seconds from 1 to 600"))
        });

        let host_id = r.take("hostid", "", |v| {
            if v.is_empty() {
                Ok(None)
            } else {
                crate::names::check_host_id(v).map(|()| Some(v.to_string()))
            }
        });
        let seconds = |v: &str| {
            v.parse::<u64>()
                .ok()
                .filter(|s| (1..=3600).contains(s))
                .map(Duration::from_secs)
                .ok_or_else(|| format!("{v:?} is not a number of seconds from 1 to 3600"))
        };
        let lease_duration = r.take("leaseduration", "30", seconds);
        let lease_renew = r.take("leaserenew", "5", seconds);
        let auto_takeover = r.take("autotakeover", "false", parse_bool);
        let shared_init = r.take("sharedinit", "true", parse_bool);
        let mount_linger = r.take("mountlinger", "10", |v| {
            v.parse::<u64>()
                .ok()
                .filter(|s| *s <= 600)
                .map(Duration::from_secs)
                .ok_or_else(|| format!("{v:?} is not a number of seconds from 0 to 600"))
        });
        let object_order = r.take("objectsize", "256K", |v| {
            let size = parse_size(v).map_err(|e| e.to_string())?;
            if !size.is_power_of_two() || !(1 << 16..=1 << 25).contains(&size) {
                return Err(format!(
                    "{} is not a power of two from 64 KiB to 32 MiB",
                    format_size(size)
                ));
            }
            Ok(size.trailing_zeros() as u8)
        });
        let object_map = r.take("objectmap", "true", parse_bool);
        let mount_root = r.take("mountroot", DEFAULT_MOUNT_ROOT, |v| {
            let path = PathBuf::from(v);
            if !path.is_absolute() {
                return Err(format!("{v:?} is not an absolute path"));
            }
            if path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(format!("{v:?} contains \"..\""));
            }
            Ok(path)
        });
        if let (Some(duration), Some(renew)) = (lease_duration, lease_renew)
            && renew * 3 > duration
        {
            r.problems.push(Problem {
                source: r.source_of("leaserenew"),
                message: format!(
                    "rbd.leaserenew: {}s is more than a third of rbd.leaseduration ({}s): \
                     one late renewal would let the lease lapse",
                    renew.as_secs(),
                    duration.as_secs()
                ),
            });
        }

        match (
            pool,
            namespace,
            fs,
            base_size,
            mapper,
            flatten_depth,
            naming,
            connect_timeout,
            (host_id, lease_duration, lease_renew, auto_takeover),
            (shared_init, mount_linger, mount_root),
            (object_order, object_map),
        ) {
            (
                Some(pool),
                Some(namespace),
                Some(fs),
                Some(base_size),
                Some(mapper),
                Some(flatten_depth),
                Some(naming),
                Some(connect_timeout),
                (Some(host_id), Some(lease_duration), Some(lease_renew), Some(auto_takeover)),
                (Some(shared_init), Some(mount_linger), Some(mount_root)),
                (Some(object_order), Some(object_map)),
            ) if r.problems.is_empty() => Ok(Settings {
                ceph,
                pool,
                namespace,
                fs,
                base_size,
                mapper,
                flatten_depth,
                naming,
                connect_timeout,
                host_id,
                lease_duration,
                lease_renew,
                auto_takeover,
                shared_init,
                mount_linger,
                mount_root,
                object_order,
                object_map,
            }),
            _ => Err(ConfigError::Invalid {
                problems: r.problems,
            }),
        }
    }
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{v:?} is not true or false")),
    }
}

/// Turns raw values into typed ones, collecting every problem.
struct Resolver {
    values: BTreeMap<&'static str, (String, Source)>,
    problems: Vec<Problem>,
}

impl Resolver {
    /// Where the value of `key` came from (a flag when defaulted).
    fn source_of(&self, key: &str) -> Source {
        self.values
            .get(key)
            .map_or(Source::Flag, |(_, source)| source.clone())
    }

    /// The value of `key` (or `default`) parsed by `parse`; a parse error is
    /// recorded as a problem naming the key and where its value came from.
    fn take<T, E: ToString>(
        &mut self,
        key: &'static str,
        default: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        let (value, source) = self
            .values
            .get(key)
            .cloned()
            .unwrap_or_else(|| (default.to_string(), Source::Flag));
        match parse(&value) {
            Ok(v) => Some(v),
            Err(e) => {
                self.problems.push(Problem {
                    source,
                    message: format!("rbd.{key}: {}", e.to_string()),
                });
                None
            }
        }
    }
}

fn same_origin(a: &Source, b: &Source) -> bool {
    match (a, b) {
        (Source::File { path: p1, .. }, Source::File { path: p2, .. }) => p1 == p2,
        (Source::Flag, Source::Flag) | (Source::StorageOpt, Source::StorageOpt) => true,
        _ => false,
    }
}

impl Settings {
    /// The directory where the layers of the driver whose Home is `home`
    /// are mounted: `<rbd.mountroot>/<first 16 hex digits of the SHA-256 of
    /// the Home's path>`. Outside the Home, so that deleting dockerd's data
    /// root never reaches into a layer still mounted (whose files live in
    /// the cluster, for every host of the fleet); one per Home, so that
    /// several dockerds on one host keep theirs apart.
    pub fn mount_dir(&self, home: &Path) -> PathBuf {
        let digest = crate::digest::sha256_hex(home.as_os_str().as_encoded_bytes());
        self.mount_root.join(&digest[..16])
    }

    /// Human-readable pairs for `docker info` and logs.
    pub fn describe(&self) -> Vec<(String, String)> {
        vec![
            ("Pool".into(), self.pool.clone()),
            ("Namespace".into(), self.namespace.clone()),
            ("Filesystem".into(), self.fs.to_string()),
            ("Base Size".into(), format_size(self.base_size)),
            ("Flatten Depth".into(), self.flatten_depth.to_string()),
            (
                "Shared Init".into(),
                if self.shared_init { "on" } else { "off" }.into(),
            ),
            (
                "Mount Linger".into(),
                format!("{}s", self.mount_linger.as_secs()),
            ),
            ("Image Prefix".into(), self.naming.prefix().to_string()),
            ("Mount Root".into(), self.mount_root.display().to_string()),
            (
                "Object Size".into(),
                format!(
                    "{}{}",
                    format_size(1 << self.object_order),
                    if self.object_map { ", object map" } else { "" }
                ),
            ),
            (
                "Lease".into(),
                format!(
                    "{}s, renewed every {}s",
                    self.lease_duration.as_secs(),
                    self.lease_renew.as_secs()
                ),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> RawSettings {
        RawSettings::from_storage_opts(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn defaults() {
        let s = RawSettings::default().resolve().unwrap();
        assert_eq!(s.pool, "rbd");
        assert_eq!(s.namespace, "");
        assert_eq!(s.fs, FsType::Ext4);
        assert_eq!(s.base_size, 10 << 30);
        assert_eq!(s.mapper, MapperKind::Auto);
        assert_eq!(s.flatten_depth, 8);
        assert_eq!(s.naming.prefix(), "docker-rbd.");
        assert_eq!(s.connect_timeout, Duration::from_secs(10));
        assert_eq!(s.ceph, CephSettings::default());
    }

    #[test]
    fn storage_opts_override_flags_which_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("docker-rbd.conf");
        std::fs::write(
            &file,
            "# fleet A\nrbd.pool = filepool\nnamespace = filens\nfs=xfs\n",
        )
        .unwrap();
        let mut flags = RawSettings::default();
        flags.set("pool", "flagpool", Source::Flag);
        flags.set("basesize", "1G", Source::Flag);
        let s = RawSettings::from_file(&file)
            .unwrap()
            .overlay(flags)
            .overlay(opts(&["rbd.basesize=2G", "rbd.id=docker"]))
            .resolve()
            .unwrap();
        assert_eq!(s.pool, "flagpool");
        assert_eq!(s.namespace, "filens");
        assert_eq!(s.fs, FsType::Xfs);
        assert_eq!(s.base_size, 2 << 30);
        assert_eq!(s.ceph.id.as_deref(), Some("docker"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = opts(&[
            "rbd.pool=p",
            "rbd.bogus=1",
            "size=10G",
            "noequals",
            "rbd.fs=btrfs",
            "rbd.basesize=ten",
            "rbd.mapper=magic",
            "rbd.flattendepth=40",
            "rbd.imageprefix=a/b",
            "rbd.connecttimeout=0",
            "rbd.pool=q",
        ])
        .resolve()
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "unknown key \"rbd.bogus\"",
            "unknown storage option \"size\"",
            "\"noequals\" is not",
            "rbd.fs: unknown filesystem \"btrfs\"",
            "rbd.basesize: invalid size \"ten\"",
            "rbd.mapper:",
            "rbd.flattendepth: 40 is outside",
            "rbd.imageprefix:",
            "rbd.connecttimeout:",
            "\"rbd.pool\" given twice",
            "dockerd --storage-opt",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        let ConfigError::Invalid { problems } = err else {
            panic!("wrong error")
        };
        assert_eq!(problems.len(), 10, "{problems:#?}");
    }

    #[test]
    fn file_problems_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.conf");
        std::fs::write(&file, "pool = a\n\nwhat\nmapper = nope\n").unwrap();
        let text = RawSettings::from_file(&file)
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(text.contains("c.conf:3"), "{text}");
        assert!(text.contains("c.conf:4"), "{text}");
        let missing = RawSettings::from_file(&dir.path().join("none")).unwrap_err();
        assert!(missing.to_string().contains("cannot read config file"));
    }

    #[test]
    fn small_base_is_refused() {
        let text = opts(&["rbd.basesize=1M"])
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(text.contains("below the 64 MiB minimum"), "{text}");
    }

    #[test]
    fn object_size_and_mount_root_are_checked() {
        let defaults = opts(&[]).resolve().unwrap();
        assert_eq!((defaults.object_order, defaults.object_map), (18, true));
        assert_eq!(defaults.mount_root, Path::new(DEFAULT_MOUNT_ROOT));
        let set = opts(&["rbd.objectsize=1M", "rbd.objectmap=false"])
            .resolve()
            .unwrap();
        assert_eq!((set.object_order, set.object_map), (20, false));
        for bad in ["3M", "32K", "64M", "lots"] {
            let text = opts(&[&format!("rbd.objectsize={bad}")])
                .resolve()
                .unwrap_err()
                .to_string();
            assert!(text.contains("rbd.objectsize"), "{bad}: {text}");
        }
        for bad in ["run/docker-rbd", "/run/../etc"] {
            let text = opts(&[&format!("rbd.mountroot={bad}")])
                .resolve()
                .unwrap_err()
                .to_string();
            assert!(text.contains("rbd.mountroot"), "{bad}: {text}");
        }
        let home = Path::new("/var/lib/docker/rbd");
        let dir = defaults.mount_dir(home);
        assert!(dir.starts_with("/run/docker-rbd") && !dir.starts_with(home));
        assert_eq!(dir.file_name().unwrap().len(), 16);
        assert_ne!(dir, defaults.mount_dir(Path::new("/var/lib/docker2/rbd")));
    }

    #[test]
    fn keys_table_matches_resolver() {
        for key in KEYS {
            let mut raw = RawSettings::default();
            raw.set(key.name, "x", Source::Flag);
            let text = match raw.resolve() {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            };
            assert!(!text.contains("unknown key"), "{}: {text}", key.name);
        }
    }
}

#[cfg(test)]
mod doc_tests {
    use super::KEYS;

    #[test]
    fn configuration_doc_lists_every_key_with_its_default() {
        let doc = include_str!("../docs/configuration.md");
        for key in KEYS {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `rbd.{}` |", key.name)))
                .unwrap_or_else(|| panic!("docs/configuration.md has no row for rbd.{}", key.name));
            let default = key.default.trim_start_matches('(').trim_end_matches(')');
            let first_word = default.split_whitespace().next().unwrap_or_default();
            assert!(
                row.contains(first_word),
                "rbd.{}: default {default:?} not in {row:?}",
                key.name
            );
        }
    }
}
