//! Safe wrappers over the part of Slurm's SPANK API the plugin uses. Every `unsafe` block of
//! the plugin that calls into Slurm is here; the context modules only see these functions.
//!
//! The functions are resolved when Slurm loads the plugin, from the process that loads it
//! (srun, sbatch, slurmd, slurmstepd all carry them); the plugin does not link libslurm.

use std::ffi::{c_char, c_int, CStr, CString};

use crate::error::Error;
use crate::options::OptionSpec;

/// The generated bindings (build.rs), kept private to this module.
#[allow(
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    clippy::all
)]
pub mod ffi {
    include!(concat!(env!("OUT_DIR"), "/spank_bindings.rs"));
}

use ffi::{slurm_err_t, spank_context as ctx, spank_item as item};

/// Which Slurm process, and so which user and which host, is running the plugin right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// srun on the login node, as the user.
    Local,
    /// slurmstepd on the compute node: root in init/user_init, the user in task_init.
    Remote,
    /// sbatch or salloc on the login node, as the user.
    Allocator,
    /// slurmd itself, as root.
    Slurmd,
    /// the job prolog/epilog run by slurmd, as root.
    JobScript,
    /// Slurm could not tell (S_CTX_ERROR) or named a context newer than this build knows.
    Unknown,
}

pub fn context() -> Context {
    // SAFETY: spank_context takes no arguments and only reads Slurm's global plugin state.
    match unsafe { ffi::spank_context() } {
        ctx::S_CTX_LOCAL => Context::Local,
        ctx::S_CTX_REMOTE => Context::Remote,
        ctx::S_CTX_ALLOCATOR => Context::Allocator,
        ctx::S_CTX_SLURMD => Context::Slurmd,
        ctx::S_CTX_JOB_SCRIPT => Context::JobScript,
        _ => Context::Unknown,
    }
}

/// The handle Slurm passes to each callback, valid for that call only.
#[derive(Debug, Clone, Copy)]
pub struct Spank(ffi::spank_t);

/// The C signature of an option value callback.
pub type OptionCallback = unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;

/// An option ready for Slurm. Some Slurm releases keep the pointer they are given rather than
/// a copy, so it lives in a `static` for the life of the plugin.
#[derive(Debug, Clone, Copy)]
pub struct SlurmOption(ffi::spank_option);

// SAFETY: the pointers inside point to 'static C string literals and are never written
// through, by us or by Slurm (which copies or only reads them).
unsafe impl Sync for SlurmOption {}

impl SlurmOption {
    /// Describes every option of `specs` to Slurm, each with `callback` and its position in
    /// `specs` as the `val` Slurm passes back, so one callback serves them all.
    pub const fn all<const N: usize>(
        specs: &[OptionSpec; N],
        callback: OptionCallback,
    ) -> [SlurmOption; N] {
        let mut out = [SlurmOption(ffi::spank_option {
            name: std::ptr::null_mut(),
            arginfo: std::ptr::null_mut(),
            usage: std::ptr::null_mut(),
            has_arg: 0,
            val: 0,
            cb: None,
        }); N];
        let mut i = 0;
        while i < N {
            let spec = &specs[i];
            let (arginfo, has_arg) = match spec.arginfo {
                Some(arginfo) => (arginfo.as_ptr().cast_mut(), 1),
                None => (std::ptr::null_mut(), 0),
            };
            out[i] = SlurmOption(ffi::spank_option {
                name: spec.name.as_ptr().cast_mut(),
                arginfo,
                usage: spec.usage.as_ptr().cast_mut(),
                has_arg,
                // i < N, the length of a table written in this crate.
                val: i as c_int,
                cb: Some(callback),
            });
            i += 1;
        }
        out
    }
}

impl Spank {
    /// Wraps the handle Slurm passed to the current callback.
    pub fn new(handle: ffi::spank_t) -> Self {
        Spank(handle)
    }

    /// Adds an option to srun/sbatch/salloc (and to slurmstepd, which must know it to receive
    /// its value). Only valid from `slurm_spank_init`.
    pub fn register(self, options: &'static [SlurmOption]) -> Result<(), Error> {
        for option in options {
            // SAFETY: the handle is the live one of this callback; the option is 'static and
            // Slurm does not write through the pointer.
            let rc = unsafe {
                ffi::spank_option_register(self.0, std::ptr::from_ref(&option.0).cast_mut())
            };
            check(rc, "spank_option_register")?;
        }
        Ok(())
    }

