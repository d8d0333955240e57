//! The node's Slurm client inside a container (`berth start --slurm-client`, which the
//! SPANK plugin asks for a batch script that runs in an image): `srun`, `sbatch`,
//! `scontrol`, `squeue`... work from the container, whatever its libc.
//!
//! The host's commands run with the host's own dynamic loader and libraries, never the
//! image's: the host's library directory is bound read-only at [`HOST_LIB`], its commands
//! at [`HOST_BIN`], and each command is a small script in the container's PATH
//! (`/usr/local/bin/srun`) that starts `HOST_LIB/ld-linux... --library-path HOST_LIB ...`.
//! Slurm's configuration, its plugin directory (loaded by absolute path) and munge's
//! socket are bound at their own paths, and so is the berth launcher (with its
//! configuration) that the SPANK plugin inside `srun` runs, so a nested `srun` inherits the
//! job's image and is judged by the site's policy as any other. The scripts need the
//! image's `/bin/sh`; an image without one has no shell to run a batch script either.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde_json::Value;

use super::spec;
use crate::{Error, Result};

/// Where the host's library directory appears inside.
pub const HOST_LIB: &str = "/.berth/host/lib";
/// Where the host's Slurm commands appear inside.
pub const HOST_BIN: &str = "/.berth/host/bin";
/// Where the scripts that run them are, early in every image's PATH.
const SCRIPT_DIR: &str = "/usr/local/bin";

/// The annotation carrying the scripts to write into the bundle (JSON: name -> text):
/// the client's and the TaskProlog's stand-in ([`stand_in`]).
pub const ANN_SCRIPTS: &str = "org.berth.scripts";

/// The Slurm client commands a job script may call.
const COMMANDS: [&str; 10] = [
    "srun", "sbatch", "salloc", "scontrol", "squeue", "scancel", "sinfo", "sacct", "sstat",
    "sattach",
];

/// Where a node keeps what the client needs, as Debian installs Slurm and munge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSlurm {
    /// The multiarch library directory holding the loader, libc, libmunge, ...
    pub lib_dir: PathBuf,
    /// The dynamic loader's file name in `lib_dir`.
    pub loader: String,
    /// Slurm's plugin directory (PluginDir), loaded by absolute path.
    pub plugin_dir: PathBuf,
    /// Directories bound at their own path: Slurm's configuration, munge's socket,
    /// berth's configuration.
    pub config_dirs: Vec<PathBuf>,
    /// The commands found, by absolute path.
    pub commands: Vec<PathBuf>,
    /// The berth launcher, bound at its own path for the SPANK plugin inside `srun`.
    pub launcher: PathBuf,
}

impl HostSlurm {
    /// What this node has; an error names what is missing. The Slurm is the one that runs
    /// this step (the caller's prefix: Debian's /usr, or a release built from source under
    /// /opt, whose commands another release's slurmctld would refuse), configured by
    /// `slurm_conf` (the slurm.conf that Slurm loaded; its directory is bound). `prefix`,
    /// where given, is that Slurm's (the plugin's slurmstepd's).
    pub fn find(slurm_conf: &Path, prefix: Option<&Path>) -> Result<HostSlurm> {
        let lib_dir = PathBuf::from(format!("/usr/lib/{}-linux-gnu", std::env::consts::ARCH));
        let loader = match std::env::consts::ARCH {
            "x86_64" => "ld-linux-x86-64.so.2",
            "aarch64" => "ld-linux-aarch64.so.1",
            other => {
                return Err(missing(&format!("a known dynamic loader for {other}")));
            }
        };
        if !lib_dir.join(loader).is_file() {
            return Err(missing(&lib_dir.join(loader).display().to_string()));
        }
        let prefix = prefix
            .map(Path::to_path_buf)
            .or_else(crate::slurm::caller_prefix)
            .filter(|p| p.join("bin/srun").is_file())
            .unwrap_or_else(|| PathBuf::from("/usr"));
        let (bin_dir, plugin_dir) = slurm_dirs(&prefix, &lib_dir);
        let commands: Vec<PathBuf> = COMMANDS
            .iter()
            .map(|c| bin_dir.join(c))
            .filter(|p| p.is_file())
            .collect();
        if commands.is_empty() || !plugin_dir.is_dir() {
            return Err(missing(&format!(
                "Slurm's client ({}/srun, {})",
                bin_dir.display(),
                plugin_dir.display()
            )));
        }
        let conf_dir = slurm_conf.parent().unwrap_or(Path::new("/etc/slurm"));
        Ok(HostSlurm {
            loader: loader.into(),
            plugin_dir,
            config_dirs: [
                conf_dir,
                Path::new("/run/munge"),
                Path::new("/etc/berth"),
                Path::new("/etc/containers"),
            ]
            .into_iter()
            .filter(|p| p.is_dir())
            .map(PathBuf::from)
            .collect(),
            commands,
            launcher: std::env::current_exe()
                .map_err(|e| Error::io("finding the berth launcher itself", e))?,
            lib_dir,
        })
    }

