//! Discovery end to end on a fake node: gres.conf, the ld.so cache, device nodes, NVML (with
//! a MIG layout), CDI specs and fabric devices, and the spec edit that follows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::nvml::{FakeNvml, MigDevice, NvmlGpu};
use super::*;
use crate::config::GpuConfig;
use crate::container::spec::{build, Host, ImageRef, Options};
use crate::image_config::ImageConfig;

const VERSION: &str = "550.54.15";
const LIBDIR: &str = "/usr/lib/x86_64-linux-gnu";

#[derive(Default)]
struct FakeNode {
    files: BTreeMap<PathBuf, Vec<u8>>,
    /// path -> (major, minor)
    devices: BTreeMap<PathBuf, (u64, u64)>,
    links: BTreeMap<PathBuf, PathBuf>,
    forbidden: Vec<PathBuf>,
    nvml: Option<Vec<NvmlGpu>>,
}

impl FakeNode {
    /// Four GPUs in gres.conf, the control nodes, a driver of VERSION in the ld.so cache,
    /// nvidia-smi, InfiniBand.
    fn gpu_node() -> FakeNode {
        let mut n = FakeNode::default();
        n.file(
            "/etc/slurm/gres.conf",
            "AutoDetect=off\nName=gpu File=/dev/nvidia[0-3]\n",
        );
        for i in 0..4 {
            n.dev(&format!("/dev/nvidia{i}"), 195, i);
        }
        n.dev("/dev/nvidiactl", 195, 255);
        n.dev("/dev/nvidia-uvm", 508, 0);
        n.dev("/dev/infiniband/uverbs0", 231, 192);
        n.dev("/dev/infiniband/rdma_cm", 10, 58);
        n.dev("/dev/infiniband/umad0", 231, 0);
        let mut entries = Vec::new();
        for lib in [
            "libcuda.so",
            "libnvidia-ml.so",
            "libnvidia-ptxjitcompiler.so",
        ] {
            let link = format!("{LIBDIR}/{lib}.1");
            n.links.insert(
                link.clone().into(),
                format!("{LIBDIR}/{lib}.{VERSION}").into(),
            );
            entries.push(ldcache::Entry::native(&format!("{lib}.1"), &link));
        }
        n.files
            .insert("/etc/ld.so.cache".into(), ldcache::write(&entries));
        n.file("/usr/bin/nvidia-smi", "#!/bin/sh\n");
        n
    }

    fn file(&mut self, path: &str, text: &str) {
        self.files.insert(path.into(), text.as_bytes().to_vec());
    }

    fn dev(&mut self, path: &str, major: u64, minor: u64) {
        self.devices.insert(path.into(), (major, minor));
    }
}

impl Node for FakeNode {
    fn read(&self, path: &Path) -> Option<Vec<u8>> {
        self.files.get(path).cloned()
    }
    fn device(&self, path: &Path) -> Option<(char, u64, u64)> {
        self.devices.get(path).map(|&(a, b)| ('c', a, b))
    }
    fn resolve(&self, path: &Path) -> Option<PathBuf> {
        Some(self.links.get(path).cloned().unwrap_or_else(|| path.into()))
    }
    fn exists(&self, path: &Path) -> bool {
        self.files.contains_key(path) || self.devices.contains_key(path)
    }
    fn list(&self, dir: &Path) -> Vec<String> {
        self.devices
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }
    fn may_open(&self, path: &Path) -> bool {
        !self.forbidden.iter().any(|f| f == path)
    }
    fn node_name(&self) -> String {
        "n1".into()
    }
    fn nvml(&self) -> Result<Box<dyn nvml::Nvml>> {
        match &self.nvml {
            Some(gpus) => Ok(Box::new(FakeNvml(gpus.clone()))),
            None => Err(Error::Nvml("libnvidia-ml.so.1: not found".into())),
        }
    }
}

fn config() -> GpuConfig {
    GpuConfig {
        cdi_dirs: Vec::new(),
        ..GpuConfig::default()
    }
}

fn indexes(list: &str) -> Selection {
    Selection::parse(list).unwrap()
}

fn paths(edits: &ContainerEdits) -> Vec<String> {
    edits
        .devices
        .iter()
        .map(|d| d.path.display().to_string())
        .collect()
}

