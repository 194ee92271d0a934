//! `thinpool completions SHELL` and `thinpool man`: shell completions (clap_complete) and
//! manual pages (clap_mangen), generated from the command-line definition itself so that they
//! never drift from it.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap_complete::Shell;

/// Print the completion script for `shell` on stdout.
pub fn completions(shell: Shell, cmd: &mut clap::Command) -> Result<i32> {
    let mut out = Vec::new();
    clap_complete::generate(shell, cmd, "thinpool", &mut out);
    write_stdout(&out)?;
    Ok(0)
}

/// Print the top manual page on stdout, or write every page into `dir`.
pub fn man(cmd: clap::Command, dir: Option<&Path>) -> Result<i32> {
    let Some(dir) = dir else {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut out)
            .context("rendering the manual page")?;
        write_stdout(&out)?;
        return Ok(0);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // `help` is clap's own subcommand, not worth a page; building gives every subcommand its
    // display name (`thinpool-pool-create`), which names its page.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, dir, &mut written)?;
    let mut text = String::new();
    for p in &written {
        text.push_str(&format!("{}\n", p.display()));
    }
    write_stdout(text.as_bytes())?;
    Ok(0)
}

/// Write the page of `cmd` and of each of its visible subcommands, depth first.
fn write_pages(
    cmd: &clap::Command,
    dir: &Path,
    written: &mut Vec<std::path::PathBuf>,
) -> Result<()> {
    let page = clap_mangen::Man::new(cmd.clone());
    let path = dir.join(page.get_filename());
    let mut out = Vec::new();
    page.render(&mut out)
        .with_context(|| format!("rendering the manual page {}", path.display()))?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

/// Write `bytes` to stdout; a closed pipe (`| head`) is not an error worth a message.
fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to standard output"),
    }
}
