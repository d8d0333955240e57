//! The site's TaskProlog (slurm.conf `TaskProlog=`) for a task that runs in a container: it
//! runs on the node, not in the image. Slurm runs it right after `task_init`, that is
//! inside the container the task has just joined (22.05 to 25.11 alike), where a script
//! that exists only on the node, or whose interpreter the image lacks, would fail every
//! task. So `task_init` runs it first, on the node, as the user with the task's
//! environment, and applies its output as Slurm would (`export NAME=VALUE`, `unset NAME`,
//! `print TEXT`); inside the container a no-op stands at its path (`berth start
//! --stand-in`), so Slurm's own run changes nothing.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::error::Error;
use crate::spank::Spank;

/// The TaskProlog of the running Slurm's configuration (its own slurm.conf, whichever
/// release and sysconfdir), if any; a relative one Slurm looks up itself, so berth leaves it.
pub fn path() -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let path = crate::spank::task_prolog()?;
    path.starts_with(b"/")
        .then(|| PathBuf::from(std::ffi::OsString::from_vec(path)))
}

/// What one line of a TaskProlog's output asks for (Slurm's `_proc_stdout`).
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Export(Vec<u8>, Vec<u8>),
    Unset(Vec<u8>),
    Print(Vec<u8>),
}

fn actions(output: &[u8]) -> Vec<Action> {
    output
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            if let Some(rest) = line.strip_prefix(b"export ") {
                let at = rest.iter().position(|&b| b == b'=')?;
                Some(Action::Export(rest[..at].to_vec(), rest[at + 1..].to_vec()))
            } else if let Some(name) = line.strip_prefix(b"unset ") {
                Some(Action::Unset(name.trim_ascii().to_vec()))
            } else {
                line.strip_prefix(b"print ")
                    .map(|text| Action::Print(text.to_vec()))
            }
        })
        .collect()
}

/// Runs the TaskProlog at `path` on the node with the task's environment and applies its
/// output to the task. A failing TaskProlog fails the task, as it does without a container.
pub fn run_on_node(spank: Spank, path: &PathBuf) -> Result<(), Error> {
    let failed = |detail: String| Error::TaskPrologFailed {
        path: path.display().to_string(),
        detail,
    };
    let env = spank.job_env()?;
    let mut command = Command::new(path);
    command
        .env_clear()
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .env("SLURM_SCRIPT_CONTEXT", "prolog_task");
    for kv in &env {
        if let Some(at) = kv.iter().position(|&b| b == b'=') {
            command.env(
                std::ffi::OsStr::from_bytes(&kv[..at]),
                std::ffi::OsStr::from_bytes(&kv[at + 1..]),
            );
        }
    }
    let out = command.output().map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(out.status.to_string()));
    }
    for action in actions(&out.stdout) {
        match action {
            Action::Export(name, value) => spank.setenv(&name, &value)?,
            Action::Unset(name) => spank.unsetenv(&name)?,
            Action::Print(text) => {
                let mut stdout = std::io::stdout();
                let _ = stdout
                    .write_all(&text)
                    .and_then(|()| stdout.write_all(b"\n"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lines_become_slurms_actions() {
        let out = b"export A=1=2\nunset B\nprint hello there\nnoise\nexport broken\n";
        assert_eq!(
            actions(out),
            vec![
                Action::Export(b"A".to_vec(), b"1=2".to_vec()),
                Action::Unset(b"B".to_vec()),
                Action::Print(b"hello there".to_vec()),
            ]
        );
    }
}