    /// Adds the binds and scripts to `spec` (see the module comment).
    pub fn apply(&self, spec: &mut Spec) -> Result<()> {
        let mut mounts: Vec<Value> = Vec::new();
        mounts.push(spec::bind(&self.lib_dir, Path::new(HOST_LIB), true));
        mounts.push(spec::bind(&self.plugin_dir, &self.plugin_dir, true));
        for dir in &self.config_dirs {
            mounts.push(spec::bind(dir, dir, true));
        }
        let mut scripts = serde_json::Map::new();
        let mut add = |host: &Path, at: &Path| {
            let name = host.file_name().expect("commands have names");
            let inside = Path::new(HOST_BIN).join(name);
            mounts.push(spec::bind(host, &inside, true));
            let script = format!("slurm-{}", name.to_string_lossy());
            scripts.insert(script.clone(), Value::String(self.script(&inside)));
            mounts.push(spec::bind(Path::new(&script), at, true));
        };
        for command in &self.commands {
            let name = command.file_name().expect("commands have names");
            add(command, &Path::new(SCRIPT_DIR).join(name));
        }
        add(&self.launcher, &self.launcher);
        add_scripts(spec, mounts, scripts)
    }

    /// The script that runs the host's `command` (its path inside) with the host's loader
    /// and libraries.
    fn script(&self, command: &Path) -> String {
        // The plugin directory (libslurmfull) is bound at its own path.
        let libs = format!("{HOST_LIB}:{}", self.plugin_dir.display());
        format!(
            "#!/bin/sh\n# berth: the node's {name}, with the node's libraries (not the image's)\n\
             exec {HOST_LIB}/{loader} --library-path {libs} {command} \"$@\"\n",
            name = command.file_name().unwrap_or_default().to_string_lossy(),
            loader = self.loader,
            command = command.display(),
        )
    }
}

/// Slurm's command and plugin directories under `prefix`: Debian's (/usr/bin, the
/// multiarch `slurm-wlm`) or those of a Slurm built from source (`PREFIX/bin`,
/// `PREFIX/lib/slurm`).
fn slurm_dirs(prefix: &Path, lib_dir: &Path) -> (PathBuf, PathBuf) {
    let plugin_dir = if prefix == Path::new("/usr") {
        lib_dir.join("slurm-wlm")
    } else {
        prefix.join("lib/slurm")
    };
    (prefix.join("bin"), plugin_dir)
}

/// Puts a no-op script at `path` inside (read-only): the node's TaskProlog, which the
/// SPANK plugin runs on the node before the task enters, so Slurm's own run of it inside
/// the container neither fails for want of the script nor runs it twice.
pub fn stand_in(spec: &mut Spec, path: &Path) -> Result<()> {
    let name = format!("stand-in-{}", scripts(spec)?.len());
    let mut new = serde_json::Map::new();
    new.insert(
        name.clone(),
        Value::String(
            "#!/bin/sh\n# berth: already run outside the container, before the task entered\n"
                .into(),
        ),
    );
    add_scripts(spec, vec![spec::bind(Path::new(&name), path, true)], new)
}

/// Adds `mounts` to the spec's and `new` to the scripts written into its bundle.
fn add_scripts(
    spec: &mut Spec,
    mounts: Vec<Value>,
    new: serde_json::Map<String, Value>,
) -> Result<()> {
    let mut all: Vec<Value> = spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| serde_json::to_value(m).map_err(Error::Spec))
        .collect::<Result<_>>()?;
    all.extend(mounts);
    spec.set_mounts(Some(
        serde_json::from_value(Value::Array(all)).map_err(Error::Spec)?,
    ));
    let mut annotations = spec.annotations().clone().unwrap_or_default();
    let mut scripts: serde_json::Map<String, Value> = match annotations.get(ANN_SCRIPTS) {
        Some(text) => serde_json::from_str(text).map_err(Error::Spec)?,
        None => serde_json::Map::new(),
    };
    scripts.extend(new);
    annotations.insert(ANN_SCRIPTS.into(), Value::Object(scripts).to_string());
    spec.set_annotations(Some(annotations));
    Ok(())
}

