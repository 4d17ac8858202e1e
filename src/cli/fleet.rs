//! `containers`, `hosts`, `lock ls`, `children`, `du`: the fleet's
//! containers and hosts, and the layer graph.

use anyhow::{Context, Result};
use ceph_client::rbd::Image;
use clap::Args;
use serde::Serialize;

use super::{CliError, Common, Conn, Snapshot, now, or_dash, output, table};
use docker_rbd::units::format_size;

/// Options of a command taking only the common ones.
#[derive(Args)]
pub struct PlainArgs {
    #[command(flatten)]
    pub common: Common,
}

/// Options of `lock ls`.
#[derive(Args)]
pub struct LockLsArgs {
    #[command(flatten)]
    pub common: Common,
    /// The container: id, unique id prefix, or name.
    pub container: String,
}

/// Options of `children`.
#[derive(Args)]
pub struct ChildrenArgs {
    #[command(flatten)]
    pub common: Common,
    /// The layer (id, unique prefix, image tag, container).
    pub layer: String,
}

/// Options of `du`.
#[derive(Args)]
pub struct DuArgs {
    #[command(flatten)]
    pub common: Common,
    /// Only this layer (id, unique prefix, image tag, container).
    pub layer: Option<String>,
}

#[derive(Serialize)]
struct ContainerRow {
    id: String,
    name: String,
    image: Option<String>,
    state: metadata::ContainerState,
    owner: Option<String>,
    last_host: String,
}

/// `docker-rbd containers`.
pub fn containers(args: &PlainArgs) -> Result<()> {
    let conn = Conn::open(&args.common)?;
    let snap = Snapshot::read(&conn.store)?;
    let rows: Vec<ContainerRow> = snap
        .containers
        .iter()
        .map(|(id, c)| ContainerRow {
            id: id.clone(),
            name: c.name.trim_start_matches('/').to_string(),
            image: container_image(&snap, &c.config),
            state: c.state,
            owner: c.active_on.clone(),
            last_host: c.ran_on.clone(),
        })
        .collect();
    output(&args.common, &rows, rows.is_empty(), || {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.id.chars().take(12).collect(),
                    r.name.clone(),
                    or_dash(r.image.as_deref().unwrap_or("")),
                    state_word(r.state).to_string(),
                    or_dash(r.owner.as_deref().unwrap_or("")),
                    or_dash(&r.last_host),
                ]
            })
            .collect();
        table(
            &["ID", "NAME", "IMAGE", "STATE", "OWNER", "LAST HOST"],
            &cells,
        )
    })
}

fn state_word(s: metadata::ContainerState) -> &'static str {
    match s {
        metadata::ContainerState::Running => "running",
        metadata::ContainerState::Stopped => "stopped",
    }
}

/// The image a container was created from: `Config.Image` of its config
/// (the name the user gave), else its image id.
fn container_image(_snap: &Snapshot, config: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(config).ok()?;
    v.pointer("/Config/Image")
        .and_then(|i| i.as_str())
        .or_else(|| v.get("Image").and_then(|i| i.as_str()))
        .map(str::to_string)
}

#[derive(Serialize)]
struct HostRow {
    id: String,
    hostname: String,
    address: String,
    alive: bool,
    lease_expires: u64,
    containers: Vec<String>,
}

/// `docker-rbd hosts`.
pub fn hosts(args: &PlainArgs) -> Result<()> {
    let conn = Conn::open(&args.common)?;
    let snap = Snapshot::read(&conn.store)?;
    let mut rows = Vec::new();
    for (id, h) in &snap.hosts {
        let alive =
            docker_rbd::engine::lease::host_is_live(conn.store.ioctx(), conn.store.prefix(), id)
                .with_context(|| format!("lease of host {id}"))?;
        rows.push(HostRow {
            id: id.clone(),
            hostname: h.hostname.clone(),
            address: h.client_addr.clone(),
            alive,
            lease_expires: h.heartbeat + h.lease_secs,
            containers: snap
                .containers
                .values()
                .filter(|c| c.active_on.as_deref() == Some(id.as_str()))
                .map(|c| c.name.trim_start_matches('/').to_string())
                .collect(),
        });
    }
    output(&args.common, &rows, rows.is_empty(), || {
        let t = now();
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let lease = if r.lease_expires > t {
                    format!("in {}s", r.lease_expires - t)
                } else {
                    format!("{}s ago", t - r.lease_expires)
                };
                vec![
                    r.id.clone(),
                    or_dash(&r.address),
                    if r.alive { "yes" } else { "no" }.to_string(),
                    lease,
                    or_dash(&r.containers.join(",")),
                ]
            })
            .collect();
        table(&["ID", "ADDRESS", "ALIVE", "LEASE", "CONTAINERS"], &cells)
    })
}

