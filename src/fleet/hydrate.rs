//! Hydrate: the fleet's records, written into this host's dockerd root
//! during `Init`, before dockerd reads its files.
//!
//! Order: layers (parents before children), images whose top layer is
//! there, tags of images that are there, then containers. A record that
//! cannot be used (unknown schema, undecodable, truncated blob, missing
//! layers, a name this dockerd already gives another container) is skipped
//! with a warning naming it; nothing is half written, and Init goes on.

use std::collections::{BTreeMap, BTreeSet};

use metadata::{ContainerRecord, DockerImageRecord, DockerLayerRecord, Table, Versioned};
use serde_json::Value;

use super::dockerfs::{LocalContainer, LocalImage, LocalLayer, summarize};
use super::{FleetError, Inner, LedgerEntry};
use crate::digest::{docker_digest, sha256_hex};

/// What a hydrate did, for the log and `Status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HydrateReport {
    /// Layers written.
    pub layers: usize,
    /// Images written.
    pub images: usize,
    /// Tags added.
    pub tags: usize,
    /// Containers written (new or newer than the local copy).
    pub containers: usize,
    /// Records skipped, each with why.
    pub skipped: Vec<String>,
}

impl HydrateReport {
    fn skip(&mut self, what: String) {
        tracing::warn!(skipped = %what, "hydrate skipped a fleet record");
        self.skipped.push(what);
    }
}

/// Reads every record of `table`, sending undecodable ones to `report`.
fn readable<T: metadata::Record>(
    table: &Table<T>,
    report: &mut HydrateReport,
) -> Result<Vec<(String, Versioned<T>)>, FleetError> {
    let mut out = Vec::new();
    for (key, rec) in table.list()? {
        match rec {
            Ok(rec) => out.push((key, rec)),
            Err(e) => report.skip(format!("{}/{key}: {e}", table.object())),
        }
    }
    Ok(out)
}

