//! `ls [-l]` and `info`: the fleet's layers.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use ceph_client::rbd::Image;
use clap::Args;
use metadata::{LayerKind, LayerRecord};
use serde::Serialize;

use super::{Common, Conn, Snapshot, or_dash, output, table};
use docker_rbd::units::format_size;

/// `ls` options.
#[derive(Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Also show size, parent, kind, users, hosts and lock.
    #[arg(short = 'l', long = "long")]
    pub long: bool,
}

/// `tree` options.
#[derive(Args)]
pub struct TreeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Only the chain of this image or container (or layer).
    pub spec: Option<String>,
}

/// `info` options.
#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub common: Common,
    /// A layer id (or unique prefix), an image tag or id, or a container.
    pub spec: String,
}

/// The word for a layer kind, as `ls -l` prints it.
pub fn kind_word(kind: LayerKind) -> &'static str {
    match kind {
        LayerKind::Image => "image",
        LayerKind::Init => "init",
        LayerKind::ReadWrite => "rw",
        LayerKind::SharedInit => "shared-init",
    }
}

#[derive(Serialize)]
struct LongRow {
    layer: String,
    image: String,
    size: u64,
    parent: Option<String>,
    kind: &'static str,
    state: metadata::LayerState,
    used_by: Vec<String>,
    hosts: Vec<String>,
    lock: Option<String>,
}

/// The host holding a read-write layer's exclusive lock, from the
/// container record (the lock's owner is a RADOS client; the record names
/// its host).
fn lock_of(snap: &Snapshot, layer: &str, rec: &LayerRecord) -> Option<String> {
    if rec.kind != LayerKind::ReadWrite {
        return None;
    }
    snap.containers
        .values()
        .find(|c| c.mount_id == layer)
        .and_then(|c| c.active_on.clone())
}

/// `docker-rbd ls [-l]`.
pub fn ls(args: &LsArgs) -> Result<()> {
    let conn = Conn::open(&args.common)?;
    let snap = Snapshot::read(&conn.store)?;
    if !args.long {
        let ids: Vec<&String> = snap.layers.keys().collect();
        return output(&args.common, &ids, ids.is_empty(), || {
            ids.iter().map(|id| format!("{id}\n")).collect()
        });
    }
    let used = snap.used_by();
    let rows: Vec<LongRow> = snap
        .layers
        .iter()
        .map(|(id, r)| LongRow {
            layer: id.clone(),
            image: r.image.clone(),
            size: r.size,
            parent: r.parent.clone(),
            kind: kind_word(r.kind),
            state: r.state,
            used_by: used.get(id).cloned().unwrap_or_default(),
            hosts: r.holders.iter().cloned().collect(),
            lock: lock_of(&snap, id, r),
        })
        .collect();
    output(&args.common, &rows, rows.is_empty(), || {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.layer.clone(),
                    format_size(r.size),
                    or_dash(r.parent.as_deref().unwrap_or("")),
                    r.kind.to_string(),
                    or_dash(&r.used_by.join(",")),
                    or_dash(&r.hosts.join(",")),
                    or_dash(r.lock.as_deref().unwrap_or("")),
                ]
            })
            .collect();
        table(
            &["NAME", "SIZE", "PARENT", "KIND", "USED BY", "HOSTS", "LOCK"],
            &cells,
        )
    })
}

#[derive(Serialize)]
struct Ancestor {
    layer: String,
    depth: u32,
}

#[derive(Serialize)]
struct Info {
    layer: String,
    rbd_image: String,
    kind: &'static str,
    state: metadata::LayerState,
    depth: u32,
    parents: Vec<Ancestor>,
    sealed_snapshot: bool,
    provisioned: u64,
    used: Option<u64>,
    quota: Option<u64>,
    holders: Vec<String>,
    used_by: Vec<String>,
    created_by: String,
    created_at: u64,
    owner: Option<String>,
    lock_owners: Vec<String>,
}

/// Bytes allocated in an image (its own, not its parent's), from
/// `diff_iterate`; `None` when the image cannot be opened.
pub fn used_bytes(ioctx: &ceph_client::IoCtx, image: &str) -> Option<u64> {
    let img = Image::open_read_only(ioctx, image, None).ok()?;
    let mut used = 0;
    img.diff_iterate(None, false, false, |_off, len, exists| {
        if exists {
            used += len;
        }
    })
    .ok()?;
    Some(used)
}

