//! Discovery: the request and the node into [`ContainerEdits`] (see the module overview in
//! `gpu/mod.rs`).

use std::path::{Path, PathBuf};

use super::{cdi, driver, gres, ldcache, BindEdit, ContainerEdits, DeviceNode, Node, Selection};
use crate::config::GpuConfig;
use crate::{Error, Result};

/// Where the driver's libraries and programs appear inside: the directories NVIDIA's CUDA
/// images already name in LD_LIBRARY_PATH, and /usr/bin, where libnvidia-container puts
/// the tools (so every image's PATH finds nvidia-smi).
const LIB_DIR: &str = "/usr/local/nvidia/lib64";
const BIN_DIR: &str = "/usr/bin";
/// Sockets of the driver's daemons, bound when present.
const PERSISTENCED_SOCKET: &str = "/run/nvidia-persistenced/socket";
const MPS_PIPE_DIR: &str = "/tmp/nvidia-mps";
/// NVIDIA nodes every NVIDIA GPU container needs, when the node has them.
const NVIDIA_CONTROL: [&str; 4] = [
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
];
const HOST_LDCACHE: &str = "/etc/ld.so.cache";

/// The edits for a container: the selected GPUs (none without a selection or with `[gpu]
/// enabled = false`) and the fabric devices. `env` is the container's environment so far
/// (`NVIDIA_DRIVER_CAPABILITIES` chooses the driver's libraries).
pub fn discover(
    config: &GpuConfig,
    selection: Option<&Selection>,
    env: &[String],
    node: &dyn Node,
) -> Result<ContainerEdits> {
    let mut edits = ContainerEdits::default();
    if let (true, Some(selection)) = (config.enabled, selection) {
        let units = select_units(config, selection, node)?;
        if !units.is_empty() {
            gpu_edits(config, &units, env, node, &mut edits)?;
        }
    }
    fabric_edits(config, node, &mut edits);
    Ok(edits)
}

/// One allocated unit: its files and, when NVML named it, its UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unit {
    index: usize,
    files: Vec<PathBuf>,
    uuid: Option<String>,
}

fn select_units(config: &GpuConfig, selection: &Selection, node: &dyn Node) -> Result<Vec<Unit>> {
    let (all, from) = all_units(config, node)?;
    let units = match selection {
        Selection::All => all
            .into_iter()
            .filter(|u| u.files.iter().all(|f| node.may_open(f)))
            .collect(),
        Selection::Indexes(list) => list
            .iter()
            .map(|&i| {
                all.iter()
                    .find(|u| u.index == i)
                    .cloned()
                    .ok_or_else(|| Error::GpuIndex {
                        index: i,
                        count: all.len(),
                        from: from.clone(),
                    })
            })
            .collect::<Result<_>>()?,
    };
    Ok(units)
}

/// Every GPU unit of the node, in Slurm's index order, and where the list came from.
fn all_units(config: &GpuConfig, node: &dyn Node) -> Result<(Vec<Unit>, String)> {
    let path = &config.gres_conf;
    let conf = match node.read(path) {
        Some(bytes) => {
            gres::GresConf::parse(path, &String::from_utf8_lossy(&bytes), &node.node_name())?
        }
        None => gres::GresConf::default(),
    };
    let listed = conf.devices("gpu");
    if !listed.is_empty() {
        let units = listed
            .into_iter()
            .map(|d| Unit {
                index: d.index,
                files: d.files,
                uuid: d.uuid,
            })
            .collect();
        return Ok((units, format!("{} File= lines", path.display())));
    }
    if conf.autodetect == Some(gres::AutoDetect::Nvml) {
        let gpus = node.nvml()?.gpus()?;
        let units = gpus
            .iter()
            .flat_map(|g| {
                g.units()
                    .into_iter()
                    .map(move |files| (files, (g.mig.is_empty()).then(|| g.uuid.clone())))
            })
            .enumerate()
            .map(|(index, (files, uuid))| Unit { index, files, uuid })
            .collect();
        return Ok((units, format!("NVML ({} AutoDetect=nvml)", path.display())));
    }
    // No gres.conf GPUs: every /dev/nvidiaN, by minor (a workstation).
    let mut minors: Vec<u32> = node
        .list(Path::new("/dev"))
        .iter()
        .filter_map(|n| n.strip_prefix("nvidia")?.parse().ok())
        .collect();
    minors.sort_unstable();
    let units = minors
        .iter()
        .enumerate()
        .map(|(index, m)| Unit {
            index,
            files: vec![format!("/dev/nvidia{m}").into()],
            uuid: None,
        })
        .collect();
    Ok((units, "/dev/nvidiaN (no GPU in gres.conf)".into()))
}