impl Inner {
    /// Writes the fleet's state into dockerd's root. Holds the export
    /// state for the whole run.
    pub(super) fn hydrate(&self) -> Result<HydrateReport, FleetError> {
        let mut synced = self.lock_synced();
        let mut report = HydrateReport::default();
        self.root.clear_staging()?;
        let store = self.engine.store();

        // Layers, parents first: a layer is written once its parent is here.
        // Unsynced, then the file system synced once: the layer database
        // is thousands of small files, and a sync each was most of the
        // time (a layer directory left not whole by a power cut meanwhile
        // is written again by the next hydrate).
        let mut local = self.root.layers()?;
        let mut pending: BTreeMap<String, DockerLayerRecord> =
            readable(&store.docker_layers(), &mut report)?
                .into_iter()
                .filter(|(chain, _)| !local.contains_key(chain))
                .map(|(chain, r)| (chain, r.value))
                .collect();
        let mut held = self.hold_all(pending.values().map(|r| r.cache_id.as_str()));
        loop {
            let ready: Vec<String> = pending
                .iter()
                .filter(|(_, r)| r.parent.as_ref().is_none_or(|p| local.contains_key(p)))
                .map(|(chain, _)| chain.clone())
                .collect();
            if ready.is_empty() {
                break;
            }
            for chain in ready {
                let rec = pending.remove(&chain).expect("listed above");
                let hold = held
                    .remove(&rec.cache_id)
                    .unwrap_or_else(|| self.engine.hold(&rec.cache_id));
                if let Some(layer) = self.hydrate_layer(&chain, &rec, hold, &mut report)? {
                    local.insert(chain, layer);
                }
            }
        }
        self.root.sync()?;
        for (chain, rec) in pending {
            report.skip(format!(
                "layer {chain}: its parent {} is not in the fleet",
                rec.parent.unwrap_or_default()
            ));
        }

        // Images whose layers are all here.
        let local_images = self.root.images()?;
        let mut images: BTreeSet<String> = local_images.keys().cloned().collect();
        for (id, rec) in readable(&store.docker_images(), &mut report)? {
            if images.contains(&id) {
                continue;
            }
            if let Some(why) = image_problem(&id, &rec.value, &local) {
                report.skip(format!("image {id}: {why}"));
                continue;
            }
            let image = LocalImage {
                config: rec.value.config.clone(),
                parent: rec.value.parent.clone(),
                last_updated: rec.value.last_updated.clone(),
            };
            if self.root.write_image(&id, &image)? {
                report.images += 1;
            }
            images.insert(id);
        }

        // Tags of images that are here; a local tag is never changed.
        let mut refs = BTreeMap::new();
        for (reference, rec) in readable(&store.docker_tags(), &mut report)? {
            if images.contains(&rec.value.image) {
                refs.insert(reference, (rec.value.repository, rec.value.image));
            }
        }
        report.tags = self.root.add_tags(&refs)?;

        // Containers.
        let local_containers = self.root.containers()?;
        let mut names: BTreeMap<String, String> = local_containers
            .iter()
            .filter_map(|(id, c)| Some((summarize(&c.config).ok()?.name, id.clone())))
            .collect();
        for (id, rec) in readable(&store.containers(), &mut report)? {
            let rec = rec.value;
            let mine = local_containers.get(&id);
            let synced_gen = synced.containers.get(&id).map(|e| e.generation);
            if mine.is_some() && synced_gen.is_none_or(|g| rec.generation <= g) {
                continue;
            }
            match self.container_problem(&id, &rec, &local, &names) {
                Ok(None) => {}
                Ok(Some(why)) => {
                    report.skip(format!("container {id} ({}): {why}", rec.name));
                    continue;
                }
                Err(e) => return Err(e),
            }
            let me = self.engine.host_id();
            let config = match rewrite_config(
                &rec.config,
                &rec.docker_root,
                &self.root.root().display().to_string(),
                rec.ran_on == me,
            ) {
                Ok(c) => c,
                Err(e) => {
                    report.skip(format!(
                        "container {id} ({}): config.v2.json: {e}",
                        rec.name
                    ));
                    continue;
                }
            };
            let container = LocalContainer {
                config,
                hostconfig: rec.hostconfig.clone(),
                mount_id: rec.mount_id.clone(),
                init_id: rec.init_id.clone(),
                parent: rec.parent.clone(),
            };
            self.root.write_container(&id, &container)?;
            names.insert(rec.name.clone(), id.clone());
            synced.mounts.insert(rec.mount_id.clone(), id.clone());
            synced.containers.insert(
                id.clone(),
                LedgerEntry {
                    generation: rec.generation,
                    hash: container.content_hash(),
                },
            );
            let host = me.to_string();
            store.containers().modify(&id, |r| {
                r.holders.insert(host.clone());
            })?;
            report.containers += 1;
        }
        self.save_ledger(&synced)?;
        self.root.clear_staging()?;
        tracing::info!(
            layers = report.layers,
            images = report.images,
            tags = report.tags,
            containers = report.containers,
            skipped = report.skipped.len(),
            "hydrated dockerd's root from the fleet"
        );
        Ok(report)
    }

