//! dockerd's own files for one storage driver, read and written in its
//! exact on-disk formats (moby 20.10: `layer/filestore.go`,
//! `image/fs.go`, `reference/store.go`, `container/container.go`).
//!
//! Everything lives under dockerd's root, the parent of the driver's Home:
//!
//! | path | what |
//! |---|---|
//! | `image/<driver>/layerdb/sha256/<hex>/{diff,size,cache-id,parent,descriptor.json,tar-split.json.gz}` | a layer, by chain id |
//! | `image/<driver>/layerdb/mounts/<container>/{mount-id,init-id,parent}` | a container's layers |
//! | `image/<driver>/imagedb/content/sha256/<hex>` | an image config |
//! | `image/<driver>/imagedb/metadata/sha256/<hex>/{parent,lastUpdated}` | image metadata |
//! | `image/<driver>/repositories.json` | tags |
//! | `containers/<id>/{config.v2.json,hostconfig.json}` | a container |
//!
//! Writes are atomic as dockerd's own are: a file is written beside its
//! target and renamed over it; a directory is filled in the staging
//! directory `image/<driver>/.docker-rbd-staging` (on the same mount as
//! every target: the driver's Home is a mount of its own, so it cannot
//! be there; outside every directory dockerd lists) and renamed into
//! place. Nothing here talks to
//! dockerd: it reads these files only at start, after `Init`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::digest::digest_hex;

/// An I/O failure on one of dockerd's files.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}")]
pub struct FileError {
    /// What was attempted.
    pub op: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

fn ferr<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A layer of dockerd's layer store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalLayer {
    /// `diff`.
    pub diff_id: String,
    /// `size`.
    pub size: u64,
    /// `cache-id`.
    pub cache_id: String,
    /// `parent`.
    pub parent: Option<String>,
    /// `descriptor.json`.
    pub descriptor: Option<String>,
    /// Whether `tar-split.json.gz` is there.
    pub has_tar_split: bool,
}

/// An image of dockerd's image store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// The config, byte for byte.
    pub config: String,
    /// `metadata/.../parent`.
    pub parent: Option<String>,
    /// `metadata/.../lastUpdated`.
    pub last_updated: Option<String>,
}

/// A container dockerd keeps for this driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalContainer {
    /// `config.v2.json`.
    pub config: String,
    /// `hostconfig.json`.
    pub hostconfig: Option<String>,
    /// `mount-id`.
    pub mount_id: String,
    /// `init-id`.
    pub init_id: Option<String>,
    /// `parent`.
    pub parent: Option<String>,
}

impl LocalContainer {
    /// A digest of everything a host exports of the container, to tell
    /// whether it changed since the last sync.
    pub fn content_hash(&self) -> String {
        let mut all = Vec::new();
        for part in [
            Some(self.config.as_str()),
            self.hostconfig.as_deref(),
            Some(self.mount_id.as_str()),
            self.init_id.as_deref(),
            self.parent.as_deref(),
        ] {
            all.extend_from_slice(part.unwrap_or("\0absent").as_bytes());
            all.push(0);
        }
        crate::digest::sha256_hex(&all)
    }
}

/// What `config.v2.json` says that the fleet needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigSummary {
    /// `Name`.
    pub name: String,
    /// `Driver`.
    pub driver: String,
    /// `State.StartedAt`.
    pub started_at: String,
}

/// Reads the fields the fleet needs from a `config.v2.json`.
pub fn summarize(config: &str) -> Result<ConfigSummary, serde_json::Error> {
    let v: Value = serde_json::from_str(config)?;
    let text = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    Ok(ConfigSummary {
        name: text("/Name"),
        driver: text("/Driver"),
        started_at: text("/State/StartedAt"),
    })
}

