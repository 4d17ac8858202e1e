//! `fsck` and `gc`: what is wrong in the fleet, and removing what is
//! provably unneeded (the checks are `docker_rbd::engine::fsck`'s);
//! `flatten`: copying a layer out of its clone chain. Long work shows a
//! progress bar on stderr when it is a terminal.

use std::io::IsTerminal;

use anyhow::{Context, Result};
use clap::Args;
use docker_rbd::engine::fsck::{self, Outcome, Problem};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::{CliError, Common, Conn, Snapshot, or_dash, output, table};

/// Exit status of `fsck` when it finds a problem.
pub const PROBLEMS_FOUND: i32 = 1;

/// Options of `fsck`.
#[derive(Args)]
pub struct FsckArgs {
    #[command(flatten)]
    pub common: Common,
}

/// Options of `gc`.
#[derive(Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub common: Common,
    /// Only list what would be removed.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
}

/// The layer id, else the host id, of a problem.
fn name_of(p: &Problem) -> String {
    or_dash(p.layer.as_deref().or(p.host.as_deref()).unwrap_or(""))
}

/// `docker-rbd fsck`: prints every problem; exits with
/// [`PROBLEMS_FOUND`] if there is one.
pub fn fsck(args: &FsckArgs) -> Result<()> {
    let conn = Conn::open(&args.common)?;
    let problems = fsck::check(&conn.store, &conn.settings.naming)?;
    output(&args.common, &problems, problems.is_empty(), || {
        let cells: Vec<Vec<String>> = problems
            .iter()
            .map(|p| {
                vec![
                    p.kind.word().to_string(),
                    name_of(p),
                    or_dash(p.image.as_deref().unwrap_or("")),
                    if p.collectable { "yes" } else { "no" }.to_string(),
                    p.detail.clone(),
                ]
            })
            .collect();
        table(&["PROBLEM", "NAME", "IMAGE", "GC", "DETAIL"], &cells)
    })?;
    if !problems.is_empty() {
        super::exit_now(PROBLEMS_FOUND);
    }
    Ok(())
}

/// What `gc` did with one problem.
#[derive(Serialize)]
struct GcRow {
    /// `removed`, `would_remove`, `skipped` or `failed`.
    action: &'static str,
    #[serde(flatten)]
    problem: Problem,
    /// Why it was skipped or failed.
    reason: Option<String>,
}

/// A progress bar on stderr when it is a terminal; hidden otherwise.
/// `template` is indicatif's (e.g. `gc {bar:40} {pos}/{len} {msg}`).
fn progress(len: u64, template: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

/// `docker-rbd gc [--dry-run]`: removes each collectable problem after
/// checking it again; fails (after printing what it did) with the first
/// removal's error if one failed.
pub fn gc(args: &GcArgs) -> Result<()> {
    let conn = Conn::open(&args.common)?;
    let naming = &conn.settings.naming;
    let candidates: Vec<Problem> = fsck::check(&conn.store, naming)?
        .into_iter()
        .filter(|p| p.collectable)
        .collect();
    let len = if args.dry_run { 0 } else { candidates.len() };
    let bar = progress(len as u64, "gc {bar:40} {pos}/{len} {msg}");
    let mut first_error = None;
    let mut rows = Vec::new();
    for problem in candidates {
        let (action, reason) = if args.dry_run {
            ("would_remove", None)
        } else {
            bar.set_message(name_of(&problem));
            let done = fsck::collect(&conn.store, naming, &problem);
            bar.inc(1);
            match done {
                Ok(Outcome::Removed) => ("removed", None),
                Ok(Outcome::Skipped(why)) => ("skipped", Some(why)),
                Err(e) => {
                    let text = e.to_string();
                    first_error.get_or_insert(e);
                    ("failed", Some(text))
                }
            }
        };
        rows.push(GcRow {
            action,
            problem,
            reason,
        });
    }
    bar.finish_and_clear();
    output(&args.common, &rows, rows.is_empty(), || {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.action.replace('_', " "),
                    r.problem.kind.word().to_string(),
                    name_of(&r.problem),
                    or_dash(r.problem.image.as_deref().unwrap_or("")),
                    or_dash(r.reason.as_deref().unwrap_or("")),
                ]
            })
            .collect();
        table(&["ACTION", "PROBLEM", "NAME", "IMAGE", "REASON"], &cells)
    })?;
    match first_error {
        Some(e) => Err(anyhow::Error::from(e).context("a removal failed")),
        None => Ok(()),
    }
}