fn is_nvidia(unit: &Unit) -> bool {
    unit.files
        .iter()
        .any(|f| f.to_str().is_some_and(|s| s.starts_with("/dev/nvidia")))
}

fn gpu_edits(
    config: &GpuConfig,
    units: &[Unit],
    env: &[String],
    node: &dyn Node,
    edits: &mut ContainerEdits,
) -> Result<()> {
    let indexes: Vec<String> = units.iter().map(|u| u.index.to_string()).collect();
    edits
        .source
        .push(format!("GPUs {} (Slurm indexes)", indexes.join(",")));
    let dirs: Vec<PathBuf> = config.cdi_dirs.iter().map(|d| d.0.clone()).collect();
    let specs = cdi::load(&dirs)?;
    let files: Vec<Vec<PathBuf>> = units.iter().map(|u| u.files.clone()).collect();
    if let Some(chosen) = cdi::select(&specs, &files) {
        return cdi_edits(&specs, &chosen, node, edits);
    }
    edits
        .source
        .push("discovery (no CDI spec covers them)".into());
    for unit in units {
        for f in &unit.files {
            edits.devices.push(device(node, f)?);
        }
    }
    let nvidia: Vec<&Unit> = units.iter().filter(|u| is_nvidia(u)).collect();
    if units
        .iter()
        .any(|u| u.files.iter().any(|f| f.starts_with("/dev/dri")))
    {
        push_if_present(node, Path::new("/dev/kfd"), edits);
    }
    if nvidia.is_empty() {
        return Ok(());
    }
    for c in NVIDIA_CONTROL {
        push_if_present(node, Path::new(c), edits);
    }
    driver_edits(config, env, node, edits)?;
    let visible: Vec<String> = (0..nvidia.len()).map(|i| i.to_string()).collect();
    let names: Vec<String> = nvidia
        .iter()
        .map(|u| {
            u.uuid.clone().unwrap_or_else(|| {
                u.files[0]
                    .to_string_lossy()
                    .trim_start_matches("/dev/nvidia")
                    .to_string()
            })
        })
        .collect();
    edits
        .env
        .push(("CUDA_VISIBLE_DEVICES".into(), visible.join(",")));
    edits
        .env
        .push(("NVIDIA_VISIBLE_DEVICES".into(), names.join(",")));
    Ok(())
}

fn device(node: &dyn Node, path: &Path) -> Result<DeviceNode> {
    let (kind, major, minor) = node.device(path).ok_or_else(|| Error::GpuDevice {
        path: path.to_path_buf(),
    })?;
    Ok(DeviceNode {
        path: path.to_path_buf(),
        host: path.to_path_buf(),
        kind,
        major,
        minor,
    })
}

fn push_if_present(node: &dyn Node, path: &Path, edits: &mut ContainerEdits) {
    if let Ok(d) = device(node, path) {
        if !edits.devices.iter().any(|x| x.path == d.path) {
            edits.devices.push(d);
        }
    }
}

/// The driver's libraries, programs and sockets.
fn driver_edits(
    config: &GpuConfig,
    env: &[String],
    node: &dyn Node,
    edits: &mut ContainerEdits,
) -> Result<()> {
    let entries = node
        .read(Path::new(HOST_LDCACHE))
        .and_then(|b| ldcache::parse(&b))
        .unwrap_or_default();
    let resolve = |p: &Path| node.resolve(p);
    let version = driver_version(config, &entries, node).ok_or(Error::NoDriver)?;
    let caps_value = env
        .iter()
        .find_map(|kv| kv.strip_prefix("NVIDIA_DRIVER_CAPABILITIES="))
        .filter(|v| !v.is_empty())
        .unwrap_or(driver::DEFAULT_CAPABILITIES);
    let caps = driver::capabilities(caps_value)?;
    let extra: Vec<String> = config.extra_libraries.iter().map(|l| l.0.clone()).collect();
    let libs = driver::libraries(&entries, &caps, &extra, &version, &resolve)?;
    edits.driver_version = Some(version.clone());
    edits.source.push(format!(
        "driver {version}: {} libraries for {}",
        libs.len(),
        caps.join(",")
    ));
    for lib in libs {
        let container = Path::new(LIB_DIR).join(&lib.soname);
        edits.ld_cache.push((lib.soname, container.clone()));
        edits.binds.push(BindEdit {
            host: lib.host,
            container,
            readonly: true,
        });
    }
    for program in driver::programs(&caps, &|p| node.exists(p)) {
        let name = program.file_name().expect("programs have names").to_owned();
        edits.binds.push(BindEdit {
            host: program,
            container: Path::new(BIN_DIR).join(name),
            readonly: true,
        });
    }
    let sockets = [
        (PERSISTENCED_SOCKET, true),
        (MPS_PIPE_DIR, caps.contains(&"compute")),
    ];
    for (path, wanted) in sockets {
        if wanted && node.exists(Path::new(path)) {
            edits.binds.push(BindEdit {
                host: path.into(),
                container: path.into(),
                readonly: false,
            });
        }
    }
    Ok(())
}