/// Orders two of dockerd's RFC 3339 UTC timestamps
/// (`2026-12-05T20:21:38.123456789Z`, fraction trimmed of zeros).
pub fn timestamp_key(ts: &str) -> (String, u64) {
    let body = ts.strip_suffix('Z').unwrap_or(ts);
    let (secs, frac) = body.split_once('.').unwrap_or((body, ""));
    let digits: String = frac
        .chars()
        .take_while(char::is_ascii_digit)
        .take(9)
        .collect();
    let nanos = format!("{digits:0<9}").parse().unwrap_or(0);
    (secs.to_string(), nanos)
}

/// dockerd's root and the driver's name in it.
#[derive(Debug, Clone)]
pub struct DockerRoot {
    root: PathBuf,
    driver: String,
    staging: PathBuf,
}

impl DockerRoot {
    /// The root of the dockerd whose driver Home is `home`
    /// (`<root>/<driver>`), or `None` if `home` has no parent or name.
    pub fn of_home(home: &Path) -> Option<DockerRoot> {
        let driver = home.file_name()?.to_str()?.to_string();
        let root = home.parent()?.to_path_buf();
        let staging = root.join("image").join(&driver).join(".docker-rbd-staging");
        Some(DockerRoot {
            root,
            driver,
            staging,
        })
    }

    /// dockerd's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The storage driver's name (`-s`).
    pub fn driver(&self) -> &str {
        &self.driver
    }

    fn image_dir(&self) -> PathBuf {
        self.root.join("image").join(&self.driver)
    }

    /// `layerdb/sha256`.
    pub fn layers_dir(&self) -> PathBuf {
        self.image_dir().join("layerdb/sha256")
    }

    /// `layerdb/mounts`.
    pub fn mounts_dir(&self) -> PathBuf {
        self.image_dir().join("layerdb/mounts")
    }

    /// `imagedb/content/sha256`.
    pub fn image_content_dir(&self) -> PathBuf {
        self.image_dir().join("imagedb/content/sha256")
    }

    fn image_metadata_dir(&self) -> PathBuf {
        self.image_dir().join("imagedb/metadata/sha256")
    }

    /// `repositories.json`.
    pub fn repositories_file(&self) -> PathBuf {
        self.image_dir().join("repositories.json")
    }

    /// `containers`.
    pub fn containers_dir(&self) -> PathBuf {
        self.root.join("containers")
    }

