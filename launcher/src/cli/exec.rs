//! `berth exec [OPTIONS] IMAGE [--] [CMD [ARGS...]]`: run a command in an image as an
//! unprivileged container; `berth exec --join HANDLE [--] CMD [ARGS...]`: run it in a
//! container held by `berth start`.

use std::path::PathBuf;

use super::Globals;
use crate::cache;
use crate::config::Config;
use crate::container::writable::{Changes, NamedId};
use crate::container::{self, spec};
use crate::gpu;
use crate::{Error, Result};

/// Options describing a container, shared by `berth exec` and `berth start`.
#[derive(Debug, clap::Args)]
pub struct ContainerArgs {
    /// Bind a host path into the container (repeatable); DST is resolved inside the image,
    /// where a symlink cannot lead outside the container. FLAGS, joined by `+` as in pyxis:
    /// ro, rw, bind (not recursive; rbind is the default), [r]private, [r]slave, [r]shared,
    /// [r]unbindable, nosuid, nodev, noexec, x-create=file|dir. SRC `tmpfs` mounts a new
    /// tmpfs (which also takes size=, nr_inodes=, mode=, huge=); SRC `umount` leaves out the
    /// default mount at DST (the home directory, /tmp, /etc/hosts, ...).
    #[arg(long = "bind", short = 'B', value_name = "SRC:DST[:FLAGS]")]
    pub binds: Vec<String>,
    /// Working directory inside the container (default: the image's, else the current
    /// directory when it is visible inside, else /).
    #[arg(long, short = 'w', value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// Set a variable inside the container (repeatable; wins over the image's).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Let the command change the image's files (on node-local disk under [runtime]
    /// writable_dir, up to [runtime] writable_max_size, for the container's life; the image
    /// file never changes).
    #[arg(long)]
    pub writable: bool,
    /// Do not bind the home directory.
    #[arg(long)]
    pub no_home: bool,
    /// Appear as root (uid 0) inside; still no privileges on the host.
    #[arg(long)]
    pub remap_root: bool,
    /// Run the image's entrypoint before the given command.
    #[arg(long)]
    pub entrypoint: bool,
    /// Print the container's OCI runtime spec (JSON) and exit without running anything.
    #[arg(long)]
    pub print_spec: bool,
    /// Namespaces of the container's own instead of the host's: any of net, ipc, uts,
    /// comma-separated (a new network namespace has only the loopback interface).
    #[arg(long, value_name = "net,ipc,uts", value_parser = parse_isolation)]
    pub unshare: Option<berth_sys::Isolation>,
    /// Give the container the node's Slurm client (srun, sbatch, scontrol, squeue, ...),
    /// run with the node's own libraries: how a batch script in an image calls srun.
    /// SLURM_CONF is the running Slurm's slurm.conf (its directory is bound; the plugin
    /// passes the one slurmstepd loaded).
    #[arg(long, value_name = "SLURM_CONF", num_args = 0..=1, require_equals = true,
          default_missing_value = "/etc/slurm/slurm.conf")]
    pub slurm_client: Option<PathBuf>,
    /// Where that Slurm is installed (PREFIX/bin/srun): the plugin passes its slurmstepd's,
    /// which a process of the user cannot read; by default the calling process's prefix,
    /// else /usr.
    #[arg(long, value_name = "PREFIX", requires = "slurm_client")]
    pub slurm_prefix: Option<PathBuf>,
    /// Put a no-op script at PATH inside (repeatable): for the node's TaskProlog, which
    /// the SPANK plugin runs on the node itself.
    #[arg(long, value_name = "PATH")]
    pub stand_in: Vec<PathBuf>,
    /// GPUs to bind: `all` (those you may open) or Slurm GPU indexes (gres.conf `File=`
    /// order) like `0,2`; the plugin passes the step's allocation.
    #[arg(long, value_name = "all|LIST")]
    pub gpus: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub container: ContainerArgs,
    /// Run in the container held by `berth start` (its handle, PID:FD) instead of an image.
    #[arg(long, value_name = "HANDLE")]
    pub join: Option<String>,
    /// IMAGE (a registry reference, or a .sif or squashfs file) then the command; with
    /// --join, only the command.
    #[arg(
        required = true,
        trailing_var_arg = true,
        value_name = "IMAGE [--] CMD"
    )]
    pub args: Vec<String>,
}

