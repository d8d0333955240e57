//! The step's container on the compute node: which `berth start` arguments a request becomes,
//! and how a task enters the container and gets its environment. The decisions are pure
//! functions, unit-tested here; `remote.rs` runs them at the right moments.
//!
//! How a task enters (in `task_init`, as the user, already in its task cgroups): `user_init`
//! took the container's namespaces (descriptors, close-on-exec) and OCI spec from the holder
//! it spawned, as root, and every task inherits them through fork. The task sets its
//! environment through Slurm (slurmstepd executes the task with its own copy of the
//! environment, not the process's), then joins those namespaces by descriptor, confined as
//! the spec says (capabilities kept only where it lists them, as for `berth exec`), and
//! changes to the working directory: `--container-workdir` if given,
//! else the job's own (slurmstepd changed the task into it) where the container has that
//! path, as pyxis does, else the image's. Slurm then looks the command
//! up on the PATH just set and execs it, inside the container. Nothing else changes: the
//! task's cgroups (so the job's memory, CPU and device limits), its open descriptors (PMI_FD,
//! stdio) and its per-task variables stay as Slurm made them.

use crate::error::Error;
use crate::launcher::Holder;
use crate::options::ContainerOptions;
use crate::spank::Spank;

/// A bind the node adds to the user's own (the batch script's directory, the PMIx server's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeBind {
    pub path: String,
    pub read_only: bool,
}

/// `berth start` arguments for `image` with the user's options, the node's binds, each at
/// the same path inside, and the step's GPUs (Slurm's indexes, which berth maps through
/// gres.conf), for step `step` of job `job`. `--container-env` is not among them: it is
/// applied per task. A named container keeps its files for the job, and is writable unless
/// `--container-readonly` says otherwise (pyxis's containers are); an unnamed one is marked
/// as the step's (`--step`), which other steps may enter by that name.
pub fn start_args(
    image: &str,
    options: &ContainerOptions,
    node: &[NodeBind],
    gpus: Option<&str>,
    (job, step): (u32, u32),
) -> Vec<String> {
    // --private: only root may open the holder's descriptors (see Launcher::start).
    let mut args = vec!["start".to_owned(), "--private".to_owned()];
    match &options.name {
        Some(named) => args.push(format!("--named={job}/{}", named.name)),
        None => args.push(format!("--step={}", crate::named::step_name(job, step))),
    }
    if let Some(gpus) = gpus.filter(|g| !g.is_empty()) {
        args.push(format!("--gpus={gpus}"));
    }
    for mount in &options.mounts {
        args.push(format!("--bind={}", mount.to_spec()));
    }
    for bind in node {
        let ro = if bind.read_only { ":ro" } else { "" };
        args.push(format!("--bind={0}:{0}{ro}", bind.path));
    }
    if let Some(workdir) = &options.workdir {
        args.push(format!("--workdir={workdir}"));
    }
    if !options.unshare.is_empty() {
        args.push(format!("--unshare={}", options.unshare.join(",")));
    }
    let flags = [
        (
            options.writable == Some(true)
                || ((options.name.is_some() || options.save.is_some())
                    && options.writable.is_none()),
            "--writable",
        ),
        // Saved when the step ends (`berth save`), from the changes left on disk (a named
        // container's stay anyway; a copy's are kept for it).
        (
            options.save.is_some() && options.writable != Some(false),
            "--keep-changes",
        ),
        (options.mount_home == Some(false), "--no-home"),
        (options.remap_root == Some(true), "--remap-root"),
    ];
    args.extend(
        flags
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| (*f).to_owned()),
    );
    // `--` so that no image reference is ever read as an option.
    args.push("--".to_owned());
    args.push(image.to_owned());
    args
}

/// One change to the task's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvChange {
    Set(Vec<u8>, Vec<u8>),
    Unset(Vec<u8>),
}