#[derive(Serialize)]
struct LockRow {
    image: String,
    locker: String,
    host: Option<String>,
}

/// `docker-rbd lock ls <container>`: the exclusive lock on the
/// container's read-write layer.
pub fn lock_ls(args: &LockLsArgs) -> Result<()> {
    let conn = Conn::open(&args.common)?;
    let (_, rec) = docker_rbd::fleet::takeover::find_container(&conn.store, &args.container)?;
    let layer = conn
        .store
        .layers()
        .get(&rec.mount_id)?
        .ok_or_else(|| CliError::NotFound {
            what: "layer",
            name: rec.mount_id.clone(),
        })?
        .value;
    let owners = Image::open_read_only(conn.store.ioctx(), &layer.image, None)
        .and_then(|i| i.lock_owners())
        .with_context(|| format!("lock of image {}", layer.image))?;
    let rows: Vec<LockRow> = owners
        .into_iter()
        .map(|locker| LockRow {
            image: layer.image.clone(),
            locker,
            host: rec.active_on.clone(),
        })
        .collect();
    output(&args.common, &rows, rows.is_empty(), || {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.image.clone(),
                    r.locker.clone(),
                    or_dash(r.host.as_deref().unwrap_or("")),
                ]
            })
            .collect();
        table(&["IMAGE", "LOCKER", "HOST"], &cells)
    })
}

/// `docker-rbd children <layer>`.
pub fn children(args: &ChildrenArgs) -> Result<()> {
    let conn = Conn::open(&args.common)?;
    let snap = Snapshot::read(&conn.store)?;
    let id = snap.resolve_layer(&args.layer)?;
    let kids: Vec<&String> = snap
        .layers
        .iter()
        .filter(|(_, r)| r.parent.as_deref() == Some(id.as_str()))
        .map(|(k, _)| k)
        .collect();
    output(&args.common, &kids, kids.is_empty(), || {
        kids.iter().map(|k| format!("{k}\n")).collect()
    })
}

#[derive(Serialize)]
struct DuRow {
    name: String,
    provisioned_size: u64,
    used_size: u64,
}

#[derive(Serialize)]
struct DuOut {
    images: Vec<DuRow>,
    total_provisioned_size: u64,
    total_used_size: u64,
}

/// `docker-rbd du [<layer>]`.
pub fn du(args: &DuArgs) -> Result<()> {
    let conn = Conn::open(&args.common)?;
    let snap = Snapshot::read(&conn.store)?;
    let ids: Vec<String> = match &args.layer {
        Some(l) => vec![snap.resolve_layer(l)?],
        None => snap.layers.keys().cloned().collect(),
    };
    let rows: Vec<DuRow> = ids
        .iter()
        .map(|id| {
            let r = &snap.layers[id];
            DuRow {
                name: id.clone(),
                provisioned_size: r.size,
                used_size: super::layers::used_bytes(conn.store.ioctx(), &r.image).unwrap_or(0),
            }
        })
        .collect();
    let out = DuOut {
        total_provisioned_size: rows.iter().map(|r| r.provisioned_size).sum(),
        total_used_size: rows.iter().map(|r| r.used_size).sum(),
        images: rows,
    };
    output(&args.common, &out, out.images.is_empty(), || {
        let mut cells: Vec<Vec<String>> = out
            .images
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    format_size(r.provisioned_size),
                    format_size(r.used_size),
                ]
            })
            .collect();
        cells.push(vec![
            "<TOTAL>".to_string(),
            format_size(out.total_provisioned_size),
            format_size(out.total_used_size),
        ]);
        table(&["NAME", "PROVISIONED", "USED"], &cells)
    })
}
