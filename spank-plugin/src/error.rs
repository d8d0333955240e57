//! The plugin's one error type. Every message is printed by Slurm after a "berth: " prefix
//! (see `spank::log_error`) into a place the reader can act on: srun/sbatch's stderr on the
//! login node, the task's stderr (srun output or the batch output file) on the node, or the
//! slurmd log for the admin. So each says what went wrong and what to do about it.

use crate::options::{HOST_IMAGE, VALUE_MAX_BYTES};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "{option} needs a value: e.g. --container-image=registry.example.com/team/app:1.0, \
         --container-mounts=/data:/data:ro (see srun --help)"
    )]
    OptionEmpty { option: String },

    #[error("{option} is {len} bytes long, more than the {VALUE_MAX_BYTES} allowed: shorten it")]
    OptionTooLong { option: String, len: usize },

    #[error(
        "{option}: berth runs an image's entrypoint in Slurm tasks only on Slurm 23.11 and \
         later (this node's Slurm cannot let a SPANK plugin change the task's command); put \
         the entrypoint in front of your command instead, e.g. \
         `srun --container-image=IMAGE /entrypoint.sh CMD`"
    )]
    EntrypointUnsupported { option: String },

    #[error(
        "the site's TaskProlog {path} failed on the node ({detail}); ask your admins (it runs \
         for every task)"
    )]
    TaskPrologFailed { path: String, detail: String },

    #[error(
        "{option}: unknown namespace '{kind}': give any of net, ipc, uts (e.g. \
         --container-unshare=net,ipc)"
    )]
    UnshareInvalid { option: String, kind: String },

    #[error(
        "container '{name}' is running without a namespace of its own for {kind}, so \
         --container-unshare={kind} cannot hold in it (it is not in a separate {what} \
         namespace): drop the option, or start another container"
    )]
    UnshareMismatch {
        name: String,
        kind: String,
        what: &'static str,
    },

    #[error(
        "{option}={value}: the path {reason}; write e.g. --container-save=/scratch/$USER/saved.sif"
    )]
    SaveInvalid {
        option: String,
        value: String,
        reason: String,
    },

    #[error(
        "could not save the container to {path} ({detail}); check that the directory exists \
         on the node and that you can write there"
    )]
    SaveFailed { path: String, detail: String },

    #[error("{option}={value} is invalid: {reason}")]
    NameInvalid {
        option: String,
        value: String,
        reason: String,
    },

    #[error(
        "--container={bundle} and berth's --container-image both ask for a container, but on \
         this cluster --container is Slurm's own OCI support ({oci_conf} is configured): use \
         --container-image=IMAGE for berth's containers, or --container alone for Slurm's"
    )]
    TwoContainerKinds { bundle: String, oci_conf: String },

    #[error("{option} is not valid UTF-8: type the value again as plain text")]
    OptionNotUtf8 { option: String },

    #[error(
        "{option} contains {what} at byte {at}: remove it (or quote the shell variable that \
         produced it)"
    )]
    OptionBadCharacter {
        option: String,
        what: String,
        at: usize,
    },

    #[error("{option}: '{entry}' is refused: {reason}")]
    MountInvalid {
        option: String,
        entry: String,
        reason: String,
    },

    #[error(
        "{option}: '{var}' is not a variable name: use letters, digits and '_', not starting \
         with a digit, separated by ','"
    )]
    EnvNameInvalid { option: String, var: String },

    #[error("{var}={value} is not a yes/no value: set it to 1 or 0 (or true/false, yes/no)")]
    BoolInvalid { var: String, value: String },

    #[error(
        "--container-writable and --container-readonly were both given: keep the one you mean"
    )]
    WritableAndReadonly,

    #[error(
        "{option} was given but no container image: add --container-image=IMAGE (or \
         --container=IMAGE), or drop the container options to run on the host"
    )]
    OptionsWithoutImage { option: String },

    #[error(
        "the container request passed from the login node has an unknown line '{line}': the \
         login node's and the compute node's berth plugins differ; ask your admins to install \
         the same version on both"
    )]
    TransportInvalid { line: String },

    #[error("image '{image}' is not allowed on this cluster: {reason}")]
    PolicyDenied { image: String, reason: String },

    #[error(
        "could not open the local image {path} ({reason}): the site allows it, but this job's \
         user cannot read it; ask your admins to make it readable"
    )]
    LocalImageUnreadable { path: String, reason: String },

    #[error(
        "{}, but steps must run in a container{}: {reason}; give an image with \
         --container-image=IMAGE",
        if *asked_for_host {
            format!("--container-image={HOST_IMAGE} asks for the host")
        } else {
            "no container image was given".to_owned()
        },
        partition.as_ref().map(|p| format!(" in partition {p}")).unwrap_or_default()
    )]
    ContainerRequired {
        asked_for_host: bool,
        partition: Option<String>,
        reason: String,
    },

    #[error(
        "could not pin image '{image}' to a digest from the login node: {detail}; a job whose \
         tag cannot be pinned could run different images on different nodes, so it is not \
         submitted. Check that the registry is reachable from here, or give the image by \
         digest (IMAGE@sha256:...)"
    )]
    ResolveFailed { image: String, detail: String },

    #[error(
        "image '{image}' names a tag that was not pinned to a digest for job {job}{cause}: \
         every step of a job runs the same image, so a step does not resolve a tag on its \
         own. Fix: name the image by digest (IMAGE@sha256:..., which `berth resolve IMAGE` \
         prints where you have access), log in to the registry yourself (`podman login`) \
         where the site uses users' credentials, or ask the site admins to run \
         `berth pin-job` as PrologSlurmctld with `[registry] controller_pin = true`"
    )]
    NotPinned {
        image: String,
        job: u32,
        /// Why the tag cannot be resolved here either, where that is the real problem.
        cause: String,
    },

    #[error(
        "`{command}` failed ({status}){}: the berth launcher did not answer as this plugin \
         expects; ask your admins to check that the launcher and spank_berth.so are the same \
         version",
        if stderr.is_empty() { String::new() } else { format!(": {stderr}") }
    )]
    LauncherFailed {
        command: String,
        status: String,
        stderr: String,
    },

    #[error(
        "node misconfigured: berth's site configuration on this node is invalid, so no \
         container can be checked or run here and the job was refused ({detail}); this is not \
         a problem with your job: tell your admins (`berth config check` on the node shows the \
         fix)"
    )]
    NodeMisconfigured { detail: String },

    #[error(
        "could not run the berth launcher {path} ({reason}): ask your admins to install berth \
         on this node or to fix berth= in plugstack.conf"
    )]
    LauncherNotRunnable { path: String, reason: String },

    #[error(
        "`{command}` did not finish within {seconds} s and was stopped: the registry or the \
         node may be overloaded; try again later"
    )]
    LauncherTimedOut { command: String, seconds: u64 },

    #[error(
        "job {job} ended ({state}) while its container was being prepared on this node, so \
         berth stopped preparing it"
    )]
    JobEnded { job: u32, state: String },

    #[error(
        "could not fetch image '{image}' onto this compute node ({detail}): check the \
         reference and the tag or digest (`berth resolve IMAGE` on a login node), and that the \
         registry is reachable from the compute nodes"
    )]
    FetchFailed { image: String, detail: String },

    #[error("{option}: '{entry}' is not a valid stage: {reason}")]
    StageInvalid {
        option: String,
        entry: String,
        reason: String,
    },

    #[error(
        "could not stage data for the step: {detail}; check the --container-stage-in and \
         --container-stage-out paths, or run `berth stage` by hand on the node to see more"
    )]
    StageFailed { detail: String },

    #[error(
        "could not start the container: `{command}` failed ({detail}); check the \
         --container-mounts sources and destinations and --container-workdir, or run the same \
         `berth start` by hand on the node to see more"
    )]
    StartFailed { command: String, detail: String },

    #[error(
        "could not enter the step's container ({detail}); the container may have ended \
         early (scancel, out of memory): run the step again, and ask your admins if it \
         persists"
    )]
    JoinFailed { detail: String },

    #[error(
        "this MPI step's PMIx server directory {path} cannot be given to the container: \
         {reason}. The node's Slurm made it, not the job: ask your admins (docs/MPI.md, \
         'PMIx'); a step without --mpi=pmix does not need it"
    )]
    PmixServerDir { path: String, reason: String },

    #[error(
        "container '{name}' already exists in this job (--container-name={name}:create makes \
         a new one only): drop ':create' to use it, or pick another name"
    )]
    NamedExists { name: String },

    #[error(
        "container '{name}' is not running in this job on this node, so \
         --container-name={name}:exec cannot enter it: drop ':exec' to start it"
    )]
    NamedNotRunning { name: String },

    #[error(
        "there is no container named '{name}' in this job on this node: create it with \
         --container-image=IMAGE --container-name={name}"
    )]
    NamedMissing { name: String },

    #[error(
        "could not record the named container in {path} ({detail}); ask your admins to check \
         the node's /run"
    )]
    NamedRecord { path: String, detail: String },

    #[error(
        "could not stop the step's container holder (pid {pid}): {detail}; slurmstepd's \
         process tracking will end it with the step"
    )]
    StopFailed { pid: i32, detail: String },

    #[error(
        "unknown argument '{arg}' for spank_berth.so in plugstack.conf, ignored: the plugin \
         takes berth=/path/to/berth"
    )]
    UnknownPluginArgument { arg: String },

    #[error(
        "berth={value} for spank_berth.so in plugstack.conf is not an absolute path, ignored \
         (using {default}): write e.g. berth=/usr/local/bin/berth"
    )]
    RelativeLauncherPath {
        value: String,
        default: &'static str,
    },

    #[error(
        "Slurm refused {call} ({reason}): check that spank_berth.so was built against this \
         Slurm version's headers"
    )]
    Spank { call: &'static str, reason: String },

    #[error(
        "internal error in the plugin's {callback} callback ({detail}); please report this to \
         your site's admins"
    )]
    Panicked {
        callback: &'static str,
        detail: String,
    },

    #[error(
        "this step was stopped rather than run outside its container, because the plugin \
         failed earlier on {node}: {earlier}"
    )]
    EarlierFailure {
        /// `node NAME`, or `this node` when Slurm did not say.
        node: String,
        earlier: String,
    },
}
