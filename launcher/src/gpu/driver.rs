//! The NVIDIA driver's user-space side: which libraries, programs and sockets a container
//! gets, chosen as libnvidia-container chooses them (by `NVIDIA_DRIVER_CAPABILITIES`), found
//! where the host's loader finds them (its ld.so cache) and only in the running driver's
//! version, so a container never mixes libraries of two drivers.

use std::path::{Path, PathBuf};

use super::ldcache::{self, Entry};
use crate::{Error, Result};

/// `NVIDIA_DRIVER_CAPABILITIES` when neither the image nor the user sets it.
pub const DEFAULT_CAPABILITIES: &str = "compute,utility";

/// The driver's version file, present whenever the kernel module is loaded.
pub const VERSION_FILE: &str = "/proc/driver/nvidia/version";

/// One capability: its libraries (names without version, as ld.so caches list them),
/// programs and whether its first library is required.
struct Capability {
    name: &'static str,
    libraries: &'static [&'static str],
    programs: &'static [&'static str],
}

/// libnvidia-container's lists (nvc_info.c), 64-bit only.
const CAPABILITIES: [Capability; 7] = [
    Capability {
        name: "utility",
        libraries: &["libnvidia-ml.so", "libnvidia-cfg.so"],
        programs: &["nvidia-smi", "nvidia-debugdump", "nvidia-persistenced"],
    },
    Capability {
        name: "compute",
        libraries: &[
            "libcuda.so",
            "libcudadebugger.so",
            "libnvidia-opencl.so",
            "libnvidia-gpucomp.so",
            "libnvidia-ptxjitcompiler.so",
            "libnvidia-fatbinaryloader.so",
            "libnvidia-allocator.so",
            "libnvidia-compiler.so",
            "libnvidia-pkcs11.so",
            "libnvidia-pkcs11-openssl3.so",
            "libnvidia-nvvm.so",
        ],
        programs: &["nvidia-cuda-mps-control", "nvidia-cuda-mps-server"],
    },
    Capability {
        name: "video",
        libraries: &[
            "libvdpau_nvidia.so",
            "libnvidia-encode.so",
            "libnvidia-opticalflow.so",
            "libnvcuvid.so",
        ],
        programs: &[],
    },
    Capability {
        name: "graphics",
        libraries: &[
            "libnvidia-eglcore.so",
            "libnvidia-glcore.so",
            "libnvidia-tls.so",
            "libnvidia-glsi.so",
            "libnvidia-fbc.so",
            "libnvidia-ifr.so",
            "libnvidia-rtcore.so",
            "libnvoptix.so",
            "libGLX_nvidia.so",
            "libEGL_nvidia.so",
            "libGLESv2_nvidia.so",
            "libGLESv1_CM_nvidia.so",
            "libnvidia-glvkspirv.so",
            "libnvidia-cbl.so",
        ],
        programs: &[],
    },
    Capability {
        name: "ngx",
        libraries: &["libnvidia-ngx.so"],
        programs: &[],
    },
    // Display needs only the modeset device; 32-bit compat libraries are not bound.
    Capability {
        name: "display",
        libraries: &[],
        programs: &[],
    },
    Capability {
        name: "compat32",
        libraries: &[],
        programs: &[],
    },
];

/// Libraries without which a capability cannot work at all.
const REQUIRED: [(&str, &str); 2] = [("compute", "libcuda.so"), ("utility", "libnvidia-ml.so")];

/// Where programs are looked for on the host (libnvidia-container's list).
const PROGRAM_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The capability names a value of `NVIDIA_DRIVER_CAPABILITIES` selects (`all` is all).
pub fn capabilities(value: &str) -> Result<Vec<&'static str>> {
    let mut out = Vec::new();
    for word in value.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        if word == "all" {
            return Ok(CAPABILITIES.iter().map(|c| c.name).collect());
        }
        let c = CAPABILITIES
            .iter()
            .find(|c| c.name == word)
            .ok_or_else(|| Error::GpuCapability {
                value: value.to_string(),
                word: word.to_string(),
                allowed: allowed_capabilities(),
            })?;
        if !out.contains(&c.name) {
            out.push(c.name);
        }
    }
    Ok(out)
}

