//! What a container shows of cgroups. /sys inside is a read-only bind of the host's, so
//! without more every task would see the node's whole cgroup tree (other jobs, their
//! users' ids, system services) under /sys/fs/cgroup. Two things narrow it:
//!
//! - [`view`] plans, from the launching process's own `/proc/self/cgroup` and mountinfo,
//!   one bind per cgroup hierarchy mounted under /sys/fs/cgroup: the job's cgroup (the
//!   `job_N` directory Slurm's cgroup plugins make, v1 or v2) onto the hierarchy's
//!   mountpoint, read-only. A hierarchy in which the process is not inside a job (on a
//!   hybrid v1 node Slurm places tasks in some controllers only) is hidden by an empty
//!   tmpfs instead. Outside Slurm, each hierarchy shows the process's own cgroup.
//! - Every process entering the container unshares a cgroup namespace
//!   ([`crate::process::Confinement::cgroup_ns`]), so its `/proc/self/cgroup` shows its
//!   own cgroup (a Slurm task's task cgroup) as `/`, as in Docker.
//!
//! The binds are made once, by whoever assembles the container's mount namespace (a step's
//! `berth start` holder, in the step's cgroups), and shared by its tasks, so they show the
//! job rather than one task; a task finds itself below it (`step_0/task_1`, v1's
//! `cgroup.procs` listing its pid).

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One mount of the cgroup view, at `target` (a hierarchy's mountpoint, the same path
/// inside the container as on the host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub target: PathBuf,
    /// The host directory bound there, or `None` for an empty read-only tmpfs.
    pub source: Option<PathBuf>,
}

/// The cgroup view of a container assembled by this process (see the module doc).
pub fn view() -> Result<Vec<CgroupMount>> {
    let read =
        |path: &str| std::fs::read_to_string(path).map_err(Error::io_path("read", Path::new(path)));
    Ok(plan(
        &read("/proc/self/cgroup")?,
        &read("/proc/self/mountinfo")?,
    ))
}

/// The view, from the text of `/proc/self/cgroup` and `/proc/self/mountinfo`.
pub fn plan(cgroup: &str, mountinfo: &str) -> Vec<CgroupMount> {
    // (controllers, path) per hierarchy; v2's unified one has no controllers listed.
    let memberships: Vec<(Vec<&str>, &str)> = cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let controllers = controllers.split(',').filter(|c| !c.is_empty()).collect();
            Some((controllers, path))
        })
        .collect();
    let in_job = memberships.iter().any(|(_, p)| job_dir(p).is_some());
    let mut out = Vec::new();
    for m in mountinfo.lines().filter_map(CgroupFs::parse) {
        let membership = memberships.iter().find(|(controllers, _)| {
            if m.v2 {
                controllers.is_empty()
            } else {
                !controllers.is_empty()
                    && controllers.iter().all(|c| m.options.iter().any(|o| o == c))
            }
        });
        let shown = membership.and_then(|(_, path)| {
            let path = if in_job { job_dir(path)? } else { path };
            // Component-wise: a mount of /job_3 does not contain /job_30.
            Path::new(path)
                .strip_prefix(&m.root)
                .ok()
                .map(Path::to_owned)
        });
        match shown {
            // The mount shows exactly that cgroup already (its root; or outside any job, the
            // hierarchy's root, which there is nothing to narrow to).
            Some(rel) if rel.as_os_str().is_empty() => {}
            Some(rel) => out.push(CgroupMount {
                source: Some(m.mountpoint.join(rel)),
                target: m.mountpoint,
            }),
            None => out.push(CgroupMount {
                target: m.mountpoint,
                source: None,
            }),
        }
    }
    out
}

/// `path` up to its last `job_N` component (Slurm's v1 and v2 cgroup plugins both name a
/// job's cgroup so), or `None` if it has none.
fn job_dir(path: &str) -> Option<&str> {
    let mut end = None;
    let mut at = 0;
    for component in path.split('/') {
        at += component.len();
        if component
            .strip_prefix("job_")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            end = Some(at);
        }
        at += 1;
    }
    end.map(|e| &path[..e])
}

/// A cgroup file system mounted under /sys/fs/cgroup, from one line of mountinfo.
struct CgroupFs {
    mountpoint: PathBuf,
    /// The cgroup the mount shows as its top (`/` for the host's own mounts).
    root: PathBuf,
    v2: bool,
    /// The super options: v1's controllers (`memory`, `cpu,cpuacct`, `name=systemd`).
    options: Vec<String>,
}

