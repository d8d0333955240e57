//! Named containers (`--container-name=NAME[:MODE]`) on the compute node: a container a
//! job keeps across its steps on each node, as in pyxis.
//!
//! - Its files: the launcher keeps what it writes in the user's part of `[runtime]
//!   writable_dir` on node-local disk (`berth start --named JOB/NAME`), so a later step
//!   continues from them; only one container uses them at a time (the launcher locks them).
//! - Its record, kept by root in [`RECORD_DIR`]`/JOB/NAME/` where no user can write: the
//!   image it was created from (`image`), and while a step runs it the handle of that step's
//!   holder (`holder`). A step naming a running container enters that holder's namespaces
//!   instead of starting a container (`srun --overlap --container-name=NAME`); one naming a
//!   stopped container starts it again from its files and its recorded image (judged by the
//!   policy again, as every start is).
//! - A step that starts it while another step runs it (`:no_exec`, or two steps starting
//!   it at once) runs a copy: its own writes over the container's files, gone when it ends
//!   (the launcher's `container::writable`; pyxis starts a second copy on the same files,
//!   which berth does not, as one overlay layer takes one writer). A copy is not recorded:
//!   later steps enter the container itself.
//! - A step's unnamed container is recorded too, as `JOBID.STEPID` (the name pyxis gives
//!   it), with no image: while it runs, `--container-name=JOBID.STEPID` enters it, through
//!   the same checks and the same confinement as a named one; once it stops it is gone.
//! - Its end: the job epilog ([`remove_job`], from `epilog`, when the job ends or is cancelled)
//!   removes the records and, as the job's user, the files (`berth named remove --job`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use berth_sys::memfd::SpecHandle;

use crate::error::Error;
use crate::launcher::{Holder, Launcher};
use crate::options::{NameMode, Named};
use crate::spank;

/// Where root records the job's named containers on this node (a tmpfs: nothing outlives a
/// reboot, when the containers are gone too).
pub const RECORD_DIR: &str = "/run/berth/named";

/// The spec annotation naming the directory of a container's files (the launcher's
/// `container::writable::ANN_CHANGES`).
pub const ANN_CHANGES: &str = "org.berth.changes";

/// The spec annotation of a copy of a running named container, naming that container's
/// files below the copy's own (the launcher's `container::writable::ANN_BELOW`).
pub const ANN_BELOW: &str = "org.berth.changes-below";

/// The spec annotation naming the job step (`JOB.STEP`) an unnamed container is for (the
/// launcher's `container::handle::ANN_STEP`, from `berth start --step`).
pub const ANN_STEP: &str = "org.berth.step";

/// The name under which step `step`'s unnamed container of job `job` is recorded, and
/// entered: `JOBID.STEPID`, as pyxis names it.
pub fn step_name(job: u32, step: u32) -> String {
    format!("{job}.{step}")
}

/// Whether the holder whose spec has annotations `ann` runs container `name` of job `job`:
/// a named container's files are that container's (`.../job-JOB/NAME`, not a copy over
/// them), an unnamed one is that step's (`JOBID.STEPID`). So a recorded handle whose holder
/// was replaced by another container of the user is not entered.
pub fn runs(ann: &BTreeMap<String, String>, job: u32, name: &str) -> bool {
    let named = ann
        .get(ANN_CHANGES)
        .is_some_and(|dir| dir.ends_with(&format!("/job-{job}/{name}")))
        && !ann.contains_key(ANN_BELOW);
    let step = ann.get(ANN_STEP).is_some_and(|step| {
        step == name && step.split_once('.').map(|(j, _)| j) == Some(&job.to_string())
    });
    named || step
}

/// Refuses to enter a running container that lacks a namespace `unshare` asks for (pyxis
/// does the same: the step would otherwise share the node's).
pub fn check_unshare(holder: &Holder, name: &str, unshare: &[String]) -> Result<(), Error> {
    let ns = &holder.namespaces;
    let kinds = [
        ("net", ns.net.is_some(), "network"),
        ("ipc", ns.ipc.is_some(), "IPC"),
        ("uts", ns.uts.is_some(), "UTS"),
    ];
    match kinds
        .iter()
        .find(|(kind, has, _)| !has && unshare.iter().any(|u| u == kind))
    {
        Some((kind, _, what)) => Err(Error::UnshareMismatch {
            name: name.to_owned(),
            kind: (*kind).to_owned(),
            what,
        }),
        None => Ok(()),
    }
}