    /// Writes one layer if its driver layer can be held here; returns it.
    /// `hold` is the result of [`Engine::hold`] of its driver layer.
    fn hydrate_layer(
        &self,
        chain: &str,
        rec: &DockerLayerRecord,
        hold: crate::engine::Result<bool>,
        report: &mut HydrateReport,
    ) -> Result<Option<LocalLayer>, FleetError> {
        if self.root.layer_dir(chain).is_none() {
            report.skip(format!("layer {chain}: not a sha256 chain id"));
            return Ok(None);
        }
        match hold {
            Ok(true) => {}
            Ok(false) => {
                report.skip(format!(
                    "layer {chain}: its RBD layer {} is gone or being removed",
                    rec.cache_id
                ));
                return Ok(None);
            }
            Err(e) => {
                report.skip(format!("layer {chain}: RBD layer {}: {e}", rec.cache_id));
                return Ok(None);
            }
        }
        let tar_split = match &rec.tar_split {
            None => None,
            Some(blob) => match self.engine.store().ioctx().read(&blob.object) {
                Ok(bytes)
                    if bytes.len() as u64 == blob.size && sha256_hex(&bytes) == blob.sha256 =>
                {
                    Some(bytes)
                }
                Ok(bytes) => {
                    report.skip(format!(
                        "tar-split object {} of layer {chain}: {} bytes, expected {} with sha256 {}; \
                         the layer is hydrated without it (docker save of its images fails here)",
                        blob.object,
                        bytes.len(),
                        blob.size,
                        blob.sha256
                    ));
                    None
                }
                Err(e) => {
                    report.skip(format!(
                        "tar-split object {} of layer {chain}: {e}; the layer is hydrated without it",
                        blob.object
                    ));
                    None
                }
            },
        };
        let layer = LocalLayer {
            diff_id: rec.diff_id.clone(),
            size: rec.size,
            cache_id: rec.cache_id.clone(),
            parent: rec.parent.clone(),
            descriptor: rec.descriptor.clone(),
            has_tar_split: tar_split.is_some(),
        };
        if self
            .root
            .write_layer(chain, &layer, tar_split.as_deref(), false)?
        {
            report.layers += 1;
        }
        Ok(Some(layer))
    }

    /// Holds (adds this host to the holders of) each driver layer of
    /// `cache_ids`, several at a time: one compare-and-set each, round
    /// trips that overlap. The result of each, by layer.
    fn hold_all<'a>(
        &self,
        cache_ids: impl Iterator<Item = &'a str>,
    ) -> std::collections::HashMap<String, crate::engine::Result<bool>> {
        const THREADS: usize = 8;
        let ids: Vec<&str> = cache_ids.collect::<BTreeSet<_>>().into_iter().collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results = std::sync::Mutex::new(std::collections::HashMap::new());
        std::thread::scope(|s| {
            for _ in 0..THREADS.min(ids.len()) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(id) = ids.get(i) else {
                            return;
                        };
                        let held = self.engine.hold(id);
                        results
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(id.to_string(), held);
                    }
                });
            }
        });
        results.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// Why container `id` cannot be hydrated here, if it cannot.
    fn container_problem(
        &self,
        id: &str,
        rec: &ContainerRecord,
        layers: &BTreeMap<String, LocalLayer>,
        names: &BTreeMap<String, String>,
    ) -> Result<Option<String>, FleetError> {
        let me = self.engine.host_id();
        if let Some(host) = &rec.active_on
            && host != me
            && self.engine.host_is_live(host)?
        {
            return Ok(Some(format!(
                "it is in use on live host {host}; it appears here once stopped there and this dockerd restarts"
            )));
        }
        if crate::digest::digest_hex(&format!("sha256:{id}")).is_none() {
            return Ok(Some("not a container id".into()));
        }
        match summarize(&rec.config) {
            Ok(s) if s.driver != self.root.driver() => {
                return Ok(Some(format!(
                    "it uses storage driver {:?}, this dockerd {:?}",
                    s.driver,
                    self.root.driver()
                )));
            }
            Ok(_) => {}
            Err(e) => return Ok(Some(format!("config.v2.json: {e}"))),
        }
        if let Some(other) = names.get(&rec.name)
            && other != id
        {
            return Ok(Some(format!(
                "this dockerd already has container {other} named {:?}; rename one of them",
                rec.name
            )));
        }
        if let Some(parent) = &rec.parent
            && !layers.contains_key(parent)
        {
            return Ok(Some(format!("its image layer {parent} is not here")));
        }
        for layer in std::iter::once(&rec.mount_id).chain(rec.init_id.as_ref()) {
            if !self.engine.hold(layer).unwrap_or(false) {
                return Ok(Some(format!("its RBD layer {layer} is gone")));
            }
        }
        Ok(None)
    }
}

