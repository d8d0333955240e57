//! CDI (Container Device Interface) specs, as `nvidia-ctk cdi generate` and `amd-ctk` write
//! them into `/etc/cdi` and `/var/run/cdi`: when one covers every allocated device, its
//! container edits are applied instead of berth's own discovery, so a site that maintains
//! CDI specs decides exactly what a GPU container gets.
//!
//! A device matches when its device nodes are exactly the allocated unit's files (so
//! `nvidia.com/gpu=0` matches `/dev/nvidia0`, a MIG device its GPU plus caps). Of the hooks,
//! berth runs the one it can do itself without running host programs in the container:
//! `update-ldcache` (the libraries mounted under its `--folder`s go into the container's
//! loader cache); others are skipped and named in the spec's `org.berth.gpu` annotation.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub cdi_version: String,
    pub kind: String,
    #[serde(default)]
    pub devices: Vec<Device>,
    #[serde(default)]
    pub container_edits: Edits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub name: String,
    #[serde(default)]
    pub container_edits: Edits,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Edits {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub hooks: Vec<Hook>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNode {
    pub path: PathBuf,
    pub host_path: Option<PathBuf>,
}

impl DeviceNode {
    pub fn host(&self) -> &Path {
        self.host_path.as_deref().unwrap_or(&self.path)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    #[serde(default)]
    pub options: Vec<String>,
}

impl Mount {
    /// Read-only unless the spec says `rw` (CDI's mounts of driver files say `ro`).
    pub fn readonly(&self) -> bool {
        !self.options.iter().any(|o| o == "rw")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    pub hook_name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
}

impl Hook {
    /// The folders of an `nvidia-ctk hook update-ldcache --folder DIR...` hook.
    pub fn ldcache_folders(&self) -> Option<Vec<PathBuf>> {
        if !self.args.iter().any(|a| a == "update-ldcache") {
            return None;
        }
        let mut out = Vec::new();
        let mut args = self.args.iter();
        while let Some(a) = args.next() {
            if a == "--folder" {
                out.extend(args.next().map(PathBuf::from));
            } else if let Some(dir) = a.strip_prefix("--folder=") {
                out.push(dir.into());
            }
        }
        Some(out)
    }

    /// A short name for the log: the hook's subcommand or program.
    pub fn describe(&self) -> String {
        self.args
            .get(2)
            .filter(|_| self.args.get(1).map(String::as_str) == Some("hook"))
            .cloned()
            .unwrap_or_else(|| self.path.display().to_string())
    }
}

/// Every spec in `dirs` (`*.json`, `*.yaml`, `*.yml`, by name), with its file. A missing
/// directory holds none; a file that does not parse is an error naming it.
pub fn load(dirs: &[PathBuf]) -> Result<Vec<(PathBuf, Spec)>> {
    let mut out = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(Error::io(
                    format!("reading CDI directory {}", dir.display()),
                    e,
                ))
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("json" | "yaml" | "yml")
                )
            })
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Error::io(format!("reading CDI spec {}", file.display()), e))?;
            let spec = parse(&text).map_err(|message| Error::Cdi {
                path: file.clone(),
                message,
            })?;
            out.push((file, spec));
        }
    }
    Ok(out)
}

/// Parses one spec (YAML, of which JSON is a part).
pub fn parse(text: &str) -> std::result::Result<Spec, String> {
    let spec: Spec = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    if !matches!(spec.kind.split_once('/'), Some((v, c)) if !v.is_empty() && !c.is_empty()) {
        return Err(format!("kind {:?} is not VENDOR/CLASS", spec.kind));
    }
    Ok(spec)
}