/// What a step naming a container does.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Enter the running container.
    Enter,
    /// Start the container from this image (its recorded one, or for a new container the
    /// step's).
    Start(String),
}

/// Decides, as pyxis does, from the mode, whether the container runs now, the image it was
/// created from (None: it does not exist) and the image the step asked for.
pub fn decide(
    named: &Named,
    running: bool,
    recorded: Option<String>,
    requested: Option<String>,
) -> Result<Decision, Error> {
    let name = || named.name.clone();
    match (named.mode, running, recorded) {
        (NameMode::Create, _, Some(_)) => Err(Error::NamedExists { name: name() }),
        (NameMode::Exec, false, _) => Err(Error::NamedNotRunning { name: name() }),
        (NameMode::Auto | NameMode::Exec, true, _) => Ok(Decision::Enter),
        // no_exec on a running one starts it too: a copy (see the module comment).
        (_, _, Some(image)) => Ok(Decision::Start(image)),
        (_, _, None) => requested
            .map(Decision::Start)
            .ok_or_else(|| Error::NamedMissing { name: name() }),
    }
}

/// Root's record of one named container of a job on this node.
#[derive(Debug, Clone)]
pub struct Record {
    dir: PathBuf,
    /// An unnamed step's: it goes, with the job's directory if that is left empty, when
    /// the container stops, so a job of unnamed steps leaves nothing once they end.
    step: bool,
}

impl Record {
    pub fn of(job: u32, name: &str) -> Record {
        Record {
            dir: Path::new(RECORD_DIR).join(job.to_string()).join(name),
            step: false,
        }
    }

    /// The record of step `step`'s unnamed container, by [`step_name`].
    pub fn of_step(job: u32, step: u32) -> Record {
        Record {
            step: true,
            ..Record::of(job, &step_name(job, step))
        }
    }

    /// The image the container was created from; None if it was not.
    pub fn image(&self) -> Option<String> {
        self.read("image")
    }

    /// The holder running it now, as recorded (checked by [`crate::launcher::Holder::attach`]).
    pub fn holder(&self) -> Option<SpecHandle> {
        SpecHandle::parse(self.read("holder")?.trim())
    }

    /// Records the container as run by `holder` and, for a named one, created from `image`
    /// (if new; an unnamed step's has none: it cannot be started again).
    pub fn started(&self, image: Option<&str>, holder: SpecHandle) -> Result<(), Error> {
        let record = || -> std::io::Result<()> {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)?;
            if let (Some(image), None) = (image, self.image()) {
                write(&self.dir.join("image"), image)?;
            }
            write(&self.dir.join("holder"), &holder.to_string())
        };
        // Another step's stop may remove the job's directory, empty, between our mkdirs.
        as_root(|| match record() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => record(),
            done => done,
        })
        .map_err(|e| self.failed(e))
    }

    /// The container stopped: it can no longer be entered, only started again (a named
    /// one; an unnamed step's record goes).
    pub fn stopped(&self, holder: SpecHandle) -> Result<(), Error> {
        if self.holder() != Some(holder) {
            return Ok(());
        }
        let gone = |done: std::io::Result<()>| match done {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        as_root(|| {
            gone(fs::remove_file(self.dir.join("holder")))?;
            if self.step {
                gone(fs::remove_dir(&self.dir))?;
                // Only if empty: the job's other containers keep theirs.
                if let Some(job) = self.dir.parent() {
                    let _ = fs::remove_dir(job);
                }
            }
            Ok(())
        })
        .map_err(|e| self.failed(e))
    }

    fn read(&self, file: &str) -> Option<String> {
        as_root(|| fs::read_to_string(self.dir.join(file))).ok()
    }

    fn failed(&self, e: std::io::Error) -> Error {
        Error::NamedRecord {
            path: self.dir.display().to_string(),
            detail: e.to_string(),
        }
    }
}

/// Root-only files, written whole (a reader never sees half a line).
fn write(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?
        .write_all(text.as_bytes())?;
    fs::rename(tmp, path)
}

