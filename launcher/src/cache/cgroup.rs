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

/// Where the v2 (unified) hierarchy is mounted, relative to [`CGROUP_ROOT`], as
/// `/proc/self/mountinfo` shows it: `""` on a unified host (`/sys/fs/cgroup` itself),
/// `"unified"` on systemd's hybrid layout (v1 controllers beside `/sys/fs/cgroup/unified`).
/// None when no cgroup2 file system is mounted there.
fn v2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let point = Path::new(mount.split_whitespace().nth(4)?);
        point.strip_prefix(CGROUP_ROOT).ok().map(Path::to_path_buf)
    })
}

/// The directory of cgroup `name` for `layout` under the mount root `root` (v2: in the
/// hierarchy mounted at `v2` below it), or None when there is nothing to leave: no memory
/// controller in either hierarchy, or a v2 hierarchy that is not mounted where berth looks.
fn target(root: &Path, v2: Option<&Path>, layout: &Layout, name: &str) -> Option<PathBuf> {
    match layout {
        Layout::V1Memory { .. } => Some(root.join("memory").join(name)),
        Layout::V2 { .. } => Some(root.join(v2?).join(name)),
        Layout::None => None,
    }
}

/// Whether the v2 hierarchy at `dir` has the memory controller (its `cgroup.controllers`):
/// without it, v2 limits no job's memory (a hybrid host keeps memory in v1) and there is
/// nothing to leave.
fn v2_has_memory(controllers: &str) -> bool {
    controllers.split_whitespace().any(|c| c == "memory")
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
    let v2 = v2_mount(&read("/proc/self/mountinfo")?);
    let Some(dir) = target(root, v2.as_deref(), &layout, name) else {
        return Ok(None);
    };
    if let (Layout::V2 { .. }, Some(v2)) = (&layout, &v2) {
        let controllers = fs::read_to_string(root.join(v2).join("cgroup.controllers"));
        if !controllers.is_ok_and(|c| v2_has_memory(&c)) {
            return Ok(None);
        }
    }
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

    /// Recorded `/proc/self/mountinfo` lines: a unified (v2-only) host as Debian 12, Ubuntu
    /// 22.04+ and RHEL 9 boot by default, systemd's hybrid layout, and this test cluster's
    /// v1-only one (controllers under a tmpfs, no cgroup2 at all).
    const MOUNTS_V2: &str = "25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n\
        26 25 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
    const MOUNTS_HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755\n\
        32 31 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate\n\
        35 31 0:32 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory\n";
    const MOUNTS_V1: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n";
    /// A task of Slurm 24.11's cgroup/v2 plugin, and systemd's hybrid view of one.
    const V2_SLURM_TASK: &str = "0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n";
    const HYBRID_TASK: &str = "11:memory:/slurm/uid_1100/job_7/step_0/task_0\n\
                               1:name=systemd:/system.slice/slurmd.service\n\
                               0::/system.slice/slurmd.service\n";

    #[test]
    fn the_v2_hierarchy_is_found_where_it_is_mounted() {
        assert_eq!(v2_mount(MOUNTS_V2), Some(PathBuf::new()));
        assert_eq!(v2_mount(MOUNTS_HYBRID), Some(PathBuf::from("unified")));
        assert_eq!(v2_mount(MOUNTS_V1), None);
        // A cgroup2 mounted elsewhere (a container's own) is not the host's hierarchy.
        assert_eq!(
            v2_mount("40 30 0:40 / /srv/cg rw - cgroup2 cgroup2 rw\n"),
            None
        );
        assert!(v2_has_memory(
            "cpuset cpu io memory hugetlb pids rdma misc\n"
        ));
        assert!(!v2_has_memory("cpuset cpu io pids\n"));
    }

    #[test]
    fn targets_per_layout() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            target(
                root,
                v2_mount(MOUNTS_V1).as_deref(),
                &layout(V1),
                "berth/fetch"
            ),
            Some(PathBuf::from("/sys/fs/cgroup/memory/berth/fetch"))
        );
        // Hybrid: the memory controller is v1's, so the build moves there, not to unified.
        assert_eq!(
            target(
                root,
                v2_mount(MOUNTS_HYBRID).as_deref(),
                &layout(HYBRID_TASK),
                "berth/fetch"
            ),
            Some(PathBuf::from("/sys/fs/cgroup/memory/berth/fetch"))
        );
        for task in [V2, V2_SLURM_TASK] {
            assert_eq!(
                target(
                    root,
                    v2_mount(MOUNTS_V2).as_deref(),
                    &layout(task),
                    "berth/fetch"
                ),
                Some(PathBuf::from("/sys/fs/cgroup/berth/fetch"))
            );
        }
        // A v2 path in /proc/self/cgroup with no cgroup2 under /sys/fs/cgroup: nowhere to go.
        assert_eq!(target(root, None, &layout(V2), "berth/fetch"), None);
        assert_eq!(target(root, None, &Layout::None, "berth/fetch"), None);
    }

    #[test]
    fn a_v2_move_goes_to_the_unified_root_and_needs_its_memory_controller() {
        // A recorded v2 root (cgroup.controllers) under a plain directory: the target is
        // computed, and without the memory controller there is nothing to leave.
        let dir = tempfile::tempdir().unwrap();
        let v2 = v2_mount(MOUNTS_V2).unwrap();
        let dest = target(dir.path(), Some(&v2), &layout(V2_SLURM_TASK), "berth/fetch");
        assert_eq!(dest, Some(dir.path().join("berth/fetch")));
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu io pids\n").unwrap();
        let controllers = std::fs::read_to_string(dir.path().join("cgroup.controllers")).unwrap();
        assert!(!v2_has_memory(&controllers));
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