/// The scripts of `spec` to write into the bundle, by file name.
pub fn scripts(spec: &Spec) -> Result<Vec<(String, String)>> {
    let Some(text) = spec.annotations().as_ref().and_then(|a| a.get(ANN_SCRIPTS)) else {
        return Ok(Vec::new());
    };
    let map: serde_json::Map<String, Value> = serde_json::from_str(text).map_err(Error::Spec)?;
    Ok(map
        .into_iter()
        .filter_map(|(name, text)| Some((name, text.as_str()?.to_owned())))
        .collect())
}

fn missing(what: &str) -> Error {
    Error::io(
        format!("giving the container the node's Slurm client: this node has no {what}"),
        std::io::Error::from(std::io::ErrorKind::NotFound),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::spec::{build, Host, ImageRef, Options};
    use crate::image_config::ImageConfig;

    fn host() -> HostSlurm {
        HostSlurm {
            lib_dir: "/usr/lib/x86_64-linux-gnu".into(),
            loader: "ld-linux-x86-64.so.2".into(),
            plugin_dir: "/usr/lib/x86_64-linux-gnu/slurm-wlm".into(),
            config_dirs: vec!["/etc/slurm".into(), "/run/munge".into()],
            commands: vec!["/usr/bin/srun".into()],
            launcher: "/usr/bin/berth".into(),
        }
    }

    #[test]
    fn the_client_is_that_of_the_slurm_running_the_step() {
        let lib = Path::new("/usr/lib/x86_64-linux-gnu");
        assert_eq!(
            slurm_dirs(Path::new("/usr"), lib),
            (
                PathBuf::from("/usr/bin"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu/slurm-wlm")
            )
        );
        assert_eq!(
            slurm_dirs(Path::new("/opt/slurm-24.11"), lib),
            (
                PathBuf::from("/opt/slurm-24.11/bin"),
                PathBuf::from("/opt/slurm-24.11/lib/slurm")
            )
        );
    }

    #[test]
    fn commands_run_with_the_hosts_loader_from_scripts_in_the_path() {
        let image = ImageRef {
            path: Path::new("/img.sif"),
            offset: 0,
            config: &ImageConfig::default(),
        };
        let h = Host {
            uid: 1,
            gid: 1,
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
        let mut spec = build(&image, &opts, &h).unwrap();
        host().apply(&mut spec).unwrap();
        let binds: Vec<(String, String)> = spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| {
                (
                    m.source().clone().unwrap_or_default().display().to_string(),
                    m.destination().display().to_string(),
                )
            })
            .collect();
        for (src, dst) in [
            ("/usr/lib/x86_64-linux-gnu", HOST_LIB),
            ("/etc/slurm", "/etc/slurm"),
            ("/run/munge", "/run/munge"),
            ("/usr/bin/srun", "/.berth/host/bin/srun"),
            ("slurm-srun", "/usr/local/bin/srun"),
            ("/usr/bin/berth", "/.berth/host/bin/berth"),
            ("slurm-berth", "/usr/bin/berth"),
        ] {
            assert!(
                binds.contains(&(src.into(), dst.into())),
                "{src} -> {dst} missing: {binds:?}"
            );
        }
        stand_in(&mut spec, Path::new("/etc/slurm/task-prolog")).unwrap();
        let last = spec.mounts().as_ref().unwrap().last().unwrap().clone();
        assert_eq!(last.destination(), Path::new("/etc/slurm/task-prolog"));
        let scripts = scripts(&spec).unwrap();
        let name = last.source().clone().unwrap().display().to_string();
        let (_, noop) = scripts.iter().find(|(n, _)| *n == name).unwrap();
        assert!(noop.starts_with("#!/bin/sh\n"), "{noop}");
        let (_, srun) = scripts.iter().find(|(n, _)| n == "slurm-srun").unwrap();
        assert!(
            srun.contains(
                "exec /.berth/host/lib/ld-linux-x86-64.so.2 --library-path \
                 /.berth/host/lib:/usr/lib/x86_64-linux-gnu/slurm-wlm /.berth/host/bin/srun \"$@\""
            ),
            "{srun}"
        );
    }
}
