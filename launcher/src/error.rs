//! The launcher's one error type. Every message names the cause and, where the user can act,
//! the fix: these strings reach researchers through srun's stderr and batch output files.
//!
//! Several areas add variants here; keep each area's variants in its own marked section.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- general -------------------------------------------------------------------------
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Sys {
        path: PathBuf,
        #[source]
        source: berth_sys::Error,
    },
    // ---- config --------------------------------------------------------------------------
    #[error("berth configuration {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(
        "berth configuration {}:{line}:{column}: {message}; fix the file (`berth config check` \
         checks it; berth.toml(5) and /etc/berth/berth.toml's comments document every key)",
        path.display()
    )]
    ConfigAt {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "berth configuration {} cannot be read ({source}); it must be a file (mode 0644) \
         readable by every user",
        path.display()
    )]
    ConfigUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    // ---- stage ---------------------------------------------------------------------------
    #[error("berth stage: {message}")]
    Stage { message: String },
    // ---- sif -----------------------------------------------------------------------------
    #[error("{path}: not a container image: neither a SIF file (no \"SIF_MAGIC\" at byte 32) nor a squashfs file (no \"hsqs\" at byte 0); build one with `berth sif create DIR OUT.sif`")]
    NotAnImage { path: PathBuf },
    #[error("{path}: unsupported SIF version {version:?}; berth reads version \"01\", the only one Apptainer writes")]
    SifVersion { path: PathBuf, version: String },
    #[error("{path}: corrupt or truncated image: {message}; re-fetch or rebuild the image")]
    SifCorrupt { path: PathBuf, message: String },
    #[error("{path}: no root file system: the SIF has no partition of type PrimSys ({message}), so it is not a runnable container image")]
    SifNoRootfs { path: PathBuf, message: String },
    #[error("{path}: the root file system partition is {fs}; berth runs only squashfs root file systems (it never kernel-mounts image bytes, and cannot decrypt); rebuild the image with `apptainer build` defaults or `berth sif create`")]
    SifUnsupportedFs { path: PathBuf, fs: String },
    #[error("mksquashfs {dir} failed ({status}): {stderr}; check that the directory is readable and the output disk has space")]
    Mksquashfs {
        dir: PathBuf,
        status: String,
        stderr: String,
    },
    // ---- container -----------------------------------------------------------------------
    #[error(
        "cannot create a user namespace ({source}): unprivileged user namespaces are disabled \
         on this node; ask the admin to enable them (sysctl user.max_user_namespaces > 0, and \
         kernel.unprivileged_userns_clone=1 where that sysctl exists)"
    )]
    UserNamespaces {
        #[source]
        source: berth_sys::Error,
    },
    #[error(
        "/dev/fuse is not usable by uid {uid} ({source}): ask the admin to make /dev/fuse mode \
         0666 (berth's packaging does this)"
    )]
    FuseUnavailable {
        uid: u32,
        #[source]
        source: berth_sys::Error,
    },
    #[error(
        "squashfuse is not installed (looked for squashfuse in /usr/bin, /usr/local/bin, \
         /bin): install it (Debian: apt install squashfuse); berth mounts \
         images with it, without privileges"
    )]
    SquashfuseMissing,
    #[error(
        "cannot mount image {}: {source}; check that it is an intact SIF or squashfs file \
         (`berth sif inspect` says which)",
        path.display()
    )]
    ImageMount {
        path: PathBuf,
        #[source]
        source: berth_sys::Error,
    },
    #[error("bind {bind} refused: {reason} (set by the site in /etc/berth/berth.toml [site])")]
    BindRefused { bind: String, reason: String },
    #[error(
        "invalid --bind {spec:?}: {reason} (use SRC:DST[:FLAGS] with an absolute DST; \
         `berth exec --help` lists the flags)"
    )]
    BindSyntax { spec: String, reason: String },
    #[error("bind source {} is not usable on this node ({source}): fix the path or create it", path.display())]
    BindSource {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid --env {0:?}: use KEY=VALUE")]
    EnvSyntax(String),
    #[error("{what} {} must be an absolute path inside the container", path.display())]
    NotAbsolute { what: &'static str, path: PathBuf },
    #[error(
        "no command given and the image defines no Entrypoint or Cmd: name the command after \
         the image"
    )]
    NoCommand,
    #[error(
        "{command}: command not found in the image (PATH={path}); give its full path, or set \
         PATH with --env PATH=..."
    )]
    CommandNotFound { command: String, path: String },
    #[error("{command}: cannot be executed ({source}); is it a program for this machine, with its x bit set?")]
    NotExecutable {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("working directory {} cannot be entered inside the container ({source}); choose another with --workdir", path.display())]
    Workdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the container ({what}): {source}")]
    Container {
        what: &'static str,
        #[source]
        source: berth_sys::Error,
    },
    #[error("container spec: {0}")]
    Spec(#[source] serde_json::Error),
    #[error("invalid container handle {0:?}: expected PID:FD as printed by `berth start`")]
    BadHandle(String),
    #[error("container {handle} is gone or not yours ({source}); start one with `berth start`")]
    HandleGone {
        handle: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the writable area {path} ([runtime] writable_dir) cannot be used: {reason}")]
    WritableArea { path: PathBuf, reason: String },
    #[error("invalid named container {value:?}: {reason}")]
    NamedInvalid { value: String, reason: String },
    #[error("container {handle} did not stop within {secs} s of SIGTERM")]
    StopTimeout { handle: String, secs: u64 },
    #[error("the image's FUSE daemon (squashfuse) ended ({0}), so the container's files are gone; see its message above")]
    HelperDied(String),
    // ---- gpu -----------------------------------------------------------------------------
    #[error("{}: line {line}: {message}; fix gres.conf (slurmd reads it too) or point [gpu] gres_conf in berth.toml at the right file", path.display())]
    GresConf {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("invalid GPU list {0:?}: use all, or Slurm GPU indexes like 0,2 or 0-3")]
    GpuSelection(String),
    #[error("GPU index {index} is not on this node: {from} lists {count} GPU(s), indexes from 0; fix gres.conf so it matches slurmd's, or ask for an index below {count}")]
    GpuIndex {
        index: usize,
        count: usize,
        from: String,
    },
    #[error("GPU device {} is missing or not a device node on this node; check the driver is loaded and gres.conf's File= names existing nodes", path.display())]
    GpuDevice { path: PathBuf },
    #[error("NVML: {0}; gres.conf says AutoDetect=nvml, so berth asks the NVIDIA driver's libnvidia-ml.so.1 which GPUs exist: check the driver is installed and loaded (nvidia-smi), or list the GPUs with File= in gres.conf")]
    Nvml(String),
    #[error("no NVIDIA driver found (no /proc/driver/nvidia/version, no libnvidia-ml.so.1 or libcuda.so.1 in the ld.so cache): install and load the driver, run ldconfig, or set [gpu] driver_version in berth.toml")]
    NoDriver,
    #[error("the NVIDIA driver library {library} of version {version} is not in this node's ld.so cache: install the driver's user-space libraries of the loaded kernel module's version and run ldconfig (or fix [gpu] driver_version / extra_libraries in berth.toml)")]
    DriverLibrary { library: String, version: String },
    #[error("NVIDIA_DRIVER_CAPABILITIES={value:?}: unknown capability {word:?}; allowed: {allowed} (set it with --env or --container-env)")]
    GpuCapability {
        value: String,
        word: String,
        allowed: String,
    },
    #[error("CDI spec {}: {message}; fix or remove the file (regenerate it with `nvidia-ctk cdi generate`), or take its directory out of [gpu] cdi_dirs", path.display())]
    Cdi { path: PathBuf, message: String },
    // ---- reference / policy --------------------------------------------------------------
    #[error("image `{image}` refused: {reason}")]
    InvalidReference { image: String, reason: String },
    #[error("digest `{digest}` refused: {reason}")]
    InvalidDigest { digest: String, reason: String },
    /// A malformed entry in the `[policy]` section; reported inside the config error.
    #[error("[policy] {key} entry `{value}`: {reason}")]
    PolicyEntry {
        key: &'static str,
        value: String,
        reason: String,
    },
    // ---- registry / fetch / cache --------------------------------------------------------
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("registry {registry} is unreachable after {attempts} attempt(s): {message}; check that it is up and reachable from this node (and the proxy: [registry] proxy in /etc/berth/berth.toml, else HTTPS_PROXY/NO_PROXY), or ask the site admins")]
    RegistryDown {
        registry: String,
        attempts: u32,
        message: String,
    },
    #[error("registry {registry} refused access to {repository} ({message}); if the repository is private, the site admins must add credentials for {registry} to the berth auth file")]
    Unauthorized {
        registry: String,
        repository: String,
        message: String,
    },
    #[error("{reference}: not found on the registry; check the repository name and tag (`skopeo list-tags docker://...` lists tags)")]
    ImageNotFound { reference: String },
    #[error("{reference}: {message}")]
    Manifest { reference: String, message: String },
    #[error("{what}: the registry served corrupt data: expected {expected}, got {actual}; the download was discarded — push the image again or repair the registry's storage")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("credentials file {path}: {message}")]
    AuthFile { path: PathBuf, message: String },
    #[error("layer {layer}: refusing entry {path:?}: {reason}; the image is unsafe to unpack, rebuild it with a standard tool (docker, buildah, umoci)")]
    UnsafeLayer {
        layer: String,
        path: String,
        reason: String,
    },
    #[error("layer {layer} is corrupt: {reason}; push the image again")]
    BadLayer { layer: String, reason: String },
    /// An image over one of the `[cache]` limits on what root unpacks.
    #[error("{what}, over the node's limit `[cache] {key} = {limit}`; berth refuses images this large (or hostile), so use a smaller image, or ask the site admins to raise {key} in /etc/berth/berth.toml")]
    ImageLimit {
        what: String,
        key: &'static str,
        limit: String,
    },
    /// A malformed entry in the `[registry]` section; reported inside the config error.
    #[error("[registry] {key} entry `{value}`: {reason}")]
    RegistryEntry {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("refused by the site policy: {reason}")]
    FetchDenied { reason: String },
    #[error("{reference}: this node has it from another user's registry login, and the registry does not confirm yours ({detail}); log in with an account that can read it (`podman login` or `docker login`; berth uses ~/.config/containers/auth.json or ~/.docker/config.json where the site allows users' credentials)")]
    NoAccess { reference: String, detail: String },
    #[error("job {job}: the image's digest pin (the job's AdminComment): {message}; `berth pin-job` runs as PrologSlurmctld (SlurmUser), which must be able to run squeue and scontrol on the controller")]
    JobPin { job: u32, message: String },
    #[error("image cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
    /// A fetch that failed in the cache owner's process (see `cache::owner`), as it said
    /// there, with the metrics cause of the original error.
    #[error("{message}")]
    AsCacheOwner { message: String, cause: String },
    #[error("invalid size {value:?}: {message} (examples: 500M, 20G, 1T)")]
    InvalidSize { value: String, message: String },
}

impl Error {
    /// Wraps an I/O error with what berth was doing, e.g. `io("reading /x/y.sif", e)`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
