//! OCI mounts into [`Mount`]s, and the masked and read-only kernel paths.

use std::path::Path;

use berth_sys::{Mount, MountpointKind, MsFlags, Syscall};

use crate::{Error, Result};

/// What an OCI mount option means (crun's `mount_flags` table): a flag to set, `ro`, or
/// nothing. Options not listed are the file system's own data (`mode=755`, `size=64k`).
enum Opt {
    Flags(MsFlags),
    ReadOnly,
    Ignored,
}

const OPTIONS: [(&str, Opt); 7] = [
    ("rbind", Opt::Flags(MsFlags::MS_BIND.union(MsFlags::MS_REC))),
    ("bind", Opt::Flags(MsFlags::MS_BIND)),
    ("ro", Opt::ReadOnly),
    ("rw", Opt::Ignored),
    ("nosuid", Opt::Flags(MsFlags::MS_NOSUID)),
    ("nodev", Opt::Flags(MsFlags::MS_NODEV)),
    ("noexec", Opt::Flags(MsFlags::MS_NOEXEC)),
];

/// Translates one OCI mount. Relative sources are in the bundle; binds of files get a file
/// mountpoint; flag-like options become mount flags, the rest the file system's data.
pub fn to_sys_mount(m: &oci_spec::runtime::Mount, bundle: &Path) -> Result<Mount> {
    let source = m.source().clone().unwrap_or_default();
    let source = if source.is_relative() {
        bundle.join(source)
    } else {
        source
    };
    let typ = m.typ().clone().unwrap_or_else(|| "bind".into());
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    let mut readonly = false;
    for o in m.options().iter().flatten() {
        match OPTIONS
            .iter()
            .find(|(name, _)| name == o)
            .map(|(_, opt)| opt)
        {
            Some(Opt::Flags(f)) => flags |= *f,
            Some(Opt::ReadOnly) => readonly = true,
            Some(Opt::Ignored) => {}
            None => data.push(o.as_str()),
        }
    }
    let is_bind = typ == "bind";
    if is_bind {
        flags |= MsFlags::MS_BIND;
    }
    let kind = match std::fs::metadata(&source) {
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
    Ok(Mount {
        source: Some(source),
        target: m.destination().clone(),
        fstype: (!is_bind).then_some(typ),
        flags,
        data: (!data.is_empty()).then(|| data.join(",")),
        readonly,
        kind,
    })
}

/// `linux.maskedPaths` and `linux.readonlyPaths`, as runc realises them: a masked file gets
/// /dev/null bound over it, a masked directory an empty read-only tmpfs; a read-only path is
/// bound onto itself read-only. /proc and /sys inside are binds of the host's, so the host
/// path says what each is; paths this kernel lacks are skipped.
pub fn mask_and_protect(
    sys: &impl Syscall,
    root: &Path,
    masked: &[String],
    readonly: &[String],
) -> Result<()> {
    let apply = |m: Mount| {
        let path = m.target.clone();
        sys.mount_in_root(root, &m)
            .map_err(|source| Error::Sys { path, source })
    };
    for path in masked {
        let Ok(meta) = std::fs::metadata(path) else {
            continue;
        };
        apply(if meta.is_dir() {
            Mount {
                source: Some("tmpfs".into()),
                target: path.into(),
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
                target: path.into(),
                fstype: None,
                flags: MsFlags::MS_BIND,
                data: None,
                readonly: true,
                kind: MountpointKind::File,
            }
        })?;
    }
    for path in readonly {
        let Ok(meta) = std::fs::metadata(path) else {
            continue;
        };
        apply(Mount {
            source: Some(path.into()),
            target: path.into(),
            fstype: None,
            flags: MsFlags::MS_BIND | MsFlags::MS_REC,
            data: None,
            readonly: true,
            kind: if meta.is_dir() {
                MountpointKind::Dir
            } else {
                MountpointKind::File
            },
        })?;
    }
    Ok(())
}