fn env<'a>(edits: &'a ContainerEdits, key: &str) -> Option<&'a str> {
    edits
        .env
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[test]
fn selections() {
    assert_eq!(Selection::parse("all").unwrap(), Selection::All);
    assert_eq!(
        Selection::parse("0,2").unwrap(),
        Selection::Indexes(vec![0, 2])
    );
    assert_eq!(
        Selection::parse("1-3,1").unwrap(),
        Selection::Indexes(vec![1, 2, 3])
    );
    assert_eq!(Selection::parse("").unwrap(), Selection::Indexes(vec![]));
    for bad in ["x", "3-1", "0,,a", "-1"] {
        assert!(
            matches!(Selection::parse(bad), Err(Error::GpuSelection(_))),
            "{bad}"
        );
    }
}

#[test]
fn exactly_the_allocated_gpus_with_their_driver() {
    let node = FakeNode::gpu_node();
    let edits = discover(&config(), Some(&indexes("1,3")), &[], &node).unwrap();
    let devices = paths(&edits);
    assert_eq!(
        devices,
        [
            "/dev/nvidia1",
            "/dev/nvidia3",
            "/dev/nvidiactl",
            "/dev/nvidia-uvm",
            "/dev/infiniband/uverbs0",
            "/dev/infiniband/rdma_cm"
        ]
    );
    assert_eq!(edits.devices[1].minor, 3);
    assert_eq!(env(&edits, "CUDA_VISIBLE_DEVICES"), Some("0,1"));
    assert_eq!(env(&edits, "NVIDIA_VISIBLE_DEVICES"), Some("1,3"));
    let cuda = edits
        .binds
        .iter()
        .find(|b| b.container == Path::new("/usr/local/nvidia/lib64/libcuda.so.1"))
        .unwrap();
    assert_eq!(
        cuda.host,
        PathBuf::from(format!("{LIBDIR}/libcuda.so.{VERSION}"))
    );
    assert!(cuda.readonly);
    assert!(edits
        .binds
        .iter()
        .any(|b| b.container == Path::new("/usr/bin/nvidia-smi")));
    assert!(edits.ld_cache.contains(&(
        "libnvidia-ml.so.1".into(),
        "/usr/local/nvidia/lib64/libnvidia-ml.so.1".into()
    )));
    assert!(
        edits.source.iter().any(|s| s.contains("discovery")),
        "{:?}",
        edits.source
    );
}

#[test]
fn no_gpus_means_no_nvidia_anything_but_fabric_stays() {
    let node = FakeNode::gpu_node();
    for (cfg, sel) in [
        (config(), None),
        (
            GpuConfig {
                enabled: false,
                ..config()
            },
            Some(indexes("0")),
        ),
    ] {
        let edits = discover(&cfg, sel.as_ref(), &[], &node).unwrap();
        assert_eq!(
            paths(&edits),
            ["/dev/infiniband/uverbs0", "/dev/infiniband/rdma_cm"]
        );
        assert!(edits.binds.is_empty() && edits.env.is_empty() && edits.ld_cache.is_empty());
    }
    let none = GpuConfig {
        fabric: vec![FabricClass::Umad],
        fabric_devices: vec![
            DevPath("/dev/gdrdrv".into()),
            DevPath("/dev/infiniband/uverbs0".into()),
        ],
        ..config()
    };
    let edits = discover(&none, None, &[], &node).unwrap();
    assert_eq!(
        paths(&edits),
        ["/dev/infiniband/umad0", "/dev/infiniband/uverbs0"]
    );
}

#[test]
fn capabilities_come_from_the_image_or_user_environment() {
    let node = FakeNode::gpu_node();
    let edits = discover(
        &config(),
        Some(&indexes("0")),
        &["NVIDIA_DRIVER_CAPABILITIES=utility".into()],
        &node,
    )
    .unwrap();
    let sonames: Vec<&str> = edits.ld_cache.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(sonames, ["libnvidia-ml.so.1"]);
    let e = discover(
        &config(),
        Some(&indexes("0")),
        &["NVIDIA_DRIVER_CAPABILITIES=compute,bogus".into()],
        &node,
    )
    .unwrap_err();
    assert!(matches!(e, Error::GpuCapability { .. }), "{e}");
}