/// The changes that turn the job's environment into the task's inside the container, as in
/// pyxis: every variable of the container's spec (the image's, PATH included, so commands
/// that exist only in the image are found; HOME and USER) wins over the job's, except those
/// named in `--container-env` that the job has; the host's locale (LANG, LANGUAGE, LC_*),
/// which the image may not have, is dropped unless named. Everything else of the job stays,
/// Slurm's per-task variables included, and a PMIx step's tasks get the PMIx client settings
/// [`crate::mpi::pmix_mca_env`] derives from them.
pub fn task_env(spec_env: &[String], job_env: &[Vec<u8>], keep: &[String]) -> Vec<EnvChange> {
    let name_of = |kv: &[u8]| -> Vec<u8> { kv.split(|&b| b == b'=').next().unwrap_or(kv).to_vec() };
    let kept = |name: &[u8]| keep.iter().any(|k| k.as_bytes() == name);
    let in_job = |name: &[u8]| job_env.iter().any(|kv| name_of(kv) == name);
    let mut changes = Vec::new();
    let mut set_by_spec = Vec::new();
    for kv in spec_env {
        let Some((name, value)) = kv.split_once('=') else {
            continue;
        };
        set_by_spec.push(name.as_bytes().to_vec());
        if !(kept(name.as_bytes()) && in_job(name.as_bytes())) {
            changes.push(EnvChange::Set(name.into(), value.into()));
        }
    }
    for kv in job_env {
        let name = name_of(kv);
        let locale = name == b"LANG" || name == b"LANGUAGE" || name.starts_with(b"LC_");
        if locale && !kept(&name) && !set_by_spec.contains(&name) {
            changes.push(EnvChange::Unset(name));
        }
    }
    for (name, value) in crate::mpi::pmix_mca_env(job_env) {
        changes.push(EnvChange::Set(name, value));
    }
    changes
}

/// The running container of this step: the holder, and what each task must apply.
#[derive(Debug)]
pub struct StepContainer {
    pub holder: Holder,
    /// `--container-env`: job variables that win over the image's.
    pub keep_env: Vec<String>,
    /// `--container-workdir` was given (and is the spec's cwd).
    pub workdir_given: bool,
    /// The site's TaskProlog, run on the node before entering (a no-op stands at its path
    /// inside).
    pub task_prolog: Option<std::path::PathBuf>,
    /// `--container-entrypoint`: the image's entrypoint goes in front of the task's command
    /// (Slurm 23.11+; refused when the options are judged on older releases).
    pub run_entrypoint: bool,
}

