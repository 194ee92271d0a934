//! `thinpool snapshot ls|info|tree|usage|rm`: the layer store's snapshots (containerd's image
//! layers and containers) for operators, without containerd. The daemon holds the store, so
//! these need it running.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use thinpool_control::{LayerSnapshot, LayerUsage};

use crate::mount::daemon;
use crate::size::human;
use crate::vol::rfc3339;

/// `thinpool snapshot …`.
#[derive(clap::Subcommand)]
pub enum SnapshotCommand {
    /// List the snapshots: key, parent, kind (committed, active, view) and volume.
    Ls {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// One snapshot as JSON: kind, key, parent, labels, times, volume, size and usage.
    Info {
        /// containerd's key (active, view) or name (committed).
        key: String,
    },
    /// The snapshots as a tree, each under its parent (roots are snapshots of the base
    /// device).
    Tree,
    /// Space used: EXCLUSIVE is what removing a snapshot frees (its blocks no other mapping
    /// shares), MAPPED all it maps.
    Usage {
        /// Only these snapshots.
        keys: Vec<String>,
        /// Print a JSON object key → usage.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots (children first: one with children is refused).
    Rm {
        /// Keys or names.
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

/// Run a `thinpool snapshot` command on the daemon serving `root`.
pub fn run(root: &Path, cmd: SnapshotCommand) -> Result<i32> {
    let mut c = daemon(root, "snapshot")?;
    match cmd {
        SnapshotCommand::Ls { json } => {
            let list = c.snapshots()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", render_list(&list));
            }
        }
        SnapshotCommand::Info { key } => {
            let s = find(c.snapshots()?, &key)?;
            let usage = c.snapshot_usage()?.remove(&key);
            let mut v = serde_json::to_value(&s)?;
            v["created"] = rfc3339(s.created).into();
            v["updated"] = rfc3339(s.updated).into();
            v["usage"] = serde_json::to_value(usage)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        SnapshotCommand::Tree => print!("{}", render_tree(&c.snapshots()?)),
        SnapshotCommand::Usage { keys, json } => {
            let mut all = c.snapshot_usage()?;
            if !keys.is_empty() {
                for k in &keys {
                    if !all.contains_key(k) {
                        bail!("snapshot {k} not found");
                    }
                }
                all.retain(|k, _| keys.contains(k));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print!("{}", render_usage(&all));
            }
        }
        SnapshotCommand::Rm { keys } => {
            for k in keys {
                c.remove_snapshot(&k)
                    .with_context(|| format!("removing snapshot {k}"))?;
                println!("removed snapshot {k}");
            }
        }
    }
    Ok(0)
}

fn find(list: Vec<LayerSnapshot>, key: &str) -> Result<LayerSnapshot> {
    match list.into_iter().find(|s| s.key == key) {
        Some(s) => Ok(s),
        None => bail!("snapshot {key} not found (`thinpool snapshot ls` lists them)"),
    }
}

fn render_list(list: &[LayerSnapshot]) -> String {
    let mut rows = vec![
        ["KEY", "PARENT", "KIND", "VOLUME", "SIZE"]
            .map(String::from)
            .into(),
    ];
    for s in list {
        rows.push(vec![
            s.key.clone(),
            s.parent.clone().unwrap_or_default(),
            s.kind.clone(),
            s.volume.clone(),
            human(s.size),
        ]);
    }
    crate::table::render(&rows, &[4])
}

fn render_usage(all: &BTreeMap<String, LayerUsage>) -> String {
    let mut rows = vec![["KEY", "EXCLUSIVE", "MAPPED"].map(String::from).into()];
    for (k, u) in all {
        rows.push(vec![
            k.clone(),
            human(u.exclusive_bytes),
            human(u.mapped_bytes),
        ]);
    }
    crate::table::render(&rows, &[1, 2])
}

/// Each snapshot under its parent, two blanks deeper per level, as `ctr snapshots tree` draws
/// it; a snapshot whose parent is not in the list is a root.
fn render_tree(list: &[LayerSnapshot]) -> String {
    let keys: Vec<&str> = list.iter().map(|s| s.key.as_str()).collect();
    let mut children: BTreeMap<Option<&str>, Vec<&LayerSnapshot>> = BTreeMap::new();
    for s in list {
        let parent = s.parent.as_deref().filter(|p| keys.contains(p));
        children.entry(parent).or_default().push(s);
    }
    let mut out = String::new();
    let mut stack: Vec<(&LayerSnapshot, usize)> = children
        .get(&None)
        .map(|v| v.iter().rev().map(|s| (*s, 0)).collect())
        .unwrap_or_default();
    while let Some((s, depth)) = stack.pop() {
        out.push_str(&format!(
            "{}\\_ {} ({}, {})\n",
            "  ".repeat(depth),
            s.key,
            s.kind,
            s.volume
        ));
        if let Some(kids) = children.get(&Some(s.key.as_str())) {
            stack.extend(kids.iter().rev().map(|k| (*k, depth + 1)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(key: &str, parent: Option<&str>, kind: &str) -> LayerSnapshot {
        LayerSnapshot {
            key: key.into(),
            parent: parent.map(String::from),
            kind: kind.into(),
            labels: BTreeMap::new(),
            created: 0,
            updated: 0,
            volume: format!("layer-{key}"),
            size: 1 << 30,
        }
    }

    #[test]
    fn tree_puts_children_under_parents() {
        let list = vec![
            snap("a", None, "committed"),
            snap("b", Some("a"), "committed"),
            snap("c", Some("b"), "active"),
            snap("d", Some("a"), "view"),
            snap("e", None, "active"),
        ];
        assert_eq!(
            render_tree(&list),
            "\\_ a (committed, layer-a)\n  \\_ b (committed, layer-b)\n    \\_ c (active, layer-c)\n  \\_ d (view, layer-d)\n\\_ e (active, layer-e)\n"
        );
    }

    #[test]
    fn list_is_aligned() {
        let out = render_list(&[
            snap("sha256:abc", None, "committed"),
            snap("x", Some("sha256:abc"), "active"),
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("KEY         PARENT"), "{out}");
        assert!(
            lines[2].starts_with("x           sha256:abc  active"),
            "{out}"
        );
    }
}
