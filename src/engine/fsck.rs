//! Consistency of a fleet's layers (`docker-rbd fsck`) and the collection
//! of what is provably unneeded (`docker-rbd gc`).
//!
//! [`check`] reads the layer records, the RBD images of the pool and
//! namespace, the container and dockerd layer records and the hosts'
//! leases, and lists every [`Problem`]. A problem is `collectable` when
//! removing it cannot take anything a live host or a child needs: no child
//! record names the layer, no clone hangs off its snapshot, no container or
//! dockerd layer record refers to it, and no live host holds it.
//!
//! [`collect`] removes one collectable problem. It checks again first
//! (a fresh [`check`] of the whole fleet, so the decision is made on what
//! is true right before the removal, not when the list was printed), then
//! records the intent with compare-and-set (the layer becomes `Removing`
//! against the exact record read, so a concurrent `hold`, seal or state
//! change makes it lose and skip), looks for clones once more, and removes
//! the image and then the record, in the engine's removal order. A crash
//! anywhere leaves a `Removing` record, which any host's startup recovery
//! or the next `gc` finishes.

use std::collections::{BTreeMap, BTreeSet};

use metadata::{InitContent, LayerKind, LayerRecord, LayerState, Store, Versioned};
use serde::Serialize;

use super::layers::{image_has_clones, remove_layer_image};
use super::{EngineError, Result, ceph, lease};
use crate::names::Naming;

/// What is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// A layer image in the pool that no record names.
    UnrecordedImage,
    /// A `Created` or `Retired` record whose RBD image does not exist.
    MissingImage,
    /// A record whose parent layer has no record.
    DanglingParent,
    /// A host whose lease lapsed while records say it runs containers.
    StaleLease,
    /// A layer left `Creating` by a host that is not alive.
    StuckCreating,
    /// A layer left `Removing` by a dead host (its creator: the record
    /// does not name the remover).
    StuckRemoving,
    /// A `Retired` layer without children: it should have gone with its
    /// last clone.
    ChildlessRetired,
    /// A `Created` layer no host holds.
    Unheld,
    /// A shared init layer whose parent is retired or gone, that no init
    /// layer uses and nothing is cloned from: it should have gone with
    /// its parent.
    OrphanedSharedInit,
    /// A layer record that does not decode.
    UnreadableRecord,
}

impl ProblemKind {
    /// The word `fsck` prints.
    pub fn word(self) -> &'static str {
        match self {
            ProblemKind::UnrecordedImage => "unrecorded-image",
            ProblemKind::MissingImage => "missing-image",
            ProblemKind::DanglingParent => "dangling-parent",
            ProblemKind::StaleLease => "stale-lease",
            ProblemKind::StuckCreating => "stuck-creating",
            ProblemKind::StuckRemoving => "stuck-removing",
            ProblemKind::ChildlessRetired => "childless-retired",
            ProblemKind::Unheld => "unheld",
            ProblemKind::OrphanedSharedInit => "orphaned-shared-init",
            ProblemKind::UnreadableRecord => "unreadable-record",
        }
    }
}

/// One finding of [`check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// The layer (its record's key, or the id in an unrecorded image's
    /// name); `None` for a host's problem.
    pub layer: Option<String>,
    /// The RBD image concerned.
    pub image: Option<String>,
    /// The host concerned (stale leases).
    pub host: Option<String>,
    /// What was found, for humans.
    pub detail: String,
    /// Whether `gc` removes it.
    pub collectable: bool,
}

/// What [`collect`] did with a problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its image and/or record are gone.
    Removed,
    /// Left alone: on the second look it was no longer safe to remove (or
    /// no longer a problem), for this reason.
    Skipped(String),
}

/// The fleet as [`check`] sees it.
struct View {
    layers: BTreeMap<String, Versioned<LayerRecord>>,
    unreadable: Vec<(String, String)>,
    images: BTreeSet<String>,
    children: BTreeMap<String, Vec<String>>,
    /// Layer id to the records referring to it (`container web`, ...).
    referenced: BTreeMap<String, Vec<String>>,
    /// Hosts running containers by the records: host to container names.
    running_on: BTreeMap<String, Vec<String>>,
    live: BTreeMap<String, bool>,
}