fn allowed_capabilities() -> String {
    let mut names: Vec<&str> = CAPABILITIES.iter().map(|c| c.name).collect();
    names.push("all");
    names.join(", ")
}

/// A driver library to bind: the host file and the name programs load it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Library {
    pub soname: String,
    pub host: PathBuf,
}

/// The driver's files for `caps`: libraries from the host's ld.so cache `entries` whose file
/// (after symlinks, through `resolve`) carries `version`, plus `extra` library names. A
/// required library that is missing is an error naming it.
pub fn libraries(
    entries: &[Entry],
    caps: &[&str],
    extra: &[String],
    version: &str,
    resolve: &dyn Fn(&Path) -> Option<PathBuf>,
) -> Result<Vec<Library>> {
    let wanted = CAPABILITIES
        .iter()
        .filter(|c| caps.contains(&c.name))
        .flat_map(|c| c.libraries.iter().map(|l| l.to_string()))
        .chain(extra.iter().cloned());
    let suffix = format!(".so.{version}");
    let mut out: Vec<Library> = Vec::new();
    let mut missing = Vec::new();
    for name in wanted {
        let prefix = format!("{name}.");
        let found: Vec<Library> = entries
            .iter()
            .filter(|e| e.flags == ldcache::NATIVE_FLAGS && e.key.starts_with(&prefix))
            .filter_map(|e| {
                let host = resolve(Path::new(&e.value))?;
                host.to_str()?.ends_with(&suffix).then(|| Library {
                    soname: e.key.clone(),
                    host,
                })
            })
            .collect();
        if found.is_empty() {
            missing.push(name);
        }
        for lib in found {
            if !out.iter().any(|l| l.soname == lib.soname) {
                out.push(lib);
            }
        }
    }
    let required = REQUIRED
        .iter()
        .filter(|(cap, lib)| caps.contains(cap) && missing.iter().any(|m| m == lib));
    let extra_missing = extra.iter().filter(|e| missing.contains(e));
    if let Some(lib) = required
        .map(|(_, lib)| lib.to_string())
        .chain(extra_missing.cloned())
        .next()
    {
        return Err(Error::DriverLibrary {
            library: lib,
            version: version.to_string(),
        });
    }
    Ok(out)
}

/// The driver's programs for `caps` that exist on the host.
pub fn programs(caps: &[&str], exists: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    CAPABILITIES
        .iter()
        .filter(|c| caps.contains(&c.name))
        .flat_map(|c| c.programs.iter())
        .filter_map(|p| {
            PROGRAM_DIRS
                .iter()
                .map(|d| Path::new(d).join(p))
                .find(|path| exists(path))
        })
        .collect()
}

/// The version in `/proc/driver/nvidia/version`'s first line ("NVRM version: NVIDIA UNIX
/// x86_64 Kernel Module  550.54.15  Tue Mar 5 ...").
pub fn version_from_proc(text: &str) -> Option<String> {
    text.lines()
        .next()?
        .split_whitespace()
        .find(|w| is_version(w))
        .map(str::to_string)
}

/// The version a library file carries after `.so.` (`libnvidia-ml.so.550.54.15`).
pub fn version_from_library(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let (_, version) = name.split_once(".so.")?;
    is_version(version).then(|| version.to_string())
}