    /// Sets a variable in the job control environment (sbatch/salloc): Slurm hands it to the
    /// job's prolog/epilog and the batch step as `SLURM_SPANK_<name>`, also under
    /// `sbatch --export=NONE`.
    pub fn job_control_setenv(self, name: &str, value: &str) -> Result<(), Error> {
        // The transport is text of the plugin's own making, lines included, so it is not
        // escaped; its values were checked for NULs when parsed, and one left would cut it.
        let c = |text: &str| CString::new(text.replace('\0', "\\0")).expect("NULs replaced");
        let (name, value) = (c(name), c(value));
        // SAFETY: the handle is the live one of this callback; both strings are NUL-terminated
        // and Slurm copies them.
        let rc = unsafe { ffi::spank_job_control_setenv(self.0, name.as_ptr(), value.as_ptr(), 1) };
        check(rc, "spank_job_control_setenv")
    }

    /// A variable of the job's environment (remote context only), `None` if it is not set.
    pub fn getenv(self, name: &CStr) -> Result<Option<Vec<u8>>, Error> {
        // Grow until the value fits: Slurm reports ESPANK_NOSPACE rather than truncating.
        let mut len: usize = 4096;
        loop {
            let mut buf = vec![0u8; len];
            let c_len = c_int::try_from(len).map_err(|_| Error::Spank {
                call: "spank_getenv",
                reason: format!("{} is larger than Slurm can return", name.to_string_lossy()),
            })?;
            // SAFETY: buf is writable for len bytes; name is NUL-terminated.
            let rc =
                unsafe { ffi::spank_getenv(self.0, name.as_ptr(), buf.as_mut_ptr().cast(), c_len) };
            match rc {
                slurm_err_t::ESPANK_ENV_NOEXIST => return Ok(None),
                slurm_err_t::ESPANK_NOSPACE => len *= 2,
                rc => {
                    check(rc, "spank_getenv")?;
                    let end = buf.iter().position(|&b| b == 0).unwrap_or(len);
                    buf.truncate(end);
                    return Ok(Some(buf));
                }
            }
        }
    }
}

/// What Slurm knows about the step slurmstepd runs (remote context), read with
/// `spank_get_item`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepInfo {
    pub job_id: u32,
    pub step_id: u32,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// The job's supplementary groups, as Slurm resolved them for the user.
    pub groups: Vec<libc::gid_t>,
    /// The step's command line; for the batch step, the script's path in slurmd's spool.
    pub argv: Vec<Vec<u8>>,
    /// How many tasks of the step run on this node.
    pub local_tasks: u32,
}

impl Spank {
    /// The step's ids, user and tasks (remote context).
    pub fn step_info(self) -> Result<StepInfo, Error> {
        Ok(StepInfo {
            job_id: self.u32_item(item::S_JOB_ID, "S_JOB_ID")?,
            step_id: self.u32_item(item::S_JOB_STEPID, "S_JOB_STEPID")?,
            uid: self.u32_item(item::S_JOB_UID, "S_JOB_UID")?,
            gid: self.u32_item(item::S_JOB_GID, "S_JOB_GID")?,
            groups: self.groups()?,
            argv: self.strings_item(item::S_JOB_ARGV, "S_JOB_ARGV")?,
            local_tasks: self.u32_item(item::S_JOB_LOCAL_TASK_COUNT, "S_JOB_LOCAL_TASK_COUNT")?,
        })
    }

    /// The step's environment as slurmstepd will hand it to the task (remote context).
    pub fn job_env(self) -> Result<Vec<Vec<u8>>, Error> {
        let mut env: *mut *mut c_char = std::ptr::null_mut();
        // SAFETY: S_JOB_ENV takes one `char ***`, which Slurm points at the step's
        // NULL-terminated environment array; it stays valid during this callback.
        let rc = unsafe { ffi::spank_get_item(self.0, item::S_JOB_ENV, &mut env) };
        check(rc, "spank_get_item(S_JOB_ENV)")?;
        // SAFETY: as above; the array ends with NULL.
        Ok(unsafe { c_strings(env, None) })
    }