/// The specs' devices that cover `units` (each unit's files exactly), as (spec, device)
/// indexes in unit order; `None` unless every unit is covered.
pub fn select(specs: &[(PathBuf, Spec)], units: &[Vec<PathBuf>]) -> Option<Vec<(usize, usize)>> {
    units
        .iter()
        .map(|files| {
            let want: BTreeSet<&Path> = files.iter().map(PathBuf::as_path).collect();
            specs.iter().enumerate().find_map(|(s, (_, spec))| {
                spec.devices
                    .iter()
                    .position(|d| {
                        let nodes = &d.container_edits.device_nodes;
                        !nodes.is_empty()
                            && nodes.iter().map(DeviceNode::host).collect::<BTreeSet<_>>() == want
                    })
                    .map(|d| (s, d))
            })
        })
        .collect()
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// What `nvidia-ctk cdi generate` writes, trimmed: two GPUs, one MIG device, globals.
    pub const NVIDIA_YAML: &str = r#"---
cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
- name: "1"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia1
- name: "1:0"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia1
    - path: /dev/nvidia-caps/nvidia-cap12
    - path: /dev/nvidia-caps/nvidia-cap13
- name: all
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
    - path: /dev/nvidia1
containerEdits:
  env:
  - NVIDIA_VISIBLE_DEVICES=void
  deviceNodes:
  - path: /dev/nvidiactl
  - path: /dev/nvidia-uvm
  hooks:
  - hookName: createContainer
    path: /usr/bin/nvidia-ctk
    args: [nvidia-ctk, hook, update-ldcache, --folder, /usr/lib/x86_64-linux-gnu]
  - hookName: createContainer
    path: /usr/bin/nvidia-ctk
    args: [nvidia-ctk, hook, create-symlinks, --link, libcuda.so.1::/usr/lib/x86_64-linux-gnu/libcuda.so]
  mounts:
  - hostPath: /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
    containerPath: /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
    options: [ro, nosuid, nodev, bind]
"#;

    fn specs() -> Vec<(PathBuf, Spec)> {
        vec![("/etc/cdi/nvidia.yaml".into(), parse(NVIDIA_YAML).unwrap())]
    }

    fn units(list: &[&[&str]]) -> Vec<Vec<PathBuf>> {
        list.iter()
            .map(|u| u.iter().map(PathBuf::from).collect())
            .collect()
    }

    #[test]
    fn nvidia_ctk_specs_parse_and_devices_match_by_their_nodes() {
        let specs = specs();
        let (_, spec) = &specs[0];
        assert_eq!(spec.kind, "nvidia.com/gpu");
        assert_eq!(spec.container_edits.device_nodes.len(), 2);
        assert!(spec.container_edits.mounts[0].readonly());
        assert_eq!(
            select(&specs, &units(&[&["/dev/nvidia1"], &["/dev/nvidia0"]])),
            Some(vec![(0, 1), (0, 0)])
        );
        let mig = units(&[&[
            "/dev/nvidia1",
            "/dev/nvidia-caps/nvidia-cap13",
            "/dev/nvidia-caps/nvidia-cap12",
        ]]);
        assert_eq!(select(&specs, &mig), Some(vec![(0, 2)]));
        assert_eq!(
            select(&specs, &units(&[&["/dev/nvidia0"], &["/dev/nvidia3"]])),
            None
        );
    }

    #[test]
    fn hooks_berth_can_run() {
        let specs = specs();
        let hooks = &specs[0].1.container_edits.hooks;
        assert_eq!(
            hooks[0].ldcache_folders(),
            Some(vec![PathBuf::from("/usr/lib/x86_64-linux-gnu")])
        );
        assert_eq!(hooks[1].ldcache_folders(), None);
        assert_eq!(hooks[1].describe(), "create-symlinks");
    }

    #[test]
    fn json_specs_and_broken_ones() {
        let json = r#"{"cdiVersion":"0.6.0","kind":"amd.com/gpu","devices":[{"name":"0","containerEdits":{"deviceNodes":[{"path":"/dev/dri/renderD128"}]}}]}"#;
        assert_eq!(parse(json).unwrap().devices[0].name, "0");
        assert!(parse("cdiVersion: 0.5.0\nkind: nokind\n")
            .unwrap_err()
            .contains("VENDOR/CLASS"));
        assert!(parse("devices: [").is_err());

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), NVIDIA_YAML).unwrap();
        std::fs::write(dir.path().join("README"), "not a spec").unwrap();
        let found = load(&[dir.path().into(), "/no/such/dir".into()]).unwrap();
        assert_eq!(found.len(), 1);
        std::fs::write(dir.path().join("b.json"), "{").unwrap();
        let e = load(&[dir.path().into()]).unwrap_err().to_string();
        assert!(e.contains("b.json"), "{e}");
    }
}