/// Options of `flatten`.
#[derive(Args)]
pub struct FlattenArgs {
    #[command(flatten)]
    pub common: Common,
    /// The layer: its id, an image (tag or id: its top layer) or a
    /// container (name or id: its read-write layer).
    pub layer: String,
}

/// What `flatten` did.
#[derive(Serialize)]
struct Flattened {
    layer: String,
    image: String,
    /// The image it was a clone of, `pool/namespace/image@snapshot`.
    parent_image: String,
}

/// `docker-rbd flatten <layer>`: copies into the layer's image what it
/// reads from its parent chain (librbd's flatten, with a progress bar on a
/// terminal), so it stands alone: its reads stop walking the chain. Only
/// a layer that is not sealed: a sealed layer's clones read through its
/// snapshot, which keeps the parent, so copying its head would buy
/// nothing. The layer may be mapped meanwhile (librbd asks the lock
/// holder to do it). Prints nothing (plain) on success, like `rbd
/// flatten`.
pub fn flatten(args: &FlattenArgs) -> Result<()> {
    let conn = Conn::open(&args.common)?;
    let snap = Snapshot::read(&conn.store)?;
    let id = snap.resolve_layer(&args.layer)?;
    let refuse = |reason: String| CliError::CannotFlatten {
        layer: id.clone(),
        reason,
    };
    let rec = snap.layers.get(&id).ok_or_else(|| CliError::NotFound {
        what: "layer",
        name: id.clone(),
    })?;
    if !rec.owns_image() {
        return Err(refuse(format!(
            "it has no image of its own (its files are served by {})",
            rec.shared_init()
                .unwrap_or("an overlay until its first Put")
        ))
        .into());
    }
    if rec.state != metadata::LayerState::Created {
        return Err(refuse(format!("it is {:?}", rec.state).to_lowercase()).into());
    }
    if rec.sealed {
        return Err(refuse(
            "it is sealed: its clones read through its snapshot, which keeps the parent; \
             flatten them instead"
                .into(),
        )
        .into());
    }
    let img = ceph_client::rbd::Image::open(conn.store.ioctx(), &rec.image, None)
        .with_context(|| format!("open image {}", rec.image))?;
    let Some(parent) = img
        .parent()
        .with_context(|| format!("parent of image {}", rec.image))?
    else {
        return Err(refuse(format!("its image {} has no parent", rec.image)).into());
    };
    let namespace = if parent.pool_namespace.is_empty() {
        String::new()
    } else {
        format!("{}/", parent.pool_namespace)
    };
    let parent_image = format!(
        "{}/{namespace}{}@{}",
        parent.pool_name, parent.image_name, parent.snap_name
    );
    let bar = progress(0, "flatten {bar:40} {percent}% {msg}");
    bar.set_message(rec.image.clone());
    let done = img.flatten(|offset, total| {
        bar.set_length(total);
        bar.set_position(offset);
    });
    bar.finish_and_clear();
    done.with_context(|| format!("flatten image {}", rec.image))?;
    // Its own chain is gone; its clones' depth stays as recorded (an
    // overestimate only makes them flatten sooner).
    conn.store
        .layers()
        .modify(&id, |r| r.depth = 0)
        .with_context(|| format!("record of layer {id}"))?;
    let row = Flattened {
        layer: id.clone(),
        image: rec.image.clone(),
        parent_image,
    };
    output(&args.common, &row, true, String::new)
}