/// `f` with root's rights (slurmstepd's `user_init` runs with the user's effective uid).
fn as_root<T>(f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    berth_sys::identity::with_effective_root(f).map_err(|e| std::io::Error::other(e.to_string()))?
}

/// The job ended (slurmd's job epilog on each node of the job, also after scancel, see
/// `epilog`): root's records of its named containers go, then their files, removed by
/// `user` (the job's user, whose files they are: root never walks a tree the user can
/// change). Never fails: a problem is logged, and `[runtime] writable_dir`'s ageing removes
/// what is left.
pub fn remove_job(job: u32, user: &Launcher) {
    let records = Path::new(RECORD_DIR).join(job.to_string());
    if records.is_dir() {
        // Root's own tree in a root-only directory: nothing in it is the user's to redirect.
        if let Err(e) = fs::remove_dir_all(&records) {
            spank::log_error(&format!("job {job}: removing {}: {e}", records.display()));
        }
    }
    if let Err(e) = user.remove_named(job) {
        spank::log_error(&format!("job {job}: removing its named containers: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(mode: NameMode) -> Named {
        Named {
            name: "n".into(),
            mode,
        }
    }

    fn img(s: &str) -> Option<String> {
        Some(s.into())
    }

    #[test]
    fn a_recorded_holder_is_entered_only_if_it_runs_that_container() {
        let ann = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let named = ann(&[(ANN_CHANGES, "/var/tmp/berth/1100/job-7/env")]);
        assert!(runs(&named, 7, "env"));
        assert!(!runs(&named, 8, "env") && !runs(&named, 7, "nv"));
        // A copy over it is not the container.
        let copy = ann(&[
            (ANN_CHANGES, "/var/tmp/berth/1100/job-7/env"),
            (ANN_BELOW, "/var/tmp/berth/1100/job-7/env"),
        ]);
        assert!(!runs(&copy, 7, "env"));
        // An unnamed step's, by JOBID.STEPID of this job only.
        let step = ann(&[(ANN_STEP, "7.3")]);
        assert!(runs(&step, 7, &step_name(7, 3)));
        assert!(!runs(&step, 7, "7.4") && !runs(&step, 8, "7.3"));
        assert!(!runs(&ann(&[]), 7, "7.3"));
    }

    #[test]
    fn decisions_follow_pyxis() {
        use NameMode::*;
        // auto: enter a running one, else start the recorded image, else create.
        assert_eq!(
            decide(&named(Auto), true, img("a"), None),
            Ok(Decision::Enter)
        );
        assert_eq!(
            decide(&named(Auto), false, img("a"), img("b")),
            Ok(Decision::Start("a".into()))
        );
        assert_eq!(
            decide(&named(Auto), false, None, img("b")),
            Ok(Decision::Start("b".into()))
        );
        let err = decide(&named(Auto), false, None, None).unwrap_err();
        assert!(err.to_string().contains("--container-image"), "{err}");
        // create: only a new one.
        assert!(matches!(
            decide(&named(Create), false, img("a"), img("a")),
            Err(Error::NamedExists { .. })
        ));
        assert_eq!(
            decide(&named(Create), false, None, img("b")),
            Ok(Decision::Start("b".into()))
        );
        // exec: only a running one.
        assert_eq!(
            decide(&named(Exec), true, img("a"), None),
            Ok(Decision::Enter)
        );
        assert!(matches!(
            decide(&named(Exec), false, img("a"), None),
            Err(Error::NamedNotRunning { .. })
        ));
        // no_exec: never enter; a running one is started again (as a copy).
        assert_eq!(
            decide(&named(NoExec), false, img("a"), None),
            Ok(Decision::Start("a".into()))
        );
        assert_eq!(
            decide(&named(NoExec), true, img("a"), None),
            Ok(Decision::Start("a".into()))
        );
        // An unnamed step's container has no image: entered while it runs, else missing.
        let step = Named {
            name: step_name(7, 3),
            mode: Auto,
        };
        assert_eq!(decide(&step, true, None, None), Ok(Decision::Enter));
        assert!(matches!(
            decide(&step, false, None, None),
            Err(Error::NamedMissing { .. })
        ));
        assert!(matches!(
            decide(
                &Named {
                    mode: NoExec,
                    ..step
                },
                true,
                None,
                None
            ),
            Err(Error::NamedMissing { .. })
        ));
    }
}