#[test]
fn driver_problems_are_clear_errors() {
    let mut node = FakeNode::gpu_node();
    let cfg = GpuConfig {
        driver_version: DriverVersion(Some("560.1".into())),
        ..config()
    };
    let e = discover(&cfg, Some(&indexes("0")), &[], &node).unwrap_err();
    assert!(
        matches!(&e, Error::DriverLibrary { library, .. } if library == "libcuda.so"),
        "{e}"
    );
    node.files.remove(Path::new("/etc/ld.so.cache"));
    let e = discover(&config(), Some(&indexes("0")), &[], &node).unwrap_err();
    assert!(matches!(e, Error::NoDriver), "{e}");
    let e = discover(&config(), Some(&indexes("4")), &[], &node).unwrap_err();
    assert!(e.to_string().contains("lists 4 GPU(s)"), "{e}");
    node.devices.remove(Path::new("/dev/nvidia2"));
    let e = discover(&config(), Some(&indexes("2")), &[], &node).unwrap_err();
    assert!(matches!(e, Error::GpuDevice { .. }), "{e}");
}

#[test]
fn all_means_the_gpus_this_process_may_open() {
    let mut node = FakeNode::gpu_node();
    node.forbidden = vec!["/dev/nvidia0".into(), "/dev/nvidia2".into()];
    let edits = discover(&config(), Some(&Selection::All), &[], &node).unwrap();
    assert_eq!(&paths(&edits)[..2], ["/dev/nvidia1", "/dev/nvidia3"]);
    // Without gres.conf: /dev/nvidiaN by minor.
    node.files.remove(Path::new("/etc/slurm/gres.conf"));
    node.forbidden.clear();
    let edits = discover(&config(), Some(&indexes("3")), &[], &node).unwrap();
    assert_eq!(paths(&edits)[0], "/dev/nvidia3");
}

#[test]
fn autodetect_nvml_with_a_mig_layout() {
    let mut node = FakeNode::gpu_node();
    node.file(
        "/etc/slurm/gres.conf",
        "AutoDetect=nvml\nName=gpu Type=a100\n",
    );
    let e = discover(&config(), Some(&indexes("0")), &[], &node).unwrap_err();
    assert!(matches!(e, Error::Nvml(_)), "{e}");
    node.nvml = Some(vec![
        NvmlGpu {
            minor: 0,
            uuid: "GPU-aaaa".into(),
            mig: vec![
                MigDevice {
                    gpu_instance: 1,
                    compute_instance: 0,
                    cap_minors: [12, 13],
                },
                MigDevice {
                    gpu_instance: 2,
                    compute_instance: 0,
                    cap_minors: [21, 22],
                },
            ],
        },
        NvmlGpu {
            minor: 1,
            uuid: "GPU-bbbb".into(),
            mig: Vec::new(),
        },
    ]);
    for (m, n) in [(12, 13), (21, 22)] {
        node.dev(&format!("/dev/nvidia-caps/nvidia-cap{m}"), 238, m);
        node.dev(&format!("/dev/nvidia-caps/nvidia-cap{n}"), 238, n);
    }
    // Index 1 is the second MIG instance, index 2 the whole second GPU.
    let edits = discover(&config(), Some(&indexes("1,2")), &[], &node).unwrap();
    assert_eq!(
        &paths(&edits)[..4],
        [
            "/dev/nvidia0",
            "/dev/nvidia-caps/nvidia-cap21",
            "/dev/nvidia-caps/nvidia-cap22",
            "/dev/nvidia1"
        ]
    );
    assert_eq!(env(&edits, "CUDA_VISIBLE_DEVICES"), Some("0,1"));
    assert_eq!(env(&edits, "NVIDIA_VISIBLE_DEVICES"), Some("0,GPU-bbbb"));
}

