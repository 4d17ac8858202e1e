//! Export: this host's dockerd files, mirrored into the fleet's records.
//!
//! One pass ([`Inner::export`]) compares dockerd's files with what this
//! host last synced and writes only the differences, each record by
//! compare-and-set: what dockerd has that the fleet lacks gains this host
//! as a holder (or a new record); what dockerd dropped loses it, and a
//! record whose last holder goes is deleted. The exporter thread runs a
//! pass when inotify reports a change under dockerd's image or container
//! directories, when `Put` or `Remove` asks for one, and every
//! [`PERIOD`] regardless, so a missed event is repaired within seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use metadata::{
    Blob, ContainerRecord, ContainerState, DockerImageRecord, DockerLayerRecord, DockerTagRecord,
};

use super::dockerfs::{LocalContainer, LocalLayer, summarize, timestamp_key};
use super::{FleetError, Inner, LedgerEntry, Synced};
use crate::engine::now;

/// Longest time between two passes.
pub const PERIOD: Duration = Duration::from_secs(2);

/// How a pass went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportCounts {
    /// Records written or deleted.
    pub writes: usize,
}

impl Inner {
    /// One export pass.
    pub(super) fn export(&self) -> Result<ExportCounts, FleetError> {
        let mut synced = self.lock_synced();
        let mut counts = ExportCounts::default();
        self.export_layers(&mut synced, &mut counts)?;
        self.export_images(&mut synced, &mut counts)?;
        self.export_tags(&mut synced, &mut counts)?;
        let ledger_changed = self.export_containers(&mut synced, &mut counts)?;
        if ledger_changed {
            self.save_ledger(&synced)?;
        }
        Ok(counts)
    }

    fn export_layers(
        &self,
        synced: &mut Synced,
        counts: &mut ExportCounts,
    ) -> Result<(), FleetError> {
        let local = self.root.layers()?;
        for (chain, layer) in &local {
            if synced.layers.contains_key(chain) {
                continue;
            }
            let held = self.push_layer(chain, layer)?;
            counts.writes += usize::from(held);
            synced.layers.insert(chain.clone(), held);
        }
        let gone: Vec<(String, bool)> = synced
            .layers
            .iter()
            .filter(|(chain, _)| !local.contains_key(*chain))
            .map(|(c, h)| (c.clone(), *h))
            .collect();
        for (chain, held) in gone {
            if held {
                let me = self.engine.host_id().to_string();
                let mut blob = None;
                self.engine
                    .store()
                    .docker_layers()
                    .update(&chain, |r| {
                        Ok::<_, std::convert::Infallible>(r.and_then(|r| {
                            let mut next = r.clone();
                            next.holders.remove(&me);
                            blob = next.tar_split.clone();
                            (!next.holders.is_empty()).then_some(next)
                        }))
                    })?
                    .unwrap_or_else(|never| match never {});
                let deleted = self.engine.store().docker_layers().get(&chain)?.is_none();
                if deleted && let Some(blob) = blob {
                    self.remove_blob(&blob);
                }
                counts.writes += 1;
            }
            synced.layers.remove(&chain);
        }
        Ok(())
    }