impl StepContainer {
    /// Enters the container from a task (see the module comment). The caller is the task
    /// process, single-threaded, running as the user.
    pub fn enter(&self, spank: Spank) -> Result<(), Error> {
        let job_cwd = std::env::current_dir().ok();
        // On the node, before the task leaves it (see `task_prolog`).
        if let Some(path) = &self.task_prolog {
            crate::task_prolog::run_on_node(spank, path)?;
        }
        for change in task_env(&self.holder.process.env, &spank.job_env()?, &self.keep_env) {
            match change {
                EnvChange::Set(name, value) => spank.setenv(&name, &value)?,
                EnvChange::Unset(name) => spank.unsetenv(&name)?,
            }
        }
        berth_sys::join(&self.holder.namespaces, &self.holder.process.confinement).map_err(
            |e| Error::JoinFailed {
                detail: format!("joining the container of holder {}: {e}", self.holder.pid),
            },
        )?;
        if let (false, Some(dir)) = (self.workdir_given, job_cwd) {
            // Resolved inside the container now; where it has no such path, the image's
            // directory entered above stays.
            let _ = std::env::set_current_dir(dir);
        }
        // As in pyxis: the entrypoint runs first, in the task's environment set above, with
        // the user's command as its arguments; Slurm finds it on the image's PATH.
        let entrypoint = &self.holder.process.entrypoint;
        if self.run_entrypoint && !entrypoint.is_empty() {
            spank.prepend_task_argv(entrypoint)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{Access, Mount};

    fn set(k: &str, v: &str) -> EnvChange {
        EnvChange::Set(k.into(), v.into())
    }

    fn unset(k: &str) -> EnvChange {
        EnvChange::Unset(k.into())
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn bytes(list: &[&str]) -> Vec<Vec<u8>> {
        list.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn image_env_wins_except_named_and_locale_goes() {
        let spec = strings(&["PATH=/img/bin", "HOME=/home/u", "A=image", "LANG=C.UTF-8"]);
        let job = bytes(&[
            "PATH=/usr/bin",
            "A=job",
            "LC_ALL=de_DE",
            "LANGUAGE=de",
            "LC_TIME=x",
            "SLURM_PROCID=3",
            "LANG=de_DE.UTF-8",
        ]);
        let changes = task_env(&spec, &job, &strings(&["A", "LC_TIME"]));
        assert_eq!(
            changes,
            vec![
                set("PATH", "/img/bin"),
                set("HOME", "/home/u"),
                // LANG is the image's own: set, not dropped.
                set("LANG", "C.UTF-8"),
                unset("LC_ALL"),
                unset("LANGUAGE"),
            ]
        );
    }

    #[test]
    fn a_named_variable_the_job_lacks_keeps_the_image_value() {
        let changes = task_env(&strings(&["A=image", "broken"]), &[], &strings(&["A"]));
        assert_eq!(changes, vec![set("A", "image")]);
    }

    #[test]
    fn a_pmix_task_gets_the_server_s_modules_as_client_settings() {
        let job = bytes(&["PMIX_SECURITY_MODE=native", "PMIX_RANK=0"]);
        let changes = task_env(&strings(&["PATH=/bin"]), &job, &[]);
        assert_eq!(
            changes,
            vec![set("PATH", "/bin"), set("PMIX_MCA_psec", "native")]
        );
    }

    #[test]
    fn values_may_hold_equals_signs() {
        let changes = task_env(&strings(&["OPTS=a=b"]), &bytes(&["OPTS=x=y"]), &[]);
        assert_eq!(changes, vec![set("OPTS", "a=b")]);
    }

    #[test]
    fn start_arguments_follow_the_request() {
        let options = ContainerOptions {
            mounts: vec![
                Mount {
                    src: "/data".into(),
                    dst: "/in".into(),
                    access: Access::ReadOnly,
                    flags: Vec::new(),
                },
                Mount {
                    src: "/scratch".into(),
                    dst: "/scratch".into(),
                    access: Access::ReadWrite,
                    flags: Vec::new(),
                },
            ],
            workdir: Some("/in".into()),
            env: vec!["A".into()],
            mount_home: Some(false),
            remap_root: Some(true),
            writable: Some(true),
            entrypoint: Some(false),
            ..ContainerOptions::default()
        };
        let node = [NodeBind {
            path: "/var/spool/slurmd/job7".into(),
            read_only: true,
        }];
        assert_eq!(
            start_args("h/r@sha256:00", &options, &node, None, (7, 2)),
            strings(&[
                "start",
                "--private",
                "--step=7.2",
                "--bind=/data:/in:ro",
                "--bind=/scratch:/scratch:rw",
                "--bind=/var/spool/slurmd/job7:/var/spool/slurmd/job7:ro",
                "--workdir=/in",
                "--writable",
                "--no-home",
                "--remap-root",
                "--",
                "h/r@sha256:00",
            ])
        );
        assert_eq!(
            start_args("-x", &ContainerOptions::default(), &[], None, (7, 2)),
            strings(&["start", "--private", "--step=7.2", "--", "-x"])
        );
        assert_eq!(
            start_args("i", &ContainerOptions::default(), &[], Some("0,2"), (7, 2)),
            strings(&["start", "--private", "--step=7.2", "--gpus=0,2", "--", "i"])
        );
        assert_eq!(
            start_args("i", &ContainerOptions::default(), &[], Some(""), (7, 2)),
            strings(&["start", "--private", "--step=7.2", "--", "i"])
        );
        // A named container is writable unless read-only was asked for.
        let named = |writable| ContainerOptions {
            name: Some(crate::options::Named {
                name: "env".into(),
                mode: crate::options::NameMode::Auto,
            }),
            writable,
            ..ContainerOptions::default()
        };
        assert_eq!(
            start_args("i", &named(None), &[], None, (7, 2)),
            strings(&[
                "start",
                "--private",
                "--named=7/env",
                "--writable",
                "--",
                "i"
            ])
        );
        assert_eq!(
            start_args("i", &named(Some(false)), &[], None, (7, 2)),
            strings(&["start", "--private", "--named=7/env", "--", "i"])
        );
        // A container to save leaves its changes for `berth save`.
        let saved = ContainerOptions {
            save: Some("/s/a.sif".into()),
            ..ContainerOptions::default()
        };
        assert_eq!(
            start_args("i", &saved, &[], None, (7, 2)),
            strings(&[
                "start",
                "--private",
                "--step=7.2",
                "--writable",
                "--keep-changes",
                "--",
                "i"
            ])
        );
        // A named one too: if it runs as a copy, the copy's changes are what is saved.
        let saved_named = ContainerOptions {
            save: Some("/s/a.sif".into()),
            ..named(None)
        };
        assert_eq!(
            start_args("i", &saved_named, &[], None, (7, 2)),
            strings(&[
                "start",
                "--private",
                "--named=7/env",
                "--writable",
                "--keep-changes",
                "--",
                "i"
            ])
        );
    }
}