    /// `uid_t`, `gid_t` and `uint32_t` items alike: all 32-bit unsigned on Linux.
    fn u32_item(self, which: ffi::spank_item_t, name: &'static str) -> Result<u32, Error> {
        let mut value: u32 = 0;
        // SAFETY: each item read through here takes exactly one pointer to a 32-bit
        // unsigned integer (spank.h), which Slurm writes.
        let rc = unsafe { ffi::spank_get_item(self.0, which, &mut value as *mut u32) };
        check(rc, name)?;
        Ok(value)
    }

    fn strings_item(
        self,
        which: ffi::spank_item_t,
        name: &'static str,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let mut count: c_int = 0;
        let mut array: *mut *mut c_char = std::ptr::null_mut();
        // SAFETY: S_JOB_ARGV takes `int *` and `char ***`; Slurm writes both.
        let rc =
            unsafe { ffi::spank_get_item(self.0, which, &mut count as *mut c_int, &mut array) };
        check(rc, name)?;
        // SAFETY: Slurm's array holds `count` valid C strings.
        Ok(unsafe { c_strings(array, usize::try_from(count).ok()) })
    }

    fn groups(self) -> Result<Vec<libc::gid_t>, Error> {
        let mut gids: *mut libc::gid_t = std::ptr::null_mut();
        let mut count: c_int = 0;
        // SAFETY: S_JOB_SUPPLEMENTARY_GIDS takes `gid_t **` and `int *`; Slurm writes both.
        let rc = unsafe {
            ffi::spank_get_item(
                self.0,
                item::S_JOB_SUPPLEMENTARY_GIDS,
                &mut gids,
                &mut count as *mut c_int,
            )
        };
        check(rc, "spank_get_item(S_JOB_SUPPLEMENTARY_GIDS)")?;
        let count = usize::try_from(count).unwrap_or(0);
        if gids.is_null() || count == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: Slurm's array holds `count` gids and outlives this call.
        Ok(unsafe { std::slice::from_raw_parts(gids, count) }.to_vec())
    }

    /// Sets a variable of the task's environment, the one slurmstepd executes the task with
    /// (remote context; the process environment is not what Slurm passes to execve).
    pub fn setenv(self, name: &[u8], value: &[u8]) -> Result<(), Error> {
        let (name, value) = (c_bytes(name)?, c_bytes(value)?);
        // SAFETY: both strings are NUL-terminated; Slurm copies them; 1 = overwrite.
        let rc = unsafe { ffi::spank_setenv(self.0, name.as_ptr(), value.as_ptr(), 1) };
        check(rc, "spank_setenv")
    }

