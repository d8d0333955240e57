//! OCI mounts into [`Mount`]s, and the masked and read-only kernel paths.

use std::path::{Path, PathBuf};

use berth_sys::{Mount, MountpointKind, MsFlags, Syscall};

use crate::{Error, Result};

/// What an OCI mount option means (crun's `mount_flags` table): a flag to set, a
/// propagation type, `ro`, or nothing. Options not listed are the file system's own data
/// (`mode=755`, `size=64k`).
enum Opt {
    Flags(MsFlags),
    Propagation(MsFlags),
    ReadOnly,
    /// What to create at a missing destination (pyxis's `x-create`).
    Create(MountpointKind),
    Ignored,
}

const OPTIONS: [(&str, Opt); 17] = [
    ("rbind", Opt::Flags(MsFlags::MS_BIND.union(MsFlags::MS_REC))),
    ("bind", Opt::Flags(MsFlags::MS_BIND)),
    ("ro", Opt::ReadOnly),
    ("rw", Opt::Ignored),
    ("nosuid", Opt::Flags(MsFlags::MS_NOSUID)),
    ("nodev", Opt::Flags(MsFlags::MS_NODEV)),
    ("noexec", Opt::Flags(MsFlags::MS_NOEXEC)),
    ("private", Opt::Propagation(MsFlags::MS_PRIVATE)),
    (
        "rprivate",
        Opt::Propagation(MsFlags::MS_PRIVATE.union(MsFlags::MS_REC)),
    ),
    ("slave", Opt::Propagation(MsFlags::MS_SLAVE)),
    (
        "rslave",
        Opt::Propagation(MsFlags::MS_SLAVE.union(MsFlags::MS_REC)),
    ),
    ("shared", Opt::Propagation(MsFlags::MS_SHARED)),
    (
        "rshared",
        Opt::Propagation(MsFlags::MS_SHARED.union(MsFlags::MS_REC)),
    ),
    ("unbindable", Opt::Propagation(MsFlags::MS_UNBINDABLE)),
    (
        "runbindable",
        Opt::Propagation(MsFlags::MS_UNBINDABLE.union(MsFlags::MS_REC)),
    ),
    ("x-create=file", Opt::Create(MountpointKind::File)),
    ("x-create=dir", Opt::Create(MountpointKind::Dir)),
];