/// `[gpu] driver_version`, else the loaded module's, else the version of the host's
/// libnvidia-ml.so.1 (or libcuda.so.1) file.
fn driver_version(
    config: &GpuConfig,
    entries: &[ldcache::Entry],
    node: &dyn Node,
) -> Option<String> {
    if let Some(v) = &config.driver_version.0 {
        return Some(v.clone());
    }
    if let Some(v) = node
        .read(Path::new(driver::VERSION_FILE))
        .and_then(|b| driver::version_from_proc(&String::from_utf8_lossy(&b)))
    {
        return Some(v);
    }
    ["libnvidia-ml.so.1", "libcuda.so.1"]
        .iter()
        .find_map(|key| {
            entries
                .iter()
                .filter(|e| e.key == *key && e.flags == ldcache::NATIVE_FLAGS)
                .find_map(|e| driver::version_from_library(&node.resolve(Path::new(&e.value))?))
        })
}

fn cdi_edits(
    specs: &[(PathBuf, cdi::Spec)],
    chosen: &[(usize, usize)],
    node: &dyn Node,
    edits: &mut ContainerEdits,
) -> Result<()> {
    let mut used: Vec<usize> = chosen.iter().map(|(s, _)| *s).collect();
    used.dedup();
    let mut all: Vec<&cdi::Edits> = used.iter().map(|&s| &specs[s].1.container_edits).collect();
    all.extend(
        chosen
            .iter()
            .map(|&(s, d)| &specs[s].1.devices[d].container_edits),
    );
    let names: Vec<String> = chosen
        .iter()
        .map(|&(s, d)| format!("{}={}", specs[s].1.kind, specs[s].1.devices[d].name))
        .collect();
    let files: Vec<String> = used
        .iter()
        .map(|&s| specs[s].0.display().to_string())
        .collect();
    edits
        .source
        .push(format!("CDI {} from {}", names.join(","), files.join(",")));
    let host_cache = node
        .read(Path::new(HOST_LDCACHE))
        .and_then(|b| ldcache::parse(&b))
        .unwrap_or_default();
    for e in &all {
        for n in &e.device_nodes {
            let d = device(node, n.host())?;
            if !edits.devices.iter().any(|x| x.path == n.path) {
                edits.devices.push(DeviceNode {
                    path: n.path.clone(),
                    ..d
                });
            }
        }
        for m in &e.mounts {
            edits.binds.push(BindEdit {
                host: m.host_path.clone(),
                container: m.container_path.clone(),
                readonly: m.readonly(),
            });
        }
        for kv in &e.env {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            edits.env.push((k.into(), v.into()));
        }
        for hook in &e.hooks {
            match hook.ldcache_folders() {
                Some(folders) => {
                    for m in e.mounts.iter().filter(|m| {
                        m.container_path
                            .parent()
                            .is_some_and(|p| folders.iter().any(|f| f == p))
                    }) {
                        let real = node.resolve(&m.host_path);
                        for entry in host_cache.iter().filter(|h| {
                            h.flags == ldcache::NATIVE_FLAGS
                                && real.is_some()
                                && node.resolve(Path::new(&h.value)) == real
                        }) {
                            edits
                                .ld_cache
                                .push((entry.key.clone(), m.container_path.clone()));
                        }
                    }
                }
                None => edits
                    .source
                    .push(format!("CDI hook {} skipped", hook.describe())),
            }
        }
    }
    Ok(())
}

/// The fabric devices of the configured classes that this node has, and the extra paths.
fn fabric_edits(config: &GpuConfig, node: &dyn Node, edits: &mut ContainerEdits) {
    let before = edits.devices.len();
    for class in &config.fabric {
        let (dir, prefixes) = class.nodes();
        let mut names: Vec<String> = node
            .list(Path::new(dir))
            .into_iter()
            .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
            .collect();
        names.sort();
        for n in names {
            push_if_present(node, &Path::new(dir).join(n), edits);
        }
    }
    for extra in &config.fabric_devices {
        push_if_present(node, &extra.0, edits);
    }
    let added: Vec<String> = edits.devices[before..]
        .iter()
        .map(|d| d.path.display().to_string())
        .collect();
    if !added.is_empty() {
        edits.source.push(format!("fabric {}", added.join(",")));
    }
}