    /// Puts `argv` in front of the task's command line (task_init, remote context): Slurm
    /// then executes `argv[0]` with the rest and the user's command as arguments, after its
    /// own PATH lookup in the task's environment. Only Slurm 23.11 and later have
    /// `spank_prepend_task_argv`; a build for an older release reports that instead, though
    /// `--container-entrypoint` is refused long before this on such a build
    /// ([`CAN_PREPEND_TASK_ARGV`]).
    pub fn prepend_task_argv(self, argv: &[String]) -> Result<(), Error> {
        #[cfg(slurm_prepend_task_argv)]
        {
            // Looked up when called, not linked: a hard reference would make dlopen fail
            // with "undefined symbol" in an older Slurm before Slurm's own version check
            // could say which release the plugin is for. spank.h 23.11+:
            // spank_err_t spank_prepend_task_argv(spank_t, int argc, const char *argv[]).
            type PrependTaskArgv =
                unsafe extern "C" fn(ffi::spank_t, c_int, *mut *const c_char) -> ffi::spank_err_t;
            // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks it up.
            let symbol =
                unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"spank_prepend_task_argv".as_ptr()) };
            if symbol.is_null() {
                return Err(Error::Spank {
                    call: "spank_prepend_task_argv",
                    reason: "this Slurm does not have it (a plugin built for 23.11 or later \
                             loaded into an older Slurm)"
                        .to_owned(),
                });
            }
            // SAFETY: the symbol is Slurm's function with the signature above.
            let prepend: PrependTaskArgv = unsafe { std::mem::transmute(symbol) };
            let args = argv
                .iter()
                .map(|a| c_bytes(a.as_bytes()))
                .collect::<Result<Vec<CString>, Error>>()?;
            let mut pointers: Vec<*const c_char> = args.iter().map(|a| a.as_ptr()).collect();
            let count = c_int::try_from(pointers.len()).map_err(|_| Error::Spank {
                call: "spank_prepend_task_argv",
                reason: format!("{} arguments are more than Slurm takes", pointers.len()),
            })?;
            // Slurm reads the array up to `count` or a NULL, whichever comes first.
            pointers.push(std::ptr::null());
            // SAFETY: the handle is the live one of this callback; `pointers` holds `count`
            // NUL-terminated strings and a NULL, which Slurm copies (xstrdup) before returning.
            let rc = unsafe { prepend(self.0, count, pointers.as_mut_ptr()) };
            check(rc, "spank_prepend_task_argv")
        }
        #[cfg(not(slurm_prepend_task_argv))]
        {
            Err(Error::Spank {
                call: "spank_prepend_task_argv",
                reason: format!(
                    "this build is for a Slurm before 23.11, which cannot change a task's \
                     command; not running {argv:?}"
                ),
            })
        }
    }

    /// Removes a variable from the task's environment (remote context).
    pub fn unsetenv(self, name: &[u8]) -> Result<(), Error> {
        let name = c_bytes(name)?;
        // SAFETY: a NUL-terminated string Slurm only reads.
        let rc = unsafe { ffi::spank_unsetenv(self.0, name.as_ptr()) };
        check(rc, "spank_unsetenv")
    }
}

extern "C" {
    /// Slurm's parsed slurm.conf: a global of libslurmfull, which every Slurm program that
    /// loads the plugin (srun, sbatch, salloc, slurmd, slurmstepd) links; its layout is the
    /// release's own (bindgen over the same headers as the rest).
    static slurm_conf: ffi::slurm_conf_t;
}

/// The site's TaskProlog (slurm.conf `TaskProlog=`), or `None` when there is none.
/// slurmstepd executes it in each task after `task_init` (22.05 and 24.11 alike), so once the
/// task has entered the container it resolves that path inside the container.
pub fn task_prolog() -> Option<Vec<u8>> {
    // SAFETY: slurmstepd filled slurm_conf from its configuration before loading any plugin
    // and does not change it while the step runs; task_prolog is NULL or a C string of it.
    unsafe { conf_string(slurm_conf.task_prolog) }
}

/// slurm.conf's `SlurmdSpoolDir` as written there (`%n` and `%h` not expanded), where
/// Slurm's pmix plugin makes each step's PMIx server directory; `None` when unset.
pub fn slurmd_spooldir() -> Option<Vec<u8>> {
    // SAFETY: as in task_prolog; slurmd_spooldir is NULL or a C string of the configuration.
    unsafe { conf_string(slurm_conf.slurmd_spooldir) }
}

/// A non-empty string of `slurm_conf`, copied.
///
/// # Safety
/// `value` must be NULL or a valid C string.
unsafe fn conf_string(value: *const c_char) -> Option<Vec<u8>> {
    if value.is_null() {
        return None;
    }
    // SAFETY: the caller's promise.
    let value = unsafe { CStr::from_ptr(value) }.to_bytes();
    (!value.is_empty()).then(|| value.to_vec())
}

/// The oci.conf of Slurm's own OCI container support when the site configured it: Slurm reads
/// it from the directory of the slurm.conf the process loaded (configless nodes included),
/// and its presence is what makes `--container` Slurm's.
pub fn slurm_oci_conf() -> Option<std::path::PathBuf> {
    let oci = slurm_conf_path()?.parent()?.join("oci.conf");
    oci.exists().then_some(oci)
}