/// The flags a bind only gets from a remount (mount(2) ignores them with MS_BIND).
const REMOUNT_FLAGS: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Translates one OCI mount into the mount(2) calls that make it, in order: the mount; for
/// a bind with nosuid/nodev/noexec, a remount that adds them (keeping the flags the source's
/// mount has, which a user namespace may not clear); for a propagation type, the change
/// of type. Relative sources are in the bundle; binds of files get a file mountpoint unless
/// `x-create` says otherwise; flag-like options become mount flags, the rest the file
/// system's data.
pub fn to_sys_mounts(m: &oci_spec::runtime::Mount, bundle: &Path) -> Result<Vec<Mount>> {
    let source = m.source().clone().unwrap_or_default();
    let source = if source.is_relative() {
        bundle.join(source)
    } else {
        source
    };
    let typ = m.typ().clone().unwrap_or_else(|| "bind".into());
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut create = None;
    let mut data = Vec::new();
    let mut readonly = false;
    for o in m.options().iter().flatten() {
        match OPTIONS
            .iter()
            .find(|(name, _)| name == o)
            .map(|(_, opt)| opt)
        {
            Some(Opt::Flags(f)) => flags |= *f,
            Some(Opt::Propagation(f)) => propagation |= *f,
            Some(Opt::ReadOnly) => readonly = true,
            Some(Opt::Create(kind)) => create = Some(*kind),
            Some(Opt::Ignored) => {}
            None => data.push(o.as_str()),
        }
    }
    let is_bind = typ == "bind";
    if is_bind {
        flags |= MsFlags::MS_BIND;
    }
    let found = match std::fs::metadata(&source) {
        Ok(meta) if is_bind && !meta.is_dir() => MountpointKind::File,
        Ok(_) => MountpointKind::Dir,
        Err(e) if is_bind => {
            return Err(Error::BindSource {
                path: source,
                source: e,
            });
        }
        Err(_) => MountpointKind::Dir,
    };
    let kind = create.unwrap_or(found);
    let change = |flags: MsFlags| Mount {
        source: None,
        target: m.destination().clone(),
        fstype: None,
        flags,
        data: None,
        readonly: false,
        kind,
    };
    let mut calls = Vec::new();
    let remount = (is_bind && flags.intersects(REMOUNT_FLAGS)).then(|| {
        let kept = berth_sys::statfs::mount_flags(&source).map_err(|e| Error::BindSource {
            path: source.clone(),
            source: e,
        })?;
        let ro = if readonly {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        Ok::<_, Error>(change(
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | (flags & REMOUNT_FLAGS) | kept | ro,
        ))
    });
    calls.push(Mount {
        source: Some(source),
        target: m.destination().clone(),
        fstype: (!is_bind).then_some(typ),
        flags: if is_bind {
            flags - REMOUNT_FLAGS
        } else {
            flags
        },
        data: (!data.is_empty()).then(|| data.join(",")),
        readonly,
        kind,
    });
    if let Some(remount) = remount {
        calls.push(remount?);
    }
    if !propagation.is_empty() {
        calls.push(change(propagation));
    }
    Ok(calls)
}

/// `linux.maskedPaths` and `linux.readonlyPaths`, as runc realises them: a masked file gets
/// /dev/null bound over it, a masked directory an empty read-only tmpfs; a read-only path is
/// bound onto itself read-only. /proc and /sys inside are binds of the host's, so the host
/// path says what each is; paths this kernel lacks are skipped, and a pattern (see
/// [`host_paths`]) covers every copy the host has.
pub fn mask_and_protect(
    sys: &impl Syscall,
    root: &Path,
    masked: &[String],
    readonly: &[String],
) -> Result<()> {
    mask_and_protect_from(sys, root, Path::new("/"), masked, readonly)
}

/// [`mask_and_protect`] with the host's file system at `host` (`/` but in tests).
fn mask_and_protect_from(
    sys: &impl Syscall,
    root: &Path,
    host: &Path,
    masked: &[String],
    readonly: &[String],
) -> Result<()> {
    let apply = |m: Mount| {
        let path = m.target.clone();
        sys.mount_in_root(root, &m)
            .map_err(|source| Error::Sys { path, source })
    };
    for (path, is_dir) in masked.iter().flat_map(|p| host_paths(host, p)) {
        apply(if is_dir {
            Mount {
                source: Some("tmpfs".into()),
                target: path,
                fstype: Some("tmpfs".into()),
                flags: MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC,
                data: Some("mode=555".into()),
                readonly: false,
                kind: MountpointKind::Dir,
            }
        } else {
            Mount {
                source: Some("/dev/null".into()),
                target: path,
                fstype: None,
                flags: MsFlags::MS_BIND,
                data: None,
                readonly: true,
                kind: MountpointKind::File,
            }
        })?;
    }
    for (path, is_dir) in readonly.iter().flat_map(|p| host_paths(host, p)) {
        apply(Mount {
            source: Some(host.join(path.strip_prefix("/").unwrap_or(&path))),
            target: path,
            fstype: None,
            flags: MsFlags::MS_BIND | MsFlags::MS_REC,
            data: None,
            readonly: true,
            kind: if is_dir {
                MountpointKind::Dir
            } else {
                MountpointKind::File
            },
        })?;
    }
    Ok(())
}

/// The paths under `host` that the absolute `pattern` names, with whether each is a
/// directory, in byte order: the path itself if it exists, or, where a component holds a
/// `*` (any run of characters, at most one per component), every existing match. Docker 28
/// and Podman mask a copy of some kernel interfaces per CPU
/// (`/sys/devices/system/cpu/cpu*/thermal_throttle`), as many as the node has.
fn host_paths(host: &Path, pattern: &str) -> Vec<(PathBuf, bool)> {
    let mut found = vec![PathBuf::from("/")];
    for component in pattern.split('/').filter(|c| !c.is_empty()) {
        let Some((prefix, suffix)) = component.split_once('*') else {
            found.iter_mut().for_each(|p| p.push(component));
            continue;
        };
        found = found
            .iter()
            .flat_map(|dir| {
                let entries = std::fs::read_dir(host.join(dir.strip_prefix("/").unwrap_or(dir)));
                let mut names: Vec<String> = entries
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| {
                        n.len() >= prefix.len() + suffix.len()
                            && n.starts_with(prefix)
                            && n.ends_with(suffix)
                    })
                    .collect();
                names.sort();
                names.into_iter().map(move |n| dir.join(n))
            })
            .collect();
    }
    found
        .into_iter()
        .filter_map(|p| {
            let meta = std::fs::metadata(host.join(p.strip_prefix("/").unwrap_or(&p))).ok()?;
            Some((p, meta.is_dir()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oci(
        destination: &str,
        typ: &str,
        source: &Path,
        options: &[&str],
    ) -> oci_spec::runtime::Mount {
        serde_json::from_value(serde_json::json!({
            "destination": destination, "type": typ, "source": source, "options": options,
        }))
        .unwrap()
    }

    #[test]
    fn propagation_is_its_own_call_after_the_bind() {
        let dir = tempfile::tempdir().unwrap();
        let m = oci("/mnt", "bind", dir.path(), &["rbind", "ro", "unbindable"]);
        let calls = to_sys_mounts(&m, Path::new("/bundle")).unwrap();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0].flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(calls[0].readonly);
        assert_eq!(calls[1].source, None);
        assert_eq!(calls[1].target, Path::new("/mnt"));
        assert_eq!(calls[1].flags, MsFlags::MS_UNBINDABLE);
    }

    #[test]
    fn bind_flags_come_from_a_remount_that_keeps_the_source_mount_flags() {
        let dir = tempfile::tempdir().unwrap();
        let m = oci(
            "/mnt",
            "bind",
            dir.path(),
            &["bind", "ro", "noexec", "x-create=dir"],
        );
        let calls = to_sys_mounts(&m, Path::new("/bundle")).unwrap();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(
            calls[0].flags,
            MsFlags::MS_BIND,
            "mount(2) would ignore noexec here"
        );
        let kept = berth_sys::statfs::mount_flags(dir.path()).unwrap();
        assert_eq!(
            calls[1].flags,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY | kept
        );
        assert_eq!(calls[1].kind, MountpointKind::Dir);
    }

    #[test]
    fn tmpfs_options_are_its_data_and_x_create_sets_the_mountpoint() {
        let m = oci(
            "/t",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "nodev", "huge=within_size", "ro"],
        );
        let calls = to_sys_mounts(&m, Path::new("/bundle")).unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].fstype.as_deref(), Some("tmpfs"));
        assert_eq!(calls[0].flags, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(calls[0].data.as_deref(), Some("huge=within_size"));
        assert!(calls[0].readonly);
        let file = tempfile::NamedTempFile::new().unwrap();
        let m = oci("/f", "bind", file.path(), &["rbind"]);
        assert_eq!(
            to_sys_mounts(&m, Path::new("/b")).unwrap()[0].kind,
            MountpointKind::File
        );
    }

    /// Docker 28's and Podman's per-CPU masks: a pattern covers each CPU's copy the node
    /// has (and nothing that only matches the glob), each masked as a directory; paths
    /// the node lacks are skipped; read-only patterns bind the host's copy.
    #[test]
    fn a_pattern_masks_every_copy_the_host_has() {
        use berth_sys::recording::{Call, RecordingSyscall};
        let host = tempfile::tempdir().unwrap();
        let cpus = host.path().join("sys/devices/system/cpu");
        for dir in [
            "cpu0/thermal_throttle",
            "cpu1/thermal_throttle",
            "cpu10/thermal_throttle",
            "cpu2",
            "cpufreq",
        ] {
            std::fs::create_dir_all(cpus.join(dir)).unwrap();
        }
        std::fs::write(cpus.join("online"), "0-2,10").unwrap();
        std::fs::create_dir_all(host.path().join("proc")).unwrap();
        std::fs::write(host.path().join("proc/kcore"), "").unwrap();
        let sys = RecordingSyscall::default();
        let masked = [
            "/sys/devices/system/cpu/cpu*/thermal_throttle",
            "/proc/kcore",
            "/proc/acpi",
        ]
        .map(String::from);
        let readonly = ["/sys/devices/system/cpu/cpu*".to_string()];
        mask_and_protect_from(&sys, Path::new("/root"), host.path(), &masked, &readonly).unwrap();
        let mounts: Vec<Mount> = sys
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::MountInRoot { mount, .. } => Some(mount),
                _ => None,
            })
            .collect();
        let targets: Vec<&Path> = mounts.iter().map(|m| m.target.as_path()).collect();
        assert_eq!(
            targets,
            [
                "/sys/devices/system/cpu/cpu0/thermal_throttle",
                "/sys/devices/system/cpu/cpu1/thermal_throttle",
                "/sys/devices/system/cpu/cpu10/thermal_throttle",
                "/proc/kcore",
                "/sys/devices/system/cpu/cpu0",
                "/sys/devices/system/cpu/cpu1",
                "/sys/devices/system/cpu/cpu10",
                "/sys/devices/system/cpu/cpu2",
                "/sys/devices/system/cpu/cpufreq",
            ]
            .map(Path::new)
        );
        for m in &mounts[..3] {
            assert_eq!(m.fstype.as_deref(), Some("tmpfs"), "{m:?}");
            assert!(m.flags.contains(MsFlags::MS_RDONLY), "{m:?}");
        }
        assert_eq!(mounts[3].source.as_deref(), Some(Path::new("/dev/null")));
        assert_eq!(
            mounts[4].source.as_deref(),
            Some(cpus.join("cpu0").as_path()),
            "a read-only path binds the host's copy"
        );
    }
}
