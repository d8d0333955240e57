//! spank_berth.so, the Slurm SPANK plugin of berth.
//!
//! This file only exports what Slurm looks up in the plugin and sends each call, through the
//! panic guard, to the module of the context it runs in; the module names say which process
//! and which user run a line:
//!
//! | module        | process (context)                | as            |
//! |---------------|----------------------------------|---------------|
//! | `submit`      | srun (local), sbatch / salloc (allocator), login node | the user |
//! | `remote`      | slurmstepd, compute node         | root; the user in task_init |
//! | `slurmd`      | slurmd, compute node             | root          |
//! | `prolog`      | slurmd's job prolog (job script) | root, outside the job's cgroups |
//! | `epilog`      | slurmd's job epilog (job script) | root; berth as the job's user |
//!
//! Callbacks not exported here are simply not called by Slurm.

// The guard catches panics with catch_unwind, which needs unwinding; with panic = "abort" a
// bug would kill srun or slurmstepd instead (the workspace's profiles set "unwind").
#[cfg(panic = "abort")]
compile_error!(
    "spank_berth.so must be built with panic = \"unwind\" (see the workspace Cargo.toml)"
);

mod config;
mod container;
mod epilog;
mod error;
#[doc(hidden)]
pub mod fuzz;
mod guard;
mod job_end;
mod launcher;
mod mpi;
mod named;
mod options;
mod prolog;
mod remote;
mod slurmd;
mod spank;
mod submit;
mod task_prolog;

use std::ffi::{c_char, c_int, c_uint};

use error::Error;
use guard::Callback;
use spank::{Context, SlurmOption, Spank};

/// The plugin's name: Slurm's logs show it, and it is part of the environment variable names
/// that carry option values (`_SLURM_SPANK_OPTION_berth_...`).
pub(crate) const PLUGIN_NAME: &str = "berth";

// What Slurm's SPANK_PLUGIN(berth, 1) macro would define, with the C types Slurm reads:
// `const char plugin_name[]`, `const char plugin_type[]`, `const unsigned int plugin_version`
// and `const unsigned int spank_plugin_version`.
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static plugin_name: [u8; 6] = *b"berth\0";

#[allow(non_upper_case_globals)]
#[no_mangle]
pub static plugin_type: [u8; 6] = *b"spank\0";

/// Slurm loads a SPANK plugin only if this matches its own major.minor; taken from the
/// headers at build time (build.rs), so each Slurm release gets a build of its own.
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static plugin_version: c_uint = spank::ffi::SLURM_VERSION_NUMBER;

/// The SPANK interface version; 1 is the only one Slurm has defined.
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static spank_plugin_version: c_uint = 1;

/// berth's options, registered in every context that parses or receives them.
pub(crate) static OPTIONS: [SlurmOption; options::SPECS.len()] =
    SlurmOption::all(&options::SPECS, option_callback);

/// Called in every context right after Slurm loads the plugin.
///
/// # Safety
/// Called by Slurm with a live handle and `ac` valid strings in `av`.
#[no_mangle]
pub unsafe extern "C" fn slurm_spank_init(
    sp: spank::ffi::spank_t,
    ac: c_int,
    av: *mut *mut c_char,
) -> c_int {
    guard::run(Callback::Init, |context| {
        // SAFETY: Slurm passes `ac` valid strings in `av`.
        let args = unsafe { spank::plugin_args(ac, av.cast_const().cast()) };
        match context {
            Context::Local | Context::Allocator => submit::init(Spank::new(sp), &args),
            Context::Remote => remote::init(Spank::new(sp), &args),
            Context::Slurmd => slurmd::init(&args),
            Context::JobScript | Context::Unknown => Ok(()),
        }
    })
}

/// Called once every option is known: on the login node, where the request is decided.
///
/// # Safety
/// Called by Slurm with a live handle.
#[no_mangle]
pub unsafe extern "C" fn slurm_spank_init_post_opt(
    sp: spank::ffi::spank_t,
    _ac: c_int,
    _av: *mut *mut c_char,
) -> c_int {
    guard::run(Callback::InitPostOpt, |context| match context {
        Context::Local | Context::Allocator => submit::init_post_opt(Spank::new(sp), context),
        _ => Ok(()),
    })
}

/// Called in each task, as the user, just before the user's command is executed.
///
/// # Safety
/// Called by Slurm with a live handle.
#[no_mangle]
pub unsafe extern "C" fn slurm_spank_task_init(
    sp: spank::ffi::spank_t,
    _ac: c_int,
    _av: *mut *mut c_char,
) -> c_int {
    guard::run(Callback::TaskInit, |context| match context {
        Context::Remote => remote::task_init(Spank::new(sp)),
        _ => Ok(()),
    })
}

