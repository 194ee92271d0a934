//! `thinpool mount` / `thinpool umount` and `thinpool vol attach` / `vol detach`: a volume as a
//! loop device and a mounted filesystem. The daemon does the work (it serves the volumes'
//! files these stand on, and remembers what it mounted), so these need it running.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use thinpool_control::{Attachment, Client, Request};

use crate::client;

/// `thinpool mount` arguments.
#[derive(clap::Args)]
pub struct MountArgs {
    /// Volume name.
    name: String,
    /// Where to mount it: an existing folder with nothing mounted on it.
    dir: PathBuf,
    /// Make a new filesystem first: ext4 or xfs (refused on a volume that holds data, unless
    /// --force).
    #[arg(long, value_name = "TYPE")]
    mkfs: Option<String>,
    /// With --mkfs: make the filesystem even over data.
    #[arg(long, requires = "mkfs")]
    force: bool,
    /// Mount options, as `mount -o` takes them (`noatime,discard`).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Option<String>,
    /// Attach and mount read-only.
    #[arg(long)]
    read_only: bool,
}

/// The daemon serving `root`, or an error saying these commands need it.
pub(crate) fn daemon(root: &Path, what: &str) -> Result<Client> {
    match client::daemon(root)? {
        Some(c) => Ok(c),
        None => bail!(
            "{what} needs the daemon (the volumes' files it serves are what loop devices and \
             mounts stand on), and none serves the pool at {}: start `thinpool up`",
            root.display()
        ),
    }
}

fn describe(a: &Attachment) -> String {
    let ro = if a.read_only { ", read-only" } else { "" };
    match &a.mount_point {
        Some(dir) => format!(
            "{} ({} on {}{ro})",
            dir.display(),
            a.fstype.as_deref().unwrap_or("?"),
            a.loop_device.display()
        ),
        None => format!("{}{ro}", a.loop_device.display()),
    }
}

/// `thinpool mount NAME DIR …`.
pub fn mount(root: &Path, a: MountArgs) -> Result<i32> {
    let mut c = daemon(root, "mount")?;
    let dir =
        std::path::absolute(&a.dir).with_context(|| format!("mount point {}", a.dir.display()))?;
    let name = a.name.clone();
    let att = c
        .mount(&Request::Mount {
            name: a.name,
            dir,
            mkfs: a.mkfs,
            force: a.force,
            options: a.options,
            read_only: a.read_only,
        })
        .with_context(|| format!("mounting volume {name:?} on {}", a.dir.display()))?;
    println!("mounted volume {name} on {}", describe(&att));
    Ok(0)
}

/// `thinpool umount DIR|NAME`.
pub fn umount(root: &Path, target: &str) -> Result<i32> {
    let mut c = daemon(root, "umount")?;
    // A path (with a slash, or a folder here) is made absolute for the daemon; anything
    // else is a volume name.
    let t = if target.contains('/') || Path::new(target).is_dir() {
        std::path::absolute(target)
            .with_context(|| format!("mount point {target}"))?
            .display()
            .to_string()
    } else {
        target.to_string()
    };
    let att = c
        .umount(&t)
        .with_context(|| format!("unmounting {target}"))?;
    match &att.mount_point {
        Some(dir) => println!(
            "unmounted volume {} from {} and detached {}",
            att.volume,
            dir.display(),
            att.loop_device.display()
        ),
        None => println!(
            "detached volume {} from {}",
            att.volume,
            att.loop_device.display()
        ),
    }
    Ok(0)
}

/// `thinpool vol attach NAME [--read-only]`: prints the loop device.
pub fn attach(root: &Path, name: &str, read_only: bool) -> Result<i32> {
    let mut c = daemon(root, "vol attach")?;
    let att = c
        .attach(name, read_only)
        .with_context(|| format!("attaching volume {name:?}"))?;
    println!("{}", att.loop_device.display());
    Ok(0)
}

/// `thinpool vol detach NAME`.
pub fn detach(root: &Path, name: &str) -> Result<i32> {
    let mut c = daemon(root, "vol detach")?;
    let att = c
        .detach(name)
        .with_context(|| format!("detaching volume {name:?}"))?;
    println!("detached volume {name} from {}", att.loop_device.display());
    Ok(0)
}