/// The slurm.conf this process loaded (a from-source release reads its own sysconfdir's).
/// slurmstepd gets its configuration from slurmd and may have no slurm.conf path, nor a
/// plugin stack path (a batch step on 24.11: both NULL); there `SLURM_CONF` as slurmd had
/// it, else the release's compiled-in default (libslurm's `default_slurm_config_file`, its
/// sysconfdir's), is the file slurmd read.
pub fn slurm_conf_path() -> Option<std::path::PathBuf> {
    // SAFETY: as in task_prolog: set from the configuration before any plugin callback;
    // both fields are NULL or the C string of a path.
    let (conf, plugstack) = unsafe { (slurm_conf.slurm_conf, slurm_conf.plugstack) };
    conf_path(conf)
        .or_else(|| Some(conf_path(plugstack)?.parent()?.join("slurm.conf")))
        .or_else(|| std::env::var_os("SLURM_CONF").map(Into::into))
        .or_else(default_slurm_conf)
}

/// libslurm's compiled-in slurm.conf path (`default_slurm_config_file`), looked up at run
/// time so that a release without the symbol still loads the plugin.
fn default_slurm_conf() -> Option<std::path::PathBuf> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks it up.
    let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"default_slurm_config_file".as_ptr()) };
    if symbol.is_null() {
        return None;
    }
    // SAFETY: the symbol is libslurm's `char *default_slurm_config_file`, set at load time
    // to a static string and never freed.
    let value = unsafe { *(symbol as *const *mut c_char) };
    conf_path(value)
}

/// The path in `field` of `slurm_conf`, if set.
fn conf_path(field: *mut std::os::raw::c_char) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    if field.is_null() {
        return None;
    }
    // SAFETY: a non-NULL path field of slurm_conf is a valid C string (see slurm_conf_path).
    let path = unsafe { CStr::from_ptr(field) }.to_bytes();
    (!path.is_empty()).then(|| std::ffi::OsStr::from_bytes(path).into())
}

/// Whether this build can change a task's command line ([`Spank::prepend_task_argv`]): true
/// when built against Slurm 23.11 or later.
pub const CAN_PREPEND_TASK_ARGV: bool = cfg!(slurm_prepend_task_argv);

/// Copies a C array of C strings: `count` entries, or up to its NULL terminator.
///
/// # Safety
/// `array` must be NULL or point to `count` valid C strings (or to a NULL-terminated array
/// of them when `count` is None).
unsafe fn c_strings(array: *mut *mut c_char, count: Option<usize>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if array.is_null() {
        return out;
    }
    loop {
        if count.is_some_and(|n| out.len() >= n) {
            break;
        }
        // SAFETY: per the contract, entries up to `count` or the terminator are readable.
        let entry = unsafe { *array.add(out.len()) };
        if entry.is_null() {
            break;
        }
        // SAFETY: a valid C string per the contract.
        out.push(unsafe { CStr::from_ptr(entry) }.to_bytes().to_vec());
    }
    out
}

/// A name or value from the job's environment or the image as a C string; they never hold
/// NUL (environment entries are C strings), so one that does is refused rather than cut.
fn c_bytes(bytes: &[u8]) -> Result<CString, Error> {
    CString::new(bytes).map_err(|_| Error::Spank {
        call: "spank_setenv",
        reason: format!(
            "'{}' contains a NUL byte",
            String::from_utf8_lossy(bytes).escape_debug()
        ),
    })
}

fn check(rc: ffi::spank_err_t, call: &'static str) -> Result<(), Error> {
    if rc == ffi::ESPANK_SUCCESS {
        return Ok(());
    }
    // SAFETY: spank_strerror returns a pointer to a static string for any code.
    let reason = unsafe { CStr::from_ptr(ffi::spank_strerror(rc)) }
        .to_string_lossy()
        .into_owned();
    Err(Error::Spank { call, reason })
}

/// The plugin arguments from plugstack.conf as text.
///
/// # Safety
/// `argv` must point to `argc` valid NUL-terminated strings, as Slurm passes them.
pub unsafe fn plugin_args(argc: c_int, argv: *const *const c_char) -> Vec<String> {
    let count = usize::try_from(argc).unwrap_or(0);
    if argv.is_null() {
        return Vec::new();
    }
    (0..count)
        // SAFETY: per the contract, argv[0..argc] are valid C strings.
        .map(|i| unsafe { CStr::from_ptr(*argv.add(i)) })
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect()
}

