//! `berth doctor`: checks what berth needs on this node and says how to fix each failure.
//! Each check reads the system (sysctls, /dev/fuse, mounts, Slurm's plugstack, the config)
//! and hands what it read to a pure judgement, which the unit tests exercise directly.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::Config;
use crate::gpu;

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok(String),
    /// Not fatal for berth, but the admin should know.
    Warn(String),
    /// berth will not work (for some or all jobs) until fixed: what is wrong, and the fix.
    Fail {
        problem: String,
        fix: String,
    },
}

pub struct Check {
    pub name: &'static str,
    pub status: Status,
}

fn fail(problem: impl Into<String>, fix: impl Into<String>) -> Status {
    Status::Fail {
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Every check, in the order an admin would fix them.
pub fn run_all(config: &Config) -> Vec<Check> {
    let mut checks = vec![
        Check {
            name: "user namespaces",
            status: user_namespaces(&Sysctls::read()),
        },
        Check {
            name: "/dev/fuse",
            status: fuse(std::fs::metadata("/dev/fuse")),
        },
        Check {
            name: "squashfuse",
            status: squashfuse(),
        },
        Check {
            name: "cgroups",
            status: cgroups(&read("/proc/self/mountinfo")),
        },
    ];
    let slurm = PackageSlurm::from_files(&command_output("dpkg-query", &["-L", "berth"]));
    checks.push(Check {
        name: "Slurm version",
        status: slurm_version(
            &command_output(&slurm.slurmd.display().to_string(), &["-V"]),
            &installed_berth_version(),
        ),
    });
    checks.push(Check {
        name: "plugstack entry",
        status: plugstack(&plugstack_lines(&slurm.plugstack)),
    });
    let mountinfo = read("/proc/self/mountinfo");
    for (name, dir) in [
        ("cache directory", &config.cache.dir),
        ("runtime directory", &config.runtime.dir),
    ] {
        checks.push(Check {
            name,
            status: directory(dir, std::fs::metadata(dir), &mountinfo),
        });
    }
    checks.push(Check {
        name: "cache owner",
        status: crate::cache::doctor_owner(config),
    });
    checks.push(Check {
        name: "stage area",
        status: stage_area(
            &config.stage.dir,
            std::fs::metadata(&config.stage.dir),
            &mountinfo,
            berth_sys::statfs::available_bytes(&config.stage.dir),
            crate::cache::parse_size(&config.stage.reserve).unwrap_or(0),
        ),
    });
    checks.push(Check {
        name: "shared image store",
        status: store(
            &config.store.dir,
            std::fs::metadata(&config.store.dir),
            &mountinfo,
        ),
    });
    checks.push(Check {
        name: "GPUs",
        status: gpus(
            config.gpu.enabled,
            gpu::discover(&config.gpu, Some(&gpu::Selection::All), &[], &gpu::HostNode),
        ),
    });
    checks.extend(registries(config));
    checks
}

/// What a job given every GPU of this node would get: the discovery path (gres.conf, NVML
/// or CDI), the driver and its libraries, or the error a GPU job would fail with.
pub fn gpus(enabled: bool, found: crate::Result<gpu::ContainerEdits>) -> Status {
    if !enabled {
        return Status::Ok("GPU binding is off ([gpu] enabled = false)".into());
    }
    match found {
        Ok(edits) if edits.driver_version.is_none() => Status::Ok(format!(
            "no GPU on this node for berth to bind{}",
            if edits.source.is_empty() {
                String::new()
            } else {
                format!(" ({})", edits.source.join("; "))
            }
        )),
        Ok(edits) => Status::Ok(format!(
            "{} device nodes; {}",
            edits.devices.len(),
            edits.source.join("; ")
        )),
        Err(e) => fail(
            format!("GPU jobs would fail: {e}"),
            "see the message; docs/GPU.md and `[gpu]` in berth.toml(5) describe the settings",
        ),
    }
}

/// The sysctls that decide whether unprivileged users may create user namespaces.
#[derive(Debug, Default)]
pub struct Sysctls {
    pub max_user_namespaces: Option<u64>,
    /// Debian and Ubuntu kernels' switch (absent upstream).
    pub unprivileged_userns_clone: Option<u64>,
    /// Ubuntu 24.04's AppArmor restriction (absent elsewhere).
    pub apparmor_restrict: Option<u64>,
}

impl Sysctls {
    fn read() -> Sysctls {
        let get = |path: &str| read(path).trim().parse().ok();
        Sysctls {
            max_user_namespaces: get("/proc/sys/user/max_user_namespaces"),
            unprivileged_userns_clone: get("/proc/sys/kernel/unprivileged_userns_clone"),
            apparmor_restrict: get("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
        }
    }
}

pub fn user_namespaces(s: &Sysctls) -> Status {
    if s.max_user_namespaces == Some(0) {
        return fail(
            "user.max_user_namespaces is 0",
            "sysctl -w user.max_user_namespaces=15000 (and set it in /etc/sysctl.d/)",
        );
    }
    if s.unprivileged_userns_clone == Some(0) {
        return fail(
            "kernel.unprivileged_userns_clone is 0",
            "sysctl -w kernel.unprivileged_userns_clone=1 (and set it in /etc/sysctl.d/)",
        );
    }
    if s.apparmor_restrict == Some(1) {
        return fail(
            "AppArmor restricts unprivileged user namespaces \
             (kernel.apparmor_restrict_unprivileged_userns=1)",
            "allow them for /usr/bin/berth with an AppArmor profile granting `userns,` \
             (or set the sysctl to 0)",
        );
    }
    Status::Ok(format!(
        "unprivileged users may create them (user.max_user_namespaces={})",
        s.max_user_namespaces.map_or("?".into(), |n| n.to_string())
    ))
}

pub fn fuse(meta: std::io::Result<std::fs::Metadata>) -> Status {
    let fix = "mknod -m 0666 /dev/fuse c 10 229 if it is missing, else chmod 0666 /dev/fuse \
               (the fuse3 package's udev rule makes it so at boot)";
    match meta {
        Err(e) => fail(format!("/dev/fuse: {e}"), fix),
        Ok(m) if !m.file_type().is_char_device() => fail("/dev/fuse is not a device", fix),
        Ok(m) if m.mode() & 0o006 != 0o006 => fail(
            format!(
                "/dev/fuse is mode {:04o}: users cannot mount images",
                m.mode() & 0o7777
            ),
            fix,
        ),
        Ok(m) => Status::Ok(format!("character device, mode {:04o}", m.mode() & 0o7777)),
    }
}

fn squashfuse() -> Status {
    let Ok(path) = crate::container::assemble::find_squashfuse() else {
        return fail("squashfuse is not installed", "apt install squashfuse");
    };
    // It prints its version (`squashfuse 0.1.104 (c) ...`) above its usage.
    let output = command_output(path.to_str().unwrap_or_default(), &["--version"]);
    let version = output
        .lines()
        .find(|l| l.starts_with("squashfuse "))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("version unknown");
    Status::Ok(format!("{} ({version})", path.display()))
}

pub fn cgroups(mountinfo: &str) -> Status {
    let fstype = |mountpoint: &str| {
        mountinfo
            .lines()
            .filter_map(parse_mountinfo)
            .filter(|(point, _)| point == mountpoint)
            .map(|(_, fs)| fs)
            .next_back()
    };
    if fstype("/sys/fs/cgroup").as_deref() == Some("cgroup2") {
        return Status::Ok("cgroup v2 (unified)".into());
    }
    let v1: Vec<&str> = ["cpuset", "memory", "devices", "freezer"]
        .into_iter()
        .filter(|c| fstype(&format!("/sys/fs/cgroup/{c}")).as_deref() == Some("cgroup"))
        .collect();
    if v1.len() == 4 {
        Status::Ok(format!("cgroup v1 ({})", v1.join(", ")))
    } else {
        fail(
            format!(
                "no cgroup v2 at /sys/fs/cgroup and cgroup v1 has only [{}]",
                v1.join(", ")
            ),
            "boot with the unified hierarchy (systemd's default), or mount the cpuset, memory, \
             devices and freezer v1 controllers that Slurm's task/cgroup needs",
        )
    }
}

/// `(mount point, fs type)` of one /proc/self/mountinfo line.
fn parse_mountinfo(line: &str) -> Option<(String, String)> {
    let mut fields = line.split(' ');
    let point = fields.nth(4)?.replace("\\040", " ");
    let mut rest = fields.skip_while(|f| *f != "-");
    rest.next()?;
    Some((point, rest.next()?.to_owned()))
}

pub fn slurm_version(slurmd_v: &str, berth_package: &str) -> Status {
    // `slurm-wlm 22.05.8` or `slurm 23.11.1`.
    let Some(slurm) = slurmd_v
        .split_whitespace()
        .nth(1)
        .map(|v| major_minor(v).to_owned())
    else {
        return fail(
            "slurmd -V did not answer",
            "install slurmd (compute nodes) or check PATH",
        );
    };
    let Some((_, built)) = berth_package.split_once("+slurm") else {
        return Status::Warn(format!(
            "Slurm {slurm}; berth is not installed from its package, so the Slurm release \
             its plugin was built for is unknown"
        ));
    };
    let built = major_minor(built);
    if built == slurm {
        Status::Ok(format!("Slurm {slurm}, plugin built for {built}"))
    } else {
        fail(
            format!("Slurm is {slurm} but spank_berth.so was built for {built}"),
            format!("install the berth package built for Slurm {slurm} (packaging/README.md)"),
        )
    }
}

/// `22.05` of `22.05.8`, `22.05+test1` or `22.05`.
fn major_minor(version: &str) -> &str {
    let numeric_end = version
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(version.len());
    let numeric = &version[..numeric_end];
    let end = numeric
        .match_indices('.')
        .nth(1)
        .map_or(numeric.len(), |(i, _)| i);
    &numeric[..end]
}

/// The Slurm the installed package was built for, from the package's own files: Debian's
/// (`slurmd` on PATH, /etc/slurm) or one built from source (`packaging/build --slurm`: the
/// plugin in `PREFIX/lib/slurm`, the entry in its sysconfdir's `plugstack.conf.d`), so a node
/// that also has Debian's Slurm is judged by the release that loads the plugin.
#[derive(Debug, PartialEq, Eq)]
pub struct PackageSlurm {
    pub slurmd: PathBuf,
    pub plugstack: PathBuf,
}

impl PackageSlurm {
    /// From `dpkg-query -L berth`'s lines (empty when berth is not installed as a package).
    pub fn from_files(files: &str) -> PackageSlurm {
        let mut found = PackageSlurm {
            slurmd: "slurmd".into(),
            plugstack: "/etc/slurm/plugstack.conf".into(),
        };
        for file in files.lines().map(Path::new) {
            let dir = file.parent().unwrap_or(Path::new("/"));
            if file.ends_with("spank_berth.so") && !dir.ends_with("slurm-wlm") {
                // PREFIX/lib/slurm/spank_berth.so
                if let Some(prefix) = dir.parent().and_then(Path::parent) {
                    found.slurmd = prefix.join("sbin/slurmd");
                }
            } else if file.ends_with("plugstack.conf.d/berth.conf") {
                if let Some(conf_dir) = dir.parent() {
                    found.plugstack = conf_dir.join("plugstack.conf");
                }
            }
        }
        found
    }
}

fn installed_berth_version() -> String {
    command_output("dpkg-query", &["-W", "-f=${Version}", "berth"])
}

/// The non-comment lines of plugstack.conf and the files its `include` lines name.
fn plugstack_lines(path: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for line in read(path).lines() {
        let line = line.trim();
        if let Some(pattern) = line.strip_prefix("include") {
            let pattern = pattern.trim();
            let (dir, glob) = pattern.rsplit_once('/').unwrap_or((".", pattern));
            let suffix = glob.trim_start_matches('*');
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect();
            files.sort();
            lines.extend(files.iter().flat_map(|f| plugstack_lines(f)));
        } else if !line.is_empty() && !line.starts_with('#') {
            lines.push(line.to_owned());
        }
    }
    lines
}

pub fn plugstack(lines: &[String]) -> Status {
    let fix = "install the berth package (it adds /etc/slurm/plugstack.conf.d/berth.conf with \
               `required spank_berth.so berth=/usr/bin/berth`) and make sure \
               /etc/slurm/plugstack.conf includes plugstack.conf.d/*.conf";
    let Some(entry) = lines.iter().find(|l| {
        l.split_whitespace()
            .nth(1)
            .is_some_and(|p| p.ends_with("spank_berth.so"))
    }) else {
        return fail(
            "no spank_berth.so line in plugstack.conf or its includes",
            fix,
        );
    };
    if !entry.starts_with("required") {
        return fail(
            format!("`{entry}`: the plugin is not `required`, so Slurm would run refused images"),
            "change `optional` to `required` in that line",
        );
    }
    let launcher = entry
        .split_whitespace()
        .find_map(|a| a.strip_prefix("berth="))
        .unwrap_or("/usr/bin/berth");
    if !Path::new(launcher).is_file() {
        return fail(
            format!("`{entry}`: the launcher {launcher} does not exist"),
            "install berth, or fix berth= in that line",
        );
    }
    Status::Ok(format!("`{entry}`"))
}

/// Network file systems: a cache or runtime directory there is shared between nodes or slow.
const REMOTE_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "glusterfs",
];

pub fn directory(dir: &Path, meta: std::io::Result<std::fs::Metadata>, mountinfo: &str) -> Status {
    let meta = match meta {
        Ok(m) => m,
        Err(e) => {
            return fail(
                format!("{}: {e}", dir.display()),
                format!(
                    "install -d -m 0755 -o root -g root {} (the package's tmpfiles.d does)",
                    dir.display()
                ),
            )
        }
    };
    if !meta.is_dir() {
        return fail(
            format!("{} is not a directory", dir.display()),
            "remove it and reinstall berth",
        );
    }
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return fail(
            format!(
                "{} is owned by uid {} with mode {:04o}: others could change what jobs run",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
            format!("chown root:root {0} && chmod 0755 {0}", dir.display()),
        );
    }
    let (fs, _) = mount_of(dir, mountinfo);
    if is_remote(&fs) {
        return fail(
            format!(
                "{} is on {fs}, a shared or network file system",
                dir.display()
            ),
            "point it at node-local storage (local disk or tmpfs) in /etc/berth/berth.toml",
        );
    }
    Status::Ok(format!(
        "{}: root-owned, mode {:04o}, on {fs}",
        dir.display(),
        meta.mode() & 0o7777
    ))
}

/// The file system type of the mount holding `dir` (the longest mount point that contains
/// it), and whether it is mounted read-only.
fn mount_of(dir: &Path, mountinfo: &str) -> (String, bool) {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (point, fs) = parse_mountinfo(line)?;
            let options = line.split(' ').nth(5)?;
            Some((point, fs, options.split(',').any(|o| o == "ro")))
        })
        .filter(|(point, ..)| dir.starts_with(point))
        .max_by_key(|(point, ..)| point.len())
        .map(|(_, fs, read_only)| (fs, read_only))
        .unwrap_or_default()
}