/// Called in slurmstepd (root, effective uid the user) before the tasks are forked: where the
/// step's container is prepared.
///
/// # Safety
/// Called by Slurm with a live handle.
#[no_mangle]
pub unsafe extern "C" fn slurm_spank_user_init(
    sp: spank::ffi::spank_t,
    _ac: c_int,
    _av: *mut *mut c_char,
) -> c_int {
    guard::run(Callback::UserInit, |context| match context {
        Context::Remote => remote::user_init(Spank::new(sp)),
        _ => Ok(()),
    })
}

/// Called in slurmstepd (root) each time a task of the step has exited.
///
/// # Safety
/// Called by Slurm with a live handle.
#[no_mangle]
pub unsafe extern "C" fn slurm_spank_task_exit(
    _sp: spank::ffi::spank_t,
    _ac: c_int,
    _av: *mut *mut c_char,
) -> c_int {
    guard::run(Callback::TaskExit, |context| match context {
        Context::Remote => remote::task_exit(),
        _ => Ok(()),
    })
}

/// Called in every context just before the plugin is unloaded.
///
/// # Safety
/// Called by Slurm with a live handle.
#[no_mangle]
pub unsafe extern "C" fn slurm_spank_exit(
    _sp: spank::ffi::spank_t,
    _ac: c_int,
    _av: *mut *mut c_char,
) -> c_int {
    guard::run(Callback::Exit, |context| match context {
        Context::Remote => remote::exit(),
        _ => Ok(()),
    })
}

/// Called by slurmd's job prolog on each node of a new allocation (with PrologFlags=Alloc,
/// at allocation; otherwise before the job's first step there), as root.
///
/// # Safety
/// Called by Slurm with `ac` valid strings in `av`.
#[no_mangle]
pub unsafe extern "C" fn slurm_spank_job_prolog(
    _sp: spank::ffi::spank_t,
    ac: c_int,
    av: *mut *mut c_char,
) -> c_int {
    guard::run(Callback::JobProlog, |context| {
        // SAFETY: Slurm passes `ac` valid strings in `av`.
        let args = unsafe { spank::plugin_args(ac, av.cast_const().cast()) };
        match context {
            Context::JobScript => prolog::job_prolog(&args, &|name| std::env::var_os(name)),
            _ => Ok(()),
        }
    })
}

/// Called by slurmd's job epilog on each node once the job ended there (also after scancel),
/// as root.
///
/// # Safety
/// Called by Slurm with `ac` valid strings in `av`.
#[no_mangle]
pub unsafe extern "C" fn slurm_spank_job_epilog(
    _sp: spank::ffi::spank_t,
    ac: c_int,
    av: *mut *mut c_char,
) -> c_int {
    guard::run(Callback::JobEpilog, |context| {
        // SAFETY: Slurm passes `ac` valid strings in `av`.
        let args = unsafe { spank::plugin_args(ac, av.cast_const().cast()) };
        match context {
            Context::JobScript => epilog::job_epilog(&args, &|name| std::env::var_os(name)),
            _ => Ok(()),
        }
    })
}

/// Slurm's callback for every berth option: `val` is the option's row in `options::SPECS`,
/// `optarg` its value (NULL for a flag), `remote` non-zero in slurmstepd.
unsafe extern "C" fn option_callback(val: c_int, optarg: *const c_char, _remote: c_int) -> c_int {
    guard::run(Callback::Option, |context| {
        // SAFETY: Slurm passes the option's argument as a C string (or NULL).
        let value = unsafe { spank::option_value(optarg) };
        let Some(opt) = usize::try_from(val).ok().and_then(options::Opt::from_index) else {
            return Err(Error::Spank {
                call: "an option callback",
                reason: format!("unknown option number {val}"),
            });
        };
        match context {
            Context::Local | Context::Allocator => submit::option(opt, value),
            Context::Remote => remote::option(opt, value),
            Context::Slurmd | Context::JobScript | Context::Unknown => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_name_is_the_plugin_name() {
        // Slurm reads plugin_name as a C string; options' environment names use PLUGIN_NAME.
        let exported = std::ffi::CStr::from_bytes_with_nul(&plugin_name).unwrap();
        assert_eq!(exported.to_str(), Ok(PLUGIN_NAME));
        assert_eq!(&plugin_type, b"spank\0");
    }

    #[test]
    fn version_has_the_slurm_layout() {
        // SLURM_VERSION_NUM(a,b,c) = a<<16 | b<<8 | c; Slurm compares the major.minor bytes.
        let major = plugin_version >> 16;
        assert!((20..=99).contains(&major), "{plugin_version:#x}");
    }
}
