//! Image builds outside the job's memory cgroup.
//!
//! The plugin fetches a step's image from `user_init`, where slurmstepd (and so the `berth`
//! it spawns) already sits in the step's memory cgroup: a cold pull and conversion of a
//! large image would be charged to a small `--mem` job and OOM-killed there. Root's build
//! therefore moves itself, before it downloads or unpacks anything, into a cgroup of berth's
//! own (`[cache] build_cgroup`), and everything it starts (mksquashfs) follows it.
//!
//! - cgroup v1 (this cluster): only the memory hierarchy is left. The freezer (Slurm's
//!   process tracking) and cpuset stay the job's, so `scancel` still ends the build and it
//!   runs on the job's CPUs.
//! - cgroup v2: one hierarchy, so the build leaves the job's cgroup altogether; the target
//!   is a leaf with no controllers enabled below it, as v2's no-internal-processes rule
//!   wants, and the build stays a child slurmstepd waits for.
//!
//! Why here and not in the plugin: the move must happen in the process that allocates, and
//! doing it in the launcher covers both the step's image and any other image a step names,
//! under one configuration key; slurmstepd itself stays where Slurm put it.

use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// Where cgroup file systems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Which cgroup layout a process's `/proc/PID/cgroup` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// A v1 memory hierarchy: the build moves in that hierarchy only.
    V1Memory { current: String },
    /// The unified v2 hierarchy (and no v1 memory controller).
    V2 { current: String },
    /// No cgroup the build could leave (no memory controller at all).
    None,
}

fn layout(proc_cgroup: &str) -> Layout {
    let mut v2 = None;
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            return Layout::V1Memory {
                current: path.to_owned(),
            };
        }
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_owned());
        }
    }
    match v2 {
        Some(current) => Layout::V2 { current },
        None => Layout::None,
    }
}

/// The directory of cgroup `name` for `layout` under the mount root `root`, or None when
/// there is nothing to leave.
fn target(root: &Path, layout: &Layout, name: &str) -> Option<PathBuf> {
    match layout {
        Layout::V1Memory { .. } => Some(root.join("memory").join(name)),
        Layout::V2 { .. } => Some(root.join(name)),
        Layout::None => None,
    }
}

/// `[cache] build_cgroup`: empty (builds stay where they were started) or a relative path of
/// plain components, checked when the configuration is read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct BuildCgroup(String);

impl Default for BuildCgroup {
    fn default() -> Self {
        BuildCgroup("berth/fetch".into())
    }
}

impl TryFrom<String> for BuildCgroup {
    type Error = String;

    fn try_from(name: String) -> std::result::Result<Self, String> {
        let plain = Path::new(&name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if name.is_empty() || (plain && !name.starts_with('/')) {
            return Ok(BuildCgroup(name));
        }
        Err(format!(
            "build_cgroup {name:?} must be a relative cgroup path such as \"berth/fetch\" \
             (no leading '/', no '.' or '..' components), or \"\" to build inside the job's \
             cgroups"
        ))
    }
}

/// Moves this process into the cgroup `name` (under `root`, the cgroup mount root) for an
/// image build, and returns where its memory is now charged (`/berth/fetch`), for the
/// progress line. `Ok(None)`: nothing to move (no name, no memory cgroup, or already there).
pub fn leave_job_memory_cgroup(root: &Path, name: &BuildCgroup) -> Result<Option<String>> {
    let name = name.0.as_str();
    if name.is_empty() {
        return Ok(None);
    }
    let self_cgroup = read("/proc/self/cgroup")?;
    let layout = layout(&self_cgroup);
    let wanted = format!("/{name}");
    match &layout {
        Layout::V1Memory { current } | Layout::V2 { current } if *current == wanted => {
            return Ok(None)
        }
        _ => {}
    }
    let Some(dir) = target(root, &layout, name) else {
        return Ok(None);
    };
    let io = |what: &str, e| Error::io(format!("{what} {}", dir.display()), e);
    fs::create_dir_all(&dir).map_err(|e| io("creating the build cgroup", e))?;
    // Writing a pid moves that process (only this thread group: berth starts its threads
    // and children after this point).
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| io("moving the build into cgroup", e))?;
    // Read back: a file system that only looks like a cgroup mount, or a kernel that refused
    // silently, must not be reported as a move.
    match self::layout(&read("/proc/self/cgroup")?) {
        Layout::V1Memory { current } | Layout::V2 { current } if current == wanted => {
            Ok(Some(current))
        }
        other => Err(Error::io(
            format!("moving the build into cgroup {}", dir.display()),
            std::io::Error::other(format!("the process is still in {other:?}")),
        )),
    }
}

fn read(path: &str) -> Result<String> {
    fs::read_to_string(path).map_err(|e| Error::io(format!("reading {path}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "12:freezer:/slurm/uid_1100/job_7/step_0\n\
                      11:memory:/slurm/uid_1100/job_7/step_0/task_0\n\
                      4:cpu,cpuacct:/\n\
                      0::/init.scope\n";
    const V2: &str = "0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n";

    #[test]
    fn layouts() {
        assert_eq!(
            layout(V1),
            Layout::V1Memory {
                current: "/slurm/uid_1100/job_7/step_0/task_0".into()
            }
        );
        assert_eq!(
            layout(V2),
            Layout::V2 {
                current: "/system.slice/slurmstepd.scope/job_7/step_0/user/task_0".into()
            }
        );
        assert_eq!(layout("3:cpu:/\n"), Layout::None);
        assert_eq!(layout(""), Layout::None);
        // A named v1 hierarchy ("1:name=systemd:/") is neither memory nor v2.
        assert_eq!(layout("1:name=systemd:/x\n"), Layout::None);
    }

    #[test]
    fn targets_per_layout() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            target(root, &layout(V1), "berth/fetch"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/berth/fetch"))
        );
        assert_eq!(
            target(root, &layout(V2), "berth/fetch"),
            Some(PathBuf::from("/sys/fs/cgroup/berth/fetch"))
        );
        assert_eq!(target(root, &Layout::None, "berth/fetch"), None);
    }

    #[test]
    fn names_are_relative_plain_paths() {
        for ok in ["", "berth", "berth/fetch"] {
            assert!(BuildCgroup::try_from(ok.to_owned()).is_ok(), "{ok}");
        }
        for bad in ["/berth", "../job", "berth/../x", "./b"] {
            let msg = BuildCgroup::try_from(bad.to_owned()).unwrap_err();
            assert!(msg.contains("relative cgroup path"), "{msg}");
        }
    }

    #[test]
    fn a_move_that_did_not_take_is_an_error() {
        // A plain directory stands in for the cgroup mount: the pid is written, the kernel
        // moves nothing, and the read-back says so. (Root's real move is tested end to end.)
        let dir = tempfile::tempdir().unwrap();
        let result = leave_job_memory_cgroup(dir.path(), &BuildCgroup::default());
        match layout(&read("/proc/self/cgroup").unwrap()) {
            Layout::None => assert!(matches!(result, Ok(None)), "{result:?}"),
            seen => {
                let msg = result.unwrap_err().to_string();
                assert!(msg.contains("still in"), "{msg}");
                let sub = match seen {
                    Layout::V1Memory { .. } => "memory/berth/fetch",
                    _ => "berth/fetch",
                };
                assert!(dir.path().join(sub).join("cgroup.procs").is_file());
            }
        }
        let off = BuildCgroup::try_from(String::new()).unwrap();
        assert!(matches!(
            leave_job_memory_cgroup(dir.path(), &off),
            Ok(None)
        ));
    }
}