impl View {
    fn read(store: &Store) -> Result<View> {
        let mut layers = BTreeMap::new();
        let mut unreadable = Vec::new();
        for (key, value) in store.layers().list()? {
            match value {
                Ok(v) => {
                    layers.insert(key, v);
                }
                Err(e) => unreadable.push((key, e.to_string())),
            }
        }
        let images = ceph_client::rbd::list(store.ioctx())
            .map_err(ceph("list images", "(all)"))?
            .into_iter()
            .map(|s| s.name)
            .collect();
        let mut children: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, rec) in &layers {
            if let Some(p) = &rec.value.parent {
                children.entry(p.clone()).or_default().push(id.clone());
            }
        }
        let mut referenced: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, rec) in &layers {
            if let Some(shared) = rec.value.shared_init() {
                referenced
                    .entry(shared.to_string())
                    .or_default()
                    .push(format!("init layer {id}"));
            }
        }
        let mut running_on: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, c) in store.containers().list()? {
            // An unreadable container record may refer to anything: such
            // a fleet keeps every layer until the record is fixed.
            let Ok(c) = c else {
                referenced
                    .entry(String::from("*"))
                    .or_default()
                    .push(format!("unreadable container record {id}"));
                continue;
            };
            let c = c.value;
            let name = c.name.trim_start_matches('/').to_string();
            for layer in std::iter::once(&c.mount_id).chain(c.init_id.as_ref()) {
                referenced
                    .entry(layer.clone())
                    .or_default()
                    .push(format!("container {name}"));
            }
            if c.state == metadata::ContainerState::Running
                && let Some(host) = c.active_on
            {
                running_on.entry(host).or_default().push(name);
            }
        }
        for (chain, l) in store.docker_layers().list()? {
            match l {
                Ok(l) => referenced
                    .entry(l.value.cache_id)
                    .or_default()
                    .push(format!("image layer {chain}")),
                Err(_) => referenced
                    .entry(String::from("*"))
                    .or_default()
                    .push(format!("unreadable image layer record {chain}")),
            }
        }
        Ok(View {
            layers,
            unreadable,
            images,
            children,
            referenced,
            running_on,
            live: BTreeMap::new(),
        })
    }

    fn is_live(&mut self, store: &Store, host: &str) -> Result<bool> {
        if let Some(&live) = self.live.get(host) {
            return Ok(live);
        }
        let live = !host.is_empty() && lease::host_is_live(store.ioctx(), store.prefix(), host)?;
        self.live.insert(host.to_string(), live);
        Ok(live)
    }

    /// Why layer `id` cannot go, if anything needs it: a child record, a
    /// referring record, a clone of its snapshot (of its own image: a
    /// shared init layer's user has none).
    fn needed(&self, store: &Store, id: &str, rec: &LayerRecord) -> Result<Option<String>> {
        if let Some(kids) = self.children.get(id) {
            return Ok(Some(format!("child layers {}", kids.join(", "))));
        }
        for key in [id, "*"] {
            if let Some(users) = self.referenced.get(key) {
                return Ok(Some(format!("used by {}", users.join(", "))));
            }
        }
        if rec.owns_image()
            && self.images.contains(&rec.image)
            && image_has_clones(store.ioctx(), id, &rec.image)?
        {
            return Ok(Some("its snapshot has clones".into()));
        }
        Ok(None)
    }

    fn problems(&mut self, store: &Store, naming: &Naming) -> Result<Vec<Problem>> {
        let mut out = Vec::new();
        let layer_problem =
            |kind, id: &str, rec: &LayerRecord, detail: String, needed: &Option<String>| Problem {
                kind,
                layer: Some(id.to_string()),
                image: Some(rec.image.clone()),
                host: None,
                detail: match needed {
                    Some(why) => format!("{detail}; kept: {why}"),
                    None => detail,
                },
                collectable: needed.is_none(),
            };
        let layers: Vec<(String, LayerRecord)> = self
            .layers
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect();
        for (id, rec) in &layers {
            if let Some(p) = &rec.parent
                && !self.layers.contains_key(p)
            {
                out.push(Problem {
                    kind: ProblemKind::DanglingParent,
                    layer: Some(id.clone()),
                    image: Some(rec.image.clone()),
                    host: None,
                    detail: format!("parent layer {p} has no record"),
                    collectable: false,
                });
            }
            if let Some(shared) = rec.shared_init()
                && !self.layers.contains_key(shared)
            {
                out.push(Problem {
                    kind: ProblemKind::DanglingParent,
                    layer: Some(id.clone()),
                    image: Some(rec.image.clone()),
                    host: None,
                    detail: format!("its shared init layer {shared} has no record"),
                    collectable: false,
                });
            }
            // A pending init layer has no image yet, a shared one's user
            // names the shared layer's image.
            let has_image =
                self.images.contains(&rec.image) || rec.init == Some(InitContent::Pending);
            match rec.state {
                LayerState::Creating | LayerState::Removing
                    if !self.is_live(store, &rec.created_by)? =>
                {
                    let (kind, what) = if rec.state == LayerState::Creating {
                        (ProblemKind::StuckCreating, "creating")
                    } else {
                        (ProblemKind::StuckRemoving, "removing")
                    };
                    let needed = self.needed(store, id, rec)?;
                    let detail = format!(
                        "{what} since its host {} died ({})",
                        if rec.created_by.is_empty() {
                            "(unknown)"
                        } else {
                            &rec.created_by
                        },
                        if has_image {
                            "image exists"
                        } else {
                            "no image"
                        }
                    );
                    out.push(layer_problem(kind, id, rec, detail, &needed));
                }
                LayerState::Retired => {
                    let needed = self.needed(store, id, rec)?;
                    if needed.is_none() {
                        let detail = "retired, and nothing is cloned from it".to_string();
                        out.push(layer_problem(
                            ProblemKind::ChildlessRetired,
                            id,
                            rec,
                            detail,
                            &needed,
                        ));
                    }
                }
                LayerState::Created if !has_image => {
                    let mut needed = self.needed(store, id, rec)?;
                    for h in &rec.holders {
                        if needed.is_none() && self.is_live(store, h)? {
                            needed = Some(format!("held by live host {h}"));
                        }
                    }
                    let detail = format!(
                        "record says created, but image {} does not exist",
                        rec.image
                    );
                    out.push(layer_problem(
                        ProblemKind::MissingImage,
                        id,
                        rec,
                        detail,
                        &needed,
                    ));
                }
                // A shared init layer is held by its users' records and
                // lives as long as its parent.
                LayerState::Created if rec.kind == LayerKind::SharedInit => {
                    let parent_live = rec
                        .parent
                        .as_ref()
                        .and_then(|p| self.layers.get(p))
                        .is_some_and(|p| p.value.state == LayerState::Created);
                    let needed = self.needed(store, id, rec)?;
                    if !parent_live && needed.is_none() {
                        let detail =
                            "shared init layer of a removed layer, and nothing uses it".to_string();
                        out.push(layer_problem(
                            ProblemKind::OrphanedSharedInit,
                            id,
                            rec,
                            detail,
                            &needed,
                        ));
                    }
                }
                LayerState::Created if rec.holders.is_empty() => {
                    let needed = self.needed(store, id, rec)?;
                    let detail = "created, and no host holds it".to_string();
                    out.push(layer_problem(ProblemKind::Unheld, id, rec, detail, &needed));
                }
                _ => {}
            }
        }
        for (id, why) in &self.unreadable {
            out.push(Problem {
                kind: ProblemKind::UnreadableRecord,
                layer: Some(id.clone()),
                image: None,
                host: None,
                detail: why.clone(),
                collectable: false,
            });
        }
        let recorded: BTreeSet<&str> = self
            .layers
            .values()
            .map(|v| v.value.image.as_str())
            .collect();
        let unrecorded: Vec<String> = self
            .images
            .iter()
            .filter(|i| !recorded.contains(i.as_str()) && naming.layer_of_image(i).is_some())
            .cloned()
            .collect();
        for image in unrecorded {
            let Some(id) = naming.layer_of_image(&image) else {
                continue;
            };
            let clones = image_has_clones(store.ioctx(), id.as_str(), &image)?;
            out.push(Problem {
                kind: ProblemKind::UnrecordedImage,
                layer: Some(id.to_string()),
                image: Some(image.clone()),
                host: None,
                detail: if clones {
                    "no record names the image; kept: its snapshot has clones".into()
                } else {
                    "no record names the image".into()
                },
                collectable: !clones,
            });
        }
        let running: Vec<(String, Vec<String>)> = self
            .running_on
            .iter()
            .map(|(h, c)| (h.clone(), c.clone()))
            .collect();
        for (host, names) in running {
            if !self.is_live(store, &host)? {
                out.push(Problem {
                    kind: ProblemKind::StaleLease,
                    layer: None,
                    image: None,
                    host: Some(host.clone()),
                    detail: format!(
                        "lease lapsed, but it runs {} by the records (docker-rbd takeover)",
                        names.join(", ")
                    ),
                    collectable: false,
                });
            }
        }
        out.sort_by(|a, b| (a.kind, &a.layer, &a.host).cmp(&(b.kind, &b.layer, &b.host)));
        Ok(out)
    }
}