/// Why image `id` cannot be hydrated, if it cannot: its config must hash
/// to its id, and its top layer must be here.
fn image_problem(
    id: &str,
    rec: &DockerImageRecord,
    layers: &BTreeMap<String, LocalLayer>,
) -> Option<String> {
    if docker_digest(rec.config.as_bytes()) != id {
        return Some("its config does not hash to its id".into());
    }
    let config: Value = match serde_json::from_str(&rec.config) {
        Ok(v) => v,
        Err(e) => return Some(format!("config: {e}")),
    };
    let diff_ids: Vec<&str> = config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // An image without layers needs none.
    let top = chain_id(&diff_ids)?;
    (!layers.contains_key(&top)).then(|| format!("its top layer {top} is not here"))
}

/// The chain id of the last of `diff_ids` (moby `layer.CreateChainID`).
pub fn chain_id(diff_ids: &[&str]) -> Option<String> {
    let (first, rest) = diff_ids.split_first()?;
    Some(rest.iter().fold(first.to_string(), |chain, diff| {
        docker_digest(format!("{chain} {diff}").as_bytes())
    }))
}

/// A container's `config.v2.json` as this host is to load it: stopped (not
/// running, paused or restarting, no pid), every path under the exporting
/// host's dockerd root moved under ours, and, unless this host ran it
/// last, `HasBeenStartedBefore` false, so that this dockerd's restore does
/// not auto-start it for an `always` or `unless-stopped` policy.
pub fn rewrite_config(
    config: &str,
    from_root: &str,
    to_root: &str,
    ran_here: bool,
) -> Result<String, serde_json::Error> {
    let mut v: Value = serde_json::from_str(config)?;
    if !from_root.is_empty() && from_root != to_root {
        let prefix = format!("{}/", from_root.trim_end_matches('/'));
        let to = format!("{}/", to_root.trim_end_matches('/'));
        move_paths(&mut v, &prefix, &to);
    }
    if let Some(state) = v.get_mut("State").and_then(Value::as_object_mut) {
        for flag in ["Running", "Paused", "Restarting", "RemovalInProgress"] {
            state.insert(flag.into(), Value::Bool(false));
        }
        state.insert("Pid".into(), Value::from(0));
    }
    if !ran_here && let Some(obj) = v.as_object_mut() {
        obj.insert("HasBeenStartedBefore".into(), Value::Bool(false));
    }
    serde_json::to_string(&v)
}

fn move_paths(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::String(s) => {
            if let Some(rest) = s.strip_prefix(from) {
                *s = format!("{to}{rest}");
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| move_paths(x, from, to)),
        Value::Object(o) => o.values_mut().for_each(|x| move_paths(x, from, to)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_as_moby_computes_them() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert_eq!(chain_id(&[a.as_str()]), Some(a.clone()));
        assert_eq!(
            chain_id(&[a.as_str(), b.as_str()]),
            Some(docker_digest(format!("{a} {b}").as_bytes()))
        );
        assert_eq!(chain_id(&[]), None);
    }

    #[test]
    fn configs_are_loaded_stopped_with_paths_moved() {
        let config = r#"{"Name":"/c","HasBeenStartedBefore":true,
            "State":{"Running":true,"Paused":false,"Restarting":false,"Pid":4242,"ExitCode":0},
            "HostsPath":"/a/root/containers/x/hosts","LogPath":"/a/root/containers/x/x-json.log",
            "MountPoints":{"/v":{"Source":"/a/root/volumes/v/_data"}},"Path":"/a/rootless"}"#;
        let out: Value =
            serde_json::from_str(&rewrite_config(config, "/a/root", "/b", false).unwrap()).unwrap();
        assert_eq!(out["State"]["Running"], false);
        assert_eq!(out["State"]["Pid"], 0);
        assert_eq!(out["HasBeenStartedBefore"], false);
        assert_eq!(out["HostsPath"], "/b/containers/x/hosts");
        assert_eq!(out["MountPoints"]["/v"]["Source"], "/b/volumes/v/_data");
        assert_eq!(
            out["Path"], "/a/rootless",
            "only whole path components move"
        );
        let here: Value =
            serde_json::from_str(&rewrite_config(config, "/a/root", "/b", true).unwrap()).unwrap();
        assert_eq!(here["HasBeenStartedBefore"], true);
        assert!(rewrite_config("{", "/a", "/b", true).is_err());
    }
}