/// `N.N[.N]`: a driver version, not a soname's single number.
pub fn is_version(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() >= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with driver 550.54.15 and a stale 535 libcuda left behind in another dir.
    fn host_cache() -> Vec<Entry> {
        vec![
            Entry::native(
                "libnvidia-ml.so.1",
                "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
            ),
            Entry::native(
                "libnvidia-ml.so",
                "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so",
            ),
            Entry::native("libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
            Entry::native("libcuda.so.1", "/opt/old/libcuda.so.1"),
            Entry::native(
                "libnvidia-ptxjitcompiler.so.1",
                "/usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1",
            ),
            Entry::native(
                "libnvidia-encode.so.1",
                "/usr/lib/x86_64-linux-gnu/libnvidia-encode.so.1",
            ),
            Entry::native("libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            Entry {
                flags: 0x0003,
                ..Entry::native("libcuda.so.1", "/usr/lib/i386-linux-gnu/libcuda.so.1")
            },
        ]
    }

    /// Every library resolves to its file of 550.54.15, except the stale one in /opt/old.
    fn resolve(p: &Path) -> Option<PathBuf> {
        let s = p.to_str()?;
        let version = if s.starts_with("/opt/old/") {
            "535.104.05"
        } else {
            "550.54.15"
        };
        Some(format!("{}.{version}", &s[..s.find(".so")? + 3]).into())
    }

    fn sonames(libs: &[Library]) -> Vec<&str> {
        libs.iter().map(|l| l.soname.as_str()).collect()
    }

    #[test]
    fn capabilities_select_libraries_of_the_running_version_only() {
        let caps = capabilities(DEFAULT_CAPABILITIES).unwrap();
        let libs = libraries(&host_cache(), &caps, &[], "550.54.15", &resolve).unwrap();
        assert_eq!(
            sonames(&libs),
            [
                "libnvidia-ml.so.1",
                "libcuda.so.1",
                "libnvidia-ptxjitcompiler.so.1"
            ]
        );
        let cuda = libs.iter().find(|l| l.soname == "libcuda.so.1").unwrap();
        assert_eq!(
            cuda.host,
            Path::new("/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15")
        );

        let video = capabilities("video,utility").unwrap();
        let libs = libraries(&host_cache(), &video, &[], "550.54.15", &resolve).unwrap();
        assert!(sonames(&libs).contains(&"libnvidia-encode.so.1"));
        assert!(!sonames(&libs).contains(&"libcuda.so.1"));
    }

    #[test]
    fn missing_required_or_extra_libraries_are_errors() {
        let caps = capabilities("compute").unwrap();
        let e = libraries(&host_cache(), &caps, &[], "560.1", &resolve).unwrap_err();
        assert!(
            e.to_string().contains("libcuda.so") && e.to_string().contains("560.1"),
            "{e}"
        );
        let e = libraries(
            &host_cache(),
            &caps,
            &["libnvidia-fbc.so".into()],
            "550.54.15",
            &resolve,
        )
        .unwrap_err();
        assert!(e.to_string().contains("libnvidia-fbc.so"), "{e}");
    }

    #[test]
    fn capability_values() {
        assert_eq!(capabilities("all").unwrap().len(), CAPABILITIES.len());
        assert_eq!(
            capabilities("utility, compute,utility").unwrap(),
            ["utility", "compute"]
        );
        assert!(capabilities("").unwrap().is_empty());
        let e = capabilities("compute,gpu").unwrap_err().to_string();
        assert!(e.contains("\"gpu\"") && e.contains("compute, video"), "{e}");
    }

    #[test]
    fn versions() {
        let proc = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  (dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:15:33 UTC 2024\nGCC version:  gcc version 12.2.0\n";
        assert_eq!(version_from_proc(proc).as_deref(), Some("550.54.15"));
        assert_eq!(
            version_from_library(Path::new("/lib/libnvidia-ml.so.550.54.15")).as_deref(),
            Some("550.54.15")
        );
        assert_eq!(
            version_from_library(Path::new("/lib/libnvidia-ml.so.1")),
            None
        );
        assert!(!is_version("1") && is_version("535.104.05") && !is_version("5a.1"));
    }

    #[test]
    fn programs_found_in_the_system_dirs() {
        let exists = |p: &Path| p == Path::new("/usr/bin/nvidia-smi");
        assert_eq!(
            programs(&["utility", "compute"], &exists),
            [PathBuf::from("/usr/bin/nvidia-smi")]
        );
        assert!(programs(&["compute"], &exists).is_empty());
    }
}