/// Every problem of the fleet in `store`, by kind, then layer or host.
pub fn check(store: &Store, naming: &Naming) -> Result<Vec<Problem>> {
    View::read(store)?.problems(store, naming)
}

/// Removes collectable problem `problem` if a fresh [`check`] still finds
/// it collectable; see the module doc for the order of steps.
pub fn collect(store: &Store, naming: &Naming, problem: &Problem) -> Result<Outcome> {
    let mut view = View::read(store)?;
    let fresh = view.problems(store, naming)?;
    let Some(now) = fresh
        .into_iter()
        .find(|p| p.kind == problem.kind && p.layer == problem.layer && p.image == problem.image)
    else {
        return Ok(Outcome::Skipped("no longer a problem".into()));
    };
    if !now.collectable {
        return Ok(Outcome::Skipped(now.detail));
    }
    let (Some(id), Some(image)) = (now.layer.as_deref(), now.image.as_deref()) else {
        return Ok(Outcome::Skipped("nothing to remove".into()));
    };
    if now.kind == ProblemKind::UnrecordedImage {
        remove_layer_image(store.ioctx(), id, image)?;
        tracing::info!(layer = id, image, "gc removed an unrecorded image");
        return Ok(Outcome::Removed);
    }
    let layers = store.layers();
    let Some(read) = view.layers.remove(id) else {
        return Ok(Outcome::Skipped("its record is gone".into()));
    };
    let marked = if read.value.state == LayerState::Removing {
        read
    } else {
        let removing = LayerRecord {
            state: LayerState::Removing,
            ..read.value.clone()
        };
        let Some(marked) = unless_lost(layers.replace(id, &read, &removing))? else {
            return Ok(Outcome::Skipped("its record changed meanwhile".into()));
        };
        // A child may have been cloned between the check and the mark.
        if read.value.owns_image() && image_has_clones(store.ioctx(), id, image)? {
            unless_lost(layers.replace(id, &marked, &read.value))?;
            return Ok(Outcome::Skipped("a clone appeared meanwhile".into()));
        }
        marked
    };
    // A shared init layer's user names the shared layer's image: only its
    // record goes.
    if marked.value.owns_image() {
        remove_layer_image(store.ioctx(), id, image)?;
    }
    // Lost: a purger deleted it first.
    unless_lost(layers.delete(id, &marked))?;
    tracing::info!(
        layer = id,
        image,
        kind = now.kind.word(),
        "gc removed a layer"
    );
    Ok(Outcome::Removed)
}

/// `None` for a lost compare-and-set, the value otherwise.
fn unless_lost<T>(r: metadata::Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(metadata::Error::Conflict { .. }) => Ok(None),
        Err(e) => Err(EngineError::from(e)),
    }
}
