//! berth's srun/sbatch/salloc options, named and meant as in pyxis so pyxis scripts keep
//! working: their table (what Slurm shows in `srun --help`), the parsing and validation of
//! every value, and the merge of all the places a value can come from into one
//! [`ContainerRequest`]. Pure: nothing here touches Slurm or the file system, so every rule is
//! unit-tested. Registration with Slurm is in `spank.rs`, the callbacks in `lib.rs`.
//!
//! Slurm's own `--container` is deliberately absent: a SPANK option of that name conflicts
//! with the native one and is dropped by Slurm; its value is read from SLURM_CONTAINER
//! (`submit.rs`, `remote.rs`).
//!
//! Where a value comes from, strongest first:
//! 1. the command line of this srun/sbatch/salloc (`#SBATCH` lines included);
//! 2. Slurm's replay of the enclosing job's options: inside a job, srun first runs the
//!    callbacks for every `_SLURM_SPANK_OPTION_berth_*` variable it inherited, then those of
//!    its own command line;
//! 3. the user's environment, read at submission only: `BERTH_CONTAINER_*`, else pyxis's
//!    `PYXIS_CONTAINER_*` of the same name, so a pyxis user's environment carries over.

use std::ffi::CStr;

use berth_sys::mount_options::{is_tmpfs_option, BIND_FLAGS, TMPFS_OPTIONS};

use crate::error::Error;
use crate::spank;

/// The longest value accepted for any option. Real values are far shorter (registries cap a
/// repository name at 255 bytes, Linux a path at 4096); the cap keeps a runaway value out of
/// the job environment and the launch message.
pub const VALUE_MAX_BYTES: usize = 4096;

/// The image value that asks for a step on the host, outside any container, e.g. inside a
/// job submitted with an image. pyxis has no such value; `none` is not a usable registry
/// reference on its own (Docker Hub's would be spelled `docker.io/library/none`).
pub const HOST_IMAGE: &str = "none";

/// The `--container-mounts` source that mounts a new tmpfs at the destination, and the one
/// that removes a default mount from the container (pyxis's `tmpfs` and `umount`).
pub const TMPFS_SOURCE: &str = "tmpfs";
pub const UMOUNT_SOURCE: &str = "umount";

/// One of berth's options. The position in [`SPECS`] is the `val` Slurm hands back to the
/// option callback, so one callback serves them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opt {
    Image,
    Mounts,
    Workdir,
    Env,
    MountHome,
    NoMountHome,
    RemapRoot,
    NoRemapRoot,
    Writable,
    Readonly,
    Entrypoint,
    NoEntrypoint,
    EntrypointLog,
    StageIn,
    StageOut,
    Name,
    Save,
    Unshare,
}

/// What an option sets. The `--x` / `--no-x` pairs (and writable/readonly) share a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    Image,
    Mounts,
    Workdir,
    Env,
    MountHome,
    RemapRoot,
    Writable,
    Entrypoint,
    EntrypointLog,
    StageIn,
    StageOut,
    Name,
    Save,
    Unshare,
}

/// One option as Slurm needs it described, C strings because Slurm keeps the pointers.
#[derive(Debug)]
pub struct OptionSpec {
    pub opt: Opt,
    pub name: &'static CStr,
    /// The argument's placeholder in `--help`; `None` for a flag, which takes no argument.
    pub arginfo: Option<&'static CStr>,
    pub usage: &'static CStr,
}

pub const SPECS: [OptionSpec; 18] = [
    OptionSpec {
        opt: Opt::Image,
        name: c"container-image",
        arginfo: Some(c"IMAGE"),
        usage: c"[berth] the container image to run tasks in (registry reference); \
                 'none' runs this step on the host",
    },
    OptionSpec {
        opt: Opt::Mounts,
        name: c"container-mounts",
        arginfo: Some(c"SRC[:DST[:FLAGS]][,...]"),
        usage: c"[berth] bind mount node paths into the container; FLAGS joined by '+' \
                 (ro, rw, rbind, rprivate, unbindable, nosuid, x-create=dir, ...); SRC \
                 'tmpfs' mounts a tmpfs, 'umount' removes a default mount",
    },
    OptionSpec {
        opt: Opt::Workdir,
        name: c"container-workdir",
        arginfo: Some(c"PATH"),
        usage: c"[berth] working directory inside the container",
    },
    OptionSpec {
        opt: Opt::Env,
        name: c"container-env",
        arginfo: Some(c"NAME[,...]"),
        usage: c"[berth] host variables that override the image's own values",
    },
    OptionSpec {
        opt: Opt::MountHome,
        name: c"container-mount-home",
        arginfo: None,
        usage: c"[berth] bind mount the user's home directory",
    },
    OptionSpec {
        opt: Opt::NoMountHome,
        name: c"no-container-mount-home",
        arginfo: None,
        usage: c"[berth] do not bind mount the user's home directory",
    },
    OptionSpec {
        opt: Opt::RemapRoot,
        name: c"container-remap-root",
        arginfo: None,
        usage: c"[berth] appear as root inside the container (no real privilege)",
    },
    OptionSpec {
        opt: Opt::NoRemapRoot,
        name: c"no-container-remap-root",
        arginfo: None,
        usage: c"[berth] keep the user's own uid inside the container",
    },
    OptionSpec {
        opt: Opt::Writable,
        name: c"container-writable",
        arginfo: None,
        usage: c"[berth] make the container's root file system writable (changes are discarded)",
    },
    OptionSpec {
        opt: Opt::Readonly,
        name: c"container-readonly",
        arginfo: None,
        usage: c"[berth] make the container's root file system read-only",
    },
    OptionSpec {
        opt: Opt::Entrypoint,
        name: c"container-entrypoint",
        arginfo: None,
        usage: if spank::CAN_PREPEND_TASK_ARGV {
            c"[berth] run the image's entrypoint first, with the task's command as its arguments"
        } else {
            c"[berth] run the image's entrypoint first (needs Slurm 23.11 or later: refused)"
        },
    },
    OptionSpec {
        opt: Opt::NoEntrypoint,
        name: c"no-container-entrypoint",
        arginfo: None,
        usage: c"[berth] do not run the image's entrypoint",
    },
    OptionSpec {
        opt: Opt::EntrypointLog,
        name: c"container-entrypoint-log",
        arginfo: None,
        usage: c"[berth] show the entrypoint's output (accepted for pyxis scripts; berth runs \
                 no entrypoint in Slurm tasks, so there is none)",
    },
    OptionSpec {
        opt: Opt::StageIn,
        name: c"container-stage-in",
        arginfo: Some(c"SRC[:DST][,...]"),
        usage: c"[berth] copy SRC (read as you) to node-local storage before the step and \
                 bind it at DST (default SRC); unchanged data is reused",
    },
    OptionSpec {
        opt: Opt::StageOut,
        name: c"container-stage-out",
        arginfo: Some(c"SRC:DST[,...]"),
        usage: c"[berth] copy SRC (a container path in a staged directory) to DST when the \
                 step ends, also when it fails",
    },
    OptionSpec {
        opt: Opt::Name,
        name: c"container-name",
        arginfo: Some(c"NAME[:auto|create|exec|no_exec]"),
        usage: c"[berth] keep the container for later steps of the job (on each node, its \
                 files on local disk; removed when the job ends); a running one is entered",
    },
    OptionSpec {
        opt: Opt::Save,
        name: c"container-save",
        arginfo: Some(c"PATH"),
        usage: c"[berth] save the container's file system as a SIF file at PATH (on the \
                 node) when the step ends; running it later is up to the site's policy",
    },
    OptionSpec {
        opt: Opt::Unshare,
        name: c"container-unshare",
        arginfo: Some(c"net,ipc,uts"),
        usage: c"[berth] give the container its own network (loopback only), IPC or UTS \
                 namespace instead of the node's",
    },
];

