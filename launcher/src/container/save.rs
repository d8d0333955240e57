//! `--container-save`: a container's file system, the image with what the container wrote
//! on top, as a SIF file (`berth save`, run as the user once the container has stopped).
//!
//! The root is put together as for running it (`assemble::mount_root`: the image through
//! squashfuse, the container's changes as the overlay's upper layer) but as root's, in a user
//! namespace mapping root to the user, and never entered: mksquashfs reads it from the host
//! side and `sif::writer` wraps the result with the image's config. Every file belongs to
//! root in the saved image (the image's and what the container wrote alike), as every file
//! of the container was the container's user's.
//!
//! Running the saved file later is a local image like any other: the site policy decides
//! (`[policy] local_images`, refused by default).

use std::path::Path;

use berth_sys::process;
use berth_sys::LinuxSyscall;
use oci_spec::runtime::Spec;

use super::assemble::{self, AssemblyInputs};
use super::{sys_err, Bundle};
use crate::config::RuntimeConfig;
use crate::image_config::ImageConfig;
use crate::Result;

/// Writes the root of the container `spec` describes (its changes directory annotated, see
/// `writable`) to `dest` as a SIF with `config`. Call from a process of its own: it enters
/// new namespaces for good.
pub fn save(spec: &Spec, runtime: &RuntimeConfig, config: &ImageConfig, dest: &Path) -> Result<()> {
    let facts = AssemblyInputs {
        uid_inside: 0,
        gid_inside: 0,
        ..AssemblyInputs::of(spec)?
    };
    let squashfuse = assemble::find_squashfuse()?;
    let bundle = Bundle::create(runtime)?;
    let (root, helper) = assemble::mount_root(&LinuxSyscall, &facts, &bundle.path, &squashfuse)?;
    let written = crate::sif::create_from_dir(dest, &root, config);
    process::kill_and_reap(helper).map_err(sys_err("stopping squashfuse"))?;
    bundle.remove()?;
    written
}