fn is_remote(fs: &str) -> bool {
    REMOTE_FS.contains(&fs) || fs.starts_with("fuse.")
}

/// `[stage] dir`: root's, mode 1777 (every user makes a private directory in it, and no one
/// may remove another's), writable, on node-local storage, with more than `reserve` free.
pub fn stage_area(
    dir: &Path,
    meta: std::io::Result<std::fs::Metadata>,
    mountinfo: &str,
    free: std::io::Result<u64>,
    reserve: u64,
) -> Status {
    let d = dir.display();
    let meta = match meta {
        Ok(meta) if meta.is_dir() => meta,
        Ok(_) => {
            return fail(
                format!("{d} is not a directory"),
                format!("rm {d} && install -d -m 1777 -o root -g root {d}"),
            )
        }
        Err(e) => {
            return fail(
                format!("{d}: {e}"),
                format!("install -d -m 1777 -o root -g root {d} (the package's tmpfiles.d does)"),
            )
        }
    };
    if meta.uid() != 0 || meta.mode() & 0o7777 != 0o1777 {
        return fail(
            format!(
                "{d} is owned by uid {} with mode {:04o}: users cannot stage there, or could \
                 remove each other's data",
                meta.uid(),
                meta.mode() & 0o7777
            ),
            format!("chown root:root {d} && chmod 1777 {d}"),
        );
    }
    let (fs, read_only) = mount_of(dir, mountinfo);
    if read_only {
        return fail(
            format!("{d} is on a read-only mount"),
            format!("mount a writable node-local file system at {d}, or set [stage] dir"),
        );
    }
    if is_remote(&fs) {
        return fail(
            format!("{d} is on {fs}, a shared or network file system: staging there gains nothing"),
            "point [stage] dir at node-local storage (local disk, NVMe or tmpfs) in /etc/berth/berth.toml",
        );
    }
    match free {
        Ok(free) if free <= reserve => Status::Warn(format!(
            "{d} on {fs}: {} free, not more than the {} [stage] reserve keeps free: every stage \
             will be refused; free space or lower reserve",
            crate::cache::format_size(free),
            crate::cache::format_size(reserve)
        )),
        Ok(free) => Status::Ok(format!(
            "{d}: root-owned, mode 1777, on {fs}, {} free",
            crate::cache::format_size(free)
        )),
        Err(e) => fail(
            format!("{d}: free space unknown: {e}"),
            "check the file system (df)",
        ),
    }
}