/// Reads an option value Slurm passed to an option callback.
///
/// # Safety
/// `optarg` must be NULL or a valid NUL-terminated string.
pub unsafe fn option_value<'a>(optarg: *const c_char) -> &'a [u8] {
    if optarg.is_null() {
        return b"";
    }
    // SAFETY: per the contract.
    unsafe { CStr::from_ptr(optarg) }.to_bytes()
}

/// Logs an error: srun/sbatch print it on the user's terminal, slurmstepd's task_init on the
/// task's stderr, daemons in their log.
pub fn log_error(message: &str) {
    let text = log_text(message);
    // SAFETY: "%s" consumes exactly the one C string argument passed.
    unsafe { ffi::slurm_error(c"berth: %s".as_ptr(), text.as_ptr()) }
}

/// Logs an informational line: the daemon's log file, not the user's terminal.
pub fn log_info(message: &str) {
    let text = log_text(message);
    // SAFETY: as in log_error.
    unsafe { ffi::slurm_info(c"berth: %s".as_ptr(), text.as_ptr()) }
}

/// Logs a debug line (shown with srun -v / SlurmdDebug=debug).
pub fn log_debug(message: &str) {
    let text = log_text(message);
    // SAFETY: as in log_error.
    unsafe { ffi::slurm_debug(c"berth: %s".as_ptr(), text.as_ptr()) }
}

/// A log message as a C string, every control character escaped ([`escape_control`]).
fn log_text(message: &str) -> CString {
    CString::new(escape_control(message).into_owned()).expect("NULs were escaped")
}

/// `text` with every control character shown as an escape a reader recognises (`\x1b`,
/// `\x0a`, `\u{9b}`): what the plugin logs or shows the user holds text others chose (a
/// holder's stderr, a registry's error, a user's option value), which must not forge log
/// lines, move a terminal's cursor or cut a C string short. The one escaping function of the
/// plugin: every log line goes through it, and the fetch progress passed on to the user.
pub fn escape_control(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match u32::from(c) {
            n if !c.is_control() => out.push(char::from_u32(n).expect("a char")),
            n @ 0..=0x7f => out.push_str(&format!("\\x{n:02x}")),
            n => out.push_str(&format!("\\u{{{n:x}}}")),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_args_reads_argv() {
        let a = CString::new("berth=/x").unwrap();
        let b = CString::new("other").unwrap();
        let argv = [a.as_ptr(), b.as_ptr()];
        // SAFETY: argv holds two valid C strings.
        let args = unsafe { plugin_args(2, argv.as_ptr()) };
        assert_eq!(args, vec!["berth=/x", "other"]);
        // SAFETY: zero entries are read.
        assert!(unsafe { plugin_args(0, argv.as_ptr()) }.is_empty());
        // SAFETY: a NULL argv is never dereferenced.
        assert!(unsafe { plugin_args(3, std::ptr::null()) }.is_empty());
    }

    #[test]
    fn option_value_treats_null_as_empty() {
        // SAFETY: NULL is allowed by the contract.
        assert_eq!(unsafe { option_value(std::ptr::null()) }, b"");
        let v = CString::new("img:1").unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { option_value(v.as_ptr()) }, b"img:1");
    }

    #[test]
    fn the_api_cfgs_follow_the_headers_release() {
        // 23.11 (SLURM_VERSION_NUM(23,11,0)) brought spank_prepend_task_argv.
        assert_eq!(
            CAN_PREPEND_TASK_ARGV,
            ffi::SLURM_VERSION_NUMBER >= 0x17_0b_00,
            "{:#x}",
            ffi::SLURM_VERSION_NUMBER
        );
    }

    #[test]
    fn log_text_escapes_every_control_character() {
        assert_eq!(log_text("a\0b").to_bytes(), b"a\\x00b");
        assert_eq!(
            log_text("plain: /p\u{e9}").to_bytes(),
            "plain: /p\u{e9}".as_bytes()
        );
        assert_eq!(
            escape_control("red \x1b[31mX\r\nforged\tline\x7f\u{9b}2J"),
            "red \\x1b[31mX\\x0d\\x0aforged\\x09line\\x7f\\u{9b}2J"
        );
    }
}