    /// Adds this host as a holder of layer `chain` (making its record and
    /// tar-split object if the fleet has none). Returns `false` when the
    /// fleet's record names another driver layer for the chain (another
    /// host imported the same content itself): then this host holds its
    /// own driver layer only.
    fn push_layer(&self, chain: &str, layer: &LocalLayer) -> Result<bool, FleetError> {
        let table = self.engine.store().docker_layers();
        let me = self.engine.host_id().to_string();
        let current = table.get(chain)?;
        if let Some(r) = &current {
            if r.value.cache_id != layer.cache_id {
                tracing::debug!(
                    chain,
                    "the fleet's record of this layer names another driver layer"
                );
                return Ok(false);
            }
            if r.value.holders.contains(&me)
                && (r.value.tar_split.is_some() || !layer.has_tar_split)
            {
                return Ok(true);
            }
        }
        let needs_blob = current.as_ref().is_none_or(|r| r.value.tar_split.is_none());
        let blob = match needs_blob
            .then(|| self.root.tar_split(chain))
            .transpose()?
            .flatten()
        {
            Some(bytes) => Some(self.put_blob(chain, &bytes)?),
            None => None,
        };
        let mut unused_blob = blob.clone();
        let written = table.update(chain, |r| match r {
            Some(r) if r.cache_id != layer.cache_id => Err(()),
            Some(r) => {
                let mut next = r.clone();
                next.holders.insert(me.clone());
                if next.tar_split.is_none() {
                    next.tar_split = blob.clone();
                }
                Ok(Some(next))
            }
            None => Ok(Some(DockerLayerRecord {
                diff_id: layer.diff_id.clone(),
                size: layer.size,
                cache_id: layer.cache_id.clone(),
                parent: layer.parent.clone(),
                descriptor: layer.descriptor.clone(),
                tar_split: blob.clone(),
                holders: BTreeSet::from([me.clone()]),
            })),
        })?;
        if let Ok(Some(rec)) = &written
            && rec.tar_split == blob
        {
            unused_blob = None;
        }
        if let Some(b) = unused_blob {
            self.remove_blob(&b);
        }
        Ok(written.is_ok())
    }

    fn put_blob(&self, chain: &str, bytes: &[u8]) -> Result<Blob, FleetError> {
        let hex = crate::digest::digest_hex(chain).unwrap_or("unnamed");
        // A name of its own per upload: deleting it never hits another
        // host's upload of the same layer.
        let object = format!(
            "{}.{:08x}",
            self.engine.store().tar_split_object(hex),
            rand32()
        );
        self.engine
            .store()
            .ioctx()
            .write_full(&object, bytes)
            .map_err(|e| FleetError::Blob {
                object: object.clone(),
                source: Box::new(e),
            })?;
        Ok(Blob {
            object,
            size: bytes.len() as u64,
            sha256: crate::digest::sha256_hex(bytes),
        })
    }