    /// The directories whose changes the exporter follows.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        vec![
            self.layers_dir(),
            self.mounts_dir(),
            self.image_content_dir(),
            self.image_dir(),
            self.containers_dir(),
        ]
    }

    /// Path of layer `chain`'s directory, if `chain` is a sha256 digest.
    pub fn layer_dir(&self, chain: &str) -> Option<PathBuf> {
        Some(self.layers_dir().join(digest_hex(chain)?))
    }

    /// `tar-split.json.gz` of layer `chain`.
    pub fn tar_split(&self, chain: &str) -> Result<Option<Vec<u8>>, FileError> {
        let Some(dir) = self.layer_dir(chain) else {
            return Ok(None);
        };
        read_opt_bytes(&dir.join("tar-split.json.gz"))
    }

    /// Every layer, by chain id. Unreadable ones are left out (dockerd
    /// drops them as well).
    pub fn layers(&self) -> Result<BTreeMap<String, LocalLayer>, FileError> {
        let mut out = BTreeMap::new();
        for (hex, dir) in digest_dirs(&self.layers_dir())? {
            match read_layer(&dir) {
                Ok(Some(layer)) => {
                    out.insert(format!("sha256:{hex}"), layer);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "skipping an unreadable layer"),
            }
        }
        Ok(out)
    }

    /// Every image, by id.
    pub fn images(&self) -> Result<BTreeMap<String, LocalImage>, FileError> {
        let mut out = BTreeMap::new();
        for (hex, path) in digest_dirs(&self.image_content_dir())? {
            let Some(config) = read_opt(&path)? else {
                continue;
            };
            let meta = self.image_metadata_dir().join(&hex);
            out.insert(
                format!("sha256:{hex}"),
                LocalImage {
                    config,
                    parent: read_opt(&meta.join("parent"))?.map(|p| p.trim().to_string()),
                    last_updated: read_opt(&meta.join("lastUpdated"))?,
                },
            );
        }
        Ok(out)
    }

    /// Every reference of `repositories.json`: reference to (repository,
    /// image id).
    pub fn tags(&self) -> Result<BTreeMap<String, (String, String)>, FileError> {
        let path = self.repositories_file();
        let Some(text) = read_opt(&path)? else {
            return Ok(BTreeMap::new());
        };
        Ok(parse_repositories(&text).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "unreadable repositories.json");
            BTreeMap::new()
        }))
    }

    /// Every container of this driver, by id.
    pub fn containers(&self) -> Result<BTreeMap<String, LocalContainer>, FileError> {
        let mut out = BTreeMap::new();
        for id in hex_entries(&self.containers_dir())? {
            let dir = self.containers_dir().join(&id);
            let Some(config) = read_opt(&dir.join("config.v2.json"))? else {
                continue;
            };
            match summarize(&config) {
                Ok(s) if s.driver == self.driver => {}
                _ => continue,
            }
            let mounts = self.mounts_dir().join(&id);
            let Some(mount_id) = read_opt(&mounts.join("mount-id"))? else {
                continue;
            };
            out.insert(
                id,
                LocalContainer {
                    config,
                    hostconfig: read_opt(&dir.join("hostconfig.json"))?,
                    mount_id: mount_id.trim().to_string(),
                    init_id: read_opt(&mounts.join("init-id"))?.map(|s| s.trim().to_string()),
                    parent: read_opt(&mounts.join("parent"))?.map(|s| s.trim().to_string()),
                },
            );
        }
        Ok(out)
    }

    /// The container whose read-write layer is `mount_id`, from the mount
    /// files.
    pub fn container_of_mount(&self, mount_id: &str) -> Result<Option<String>, FileError> {
        for id in hex_entries(&self.mounts_dir())? {
            let file = self.mounts_dir().join(&id).join("mount-id");
            if read_opt(&file)?.is_some_and(|m| m.trim() == mount_id) {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    fn stage(&self, name: &str) -> Result<PathBuf, FileError> {
        std::fs::create_dir_all(&self.staging).map_err(ferr("create", &self.staging))?;
        let dir = self.staging.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(ferr("remove", &dir))?;
        }
        std::fs::create_dir(&dir).map_err(ferr("create", &dir))?;
        Ok(dir)
    }

    /// Removes what an interrupted hydrate left in the staging directory.
    pub fn clear_staging(&self) -> Result<(), FileError> {
        match std::fs::remove_dir_all(&self.staging) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ferr("remove", &self.staging)(e)),
        }
    }

    /// Fills a staged directory with `files` and renames it to `target`,
    /// which must not exist.
    fn place_dir(&self, target: &Path, files: &[(&str, Option<&[u8]>)]) -> Result<(), FileError> {
        self.place_dir_with(target, files, true)
    }

    /// [`DockerRoot::place_dir`]; without `sync`, nothing is fsynced (the
    /// caller syncs the whole file system once, [`DockerRoot::sync`]).
    fn place_dir_with(
        &self,
        target: &Path,
        files: &[(&str, Option<&[u8]>)],
        sync: bool,
    ) -> Result<(), FileError> {
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("entry")
            .to_string();
        let staged = self.stage(&name)?;
        for (file, bytes) in files {
            if let Some(bytes) = bytes {
                let path = staged.join(file);
                if sync {
                    write_synced(&path, bytes)?;
                } else {
                    std::fs::write(&path, bytes).map_err(ferr("write", &path))?;
                }
            }
        }
        if sync {
            sync_dir(&staged)?;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(ferr("create", parent))?;
        }
        std::fs::rename(&staged, target).map_err(ferr("rename into place", target))?;
        if sync && let Some(parent) = target.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }

    /// Flushes everything written under the root to disk (`syncfs`).
    pub fn sync(&self) -> Result<(), FileError> {
        let dir = std::fs::File::open(&self.root).map_err(ferr("open", &self.root))?;
        // SAFETY: syncfs takes a descriptor we own for the call's duration.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
            return Err(ferr("syncfs", &self.root)(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Writes layer `chain` unless it is there. A directory of it that is
    /// not whole (a power cut before an unsynced write reached the disk;
    /// dockerd itself renames only whole ones into place) is written
    /// again. Without `sync`, see [`DockerRoot::place_dir_with`].
    pub fn write_layer(
        &self,
        chain: &str,
        layer: &LocalLayer,
        tar_split: Option<&[u8]>,
        sync: bool,
    ) -> Result<bool, FileError> {
        let Some(target) = self.layer_dir(chain) else {
            return Ok(false);
        };
        if target.exists() {
            if matches!(read_layer(&target), Ok(Some(_))) {
                return Ok(false);
            }
            tracing::warn!(layer = chain, dir = %target.display(), "rewriting a layer directory that is not whole");
            std::fs::remove_dir_all(&target).map_err(ferr("remove", &target))?;
        }
        let size = layer.size.to_string();
        self.place_dir_with(
            &target,
            &[
                ("diff", Some(layer.diff_id.as_bytes())),
                ("size", Some(size.as_bytes())),
                ("cache-id", Some(layer.cache_id.as_bytes())),
                ("parent", layer.parent.as_deref().map(str::as_bytes)),
                (
                    "descriptor.json",
                    layer.descriptor.as_deref().map(str::as_bytes),
                ),
                ("tar-split.json.gz", tar_split),
            ],
            sync,
        )?;
        Ok(true)
    }

    /// Writes image `id` unless its config is there.
    pub fn write_image(&self, id: &str, image: &LocalImage) -> Result<bool, FileError> {
        let Some(hex) = digest_hex(id) else {
            return Ok(false);
        };
        let content = self.image_content_dir().join(hex);
        if content.exists() {
            return Ok(false);
        }
        let meta = self.image_metadata_dir().join(hex);
        if let Some(parent) = &image.parent {
            write_atomic(&meta.join("parent"), parent.as_bytes())?;
        }
        if let Some(updated) = &image.last_updated {
            write_atomic(&meta.join("lastUpdated"), updated.as_bytes())?;
        }
        write_atomic(&content, image.config.as_bytes())?;
        Ok(true)
    }

    /// Adds `refs` (reference to (repository, image id)) that
    /// `repositories.json` does not have; never changes one it has.
    /// Returns how many were added.
    pub fn add_tags(&self, refs: &BTreeMap<String, (String, String)>) -> Result<usize, FileError> {
        let path = self.repositories_file();
        let mut doc: Value = match read_opt(&path)? {
            Some(text) => {
                serde_json::from_str(&text).unwrap_or_else(|_| Value::Object(Default::default()))
            }
            None => Value::Object(Default::default()),
        };
        let existing = parse_repositories(&doc.to_string()).unwrap_or_default();
        let mut added = 0;
        for (reference, (repo, image)) in refs {
            if existing.contains_key(reference) {
                continue;
            }
            let Some(root) = doc.as_object_mut() else {
                break;
            };
            let repos = root
                .entry("Repositories")
                .or_insert_with(|| Value::Object(Default::default()));
            if !repos.is_object() {
                *repos = Value::Object(Default::default());
            }
            if let Some(repos) = repos.as_object_mut() {
                let entry = repos
                    .entry(repo.clone())
                    .or_insert_with(|| Value::Object(Default::default()));
                if let Some(entry) = entry.as_object_mut() {
                    entry.insert(reference.clone(), Value::String(image.clone()));
                    added += 1;
                }
            }
        }
        if added > 0 {
            write_atomic(&path, doc.to_string().as_bytes())?;
        }
        Ok(added)
    }

    /// Writes container `id`'s files: `config.v2.json` and `hostconfig.json`
    /// in `containers/<id>/`, and its mount files. Existing files are
    /// replaced, each atomically.
    pub fn write_container(&self, id: &str, c: &LocalContainer) -> Result<(), FileError> {
        let mounts = self.mounts_dir().join(id);
        let mount_files: [(&str, Option<&[u8]>); 3] = [
            ("mount-id", Some(c.mount_id.as_bytes())),
            ("init-id", c.init_id.as_deref().map(str::as_bytes)),
            ("parent", c.parent.as_deref().map(str::as_bytes)),
        ];
        if mounts.exists() {
            for (file, bytes) in mount_files {
                if let Some(bytes) = bytes {
                    write_atomic(&mounts.join(file), bytes)?;
                }
            }
        } else {
            self.place_dir(&mounts, &mount_files)?;
        }
        let dir = self.containers_dir().join(id);
        let files: [(&str, Option<&[u8]>); 2] = [
            (
                "hostconfig.json",
                c.hostconfig.as_deref().map(str::as_bytes),
            ),
            ("config.v2.json", Some(c.config.as_bytes())),
        ];
        if dir.exists() {
            for (file, bytes) in files {
                if let Some(bytes) = bytes {
                    write_atomic(&dir.join(file), bytes)?;
                }
            }
            Ok(())
        } else {
            self.place_dir(&dir, &files)
        }
    }
}

/// Parses `repositories.json` into reference to (repository, image id).
pub fn parse_repositories(
    text: &str,
) -> Result<BTreeMap<String, (String, String)>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(rename = "Repositories", default)]
        repositories: BTreeMap<String, BTreeMap<String, String>>,
    }
    let doc: Doc = serde_json::from_str(text)?;
    Ok(doc
        .repositories
        .into_iter()
        .flat_map(|(repo, refs)| {
            refs.into_iter()
                .map(move |(reference, image)| (reference, (repo.clone(), image)))
        })
        .collect())
}

