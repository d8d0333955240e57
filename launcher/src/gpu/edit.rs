//! The pure spec edit: [`ContainerEdits`] into an OCI spec. No I/O, so `--print-spec` and the
//! unit tests see exactly what assembly will realise.
//!
//! - device nodes go to `linux.devices` (assembly binds the host node at the same path);
//!   a CDI node whose host path differs becomes a bind mount instead, as OCI devices carry
//!   no host path;
//! - binds become read-only (or read-write for sockets) bind mounts;
//! - variables are set in `process.env`, replacing the image's;
//! - loader-cache entries go to the `org.berth.ld.so.cache` annotation, and the bundle's
//!   generated cache is bound over `/etc/ld.so.cache` (assembly writes it: the image's own
//!   entries plus these);
//! - the bound driver's version goes to `org.berth.gpu.driver` (assembly prefers an image's
//!   newer CUDA forward-compatibility libraries), where it all came from to `org.berth.gpu`.

use std::path::Path;

use oci_spec::runtime::{LinuxDevice, Mount, Spec};
use serde_json::json;

use super::ContainerEdits;
use crate::container::spec;
use crate::{Error, Result};

pub const ANN_GPU: &str = "org.berth.gpu";
pub const ANN_LDCACHE: &str = "org.berth.ld.so.cache";
pub const ANN_DRIVER: &str = "org.berth.gpu.driver";
/// The generated loader cache, relative to the bundle.
pub const LDCACHE: &str = "ld.so.cache";
pub const LDCACHE_PATH: &str = "/etc/ld.so.cache";

pub fn apply(s: &mut Spec, edits: &ContainerEdits) -> Result<()> {
    let mut mounts = s.mounts().clone().unwrap_or_default();
    let mut devices = Vec::new();
    for d in &edits.devices {
        if d.host == d.path {
            let dev: LinuxDevice = serde_json::from_value(json!({
                "path": d.path, "type": d.kind.to_string(), "major": d.major, "minor": d.minor,
            }))
            .map_err(Error::Spec)?;
            devices.push(dev);
        } else {
            mounts.push(to_mount(&d.host, &d.path, false)?);
        }
    }
    for b in &edits.binds {
        mounts.push(to_mount(&b.host, &b.container, b.readonly)?);
    }
    let mut annotations = s.annotations().clone().unwrap_or_default();
    if !edits.ld_cache.is_empty() {
        let entries: Vec<(String, String)> = edits
            .ld_cache
            .iter()
            .map(|(k, p)| (k.clone(), p.display().to_string()))
            .collect();
        annotations.insert(
            ANN_LDCACHE.into(),
            serde_json::to_string(&entries).map_err(Error::Spec)?,
        );
        mounts.push(to_mount(Path::new(LDCACHE), Path::new(LDCACHE_PATH), true)?);
    }
    if let Some(v) = &edits.driver_version {
        annotations.insert(ANN_DRIVER.into(), v.clone());
    }
    if !edits.source.is_empty() {
        annotations.insert(ANN_GPU.into(), edits.source.join("; "));
    }
    if let Some(linux) = s.linux_mut() {
        let mut all = linux.devices().clone().unwrap_or_default();
        all.extend(devices);
        linux.set_devices(Some(all));
    }
    if let Some(p) = s.process_mut() {
        let env = spec::with_vars(p.env().as_deref().unwrap_or_default(), &edits.env);
        p.set_env(Some(env));
    }
    s.set_mounts(Some(mounts));
    s.set_annotations(Some(annotations));
    Ok(())
}

fn to_mount(host: &Path, container: &Path, readonly: bool) -> Result<Mount> {
    serde_json::from_value(spec::bind(host, container, readonly)).map_err(Error::Spec)
}

/// The bound driver's version, if the spec binds one.
pub fn driver_version(s: &Spec) -> Option<String> {
    s.annotations().as_ref()?.get(ANN_DRIVER).cloned()
}

/// The loader-cache entries the spec asks for (see [`apply`]).
pub fn ld_cache_entries(s: &Spec) -> Result<Vec<(String, String)>> {
    match s.annotations().as_ref().and_then(|a| a.get(ANN_LDCACHE)) {
        Some(text) => serde_json::from_str(text).map_err(Error::Spec),
        None => Ok(Vec::new()),
    }
}
