//! Running the system's tools: one place that turns "not installed", a failing exit status
//! and its stderr into [`Error`]s that name the command.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

use crate::{Error, Result};

/// The Debian package that ships `tool`, for the "not installed" message.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "mkfs.ext4" | "e2fsck" | "resize2fs" | "dumpe2fs" => "e2fsprogs",
        "mkfs.xfs" | "xfs_growfs" | "xfs_repair" => "xfsprogs",
        _ => "util-linux",
    }
}

/// `tool args…` as a person would type it.
fn command_line(tool: &str, args: &[&OsStr]) -> String {
    let mut s = tool.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `tool` with `args`, stdin closed, and return its output whatever its exit status.
pub(crate) fn output<S: AsRef<OsStr>>(tool: &str, args: &[S]) -> Result<Output> {
    let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    tracing::debug!(command = command_line(tool, &args), "running");
    Command::new(tool)
        .args(&args)
        .stdin(Stdio::null())
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Missing {
                    tool: tool.to_string(),
                    package: package_of(tool),
                }
            } else {
                Error::Tool {
                    command: command_line(tool, &args),
                    status: "could not start".into(),
                    stderr: e.to_string(),
                }
            }
        })
}

/// The error for a run that ended badly.
pub(crate) fn failed<S: AsRef<OsStr>>(tool: &str, args: &[S], out: &Output) -> Error {
    let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    // The reason comes first; a usage text after it says nothing more.
    if stderr.lines().count() > 4 {
        stderr = stderr.lines().take(4).collect::<Vec<_>>().join("\n") + "\n…";
    }
    Error::Tool {
        command: command_line(tool, &args),
        status: out.status.to_string(),
        stderr,
    }
}

/// Run `tool` with `args`; its stdout on success, [`Error::Tool`] on a non-zero exit.
pub(crate) fn run<S: AsRef<OsStr>>(tool: &str, args: &[S]) -> Result<String> {
    let out = output(tool, args)?;
    if !out.status.success() {
        return Err(failed(tool, args, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_its_package() {
        let e = run("mkfs.ext4-not-here", &["x"]).unwrap_err();
        assert!(matches!(e, Error::Missing { .. }), "{e}");
        let e = output("resize2fs", &["--no-such-option-at-all"]);
        if let Ok(out) = e {
            let msg = failed("resize2fs", &["--no-such-option-at-all"], &out).to_string();
            assert!(
                msg.starts_with("`resize2fs --no-such-option-at-all` failed (exit status"),
                "{msg}"
            );
        }
    }
}