fn read_layer(dir: &Path) -> Result<Option<LocalLayer>, FileError> {
    let (Some(diff), Some(size), Some(cache)) = (
        read_opt(&dir.join("diff"))?,
        read_opt(&dir.join("size"))?,
        read_opt(&dir.join("cache-id"))?,
    ) else {
        return Ok(None);
    };
    let Ok(size) = size.trim().parse() else {
        return Ok(None);
    };
    Ok(Some(LocalLayer {
        diff_id: diff.trim().to_string(),
        size,
        cache_id: cache.trim().to_string(),
        parent: read_opt(&dir.join("parent"))?.map(|p| p.trim().to_string()),
        descriptor: read_opt(&dir.join("descriptor.json"))?,
        has_tar_split: dir.join("tar-split.json.gz").exists(),
    }))
}

/// Entries of `dir` named by 64 hex digits, with their paths.
fn digest_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>, FileError> {
    Ok(hex_entries(dir)?
        .into_iter()
        .map(|hex| {
            let path = dir.join(&hex);
            (hex, path)
        })
        .collect())
}

/// Names in `dir` that are 64 lowercase hex digits (a missing `dir` has
/// none): dockerd's ids. Anything else there (`-removing` dirs, temp
/// files) is not ours to read.
fn hex_entries(dir: &Path) -> Result<Vec<String>, FileError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ferr("list", dir)(e)),
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| digest_hex(&format!("sha256:{n}")).is_some())
        .collect();
    out.sort();
    Ok(out)
}