/// `docker-rbd info <spec>`.
pub fn info(args: &InfoArgs) -> Result<()> {
    let conn = Conn::open(&args.common)?;
    let snap = Snapshot::read(&conn.store)?;
    let id = snap.resolve_layer(&args.spec)?;
    let rec = &snap.layers[&id];
    let mut parents = Vec::new();
    let mut at = rec.parent.clone();
    while let Some(p) = at {
        let Some(pr) = snap.layers.get(&p) else {
            parents.push(Ancestor { layer: p, depth: 0 });
            break;
        };
        parents.push(Ancestor {
            layer: p.clone(),
            depth: pr.depth,
        });
        at = pr.parent.clone();
        if parents.len() > snap.layers.len() {
            break;
        }
    }
    let ioctx = conn.store.ioctx();
    let lock_owners = Image::open_read_only(ioctx, &rec.image, None)
        .and_then(|i| i.lock_owners())
        .unwrap_or_default();
    let used = used_bytes(ioctx, &rec.image);
    let used_by = snap.used_by().remove(&id).unwrap_or_default();
    let info = Info {
        layer: id.clone(),
        rbd_image: rec.image.clone(),
        kind: kind_word(rec.kind),
        state: rec.state,
        depth: rec.depth,
        parents,
        sealed_snapshot: rec.sealed,
        provisioned: rec.size,
        used,
        quota: rec.quota,
        holders: rec.holders.iter().cloned().collect(),
        used_by,
        created_by: rec.created_by.clone(),
        created_at: rec.created_at,
        owner: lock_of(&snap, &id, rec),
        lock_owners,
    };
    output(&args.common, &info, false, || {
        let mut s = String::new();
        let mut kv = |k: &str, v: String| s.push_str(&format!("\t{k}: {v}\n"));
        kv("rbd image", info.rbd_image.clone());
        kv("kind", info.kind.to_string());
        kv(
            "state",
            serde_json::to_string(&info.state)
                .unwrap_or_default()
                .trim_matches('"')
                .to_string(),
        );
        kv("size", format_size(info.provisioned));
        kv(
            "used",
            info.used.map(format_size).unwrap_or_else(|| "-".into()),
        );
        if let Some(q) = info.quota {
            kv("quota", format_size(q));
        }
        kv("depth", info.depth.to_string());
        kv(
            "snapshot",
            if info.sealed_snapshot { "sealed" } else { "-" }.to_string(),
        );
        kv("holders", or_dash(&info.holders.join(",")));
        kv("used by", or_dash(&info.used_by.join(",")));
        kv("owner", or_dash(info.owner.as_deref().unwrap_or("")));
        kv("lock owners", or_dash(&info.lock_owners.join(",")));
        kv("created by", info.created_by.clone());
        for (i, p) in info.parents.iter().enumerate() {
            kv(
                &format!("parent {}", i + 1),
                format!("{} (depth {})", p.layer, p.depth),
            );
        }
        format!("layer '{}':\n{s}", info.layer)
    })
    .with_context(|| format!("info of {}", args.spec))
}

/// Layer ids grouped by parent (`None` for the roots).
pub fn children_of(
    layers: &BTreeMap<String, LayerRecord>,
) -> BTreeMap<Option<String>, Vec<String>> {
    let mut out: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
    for (id, r) in layers {
        out.entry(r.parent.clone()).or_default().push(id.clone());
    }
    out
}

#[derive(Serialize)]
struct TreeNode {
    layer: String,
    kind: &'static str,
    used_by: Vec<String>,
    children: Vec<TreeNode>,
}

fn node(
    id: &str,
    snap: &Snapshot,
    kids: &BTreeMap<Option<String>, Vec<String>>,
    used: &BTreeMap<String, Vec<String>>,
    only: Option<&[String]>,
) -> TreeNode {
    let children = kids
        .get(&Some(id.to_string()))
        .map(|v| {
            v.iter()
                .filter(|k| only.is_none_or(|o| o.contains(k)))
                .map(|k| node(k, snap, kids, used, only))
                .collect()
        })
        .unwrap_or_default();
    TreeNode {
        layer: id.to_string(),
        kind: snap
            .layers
            .get(id)
            .map(|r| kind_word(r.kind))
            .unwrap_or("image"),
        used_by: used.get(id).cloned().unwrap_or_default(),
        children,
    }
}

fn draw(n: &TreeNode, prefix: &str, last: bool, root: bool, out: &mut String) {
    let (branch, next) = match (root, last) {
        (true, _) => ("", String::new()),
        (false, true) => ("`-- ", format!("{prefix}    ")),
        (false, false) => ("|-- ", format!("{prefix}|   ")),
    };
    out.push_str(&format!("{prefix}{branch}{} ({})", n.layer, n.kind));
    if !n.used_by.is_empty() {
        out.push_str(&format!(" [{}]", n.used_by.join(", ")));
    }
    out.push('\n');
    for (i, c) in n.children.iter().enumerate() {
        draw(c, &next, i + 1 == n.children.len(), false, out);
    }
}

/// `docker-rbd tree [<image|container>]`.
pub fn tree(args: &TreeArgs) -> Result<()> {
    let conn = Conn::open(&args.common)?;
    let snap = Snapshot::read(&conn.store)?;
    let used = snap.used_by();
    let kids = children_of(&snap.layers);
    let chain: Option<Vec<String>> = match &args.spec {
        None => None,
        Some(spec) => {
            let mut at = Some(snap.resolve_layer(spec)?);
            let mut chain = Vec::new();
            while let Some(id) = at {
                if chain.contains(&id) {
                    break;
                }
                at = snap.layers.get(&id).and_then(|r| r.parent.clone());
                chain.push(id);
            }
            Some(chain)
        }
    };
    // Roots: no parent, or a parent with no record.
    let roots: Vec<&String> = snap
        .layers
        .iter()
        .filter(|(_, r)| {
            r.parent
                .as_ref()
                .is_none_or(|p| !snap.layers.contains_key(p))
        })
        .map(|(id, _)| id)
        .filter(|id| chain.as_ref().is_none_or(|c| c.contains(id)))
        .collect();
    let nodes: Vec<TreeNode> = roots
        .iter()
        .map(|r| node(r, &snap, &kids, &used, chain.as_deref()))
        .collect();
    output(&args.common, &nodes, nodes.is_empty(), || {
        let mut s = String::new();
        for n in &nodes {
            draw(n, "", true, true, &mut s);
        }
        s
    })
}