impl Opt {
    pub fn spec(self) -> &'static OptionSpec {
        &SPECS[self.index()]
    }

    /// The `val` registered with Slurm for this option.
    pub fn index(self) -> usize {
        SPECS
            .iter()
            .position(|s| s.opt == self)
            .expect("every Opt has a row in SPECS")
    }

    pub fn from_index(val: usize) -> Option<Opt> {
        SPECS.get(val).map(|s| s.opt)
    }

    pub fn from_name(name: &str) -> Option<Opt> {
        SPECS
            .iter()
            .find(|s| s.name.to_bytes() == name.as_bytes())
            .map(|s| s.opt)
    }

    pub fn name(self) -> &'static str {
        self.spec().name.to_str().expect("option names are ASCII")
    }

    /// The setting this option sets and, for a flag, the value it sets it to.
    pub fn setting(self) -> (Setting, Option<bool>) {
        match self {
            Opt::Image => (Setting::Image, None),
            Opt::Mounts => (Setting::Mounts, None),
            Opt::Workdir => (Setting::Workdir, None),
            Opt::Env => (Setting::Env, None),
            Opt::MountHome => (Setting::MountHome, Some(true)),
            Opt::NoMountHome => (Setting::MountHome, Some(false)),
            Opt::RemapRoot => (Setting::RemapRoot, Some(true)),
            Opt::NoRemapRoot => (Setting::RemapRoot, Some(false)),
            Opt::Writable => (Setting::Writable, Some(true)),
            Opt::Readonly => (Setting::Writable, Some(false)),
            Opt::Entrypoint => (Setting::Entrypoint, Some(true)),
            Opt::NoEntrypoint => (Setting::Entrypoint, Some(false)),
            Opt::EntrypointLog => (Setting::EntrypointLog, Some(true)),
            Opt::StageIn => (Setting::StageIn, None),
            Opt::StageOut => (Setting::StageOut, None),
            Opt::Name => (Setting::Name, None),
            Opt::Save => (Setting::Save, None),
            Opt::Unshare => (Setting::Unshare, None),
        }
    }

    /// The variable Slurm puts the option's value in for the job:
    /// `_SLURM_SPANK_OPTION_<plugin>_<option>`, every non-alphanumeric byte turned into `_` (as
    /// spank.c's `_opt_env_name` does).
    pub fn slurm_env_name(self) -> String {
        let canonical = |s: &str| -> String {
            s.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect()
        };
        format!(
            "_SLURM_SPANK_OPTION_{}_{}",
            canonical(crate::PLUGIN_NAME),
            canonical(self.name())
        )
    }
}

impl Setting {
    pub const ALL: [Setting; 14] = [
        Setting::Image,
        Setting::Mounts,
        Setting::Workdir,
        Setting::Env,
        Setting::MountHome,
        Setting::RemapRoot,
        Setting::Writable,
        Setting::Entrypoint,
        Setting::EntrypointLog,
        Setting::StageIn,
        Setting::StageOut,
        Setting::Name,
        Setting::Save,
        Setting::Unshare,
    ];

    /// The user's environment variable for this setting, berth's name; see [`env_vars`]
    /// (Self::env_vars) for every name read. A flag pair's variable takes 1/true/yes or
    /// 0/false/no; for WRITABLE 0 means readonly.
    pub fn env_var(self) -> &'static str {
        match self {
            Setting::Image => "BERTH_CONTAINER_IMAGE",
            Setting::Mounts => "BERTH_CONTAINER_MOUNTS",
            Setting::Workdir => "BERTH_CONTAINER_WORKDIR",
            Setting::Env => "BERTH_CONTAINER_ENV",
            Setting::MountHome => "BERTH_CONTAINER_MOUNT_HOME",
            Setting::RemapRoot => "BERTH_CONTAINER_REMAP_ROOT",
            Setting::Writable => "BERTH_CONTAINER_WRITABLE",
            Setting::Entrypoint => "BERTH_CONTAINER_ENTRYPOINT",
            Setting::EntrypointLog => "BERTH_CONTAINER_ENTRYPOINT_LOG",
            Setting::StageIn => "BERTH_CONTAINER_STAGE_IN",
            Setting::StageOut => "BERTH_CONTAINER_STAGE_OUT",
            Setting::Name => "BERTH_CONTAINER_NAME",
            Setting::Save => "BERTH_CONTAINER_SAVE",
            Setting::Unshare => "BERTH_CONTAINER_UNSHARE",
        }
    }

    /// Every variable that sets this setting, in the order they are read (the first one set
    /// counts): berth's own, then pyxis's (`PYXIS_CONTAINER_` and the same suffix). For
    /// WRITABLE each prefix's READONLY comes first, its true value meaning read-only: pyxis
    /// applies `PYXIS_CONTAINER_READONLY` after `PYXIS_CONTAINER_WRITABLE`, so with both set
    /// READONLY wins.
    pub fn env_vars(self) -> Vec<EnvVar> {
        let berth = self.env_var();
        let suffix = berth
            .strip_prefix(BERTH_ENV_PREFIX)
            .expect("every variable starts with BERTH_CONTAINER_");
        let mut vars = Vec::new();
        for prefix in [BERTH_ENV_PREFIX, PYXIS_ENV_PREFIX] {
            if self == Setting::Writable {
                vars.push(EnvVar {
                    name: format!("{prefix}READONLY"),
                    inverted: true,
                });
            }
            vars.push(EnvVar {
                name: format!("{prefix}{suffix}"),
                inverted: false,
            });
        }
        vars
    }
}

const BERTH_ENV_PREFIX: &str = "BERTH_CONTAINER_";
const PYXIS_ENV_PREFIX: &str = "PYXIS_CONTAINER_";

/// An environment variable that sets a setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    pub name: String,
    /// A flag variable whose true value sets the pair's other side
    /// (`PYXIS_CONTAINER_READONLY=1` is `--container-readonly`).
    pub inverted: bool,
}

/// Where a value came from; see the module comment for the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// `BERTH_CONTAINER_*` in the submitting user's environment.
    Environment,
    /// Slurm's replay of an option the enclosing job was submitted with.
    Inherited,
    /// This command's own command line.
    CommandLine,
}

/// One option value as Slurm delivered it, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Given {
    pub opt: Opt,
    pub value: Vec<u8>,
    pub origin: Origin,
}

/// The image a step asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageChoice {
    /// `--container-image=none`: run on the host.
    Host,
    /// A registry reference (or local file path), judged by the launcher.
    Image(String),
}

/// `--container-mounts` entries carry one of these, default read-write as in pyxis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

/// A `--container-stage-in`/`--container-stage-out` entry: a host path and a container path.
/// Stage-in copies host `src` and binds the copy at `dst`; stage-out copies container path
/// `src` (in a staged directory) to host path `dst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub src: String,
    pub dst: String,
}

/// One `--container-mounts` entry. `src` is a host path (absolute once the submitting side
/// resolved a relative one against its working directory), [`TMPFS_SOURCE`] or
/// [`UMOUNT_SOURCE`]; whether a host path exists is the node's call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub src: String,
    pub dst: String,
    pub access: Access,
    /// The other flags, in the order given: [`BIND_FLAGS`] and, for a tmpfs,
    /// [`TMPFS_OPTIONS`].
    pub flags: Vec<String>,
}

impl Mount {
    /// A bind of a host path, not a tmpfs or an umount.
    pub fn is_host_path(&self) -> bool {
        self.src != TMPFS_SOURCE && self.src != UMOUNT_SOURCE
    }