    fn remove_blob(&self, blob: &Blob) {
        match self.engine.store().ioctx().remove(&blob.object) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::warn!(object = %blob.object, error = %e, "cannot remove a tar-split object; fsck will report it")
            }
        }
    }

    fn export_images(
        &self,
        synced: &mut Synced,
        counts: &mut ExportCounts,
    ) -> Result<(), FleetError> {
        let local = self.root.images()?;
        let me = self.engine.host_id().to_string();
        let table = self.engine.store().docker_images();
        for (id, image) in &local {
            let meta = (image.parent.clone(), image.last_updated.clone());
            if synced.images.get(id) == Some(&meta) {
                continue;
            }
            table
                .update(id, |r| {
                    Ok::<_, std::convert::Infallible>(Some(match r {
                        Some(r) => {
                            let mut next = r.clone();
                            next.holders.insert(me.clone());
                            next.parent = image.parent.clone();
                            next.last_updated = image.last_updated.clone();
                            next
                        }
                        None => DockerImageRecord {
                            config: image.config.clone(),
                            parent: image.parent.clone(),
                            last_updated: image.last_updated.clone(),
                            holders: BTreeSet::from([me.clone()]),
                        },
                    }))
                })?
                .unwrap_or_else(|never| match never {});
            counts.writes += 1;
            synced.images.insert(id.clone(), meta);
        }
        counts.writes += drop_gone(&table, &mut synced.images, &local, &me)?;
        Ok(())
    }

    fn export_tags(
        &self,
        synced: &mut Synced,
        counts: &mut ExportCounts,
    ) -> Result<(), FleetError> {
        let local = self.root.tags()?;
        let me = self.engine.host_id().to_string();
        let table = self.engine.store().docker_tags();
        for (reference, (repo, image)) in &local {
            if synced.tags.get(reference) == Some(image) {
                continue;
            }
            table
                .update(reference, |r| {
                    let mut next = r.cloned().unwrap_or_else(|| DockerTagRecord {
                        repository: repo.clone(),
                        image: image.clone(),
                        holders: BTreeSet::new(),
                    });
                    next.image = image.clone();
                    next.holders.insert(me.clone());
                    Ok::<_, std::convert::Infallible>(Some(next))
                })?
                .unwrap_or_else(|never| match never {});
            counts.writes += 1;
            synced.tags.insert(reference.clone(), image.clone());
        }
        counts.writes += drop_gone(&table, &mut synced.tags, &local, &me)?;
        Ok(())
    }

    /// Returns whether the ledger changed.
    fn export_containers(
        &self,
        synced: &mut Synced,
        counts: &mut ExportCounts,
    ) -> Result<bool, FleetError> {
        let local = self.root.containers()?;
        let me = self.engine.host_id().to_string();
        let table = self.engine.store().containers();
        let mut changed = false;
        for (id, c) in &local {
            synced.mounts.insert(c.mount_id.clone(), id.clone());
            let hash = c.content_hash();
            let entry = synced.containers.get(id).cloned();
            if entry.as_ref().is_some_and(|e| e.hash == hash) {
                continue;
            }
            let summary = match summarize(&c.config) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "not exporting a container with an unreadable config.v2.json");
                    continue;
                }
            };
            let root = self.root.root().display().to_string();
            let in_use_here =
                synced.in_use.contains(id) || self.engine.mount_record(&c.mount_id)?.is_some();
            let mut conflict = None;
            let written = table.update(id, |r| {
                let newer_start = r.is_none_or(|r| {
                    timestamp_key(&summary.started_at) > timestamp_key(&r.started_at)
                });
                if let (Some(r), Some(e)) = (r, &entry)
                    && r.generation != e.generation
                    && !newer_start
                {
                    conflict = Some(r.exported_by.clone());
                    return Err(r.generation);
                }
                Ok(Some(container_record(
                    c,
                    &summary,
                    r,
                    &me,
                    &root,
                    newer_start,
                    in_use_here,
                )))
            })?;
            match written {
                Ok(Some(rec)) => {
                    counts.writes += 1;
                    synced.containers.insert(
                        id.clone(),
                        LedgerEntry {
                            generation: rec.generation,
                            hash,
                        },
                    );
                }
                Ok(None) => {}
                Err(generation) => {
                    tracing::warn!(
                        container = %id,
                        name = %summary.name,
                        changed_by = conflict.as_deref().unwrap_or(""),
                        generation,
                        "the container changed on another host since this dockerd loaded it; \
                         its change here is not exported (restart dockerd here to load the newer one)"
                    );
                    let generation = entry.map_or(0, |e| e.generation);
                    synced
                        .containers
                        .insert(id.clone(), LedgerEntry { generation, hash });
                }
            }
            changed = true;
        }
        let gone: Vec<String> = synced
            .containers
            .keys()
            .filter(|id| !local.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            table
                .update(&id, |r| {
                    Ok::<_, std::convert::Infallible>(r.and_then(|r| {
                        let mut next = r.clone();
                        next.holders.remove(&me);
                        if next.active_on.as_deref() == Some(me.as_str()) {
                            next.active_on = None;
                            next.state = ContainerState::Stopped;
                        }
                        (!next.holders.is_empty()).then_some(next)
                    }))
                })?
                .unwrap_or_else(|never| match never {});
            synced.containers.remove(&id);
            synced.mounts.retain(|_, c| *c != id);
            counts.writes += 1;
            changed = true;
        }
        Ok(changed)
    }
}

