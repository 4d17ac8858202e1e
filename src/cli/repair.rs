//! `fsck` and `gc`: what is wrong in the fleet, and removing what is
//! provably unneeded (the checks are `docker_rbd::engine::fsck`'s).

use std::io::IsTerminal;

use anyhow::Result;
use clap::Args;
use docker_rbd::engine::fsck::{self, Outcome, Problem};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::{Common, Conn, or_dash, output, table};

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
        drop(conn);
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
fn progress(len: usize) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("gc {bar:40} {pos}/{len} {msg}") {
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
    let bar = progress(if args.dry_run { 0 } else { candidates.len() });
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