    /// `SRC:DST:FLAGS` (`umount:DST`), the form the launcher's `--bind` and the request's
    /// transport read.
    pub fn to_spec(&self) -> String {
        if self.src == UMOUNT_SOURCE {
            return format!("{}:{}", self.src, self.dst);
        }
        let access = match self.access {
            Access::ReadOnly => "ro",
            Access::ReadWrite => "rw",
        };
        let flags: Vec<&str> = std::iter::once(access)
            .chain(self.flags.iter().map(String::as_str))
            .collect();
        format!("{}:{}:{}", self.src, self.dst, flags.join("+"))
    }
}

/// Makes every relative host source absolute against `cwd` (the submitting command's
/// working directory, which is the job's unless `--chdir` says otherwise), lexically: `.`
/// components go, `..` stays for the node to resolve.
pub fn absolute_sources(mounts: &mut [Mount], cwd: &std::path::Path) {
    for m in mounts.iter_mut().filter(|m| m.is_host_path()) {
        if !m.src.starts_with('/') {
            let joined = cwd.join(&m.src);
            let clean: std::path::PathBuf = joined
                .components()
                .filter(|c| *c != std::path::Component::CurDir)
                .collect();
            m.src = clean.to_string_lossy().into_owned();
        }
    }
}

/// Every setting other than the image, each `None` where nobody set it, so the launcher's
/// (or the site's) default applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerOptions {
    pub mounts: Vec<Mount>,
    pub workdir: Option<String>,
    pub env: Vec<String>,
    pub mount_home: Option<bool>,
    pub remap_root: Option<bool>,
    pub writable: Option<bool>,
    pub entrypoint: Option<bool>,
    pub stage_in: Vec<Stage>,
    pub stage_out: Vec<Stage>,
    /// `--container-name`.
    pub name: Option<Named>,
    /// `--container-save`: where the container's file system goes when the step ends.
    pub save: Option<String>,
    /// `--container-unshare`: the namespaces of its own, in [`UNSHARE_KINDS`] order.
    pub unshare: Vec<String>,
}

/// What `--container-unshare` takes, as pyxis names them.
pub const UNSHARE_KINDS: [&str; 3] = ["net", "ipc", "uts"];

/// `--container-name=NAME[:MODE]`: a container kept for the job's later steps on each node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub name: String,
    pub mode: NameMode,
}

/// What `--container-name` does with a container of that name, as in pyxis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameMode {
    /// Enter it if running, else start it from its files, else create it.
    Auto,
    /// Create it; an error if it exists.
    Create,
    /// Enter it; an error if it is not running.
    Exec,
    /// Start it from its files (or create it), never entering a running one.
    NoExec,
}

impl NameMode {
    const ALL: [(NameMode, &'static str); 4] = [
        (NameMode::Auto, "auto"),
        (NameMode::Create, "create"),
        (NameMode::Exec, "exec"),
        (NameMode::NoExec, "no_exec"),
    ];

    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(m, _)| *m == self)
            .map(|(_, s)| *s)
            .expect("every mode has a name")
    }
}

/// The settings parsed from every source, with where each came from; the image choice is
/// made from these and Slurm's `--container` by the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub image: Option<(ImageChoice, Origin)>,
    pub options: ContainerOptions,
    /// The strongest origin of any setting other than the image, to tell a user who gave
    /// `--container-mounts` without any image that the mounts would be ignored.
    pub options_origin: Option<Origin>,
}

/// What a step runs in, after every source was merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerRequest {
    /// Nothing asked for a container.
    None,
    /// `--container-image=none`: explicitly on the host.
    Host,
    Container {
        image: String,
        options: ContainerOptions,
    },
    /// `--container-name` without an image: the job's container of that name, run from the
    /// image it was created with (`options.name` is set).
    Named { options: ContainerOptions },
}

/// How an offending value is named in a message: the option, or the environment variable.
pub fn source_name(opt: Opt, origin: Origin) -> String {
    match origin {
        Origin::Environment => opt.setting().0.env_var().to_owned(),
        Origin::CommandLine | Origin::Inherited => format!("--{}", opt.name()),
    }
}

/// Looks up a variable of the user's environment as bytes.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<Vec<u8>>;

/// A setting's value as found in the user's environment: the first of
/// [`Setting::env_vars`] that is set and not empty (an empty variable is how shells unset
/// one for a single command), with the variable's name for messages.
fn from_environment(setting: Setting, env: Env) -> Option<(EnvVar, Vec<u8>)> {
    setting
        .env_vars()
        .into_iter()
        .find_map(|var| env(&var.name).filter(|v| !v.is_empty()).map(|v| (var, v)))
}

/// Parses every given value and the user's environment (`env`, None on the node) into
/// [`Settings`]. A value given later beats one given earlier from the same origin.
pub fn settings(given: &[Given], env: Option<Env>) -> Result<Settings, Error> {
    let writable_on_command_line = |want: bool| {
        given.iter().any(|g| {
            g.origin == Origin::CommandLine && g.opt.setting() == (Setting::Writable, Some(want))
        })
    };
    if writable_on_command_line(true) && writable_on_command_line(false) {
        return Err(Error::WritableAndReadonly);
    }
    let mut out = Settings::default();
    for setting in Setting::ALL {
        let strongest = given
            .iter()
            .enumerate()
            .filter(|(_, g)| g.opt.setting().0 == setting)
            .max_by_key(|(at, g)| (g.origin, *at))
            .map(|(_, g)| {
                let source = Source::Option {
                    opt: g.opt,
                    origin: g.origin,
                };
                (source, g.value.clone(), g.origin)
            });
        let from_env = || {
            let (var, value) = from_environment(setting, env?)?;
            Some((Source::Variable(var), value, Origin::Environment))
        };
        let Some((source, value, origin)) = strongest.or_else(from_env) else {
            continue;
        };
        apply(&mut out, setting, &source, &value)?;
        if setting != Setting::Image {
            out.options_origin = out.options_origin.max(Some(origin));
        }
    }
    Ok(out)
}

/// Where one setting's value was read.
enum Source {
    Option { opt: Opt, origin: Origin },
    Variable(EnvVar),
}

impl Source {
    fn origin(&self) -> Origin {
        match self {
            Source::Option { origin, .. } => *origin,
            Source::Variable(_) => Origin::Environment,
        }
    }

    /// How messages name it: `--container-mounts` or `PYXIS_CONTAINER_MOUNTS`.
    fn name(&self) -> String {
        match self {
            Source::Option { opt, origin } => source_name(*opt, *origin),
            Source::Variable(var) => var.name.clone(),
        }
    }

    /// The value a flag pair is set to.
    fn flag(&self, value: &[u8]) -> Result<bool, Error> {
        match self {
            Source::Option { opt, .. } => Ok(opt
                .setting()
                .1
                .expect("flag settings are set by flag options")),
            Source::Variable(var) => Ok(parse_bool(&var.name, value)? != var.inverted),
        }
    }
}