/// `[store] dir`, when set: root's and writable by root alone (nodes run what they find
/// there), writable, and best on a file system every node mounts.
pub fn store(dir: &Path, meta: std::io::Result<std::fs::Metadata>, mountinfo: &str) -> Status {
    let d = dir.display();
    if dir.as_os_str().is_empty() {
        return Status::Ok("no shared image store ([store] dir is empty)".into());
    }
    let meta = match meta {
        Ok(meta) if meta.is_dir() => meta,
        Ok(_) => {
            return fail(
                format!("{d} is not a directory"),
                "point [store] dir at a directory on the shared file system",
            )
        }
        Err(e) => {
            return fail(
                format!("{d}: {e}"),
                format!(
                    "mount the shared file system, then install -d -m 0755 -o root -g root {d}"
                ),
            )
        }
    };
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return fail(
            format!(
                "{d} is owned by uid {} with mode {:04o}: others could publish images every node runs",
                meta.uid(),
                meta.mode() & 0o7777
            ),
            format!("chown root:root {d} && chmod 0755 {d} (export it with no_root_squash)"),
        );
    }
    let (fs, read_only) = mount_of(dir, mountinfo);
    if read_only {
        return fail(
            format!("{d} is on a read-only mount: no node can publish"),
            "mount it read-write on every node",
        );
    }
    if !is_remote(&fs) {
        return Status::Warn(format!(
            "{d} is on {fs}, a node-local file system: only this node shares it; point [store] \
             dir at the file system every node mounts"
        ));
    }
    Status::Ok(format!(
        "{d}: root-owned, mode {:04o}, on {fs}",
        meta.mode() & 0o7777
    ))
}

