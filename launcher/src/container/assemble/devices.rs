//! The container's /dev: the host nodes of `linux.devices` bound in (rootless, as youki's
//! `create_devices(…, bind = true)`: a user namespace cannot mknod, and the device cgroup
//! Slurm set still decides what may be opened), then the links every /dev has.

use std::path::Path;

use berth_sys::{Mount, MountpointKind, MsFlags, Syscall};
use oci_spec::runtime::Spec;

use crate::{Error, Result};

/// Binds each device of the spec at its path inside, from the same path on the host.
pub fn bind_devices(sys: &impl Syscall, root: &Path, spec: &Spec) -> Result<()> {
    let devices = spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default();
    for d in &devices {
        let path = d.path();
        sys.mount_in_root(
            root,
            &Mount {
                source: Some(path.clone()),
                target: path.clone(),
                fstype: None,
                flags: MsFlags::MS_BIND,
                data: None,
                readonly: false,
                kind: MountpointKind::File,
            },
        )
        .map_err(|source| Error::Sys {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// /dev entries that are links rather than mounts.
pub fn links(sys: &impl Syscall, root: &Path) -> Result<()> {
    for (target, link) in [
        ("pts/ptmx", "/dev/ptmx"),
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        sys.symlink_in_root(root, Path::new(target), Path::new(link))
            .map_err(|source| Error::Sys {
                path: link.into(),
                source,
            })?;
    }
    Ok(())
}