#[test]
fn a_cdi_spec_covering_the_devices_wins() {
    let node = {
        let mut n = FakeNode::gpu_node();
        n.links.insert(
            format!("{LIBDIR}/libcuda.so.{VERSION}").into(),
            format!("{LIBDIR}/libcuda.so.{VERSION}").into(),
        );
        n
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nvidia.yaml"), cdi::tests::NVIDIA_YAML).unwrap();
    let cfg = GpuConfig {
        cdi_dirs: vec![AbsPath(dir.path().into())],
        ..config()
    };
    let edits = discover(&cfg, Some(&indexes("1")), &[], &node).unwrap();
    assert_eq!(
        &paths(&edits)[..3],
        ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia1"]
    );
    assert_eq!(env(&edits, "NVIDIA_VISIBLE_DEVICES"), Some("void"));
    assert_eq!(
        edits.ld_cache,
        [(
            "libcuda.so.1".to_string(),
            PathBuf::from(format!("{LIBDIR}/libcuda.so.{VERSION}"))
        )]
    );
    let source = edits.source.join("; ");
    assert!(source.contains("CDI nvidia.com/gpu=1"), "{source}");
    assert!(source.contains("create-symlinks skipped"), "{source}");
    // Index 3 has no CDI device: discovery.
    let edits = discover(&cfg, Some(&indexes("3")), &[], &node).unwrap();
    assert!(edits.source.iter().any(|s| s.contains("discovery")));
    // A broken spec is an error naming it.
    std::fs::write(dir.path().join("zz.json"), "{").unwrap();
    let e = discover(&cfg, Some(&indexes("1")), &[], &node).unwrap_err();
    assert!(e.to_string().contains("zz.json"), "{e}");
}

#[test]
fn the_spec_edit_adds_devices_binds_env_and_the_loader_cache() {
    let node = FakeNode::gpu_node();
    let edits = discover(&config(), Some(&indexes("2")), &[], &node).unwrap();
    let image_config = ImageConfig {
        env: vec![
            "NVIDIA_VISIBLE_DEVICES=all".into(),
            "CUDA_VISIBLE_DEVICES=7".into(),
        ],
        ..Default::default()
    };
    let image = ImageRef {
        path: Path::new("/i.sif"),
        offset: 0,
        config: &image_config,
    };
    let host = Host {
        uid: 1100,
        gid: 1100,
        user: "u".into(),
        home: None,
        cwd: None,
        term: None,
        files: Vec::new(),
    };
    let opts = Options {
        command: vec!["true".into()],
        ..Default::default()
    };
    let mut spec = build(&image, &opts, &host).unwrap();
    edit::apply(&mut spec, &edits).unwrap();
    let devices = spec.linux().as_ref().unwrap().devices().clone().unwrap();
    let gpu = devices
        .iter()
        .find(|d| d.path() == Path::new("/dev/nvidia2"))
        .unwrap();
    assert_eq!((gpu.major(), gpu.minor()), (195, 2));
    assert!(devices.iter().any(|d| d.path() == Path::new("/dev/null")));
    let env = spec.process().as_ref().unwrap().env().clone().unwrap();
    assert!(
        env.contains(&"CUDA_VISIBLE_DEVICES=0".to_string()),
        "{env:?}"
    );
    assert!(
        env.contains(&"NVIDIA_VISIBLE_DEVICES=2".to_string()),
        "{env:?}"
    );
    let mounts = spec.mounts().clone().unwrap();
    let cache = mounts
        .iter()
        .find(|m| m.destination() == Path::new("/etc/ld.so.cache"))
        .unwrap();
    assert_eq!(cache.source().as_deref(), Some(Path::new("ld.so.cache")));
    let entries = edit::ld_cache_entries(&spec).unwrap();
    assert!(entries.iter().any(|(k, _)| k == "libcuda.so.1"));
    let ann = spec.annotations().as_ref().unwrap();
    assert!(
        ann[edit::ANN_GPU].contains("GPUs 2"),
        "{}",
        ann[edit::ANN_GPU]
    );
}

#[test]
fn config_values_are_checked_with_the_allowed_ones() {
    let parse = |text: &str| crate::config::Config::from_toml(Path::new("/b.toml"), text);
    let c = parse("[gpu]\nenabled = false\nfabric = [\"umad\"]\ncdi_dirs = []\n").unwrap();
    assert!(!c.gpu.enabled && c.gpu.fabric == [FabricClass::Umad] && c.gpu.cdi_dirs.is_empty());
    let d = parse("").unwrap().gpu;
    assert!(d.enabled && d.fabric.contains(&FabricClass::Uverbs) && d.cdi_dirs.len() == 2);
    for (text, needle) in [
        ("fabric = [\"nvlink\"]", "uverbs"),
        ("fabric_devices = [\"/etc/passwd\"]", "under /dev"),
        ("fabric_devices = [\"/dev/../etc\"]", "under /dev"),
        ("cdi_dirs = [\"cdi\"]", "absolute"),
        ("extra_libraries = [\"/lib/libx.so\"]", "without version"),
        ("driver_version = \"latest\"", "550.54.15"),
        ("colour = 1", "colour"),
    ] {
        let e = parse(&format!("[gpu]\n{text}\n")).unwrap_err().to_string();
        assert!(e.contains(needle), "{text}: {e}");
    }
}