fn apply(out: &mut Settings, setting: Setting, source: &Source, value: &[u8]) -> Result<(), Error> {
    let name = || source.name();
    let o = &mut out.options;
    match setting {
        Setting::Image => out.image = Some((parse_image(&name(), value)?, source.origin())),
        Setting::Mounts => o.mounts = parse_mounts(&name(), text(&name(), value)?)?,
        Setting::Workdir => o.workdir = Some(parse_workdir(&name(), value)?),
        Setting::Env => o.env = parse_env_names(&name(), text(&name(), value)?)?,
        Setting::StageIn => o.stage_in = parse_stages(&name(), text(&name(), value)?, false)?,
        Setting::StageOut => o.stage_out = parse_stages(&name(), text(&name(), value)?, true)?,
        // Checked like any flag, then without effect: no entrypoint runs, so none logs.
        Setting::EntrypointLog => {
            source.flag(value)?;
        }
        Setting::Name => o.name = Some(parse_name(&name(), text(&name(), value)?)?),
        Setting::Save => o.save = Some(parse_save(&name(), value)?),
        Setting::Unshare => o.unshare = parse_unshare(&name(), text(&name(), value)?)?,
        Setting::MountHome | Setting::RemapRoot | Setting::Writable | Setting::Entrypoint => {
            let on = source.flag(value)?;
            // Slurm 23.11+ lets task_init change the task's command; older releases cannot.
            if setting == Setting::Entrypoint && on && !spank::CAN_PREPEND_TASK_ARGV {
                return Err(Error::EntrypointUnsupported { option: name() });
            }
            let slot = match setting {
                Setting::MountHome => &mut o.mount_home,
                Setting::RemapRoot => &mut o.remap_root,
                Setting::Writable => &mut o.writable,
                _ => &mut o.entrypoint,
            };
            *slot = Some(on);
        }
    }
    Ok(())
}

/// Checks what every value must be: present, not over-long, UTF-8, and free of control
/// characters (which no path, name or reference needs, and which would break the one-line-per
/// value form the request travels in, see [`ContainerRequest::to_transport`]).
pub fn text<'a>(name: &str, value: &'a [u8]) -> Result<&'a str, Error> {
    if value.is_empty() {
        return Err(Error::OptionEmpty {
            option: name.to_owned(),
        });
    }
    if value.len() > VALUE_MAX_BYTES {
        return Err(Error::OptionTooLong {
            option: name.to_owned(),
            len: value.len(),
        });
    }
    let text = std::str::from_utf8(value).map_err(|_| Error::OptionNotUtf8 {
        option: name.to_owned(),
    })?;
    if let Some((at, ch)) = text.char_indices().find(|(_, c)| c.is_control()) {
        return Err(bad_character(name, ch, at));
    }
    Ok(text)
}

fn bad_character(name: &str, ch: char, at: usize) -> Error {
    Error::OptionBadCharacter {
        option: name.to_owned(),
        what: describe(ch),
        at,
    }
}

/// Names an offending character so the user can find it even when it does not print.
fn describe(ch: char) -> String {
    match ch {
        ' ' => "a space".to_owned(),
        '\t' => "a tab".to_owned(),
        '\n' => "a newline".to_owned(),
        c => format!("the character U+{:04X}", u32::from(c)),
    }
}

/// Only the shape of an image is checked here; whether the reference parses, and whether
/// policy allows it, is the launcher's call.
pub fn parse_image(name: &str, value: &[u8]) -> Result<ImageChoice, Error> {
    let image = text(name, value)?;
    if let Some((at, ch)) = image.char_indices().find(|(_, c)| c.is_whitespace()) {
        return Err(bad_character(name, ch, at));
    }
    Ok(if image == HOST_IMAGE {
        ImageChoice::Host
    } else {
        ImageChoice::Image(image.to_owned())
    })
}

/// `SRC[:DST[:FLAGS]][,...]`, FLAGS joined by `+` as in pyxis; a missing DST is SRC.
pub fn parse_mounts(name: &str, value: &str) -> Result<Vec<Mount>, Error> {
    value
        .split(',')
        .map(|entry| parse_mount(name, entry))
        .collect()
}

fn parse_mount(name: &str, entry: &str) -> Result<Mount, Error> {
    let bad = |reason: String| Error::MountInvalid {
        option: name.to_owned(),
        entry: entry.to_owned(),
        reason,
    };
    let mut parts = entry.split(':');
    let src = parts.next().unwrap_or_default();
    let dst = parts.next().unwrap_or(src);
    let flags = parts.next();
    if parts.next().is_some() {
        return Err(bad(
            "it has more than SRC:DST:FLAGS; a path may not contain ':'".into(),
        ));
    }
    if src.is_empty() {
        return Err(bad(
            "the source is empty (a doubled or trailing ','?)".into()
        ));
    }
    if (src == TMPFS_SOURCE || src == UMOUNT_SOURCE) && dst == src {
        return Err(bad(format!(
            "a '{src}' source needs a destination: {src}:/PATH"
        )));
    }
    check_container_path(dst).map_err(|why| bad(format!("the destination '{dst}' {why}")))?;
    let mut access = None;
    let mut other = Vec::new();
    for flag in flags.map(|f| f.split('+')).into_iter().flatten() {
        let this = match flag {
            "ro" => Access::ReadOnly,
            "rw" => Access::ReadWrite,
            f if BIND_FLAGS.contains(&f) => {
                other.push(f.to_owned());
                continue;
            }
            f if src == TMPFS_SOURCE && is_tmpfs_option(f) => {
                other.push(f.to_owned());
                continue;
            }
            other => {
                return Err(bad(format!(
                    "the flag '{other}' is not supported; berth supports ro, rw, {}, and for \
                     a tmpfs {}",
                    BIND_FLAGS.join(", "),
                    TMPFS_OPTIONS.map(|o| format!("{o}=VALUE")).join(", ")
                )))
            }
        };
        if access.is_some_and(|a| a != this) {
            return Err(bad("it is both ro and rw; keep one".into()));
        }
        access = Some(this);
    }
    if src == UMOUNT_SOURCE && (access.is_some() || !other.is_empty()) {
        return Err(bad("an 'umount' entry takes no flags: umount:/PATH".into()));
    }
    Ok(Mount {
        src: src.to_owned(),
        dst: dst.to_owned(),
        access: access.unwrap_or(Access::ReadWrite),
        flags: other,
    })
}

/// A path inside the container must be absolute, must not climb with `..` (which could name
/// a host path once resolved against a symlink) and must not be the root itself.
fn check_container_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("is not absolute; paths inside the container start with '/'");
    }
    if path.split('/').any(|c| c == "..") {
        return Err("contains '..'; write the path without it");
    }
    if path.split('/').all(|c| c.is_empty() || c == ".") {
        return Err("is the container's root, which cannot be replaced by a mount");
    }
    Ok(())
}

/// `SRC[:DST][,...]` (stage-in: SRC a host path, DST where the copy appears, default SRC) or
/// `SRC:DST[,...]` (stage-out, `need_dst`: SRC a container path, DST a host path).
pub fn parse_stages(name: &str, value: &str, need_dst: bool) -> Result<Vec<Stage>, Error> {
    value
        .split(',')
        .map(|entry| {
            let bad = |reason: String| Error::StageInvalid {
                option: name.to_owned(),
                entry: entry.to_owned(),
                reason,
            };
            let (src, dst) = match entry.split_once(':') {
                Some((src, dst)) => (src, dst),
                None if need_dst => return Err(bad("it has no destination; write SRC:DST".into())),
                None => (entry, entry),
            };
            if dst.contains(':') {
                return Err(bad("a path may not contain ':'".into()));
            }
            let (host, container) = if need_dst { (dst, src) } else { (src, dst) };
            if !host.starts_with('/') {
                return Err(bad(format!(
                    "the host path '{host}' is relative; give an absolute path such as \
                     $PWD/{host}"
                )));
            }
            check_container_path(container)
                .map_err(|why| bad(format!("the container path '{container}' {why}")))?;
            Ok(Stage {
                src: src.to_owned(),
                dst: dst.to_owned(),
            })
        })
        .collect()
}