pub fn run(a: Args, g: &Globals) -> Result<i32> {
    let outcome = match &a.join {
        Some(handle) => {
            let env = parse_env(&a.container.env)?;
            container::join_exec(handle, a.args, &env)
        }
        None => {
            let (image, command) = a.args.split_first().expect("clap requires one argument");
            let config = Config::load_for_caller(g.config.as_deref())?;
            // Held until the command ends: a cached image stays locked against eviction.
            let image = cache::runnable(&config, image)?;
            let mut spec = build_spec(&a.container, &image.path, command.to_vec(), &config)?;
            if a.container.print_spec {
                return print_spec(&spec);
            }
            let changes = changes_for(&a.container, None, &config, &mut spec)?;
            container::exec(&spec, &config.runtime, changes)
        }
    };
    // A missing or non-executable command keeps the shell's exit statuses (127, 126).
    outcome.or_else(|e| match container::exit_code(&e) {
        125 => Err(e),
        code => {
            eprintln!("berth: {e}");
            Ok(code)
        }
    })
}

/// The spec of a container of `image` running `command` with these options.
/// The site's `[site]` binds and variables are added to the user's, and the user's binds
/// checked against them.
pub fn build_spec(
    c: &ContainerArgs,
    image: &std::path::Path,
    command: Vec<String>,
    config: &Config,
) -> Result<oci_spec::runtime::Spec> {
    let site = &config.site;
    let path = container::canonical_image(image)?;
    let source = crate::sif::open_image(&path)?;
    let binds = c
        .binds
        .iter()
        .map(|b| spec::Bind::parse(b))
        .collect::<Result<_>>()?;
    let opts = spec::Options {
        binds: crate::site::apply(site, binds, &|p| p.exists())?,
        workdir: c.workdir.clone(),
        env: crate::site::env(site, parse_env(&c.env)?),
        writable: c.writable,
        no_home: c.no_home,
        remap_root: c.remap_root,
        entrypoint: c.entrypoint,
        command,
        isolation: c.unshare.unwrap_or_default(),
    };
    let image = spec::ImageRef {
        path: &source.path,
        offset: source.offset,
        config: &source.config,
    };
    let mut spec = spec::build(&image, &opts, &spec::Host::current())?;
    spec::with_seccomp(&mut spec, &opts, &config.security.seccomp_deny())?;
    let cgroups = berth_sys::cgroup::view().map_err(|source| Error::Sys {
        path: "/proc/self/cgroup".into(),
        source,
    })?;
    spec::with_cgroup_view(&mut spec, &cgroups)?;
    let selection = c.gpus.as_deref().map(gpu::Selection::parse).transpose()?;
    let env = spec
        .process()
        .as_ref()
        .and_then(|p| p.env().clone())
        .unwrap_or_default();
    let edits = gpu::discover(&config.gpu, selection.as_ref(), &env, &gpu::HostNode)?;
    gpu::edit::apply(&mut spec, &edits)?;
    if let Some(slurm_conf) = &c.slurm_client {
        container::slurm::HostSlurm::find(slurm_conf, c.slurm_prefix.as_deref())?
            .apply(&mut spec)?;
    }
    for path in &c.stand_in {
        container::slurm::stand_in(&mut spec, path)?;
    }
    Ok(spec)
}

/// Where a container's writes go: a named container's own directory, kept for the job, or
/// for `--writable` a temporary one; the spec's overlay is pointed at it. None: read-only,
/// nothing written.
pub fn changes_for(
    c: &ContainerArgs,
    named: Option<&NamedId>,
    config: &Config,
    spec: &mut oci_spec::runtime::Spec,
) -> Result<Option<Changes>> {
    let changes = match named {
        Some(id) => Changes::named(&config.runtime, id)?,
        None if c.writable => Changes::temporary(&config.runtime, &container::tmpdir())?,
        None => return Ok(None),
    };
    changes.annotate(spec);
    Ok(Some(changes))
}

pub fn print_spec(spec: &oci_spec::runtime::Spec) -> Result<i32> {
    println!(
        "{}",
        serde_json::to_string_pretty(spec).map_err(Error::Spec)?
    );
    Ok(0)
}

/// `net,ipc,uts` (any of them) as berth_sys::Isolation.
fn parse_isolation(list: &str) -> std::result::Result<berth_sys::Isolation, String> {
    let mut iso = berth_sys::Isolation::default();
    for kind in list.split(',') {
        let slot = match kind {
            "net" => &mut iso.net,
            "ipc" => &mut iso.ipc,
            "uts" => &mut iso.uts,
            other => {
                return Err(format!(
                    "unknown namespace '{other}'; give any of net, ipc, uts"
                ))
            }
        };
        *slot = true;
    }
    Ok(iso)
}

fn parse_env(vars: &[String]) -> Result<Vec<(String, String)>> {
    vars.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(Error::EnvSyntax(kv.clone())),
        })
        .collect()
}