/// Each approved registry, reached as a fetch would (configured proxy, CAs, credentials):
/// asking for a repository that does not exist must get an answer from the registry.
fn registries(config: &Config) -> Vec<Check> {
    let mut probe = config.clone();
    probe.registry.retries = 1;
    probe.registry.timeout_secs = probe.registry.timeout_secs.min(10);
    let mut seen = std::collections::BTreeSet::new();
    let mut checks = Vec::new();
    for pattern in &config.policy.allowed {
        if !seen.insert(pattern.registry().to_owned()) {
            continue;
        }
        let text = pattern.to_string();
        let image = match text.strip_suffix("/*") {
            Some(prefix) => format!("{prefix}/berth-doctor-probe:none"),
            None => format!("{text}:berth-doctor-probe"),
        };
        let resolved = crate::cache::resolve(&probe, &image);
        // By cause, so an answer the cache's service user got counts the same.
        let answered = match &resolved {
            Ok(_) => true,
            Err(e) => matches!(
                crate::metrics::failure_cause(e),
                "not_found" | "unauthorized"
            ),
        };
        let status = match resolved {
            Err(e) if !answered => fail(
                e.to_string(),
                "check the registry's address, [registry] proxy/no_proxy and its CA in \
                 <certs_dir>/HOST:PORT/ca.crt",
            ),
            _ => Status::Ok(format!(
                "{} answers{}",
                pattern.registry(),
                match &config.registry.proxy {
                    Some(_) => " through the configured proxy",
                    None => "",
                }
            )),
        };
        checks.push(Check {
            name: "registry",
            status,
        });
    }
    if config.policy.allowed.is_empty() {
        checks.push(Check {
            name: "registry",
            status: Status::Warn("no registry is approved ([policy] allowed = [])".into()),
        });
    }
    checks
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slurm_checked_is_the_one_the_package_was_built_for() {
        let debian = "/usr/bin/berth\n/usr/lib/x86_64-linux-gnu/slurm-wlm/spank_berth.so\n\
                      /etc/slurm/plugstack.conf.d/berth.conf\n";
        assert_eq!(
            PackageSlurm::from_files(debian),
            PackageSlurm {
                slurmd: "slurmd".into(),
                plugstack: "/etc/slurm/plugstack.conf".into(),
            }
        );
        assert_eq!(
            PackageSlurm::from_files(""),
            PackageSlurm::from_files(debian)
        );
        let source = "/usr/bin/berth\n/opt/slurm-24.11/lib/slurm/spank_berth.so\n\
                      /etc/slurm-24.11/plugstack.conf.d/berth.conf\n";
        assert_eq!(
            PackageSlurm::from_files(source),
            PackageSlurm {
                slurmd: "/opt/slurm-24.11/sbin/slurmd".into(),
                plugstack: "/etc/slurm-24.11/plugstack.conf".into(),
            }
        );
    }

    #[test]
    fn user_namespace_sysctls_name_their_fix() {
        let ok = Sysctls {
            max_user_namespaces: Some(1000),
            ..Sysctls::default()
        };
        assert!(matches!(user_namespaces(&ok), Status::Ok(_)));
        let apparmor = Sysctls {
            apparmor_restrict: Some(1),
            ..ok
        };
        let Status::Fail { fix, .. } = user_namespaces(&apparmor) else {
            panic!()
        };
        assert!(fix.contains("AppArmor profile"), "{fix}");
        let off = Sysctls {
            max_user_namespaces: Some(0),
            ..Sysctls::default()
        };
        assert!(matches!(user_namespaces(&off), Status::Fail { .. }));
    }

    #[test]
    fn a_private_dev_fuse_fails_with_the_chmod() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        let Status::Fail { problem, .. } = fuse(std::fs::metadata(&file)) else {
            panic!()
        };
        assert!(problem.contains("not a device"), "{problem}");
        let Status::Fail { fix, .. } = fuse(std::fs::metadata(dir.path().join("no"))) else {
            panic!()
        };
        assert!(fix.contains("chmod 0666 /dev/fuse"), "{fix}");
    }

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
30 22 0:25 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
40 22 0:40 / /var/cache/berth rw - nfs4 srv:/cache rw\n";

    #[test]
    fn cgroup_layouts() {
        assert_eq!(cgroups(MOUNTINFO), Status::Ok("cgroup v2 (unified)".into()));
        assert!(matches!(
            cgroups("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"),
            Status::Fail { .. }
        ));
    }

    #[test]
    fn a_cache_on_nfs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let meta = std::fs::metadata(dir.path());
        // The temp dir is the test runner's, so judge the file system alone via the mount
        // table: the owner check comes first for non-root runners.
        if berth_sys::identity::real_uid() == 0 {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let mountinfo = format!(
                "{MOUNTINFO}50 22 0:50 / {} rw - nfs srv:/x rw\n",
                dir.path().display()
            );
            let Status::Fail { problem, .. } = directory(dir.path(), meta, &mountinfo) else {
                panic!()
            };
            assert!(problem.contains("nfs"), "{problem}");
        }
    }

    #[test]
    fn the_stage_area_must_be_1777_local_and_writable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let stat = || std::fs::metadata(path);
        let mounts = |fs: &str, opts: &str| {
            format!(
                "{MOUNTINFO}60 22 0:60 / {} {opts} - {fs} x rw\n",
                path.display()
            )
        };
        let set_mode = |mode| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let missing = stage_area(
            &path.join("no"),
            std::fs::metadata(path.join("no")),
            MOUNTINFO,
            Ok(0),
            0,
        );
        assert!(matches!(missing, Status::Fail { fix, .. } if fix.contains("install -d -m 1777")));
        set_mode(0o755);
        assert!(
            matches!(stage_area(path, stat(), MOUNTINFO, Ok(1 << 40), 0),
            Status::Fail { fix, .. } if fix.contains("chmod 1777"))
        );
        if berth_sys::identity::real_uid() != 0 {
            return;
        }
        set_mode(0o1777);
        assert!(matches!(
            stage_area(path, stat(), &mounts("ext4", "rw"), Ok(1 << 40), 1 << 30),
            Status::Ok(_)
        ));
        assert!(
            matches!(stage_area(path, stat(), &mounts("ext4", "ro,relatime"), Ok(1 << 40), 0),
            Status::Fail { problem, .. } if problem.contains("read-only"))
        );
        assert!(
            matches!(stage_area(path, stat(), &mounts("lustre", "rw"), Ok(1 << 40), 0),
            Status::Fail { problem, .. } if problem.contains("lustre"))
        );
        assert!(matches!(
            stage_area(path, stat(), &mounts("ext4", "rw"), Ok(1 << 20), 1 << 30),
            Status::Warn(_)
        ));
    }

    #[test]
    fn the_store_is_roots_alone_and_best_shared() {
        assert!(matches!(
            store(
                Path::new(""),
                Err(std::io::ErrorKind::NotFound.into()),
                MOUNTINFO
            ),
            Status::Ok(_)
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let missing = store(
            &path.join("no"),
            std::fs::metadata(path.join("no")),
            MOUNTINFO,
        );
        assert!(matches!(missing, Status::Fail { .. }));
        if berth_sys::identity::real_uid() != 0 {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(store(path, std::fs::metadata(path), MOUNTINFO),
            Status::Fail { fix, .. } if fix.contains("chmod 0755")));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let nfs = format!(
            "{MOUNTINFO}60 22 0:60 / {} rw - nfs4 srv:/s rw\n",
            path.display()
        );
        assert!(matches!(
            store(path, std::fs::metadata(path), &nfs),
            Status::Ok(_)
        ));
        assert!(matches!(
            store(path, std::fs::metadata(path), MOUNTINFO),
            Status::Warn(_)
        ));
    }

    #[test]
    fn slurm_release_must_match_the_plugin() {
        assert!(matches!(
            slurm_version("slurm-wlm 22.05.8", "0.1.0+slurm22.05"),
            Status::Ok(_)
        ));
        let Status::Fail { problem, .. } = slurm_version("slurm 23.11.1", "0.1.0+slurm22.05")
        else {
            panic!()
        };
        assert!(
            problem.contains("23.11") && problem.contains("22.05"),
            "{problem}"
        );
        assert!(matches!(
            slurm_version("slurm 23.11.1", ""),
            Status::Warn(_)
        ));
        assert_eq!(major_minor("22.05.8"), "22.05");
        assert_eq!(major_minor("22.05+test1"), "22.05");
    }

    #[test]
    fn plugstack_entry_must_be_required() {
        let lines = |l: &str| vec![l.to_owned()];
        let Status::Fail { fix, .. } = plugstack(&lines("optional spank_berth.so berth=/bin/sh"))
        else {
            panic!()
        };
        assert!(fix.contains("required"), "{fix}");
        assert!(matches!(
            plugstack(&lines("required spank_berth.so berth=/bin/sh")),
            Status::Ok(_)
        ));
        assert!(matches!(plugstack(&[]), Status::Fail { .. }));
        assert!(matches!(
            plugstack(&lines("required /x/spank_berth.so berth=/nonexistent")),
            Status::Fail { .. }
        ));
    }

    #[test]
    fn gpu_discovery_is_reported_or_its_error_named() {
        assert!(
            matches!(gpus(false, Err(crate::Error::NoCommand)), Status::Ok(m) if m.contains("off"))
        );
        let none = gpu::ContainerEdits::default();
        assert!(matches!(gpus(true, Ok(none)), Status::Ok(m) if m.starts_with("no GPU")));
        let found = gpu::ContainerEdits {
            driver_version: Some("550.54.15".into()),
            source: vec!["gres.conf /etc/slurm/gres.conf".into()],
            ..Default::default()
        };
        assert!(matches!(gpus(true, Ok(found)), Status::Ok(m) if m.contains("gres.conf")));
        assert!(matches!(
            gpus(true, Err(crate::Error::NoCommand)),
            Status::Fail { problem, .. } if problem.starts_with("GPU jobs would fail")
        ));
    }
}