impl CgroupFs {
    /// `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER`
    /// (proc(5)); anything else is not one.
    fn parse(line: &str) -> Option<CgroupFs> {
        let (before, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = before.split(' ').collect();
        let (root, mountpoint) = (unescape(fields.get(3)?), unescape(fields.get(4)?));
        let mut after = after.split(' ');
        let fstype = after.next()?;
        let _source = after.next()?;
        let options = after.next().unwrap_or_default();
        let v2 = match fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => return None,
        };
        let mountpoint = PathBuf::from(mountpoint);
        if !mountpoint.starts_with("/sys/fs/cgroup") {
            return None;
        }
        Some(CgroupFs {
            mountpoint,
            root: root.into(),
            v2,
            options: options.split(',').map(str::to_owned).collect(),
        })
    }
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test cluster's node: hybrid v1 (Slurm's cgroup/v1 places a step in memory,
    /// cpuset, devices and freezer; cpu, pids and the others stay at the root) with a v2
    /// tree beside it; recorded from a `berth start` holder of job 7, step 0.
    const HYBRID_CGROUP: &str = "\
12:pids:/
11:freezer:/slurm/uid_1100/job_7/step_0
10:devices:/slurm/uid_1100/job_7/step_0
9:name=systemd:/system.slice/slurmd.service
8:cpu,cpuacct:/
5:memory:/slurm/uid_1100/job_7/step_0
3:cpuset:/slurm/uid_1100/job_7/step_0
0::/system.slice/slurmd.service
";
    const HYBRID_MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
31 23 0:28 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";

    fn bind(target: &str, source: &str) -> CgroupMount {
        CgroupMount {
            target: target.into(),
            source: Some(source.into()),
        }
    }

    fn hidden(target: &str) -> CgroupMount {
        CgroupMount {
            target: target.into(),
            source: None,
        }
    }

    #[test]
    fn hybrid_v1_shows_the_job_where_slurm_placed_the_step_and_hides_the_rest() {
        let job = "slurm/uid_1100/job_7";
        assert_eq!(
            plan(HYBRID_CGROUP, HYBRID_MOUNTINFO),
            vec![
                hidden("/sys/fs/cgroup/cpu,cpuacct"),
                bind(
                    "/sys/fs/cgroup/memory",
                    &format!("/sys/fs/cgroup/memory/{job}")
                ),
                bind(
                    "/sys/fs/cgroup/cpuset",
                    &format!("/sys/fs/cgroup/cpuset/{job}")
                ),
                bind(
                    "/sys/fs/cgroup/devices",
                    &format!("/sys/fs/cgroup/devices/{job}")
                ),
                bind(
                    "/sys/fs/cgroup/freezer",
                    &format!("/sys/fs/cgroup/freezer/{job}")
                ),
                hidden("/sys/fs/cgroup/pids"),
                hidden("/sys/fs/cgroup/systemd"),
                hidden("/sys/fs/cgroup/unified"),
            ]
        );
    }

    #[test]
    fn unified_v2_shows_the_job() {
        // Slurm's cgroup/v2: slurmstepd's scope, the step's stepd in `slurm`.
        let cgroup = "0::/system.slice/slurmstepd.scope/job_12/step_3/slurm\n";
        let mountinfo = "\
24 1 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        assert_eq!(
            plan(cgroup, mountinfo),
            vec![bind(
                "/sys/fs/cgroup",
                "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_12"
            )]
        );
    }

    #[test]
    fn outside_slurm_each_hierarchy_shows_the_own_cgroup() {
        let cgroup = "0::/user.slice/user-1100.slice/session-4.scope\n";
        let mountinfo = "24 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            plan(cgroup, mountinfo),
            vec![bind(
                "/sys/fs/cgroup",
                "/sys/fs/cgroup/user.slice/user-1100.slice/session-4.scope"
            )]
        );
        // At the root already (a process in a container of its own): nothing to narrow.
        assert_eq!(plan("0::/\n", mountinfo), vec![]);
    }

    #[test]
    fn a_mount_of_a_subtree_is_read_relative_to_its_root() {
        // Inside a cgroup namespace (or a bind of a subtree) the mount's root is not `/`.
        let cgroup = "0::/job_3/step_0\n";
        let mountinfo = "30 1 0:22 /job_3 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(plan(cgroup, mountinfo), vec![], "it shows the job already");
        let above = "30 1 0:22 /a /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            plan("0::/a/job_3/step_0\n", above),
            vec![bind("/sys/fs/cgroup", "/sys/fs/cgroup/job_3")]
        );
        // A cgroup outside the mounted subtree cannot be shown: hidden.
        let other = "30 1 0:22 /job_30 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(plan(cgroup, other), vec![hidden("/sys/fs/cgroup")]);
    }

    #[test]
    fn job_dirs_are_whole_components_with_digits() {
        assert_eq!(
            job_dir("/slurm/uid_1/job_7/step_0"),
            Some("/slurm/uid_1/job_7")
        );
        assert_eq!(job_dir("/a/job_/b"), None);
        assert_eq!(job_dir("/a/job_x1/b"), None);
        assert_eq!(job_dir("/a/myjob_1"), None);
        assert_eq!(job_dir("/job_1/x/job_2/y"), Some("/job_1/x/job_2"));
    }

    #[test]
    fn mountinfo_escapes_and_other_file_systems() {
        assert_eq!(unescape(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
        let line = r"40 31 0:37 / /sys/fs/cgroup/x\040y rw - cgroup cgroup rw,name=x";
        let fs = CgroupFs::parse(line).unwrap();
        assert_eq!(fs.mountpoint, Path::new("/sys/fs/cgroup/x y"));
        assert!(CgroupFs::parse("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw").is_none());
        assert!(CgroupFs::parse("41 1 0:38 / /mnt/cg rw - cgroup2 cgroup2 rw").is_none());
        assert!(CgroupFs::parse("garbage").is_none());
    }
}