/// The record of local container `c`. `in_use_here`: whether this host
/// has its read-write layer claimed or mounted; it decides who uses the
/// container only in a first record, and an existing record keeps the
/// claim `Get`, `Put` and takeovers recorded.
fn container_record(
    c: &LocalContainer,
    summary: &super::dockerfs::ConfigSummary,
    current: Option<&ContainerRecord>,
    me: &str,
    root: &str,
    newer_start: bool,
    in_use_here: bool,
) -> ContainerRecord {
    let mut holders = current.map(|r| r.holders.clone()).unwrap_or_default();
    holders.insert(me.to_string());
    let ran_on = match current {
        Some(r) if !newer_start => r.ran_on.clone(),
        _ => me.to_string(),
    };
    ContainerRecord {
        name: summary.name.clone(),
        config: c.config.clone(),
        hostconfig: c.hostconfig.clone(),
        mount_id: c.mount_id.clone(),
        init_id: c.init_id.clone(),
        parent: c.parent.clone(),
        // Who uses the container is `Get`'s, `Put`'s and a takeover's to
        // say: an export never changes it, lest a stale local file undo
        // another host's claim.
        state: current.map_or(
            if in_use_here {
                ContainerState::Running
            } else {
                ContainerState::Stopped
            },
            |r| r.state,
        ),
        active_on: match current {
            Some(r) => r.active_on.clone(),
            None => in_use_here.then(|| me.to_string()),
        },
        ran_on,
        started_at: summary.started_at.clone(),
        docker_root: root.to_string(),
        exported_by: me.to_string(),
        generation: current.map_or(1, |r| r.generation + 1),
        holders,
        updated_at: now(),
    }
}

/// Removes `me` from the holders of `key`, deleting the record with its
/// last holder.
fn drop_holder<T>(table: &metadata::Table<T>, key: &str, me: &str) -> Result<(), FleetError>
where
    T: metadata::Record + Holders,
{
    table
        .update(key, |r| {
            Ok::<_, std::convert::Infallible>(r.and_then(|r| {
                let mut next = r.clone();
                next.holders_mut().remove(me);
                (!next.holders_mut().is_empty()).then_some(next)
            }))
        })?
        .unwrap_or_else(|never| match never {});
    Ok(())
}

/// Drops `me` from the holders of every key of `synced` that `local` no
/// longer has, and forgets those keys. Returns how many there were.
fn drop_gone<T, V, L>(
    table: &metadata::Table<T>,
    synced: &mut BTreeMap<String, V>,
    local: &BTreeMap<String, L>,
    me: &str,
) -> Result<usize, FleetError>
where
    T: metadata::Record + Holders,
{
    let gone: Vec<String> = synced
        .keys()
        .filter(|k| !local.contains_key(*k))
        .cloned()
        .collect();
    for key in &gone {
        drop_holder(table, key, me)?;
        synced.remove(key);
    }
    Ok(gone.len())
}

/// Records with a holder set.
pub(super) trait Holders {
    fn holders_mut(&mut self) -> &mut BTreeSet<String>;
}

impl Holders for DockerImageRecord {
    fn holders_mut(&mut self) -> &mut BTreeSet<String> {
        &mut self.holders
    }
}

impl Holders for DockerTagRecord {
    fn holders_mut(&mut self) -> &mut BTreeSet<String> {
        &mut self.holders
    }
}

fn rand32() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u32::from_le_bytes(b) ^ (now() as u32)
}

/// `BTreeMap` of what was last synced, rebuilt from the records at start.
pub(super) fn held_by<T: metadata::Record, V>(
    table: &metadata::Table<T>,
    me: &str,
    holders: impl Fn(&T) -> &BTreeSet<String>,
    value: impl Fn(&T) -> V,
) -> Result<BTreeMap<String, V>, FleetError> {
    Ok(table
        .list()?
        .into_iter()
        .filter_map(|(k, r)| {
            let r = r.ok()?.value;
            holders(&r).contains(me).then(|| (k, value(&r)))
        })
        .collect())
}