fn read_opt_bytes(path: &Path) -> Result<Option<Vec<u8>>, FileError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ferr("read", path)(e)),
    }
}

fn read_opt(path: &Path) -> Result<Option<String>, FileError> {
    Ok(read_opt_bytes(path)?.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let mut f = std::fs::File::create(path).map_err(ferr("create", path))?;
    f.write_all(bytes).map_err(ferr("write", path))?;
    f.sync_all().map_err(ferr("sync", path))
}

fn sync_dir(dir: &Path) -> Result<(), FileError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ferr("sync", dir))
}

/// Writes `path` through a temporary file beside it and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(ferr("create", dir))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.docker-rbd-tmp"));
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(ferr("rename into place", path))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_order_with_trimmed_fractions() {
        let a = timestamp_key("2026-12-05T20:21:38.1Z");
        let b = timestamp_key("2026-12-05T20:21:38.12Z");
        let c = timestamp_key("2026-12-05T20:21:39Z");
        assert!(a < b && b < c);
        assert_eq!(
            timestamp_key("0001-01-01T00:00:00Z"),
            ("0001-01-01T00:00:00".into(), 0)
        );
    }

    #[test]
    fn summary_of_a_config() {
        let s = summarize(
            r#"{"Name":"/web","Driver":"rbd","State":{"Running":true,"StartedAt":"2026-01-01T00:00:00Z"}}"#,
        )
        .unwrap();
        assert_eq!(s.name, "/web");
        assert_eq!(s.driver, "rbd");
        assert_eq!(s.started_at, "2026-01-01T00:00:00Z");
        assert!(summarize("{not json").is_err());
    }

    #[test]
    fn files_round_trip_in_dockerd_layout() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("rbd");
        std::fs::create_dir(&home).unwrap();
        let root = DockerRoot::of_home(&home).unwrap();
        assert_eq!(root.driver(), "rbd");
        let chain = format!("sha256:{}", "a".repeat(64));
        let layer = LocalLayer {
            diff_id: format!("sha256:{}", "b".repeat(64)),
            size: 42,
            cache_id: "c".repeat(64),
            parent: None,
            descriptor: None,
            has_tar_split: true,
        };
        assert!(root.write_layer(&chain, &layer, Some(b"gz"), true).unwrap());
        assert!(
            !root.write_layer(&chain, &layer, None, false).unwrap(),
            "never overwritten"
        );
        assert_eq!(root.layers().unwrap().get(&chain), Some(&layer));
        assert!(!root.layer_dir(&chain).unwrap().join("parent").exists());
        // A directory that is not whole (its unsynced files lost in a
        // power cut) is written again, unsynced this time, then synced.
        std::fs::write(root.layer_dir(&chain).unwrap().join("size"), b"").unwrap();
        assert!(!root.layers().unwrap().contains_key(&chain));
        assert!(root.write_layer(&chain, &layer, None, false).unwrap());
        root.sync().unwrap();
        let mut whole = layer.clone();
        whole.has_tar_split = false;
        assert_eq!(root.layers().unwrap().get(&chain), Some(&whole));

        let id = "d".repeat(64);
        let c = LocalContainer {
            config: r#"{"Name":"/x","Driver":"rbd"}"#.into(),
            hostconfig: Some("{}".into()),
            mount_id: "e".repeat(64),
            init_id: Some(format!("{}-init", "e".repeat(64))),
            parent: Some(chain.clone()),
        };
        root.write_container(&id, &c).unwrap();
        root.write_container(&id, &c).unwrap();
        assert_eq!(root.containers().unwrap().get(&id), Some(&c));
        assert_eq!(
            root.container_of_mount(&c.mount_id).unwrap(),
            Some(id.clone())
        );

        let refs = BTreeMap::from([(
            "busybox:latest".to_string(),
            ("busybox".to_string(), format!("sha256:{}", "f".repeat(64))),
        )]);
        assert_eq!(root.add_tags(&refs).unwrap(), 1);
        assert_eq!(root.add_tags(&refs).unwrap(), 0);
        assert_eq!(root.tags().unwrap(), refs);
        root.clear_staging().unwrap();
        assert!(!root.root().join("image/rbd/.docker-rbd-staging").exists());
    }
}