/// `NAME[:auto|create|exec|no_exec]`; NAME letters, digits, `.`, `_` and `-` (a directory
/// name on the node: the launcher checks it the same way).
pub fn parse_name(option: &str, value: &str) -> Result<Named, Error> {
    let bad = |reason: String| Error::NameInvalid {
        option: option.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let (name, mode) = match value.split_once(':') {
        Some((name, mode)) => {
            let mode = NameMode::ALL
                .iter()
                .find(|(_, s)| *s == mode)
                .map(|(m, _)| *m)
                .ok_or_else(|| {
                    bad(format!(
                        "unknown flag '{mode}'; use auto, create, exec or no_exec"
                    ))
                })?;
            (name, mode)
        }
        None => (value, NameMode::Auto),
    };
    let first_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !first_ok || !rest_ok || name.len() > 128 {
        return Err(bad(
            "a name is up to 128 letters, digits, '.', '_' and '-', starting with a letter, \
             a digit or '_'"
                .into(),
        ));
    }
    Ok(Named {
        name: name.to_owned(),
        mode,
    })
}

/// `net,ipc,uts` (any of them, any order).
pub fn parse_unshare(option: &str, value: &str) -> Result<Vec<String>, Error> {
    if let Some(unknown) = value.split(',').find(|k| !UNSHARE_KINDS.contains(k)) {
        return Err(Error::UnshareInvalid {
            option: option.to_owned(),
            kind: unknown.to_owned(),
        });
    }
    Ok(UNSHARE_KINDS
        .iter()
        .filter(|k| value.split(',').any(|v| v == **k))
        .map(|k| (*k).to_owned())
        .collect())
}

/// `--container-save=PATH`: an absolute path on the node (relative to what would be unclear
/// there), no `..`.
pub fn parse_save(option: &str, value: &[u8]) -> Result<String, Error> {
    let path = text(option, value)?;
    let reason = if !path.starts_with('/') {
        "is not absolute"
    } else if path.split('/').any(|c| c == "..") {
        "contains '..'"
    } else if path.ends_with('/') {
        "names a directory, not a file"
    } else {
        return Ok(path.to_owned());
    };
    Err(Error::SaveInvalid {
        option: option.to_owned(),
        value: path.to_owned(),
        reason: reason.to_owned(),
    })
}

/// An absolute path as given (the launcher resolves it inside the container's root); a
/// relative one is below the container's `/`, as in pyxis, with `..` stopping at `/`.
pub fn parse_workdir(name: &str, value: &[u8]) -> Result<String, Error> {
    let path = text(name, value)?;
    if path.starts_with('/') {
        return Ok(path.to_owned());
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// `NAME[,...]`, each a shell identifier: anything else cannot be a variable the container's
/// shell could read.
pub fn parse_env_names(name: &str, value: &str) -> Result<Vec<String>, Error> {
    value
        .split(',')
        .map(|var| {
            let mut chars = var.chars();
            let valid = chars
                .next()
                .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
                && chars.all(|c| c == '_' || c.is_ascii_alphanumeric());
            if valid {
                Ok(var.to_owned())
            } else {
                Err(Error::EnvNameInvalid {
                    option: name.to_owned(),
                    var: var.to_owned(),
                })
            }
        })
        .collect()
}

fn parse_bool(var: &str, value: &[u8]) -> Result<bool, Error> {
    match value.to_ascii_lowercase().as_slice() {
        b"1" | b"true" | b"yes" => Ok(true),
        b"0" | b"false" | b"no" => Ok(false),
        _ => Err(Error::BoolInvalid {
            var: var.to_owned(),
            value: String::from_utf8_lossy(value).into_owned(),
        }),
    }
}

impl ContainerRequest {
    /// The request as the node reads it back: one `option[=value]` line per setting, in the
    /// options' own syntax, so the node re-parses it with the same rules (it trusts nothing
    /// from the login node) and a human reading the job's environment understands it.
    pub fn to_transport(&self) -> String {
        let (image, options) = match self {
            ContainerRequest::None => return String::new(),
            ContainerRequest::Host => return format!("{}={HOST_IMAGE}", Opt::Image.name()),
            ContainerRequest::Container { image, options } => (Some(image), options),
            ContainerRequest::Named { options } => (None, options),
        };
        let mut lines: Vec<String> = image
            .iter()
            .map(|image| format!("{}={image}", Opt::Image.name()))
            .collect();
        if !options.mounts.is_empty() {
            let mounts: Vec<String> = options.mounts.iter().map(Mount::to_spec).collect();
            lines.push(format!("{}={}", Opt::Mounts.name(), mounts.join(",")));
        }
        if let Some(workdir) = &options.workdir {
            lines.push(format!("{}={workdir}", Opt::Workdir.name()));
        }
        if !options.env.is_empty() {
            lines.push(format!("{}={}", Opt::Env.name(), options.env.join(",")));
        }
        if !options.unshare.is_empty() {
            lines.push(format!(
                "{}={}",
                Opt::Unshare.name(),
                options.unshare.join(",")
            ));
        }
        if let Some(save) = &options.save {
            lines.push(format!("{}={save}", Opt::Save.name()));
        }
        if let Some(named) = &options.name {
            lines.push(format!(
                "{}={}:{}",
                Opt::Name.name(),
                named.name,
                named.mode.as_str()
            ));
        }
        for (opt, stages) in [
            (Opt::StageIn, &options.stage_in),
            (Opt::StageOut, &options.stage_out),
        ] {
            if !stages.is_empty() {
                let list: Vec<String> = stages
                    .iter()
                    .map(|s| format!("{}:{}", s.src, s.dst))
                    .collect();
                lines.push(format!("{}={}", opt.name(), list.join(",")));
            }
        }
        let flags = [
            (options.mount_home, Opt::MountHome, Opt::NoMountHome),
            (options.remap_root, Opt::RemapRoot, Opt::NoRemapRoot),
            (options.writable, Opt::Writable, Opt::Readonly),
            (options.entrypoint, Opt::Entrypoint, Opt::NoEntrypoint),
        ];
        for (value, on, off) in flags {
            if let Some(value) = value {
                lines.push(if value { on } else { off }.name().to_owned());
            }
        }
        lines.join("\n")
    }

    /// Reads [`to_transport`](Self::to_transport)'s form back, with every value checked again.
    pub fn from_transport(text: &[u8]) -> Result<ContainerRequest, Error> {
        let mut given = Vec::new();
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let (name, value) = match line.iter().position(|&b| b == b'=') {
                Some(at) => (&line[..at], line[at + 1..].to_vec()),
                None => (line, Vec::new()),
            };
            let opt = std::str::from_utf8(name)
                .ok()
                .and_then(Opt::from_name)
                .ok_or_else(|| Error::TransportInvalid {
                    line: String::from_utf8_lossy(line).into_owned(),
                })?;
            given.push(Given {
                opt,
                value,
                origin: Origin::CommandLine,
            });
        }
        let settings = settings(&given, None)?;
        // The submitting side made relative sources absolute; the node has no cwd to
        // resolve one against.
        if let Some(m) = settings
            .options
            .mounts
            .iter()
            .find(|m| m.is_host_path() && !m.src.starts_with('/'))
        {
            return Err(Error::TransportInvalid {
                line: format!("{}={}", Opt::Mounts.name(), m.to_spec()),
            });
        }
        Ok(match settings.image {
            None if settings.options.name.is_some() => ContainerRequest::Named {
                options: settings.options,
            },
            None => ContainerRequest::None,
            Some((ImageChoice::Host, _)) => ContainerRequest::Host,
            Some((ImageChoice::Image(image), _)) => ContainerRequest::Container {
                image,
                options: settings.options,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLI: Origin = Origin::CommandLine;

    fn given(opt: Opt, value: &str, origin: Origin) -> Given {
        Given {
            opt,
            value: value.as_bytes().to_vec(),
            origin,
        }
    }

    fn from(list: &[(Opt, &str)]) -> Result<Settings, Error> {
        let given: Vec<Given> = list.iter().map(|(o, v)| given(*o, v, CLI)).collect();
        settings(&given, None)
    }

    fn no_env(_: &str) -> Option<Vec<u8>> {
        None
    }

    #[test]
    fn table_fits_slurm_and_is_consistent() {
        for (at, spec) in SPECS.iter().enumerate() {
            // Slurm ignores options whose name is longer than SPANK_OPTION_MAXLEN (75).
            assert!(spec.name.to_bytes().len() <= 75);
            assert!(spec.usage.to_bytes().starts_with(b"[berth] "), "{spec:?}");
            assert_eq!(spec.opt.index(), at);
            assert_eq!(Opt::from_index(at), Some(spec.opt));
            assert_eq!(Opt::from_name(spec.opt.name()), Some(spec.opt));
            // Flags are exactly the options that set a flag setting.
            assert_eq!(spec.arginfo.is_none(), spec.opt.setting().1.is_some());
        }
        assert_eq!(Opt::from_index(SPECS.len()), None);
        // Each setting is reachable from an option, and each has its own variable.
        for setting in Setting::ALL {
            assert!(SPECS.iter().any(|s| s.opt.setting().0 == setting));
            assert!(setting.env_var().starts_with("BERTH_CONTAINER_"));
        }
    }

    #[test]
    fn slurm_env_names_match_spank_c() {
        assert_eq!(
            Opt::Image.slurm_env_name(),
            "_SLURM_SPANK_OPTION_berth_container_image"
        );
        assert_eq!(
            Opt::NoMountHome.slurm_env_name(),
            "_SLURM_SPANK_OPTION_berth_no_container_mount_home"
        );
    }

    #[test]
    fn text_rules() {
        let long = "a".repeat(VALUE_MAX_BYTES + 1);
        let cases: [(&[u8], Result<&str, Error>); 6] = [
            (b"/ok path", Ok("/ok path")),
            (
                b"",
                Err(Error::OptionEmpty {
                    option: "--x".into(),
                }),
            ),
            (
                long.as_bytes(),
                Err(Error::OptionTooLong {
                    option: "--x".into(),
                    len: VALUE_MAX_BYTES + 1,
                }),
            ),
            (
                b"a\xff",
                Err(Error::OptionNotUtf8 {
                    option: "--x".into(),
                }),
            ),
            (b"a\nb", Err(bad_character("--x", '\n', 1))),
            (b"\x7fa", Err(bad_character("--x", '\u{7f}', 0))),
        ];
        for (value, want) in cases {
            assert_eq!(text("--x", value), want, "{value:?}");
        }
        assert!(text("--x", "a".repeat(VALUE_MAX_BYTES).as_bytes()).is_ok());
    }

    #[test]
    fn images() {
        let ok = [
            "busybox",
            "registry.example.com:5000/team/app:1.0",
            "nvcr.io#nvidia/pytorch:24.01-py3",
            "docker://ubuntu@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ];
        for image in ok {
            assert_eq!(
                parse_image("--container-image", image.as_bytes()),
                Ok(ImageChoice::Image(image.into()))
            );
        }
        assert_eq!(parse_image("i", b"none"), Ok(ImageChoice::Host));
        assert_eq!(parse_image("i", b"app 1"), Err(bad_character("i", ' ', 3)));
        assert_eq!(
            parse_image("i", "app\u{a0}".as_bytes()), // no-break space, pasted from a web page
            Err(bad_character("i", '\u{a0}', 3))
        );
    }

    #[test]
    fn mounts_accepted_in_every_pyxis_form() {
        let m = |src: &str, dst: &str, access, flags: &[&str]| Mount {
            src: src.into(),
            dst: dst.into(),
            access,
            flags: flags.iter().map(|f| f.to_string()).collect(),
        };
        let rw = Access::ReadWrite;
        let cases: [(&str, Vec<Mount>); 10] = [
            ("/data", vec![m("/data", "/data", rw, &[])]),
            ("/data:/in", vec![m("/data", "/in", rw, &[])]),
            (
                "/data:/in:ro",
                vec![m("/data", "/in", Access::ReadOnly, &[])],
            ),
            ("/a b:/c d:rw+rw", vec![m("/a b", "/c d", rw, &[])]),
            (
                "/a:/a:ro,/b:/x",
                vec![m("/a", "/a", Access::ReadOnly, &[]), m("/b", "/x", rw, &[])],
            ),
            (
                "/t:/m:unbindable+ro+nosuid+rprivate",
                vec![m(
                    "/t",
                    "/m",
                    Access::ReadOnly,
                    &["unbindable", "nosuid", "rprivate"],
                )],
            ),
            (
                "/f:/g:bind+x-create=file",
                vec![m("/f", "/g", rw, &["bind", "x-create=file"])],
            ),
            // Relative sources: the submitting side makes them absolute.
            ("./:/test-mnt", vec![m("./", "/test-mnt", rw, &[])]),
            (
                "tmpfs:/scratch:huge=within_size+size=1G+ro",
                vec![m(
                    "tmpfs",
                    "/scratch",
                    Access::ReadOnly,
                    &["huge=within_size", "size=1G"],
                )],
            ),
            ("umount:/root", vec![m("umount", "/root", rw, &[])]),
        ];
        for (value, want) in cases {
            assert_eq!(
                parse_mounts("--container-mounts", value),
                Ok(want),
                "{value}"
            );
        }
    }

    #[test]
    fn mounts_travel_in_their_own_syntax_and_relative_sources_become_absolute() {
        let mut mounts = parse_mounts(
            "m",
            "./d/./e:/in:unbindable,tmpfs:/t:size=1M,../up:/u,umount:/r",
        )
        .unwrap();
        absolute_sources(&mut mounts, std::path::Path::new("/job/dir"));
        let specs: Vec<String> = mounts.iter().map(Mount::to_spec).collect();
        assert_eq!(
            specs,
            [
                "/job/dir/d/e:/in:rw+unbindable",
                "tmpfs:/t:rw+size=1M",
                "/job/dir/../up:/u:rw",
                "umount:/r"
            ]
        );
        for spec in &specs {
            assert_eq!(parse_mounts("m", spec).unwrap().len(), 1, "{spec}");
        }
    }

    #[test]
    fn mounts_refused_with_the_reason() {
        let cases = [
            ("/a,", "the source is empty"),
            ("tmpfs", "needs a destination: tmpfs:/PATH"),
            ("umount:/etc/x:ro", "takes no flags"),
            ("/a:b", "the destination 'b' is not absolute"),
            ("/a:/x/../etc", "contains '..'"),
            ("/a:/", "is the container's root"),
            ("/a:/./", "is the container's root"),
            (
                "/a:/b:rbind+suid",
                "the flag 'suid' is not supported; berth supports ro, rw, bind, rbind",
            ),
            ("/a:/b:ro+bogus", "the flag 'bogus' is not supported"),
            // tmpfs options only for a tmpfs, and only plain values.
            ("/a:/b:size=1G", "the flag 'size=1G' is not supported"),
            (
                "tmpfs:/b:size=1G,uid=0",
                "the destination 'uid=0' is not absolute",
            ),
            ("tmpfs:/b:mode=1777=x", "the flag 'mode=1777=x'"),
            ("/a:/b:ro+rw", "both ro and rw"),
            ("/a:/b:ro:x", "more than SRC:DST:FLAGS"),
            ("/a::ro", "the destination '' is not absolute"),
        ];
        for (value, reason) in cases {
            let err = parse_mounts("--container-mounts", value).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, Error::MountInvalid { .. }),
                "{value}: {err:?}"
            );
            assert!(msg.contains(reason), "{value}: {msg}");
            assert!(msg.starts_with("--container-mounts"), "{msg}");
        }
    }

    #[test]
    fn stages_parsed_and_refused_with_the_reason() {
        let st = |src: &str, dst: &str| Stage {
            src: src.into(),
            dst: dst.into(),
        };
        assert_eq!(
            parse_stages("i", "/d,/e:/in", false),
            Ok(vec![st("/d", "/d"), st("/e", "/in")])
        );
        assert_eq!(
            parse_stages("o", "/out/r:/home/u/r", true),
            Ok(vec![st("/out/r", "/home/u/r")])
        );
        let cases = [
            ("d:/x", false, "is relative"),
            ("/d:x", false, "is not absolute"),
            ("/d:/", false, "container's root"),
            ("/out/r", true, "no destination"),
            ("/out/r:rel", true, "is relative"),
            ("/a:/b:/c", false, "may not contain ':'"),
        ];
        for (value, out, reason) in cases {
            let msg = parse_stages("--container-stage-in", value, out)
                .unwrap_err()
                .to_string();
            assert!(msg.contains(reason), "{value}: {msg}");
        }
    }

    #[test]
    fn workdir_and_env_names() {
        assert_eq!(parse_workdir("w", b"/work dir"), Ok("/work dir".into()));
        for (relative, inside) in [("work", "/work"), ("../", "/"), ("a/../../b/./c", "/b/c")] {
            assert_eq!(parse_workdir("w", relative.as_bytes()), Ok(inside.into()));
        }
        assert_eq!(
            parse_env_names("e", "PATH,_X,a1"),
            Ok(vec!["PATH".into(), "_X".into(), "a1".into()])
        );
        for bad in ["1A", "A-B", "A,", "A=B", ",A", "É"] {
            let err = parse_env_names("e", bad).unwrap_err();
            assert!(matches!(err, Error::EnvNameInvalid { .. }), "{bad}");
        }
    }

    #[test]
    fn flags_pair_up_and_the_last_wins() {
        let s = from(&[
            (Opt::MountHome, ""),
            (Opt::NoMountHome, ""),
            (Opt::NoRemapRoot, ""),
            (Opt::RemapRoot, ""),
            (Opt::Readonly, ""),
            (Opt::NoEntrypoint, ""),
        ])
        .unwrap();
        assert_eq!(s.options.mount_home, Some(false));
        assert_eq!(s.options.remap_root, Some(true));
        assert_eq!(s.options.writable, Some(false));
        assert_eq!(s.options.entrypoint, Some(false));
        assert_eq!(from(&[]).unwrap(), Settings::default());
    }

    #[test]
    fn running_the_entrypoint_is_refused_with_the_way_around() {
        if spank::CAN_PREPEND_TASK_ARGV {
            // Built for Slurm 23.11+: task_init prepends the entrypoint (container.rs).
            let s = from(&[(Opt::NoEntrypoint, ""), (Opt::Entrypoint, "")]).unwrap();
            assert_eq!(s.options.entrypoint, Some(true));
            return;
        }
        for given in [
            from(&[(Opt::Entrypoint, "")]),
            from(&[(Opt::NoEntrypoint, ""), (Opt::Entrypoint, "")]),
        ] {
            let err = given.unwrap_err();
            assert!(
                matches!(&err, Error::EntrypointUnsupported { option } if option == "--container-entrypoint"),
                "{err:?}"
            );
            assert!(
                err.to_string().contains("in front of your command"),
                "{err}"
            );
        }
    }

    #[test]
    fn entrypoint_log_is_accepted_and_checked() {
        assert_eq!(
            from(&[(Opt::EntrypointLog, ""), (Opt::NoEntrypoint, "")])
                .unwrap()
                .options,
            ContainerOptions {
                entrypoint: Some(false),
                ..ContainerOptions::default()
            }
        );
        let env = |var: &str| (var == "PYXIS_CONTAINER_ENTRYPOINT_LOG").then(|| b"x".to_vec());
        assert!(matches!(
            settings(&[], Some(&env)),
            Err(Error::BoolInvalid { .. })
        ));
    }

    #[test]
    fn writable_with_readonly_is_refused_only_on_one_command_line() {
        assert_eq!(
            from(&[(Opt::Writable, ""), (Opt::Readonly, "")]),
            Err(Error::WritableAndReadonly)
        );
        // A step inside a job submitted --container-writable may ask for --container-readonly.
        let s = settings(
            &[
                given(Opt::Writable, "", Origin::Inherited),
                given(Opt::Readonly, "", CLI),
            ],
            None,
        )
        .unwrap();
        assert_eq!(s.options.writable, Some(false));
    }

    #[test]
    fn command_line_beats_inherited_beats_environment() {
        let env = |var: &str| match var {
            "BERTH_CONTAINER_IMAGE" => Some(b"env/img".to_vec()),
            "BERTH_CONTAINER_WORKDIR" => Some(b"/env".to_vec()),
            "BERTH_CONTAINER_MOUNTS" => Some(b"/e:/e".to_vec()),
            "BERTH_CONTAINER_WRITABLE" => Some(b"0".to_vec()),
            _ => None,
        };
        let given = [
            given(Opt::Image, "cli/img", CLI),
            given(Opt::Image, "job/img", Origin::Inherited), // arrival order does not matter
            given(Opt::Workdir, "/job", Origin::Inherited),
            given(Opt::MountHome, "", Origin::Inherited),
            given(Opt::NoMountHome, "", CLI),
        ];
        let s = settings(&given, Some(&env)).unwrap();
        assert_eq!(s.image, Some((ImageChoice::Image("cli/img".into()), CLI)));
        assert_eq!(s.options.workdir.as_deref(), Some("/job"));
        assert_eq!(s.options.mounts[0].src, "/e");
        assert_eq!(s.options.writable, Some(false));
        assert_eq!(s.options.mount_home, Some(false));
        assert_eq!(s.options_origin, Some(CLI));
    }

    #[test]
    fn environment_values_are_checked_and_named() {
        let env = |var: &str| match var {
            "BERTH_CONTAINER_MOUNTS" => Some(b"/a:rel".to_vec()),
            _ => None,
        };
        let msg = settings(&[], Some(&env)).unwrap_err().to_string();
        assert!(msg.starts_with("BERTH_CONTAINER_MOUNTS"), "{msg}");
        for (value, want) in [("YES", Ok(true)), ("0", Ok(false)), ("no", Ok(false))] {
            assert_eq!(parse_bool("V", value.as_bytes()), want);
        }
        let env = |var: &str| (var == "BERTH_CONTAINER_REMAP_ROOT").then(|| b"maybe".to_vec());
        assert_eq!(
            settings(&[], Some(&env)),
            Err(Error::BoolInvalid {
                var: "BERTH_CONTAINER_REMAP_ROOT".into(),
                value: "maybe".into()
            })
        );
        assert_eq!(settings(&[], Some(&no_env)), Ok(Settings::default()));
    }

    #[test]
    fn options_origin_tracks_the_strongest_non_image_setting() {
        let s = from(&[(Opt::Image, "a")]).unwrap();
        assert_eq!(s.options_origin, None);
        let s = settings(&[given(Opt::Env, "A", Origin::Inherited)], None).unwrap();
        assert_eq!(s.options_origin, Some(Origin::Inherited));
    }

    #[test]
    fn transport_round_trips() {
        let full = ContainerRequest::Container {
            image: "localhost:5000/a@sha256:00".into(),
            options: ContainerOptions {
                mounts: vec![
                    Mount {
                        src: "/d a".into(),
                        dst: "/in".into(),
                        access: Access::ReadOnly,
                        flags: vec!["rprivate".into(), "noexec".into()],
                    },
                    Mount {
                        src: "tmpfs".into(),
                        dst: "/s".into(),
                        access: Access::ReadWrite,
                        flags: vec!["size=1G".into()],
                    },
                ],
                workdir: Some("/w".into()),
                env: vec!["A".into(), "B_2".into()],
                mount_home: Some(false),
                remap_root: Some(true),
                writable: Some(false),
                entrypoint: None,
                stage_in: vec![Stage {
                    src: "/shared/in".into(),
                    dst: "/in".into(),
                }],
                stage_out: vec![Stage {
                    src: "/out/r".into(),
                    dst: "/shared/r".into(),
                }],
                name: Some(Named {
                    name: "env".into(),
                    mode: NameMode::NoExec,
                }),
                save: Some("/scratch/u/saved.sif".into()),
                unshare: vec!["net".into(), "uts".into()],
            },
        };
        for request in [
            full,
            ContainerRequest::Host,
            ContainerRequest::None,
            ContainerRequest::Named {
                options: ContainerOptions {
                    name: Some(Named {
                        name: "env".into(),
                        mode: NameMode::Auto,
                    }),
                    ..ContainerOptions::default()
                },
            },
            ContainerRequest::Container {
                image: "x".into(),
                options: ContainerOptions::default(),
            },
        ] {
            let text = request.to_transport();
            assert_eq!(
                ContainerRequest::from_transport(text.as_bytes()),
                Ok(request),
                "{text}"
            );
        }
    }

    #[test]
    fn pyxis_variables_set_every_setting_and_berth_and_the_command_line_win() {
        let env = |var: &str| match var {
            "PYXIS_CONTAINER_IMAGE" => Some(b"pyxis/img".to_vec()),
            "PYXIS_CONTAINER_WORKDIR" => Some(b"/pyxis".to_vec()),
            "BERTH_CONTAINER_WORKDIR" => Some(b"/berth".to_vec()),
            "PYXIS_CONTAINER_MOUNT_HOME" => Some(b"0".to_vec()),
            "PYXIS_CONTAINER_REMAP_ROOT" => Some(b"1".to_vec()),
            "PYXIS_CONTAINER_READONLY" => Some(b"1".to_vec()),
            "PYXIS_CONTAINER_ENV" => Some(b"".to_vec()), // empty: unset for this command
            _ => None,
        };
        let s = settings(&[], Some(&env)).unwrap();
        assert_eq!(
            s.image,
            Some((ImageChoice::Image("pyxis/img".into()), Origin::Environment))
        );
        assert_eq!(s.options.workdir.as_deref(), Some("/berth"));
        assert_eq!(s.options.mount_home, Some(false));
        assert_eq!(s.options.remap_root, Some(true));
        assert_eq!(s.options.writable, Some(false));
        assert!(s.options.env.is_empty());
        let s = settings(&[given(Opt::Writable, "", CLI)], Some(&env)).unwrap();
        assert_eq!(s.options.writable, Some(true));
        // Both of pyxis's set: READONLY wins, as in pyxis (a site's WRITABLE=1 default).
        let both = |var: &str| match var {
            "PYXIS_CONTAINER_WRITABLE" | "PYXIS_CONTAINER_READONLY" => Some(b"1".to_vec()),
            _ => None,
        };
        let s = settings(&[], Some(&both)).unwrap();
        assert_eq!(s.options.writable, Some(false));
        // A bad value is named by the variable it came from.
        let env = |var: &str| (var == "PYXIS_CONTAINER_WRITABLE").then(|| b"perhaps".to_vec());
        assert_eq!(
            settings(&[], Some(&env)),
            Err(Error::BoolInvalid {
                var: "PYXIS_CONTAINER_WRITABLE".into(),
                value: "perhaps".into()
            })
        );
        let env = |var: &str| (var == "PYXIS_CONTAINER_MOUNTS").then(|| b"/a:rel".to_vec());
        let msg = settings(&[], Some(&env)).unwrap_err().to_string();
        assert!(msg.starts_with("PYXIS_CONTAINER_MOUNTS"), "{msg}");
    }

    #[test]
    fn every_setting_reads_its_pyxis_variable() {
        for setting in Setting::ALL {
            let names: Vec<String> = setting
                .env_vars()
                .into_iter()
                .filter(|v| !v.inverted)
                .map(|v| v.name)
                .collect();
            let pyxis = setting.env_var().replacen("BERTH_", "PYXIS_", 1);
            assert_eq!(names, [setting.env_var().to_owned(), pyxis]);
        }
        let names: Vec<(String, bool)> = Setting::Writable
            .env_vars()
            .into_iter()
            .map(|v| (v.name, v.inverted))
            .collect();
        let var = |name: &str, inverted| (name.to_owned(), inverted);
        assert_eq!(
            names,
            [
                var("BERTH_CONTAINER_READONLY", true),
                var("BERTH_CONTAINER_WRITABLE", false),
                var("PYXIS_CONTAINER_READONLY", true),
                var("PYXIS_CONTAINER_WRITABLE", false),
            ]
        );
    }

    #[test]
    fn container_names_take_pyxis_flags() {
        let parse = |v: &str| parse_name("--container-name", v);
        assert_eq!(
            parse("my-env.1"),
            Ok(Named {
                name: "my-env.1".into(),
                mode: NameMode::Auto
            })
        );
        for (mode, flag) in NameMode::ALL {
            assert_eq!(parse(&format!("n:{flag}")).unwrap().mode, mode);
        }
        let err = parse("n:sometimes").unwrap_err().to_string();
        assert!(err.contains("auto, create, exec or no_exec"), "{err}");
        for bad in ["", ":exec", "../x", "a/b", "-a", ".a", "a b"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse(&"a".repeat(129)).is_err());
        // Set from the environment like every other option.
        let env = |var: &str| (var == "BERTH_CONTAINER_NAME").then(|| b"env:exec".to_vec());
        let s = settings(&[], Some(&env)).unwrap();
        assert_eq!(s.options.name.unwrap().mode, NameMode::Exec);
    }

    #[test]
    fn unshare_takes_pyxis_namespace_names() {
        assert_eq!(
            parse_unshare("--container-unshare", "uts,net"),
            Ok(vec!["net".into(), "uts".into()])
        );
        let err = parse_unshare("--container-unshare", "net,foo").unwrap_err();
        assert!(err.to_string().contains("unknown namespace 'foo'"), "{err}");
        let env = |var: &str| (var == "PYXIS_CONTAINER_UNSHARE").then(|| b"net".to_vec());
        assert_eq!(
            settings(&[], Some(&env)).unwrap().options.unshare,
            ["net".to_owned()]
        );
    }

    #[test]
    fn a_save_path_is_absolute() {
        assert_eq!(
            parse_save("--container-save", b"/scratch/a.sif"),
            Ok("/scratch/a.sif".into())
        );
        for bad in ["a.sif", "/x/../y", "/"] {
            let err = parse_save("--container-save", bad.as_bytes()).unwrap_err();
            assert!(matches!(err, Error::SaveInvalid { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn transport_is_checked_again() {
        assert_eq!(
            ContainerRequest::from_transport(b"container-image=x\nbogus=1"),
            Err(Error::TransportInvalid {
                line: "bogus=1".into()
            })
        );
        let err = ContainerRequest::from_transport(b"container-image=x\ncontainer-mounts=/a:rel")
            .unwrap_err();
        assert!(matches!(err, Error::MountInvalid { .. }), "{err:?}");
        // The node has no working directory to resolve a relative source against.
        let err = ContainerRequest::from_transport(b"container-image=x\ncontainer-mounts=rel:/a")
            .unwrap_err();
        assert!(matches!(err, Error::TransportInvalid { .. }), "{err:?}");
    }
}
