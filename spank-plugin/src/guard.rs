//! The one gate between Slurm and the plugin's Rust code. Every exported callback and option
//! callback runs its body through [`run`], which
//!
//! - catches any panic (`catch_unwind`; the workspace builds with `panic = "unwind"`), so no
//!   unwinding ever reaches Slurm's C frames;
//! - logs an error or a panic through Slurm's log, once, with the callback's name;
//! - and decides what Slurm sees. Returning an error is only safe where it fails just the
//!   user's command or task (see [`may_fail`]); everywhere else, above all in slurmstepd's
//!   `init`/`init_post_opt`/`user_init` where an error drains the node for batch jobs, the
//!   failure is remembered instead and the step's tasks are failed in `task_init`, so the job
//!   is neither silently run outside its container nor allowed to take the node down.
//!
//! Nothing here (or anywhere in the plugin) starts a thread: Slurm's daemons fork after
//! calling us, and a thread left running would not survive into the child.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::ffi::c_int;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Mutex, Once};

use crate::error::Error;
use crate::spank::{self, Context};

/// The SPANK callbacks the plugin implements, named as in spank.h for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callback {
    Init,
    InitPostOpt,
    UserInit,
    TaskInit,
    TaskExit,
    Exit,
    /// slurmd's job prolog (`slurm_spank_job_prolog`).
    JobProlog,
    /// slurmd's job epilog (`slurm_spank_job_epilog`).
    JobEpilog,
    /// An option's value callback, run while srun/sbatch or slurmstepd parse options.
    Option,
}

impl Callback {
    fn name(self) -> &'static str {
        match self {
            Callback::Init => "slurm_spank_init",
            Callback::InitPostOpt => "slurm_spank_init_post_opt",
            Callback::UserInit => "slurm_spank_user_init",
            Callback::TaskInit => "slurm_spank_task_init",
            Callback::TaskExit => "slurm_spank_task_exit",
            Callback::Exit => "slurm_spank_exit",
            Callback::JobProlog => "slurm_spank_job_prolog",
            Callback::JobEpilog => "slurm_spank_job_epilog",
            Callback::Option => "option",
        }
    }
}

/// Whether Slurm may be told that `callback` failed in `context`.
///
/// - srun (local) and sbatch/salloc (allocator): the command exits with our message, which is
///   exactly what a user error should do there.
/// - slurmstepd (remote): only `task_init`, which fails the task with exit code 1 and shows the
///   message to the user. Any other remote failure drains the node for batch jobs.
/// - slurmd and the prolog/epilog contexts: a failure drains the node or stops slurmd, so never.
pub fn may_fail(context: Context, callback: Callback) -> bool {
    match context {
        Context::Local | Context::Allocator => true,
        Context::Remote => callback == Callback::TaskInit,
        Context::Slurmd | Context::JobScript | Context::Unknown => false,
    }
}

/// A failure in a callback that could not return it, kept until `task_init` can report it.
/// slurmstepd forks each task from the process that ran the earlier callbacks, so the task
/// sees what was stored here.
static DEFERRED: Mutex<Option<String>> = Mutex::new(None);

/// Runs a callback body for Slurm and turns its outcome into Slurm's return code: 0, or -1
/// where [`may_fail`] allows.
pub fn run(callback: Callback, body: impl FnOnce(Context) -> Result<(), Error>) -> c_int {
    // The context is read before the body so a panic cannot leave us unsure which rule to
    // apply; spank_context() only reads a global in Slurm and cannot fail.
    let context = spank::context();
    // A failure slurmstepd defers is shown to the user once, by task_init; until then it
    // goes to the node's log only (slurmstepd copies error-level lines to the job's stderr).
    let deferred = context == Context::Remote && !may_fail(context, callback);
    run_in(
        context,
        callback,
        &|message| {
            if deferred {
                spank::log_info(message)
            } else {
                spank::log_error(message)
            }
        },
        &DEFERRED,
        body,
    )
}

/// Takes (and clears) a failure remembered by an earlier callback in this process.
pub fn take_deferred() -> Option<String> {
    lock(&DEFERRED).take()
}

/// [`run`] with its surroundings as arguments, so tests can drive it without Slurm.
fn run_in(
    context: Context,
    callback: Callback,
    log: &dyn Fn(&str),
    deferred: &Mutex<Option<String>>,
    body: impl FnOnce(Context) -> Result<(), Error>,
) -> c_int {
    install_panic_hook();
    // AssertUnwindSafe: after a panic the plugin's state is not used by this callback again;
    // the only shared state is behind Mutexes, which `lock` recovers from poisoning.
    IN_GUARD.with(|g| g.set(true));
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| body(context)));
    IN_GUARD.with(|g| g.set(false));
    let error = match outcome {
        Ok(Ok(())) => return 0,
        Ok(Err(error)) => error,
        Err(payload) => Error::Panicked {
            callback: callback.name(),
            detail: panic_detail(payload.as_ref()),
        },
    };
    let message = error.to_string();
    log(&message);
    if may_fail(context, callback) {
        return -1;
    }
    if context == Context::Remote {
        // Keep the first failure: it is the cause, later ones are usually its consequences.
        lock(deferred).get_or_insert(message);
    }
    0
}

/// Locks a mutex whose holder may have panicked: the data (plain values) is still valid.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    /// Whether this thread is inside a guarded callback body.
    static IN_GUARD: Cell<bool> = const { Cell::new(false) };
    /// Where the panic hook leaves the message and location of the last panic on this thread.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Inside a guarded body, replaces Rust's default panic output (a "thread panicked" line on
/// stderr, which in srun is the user's terminal and in slurmstepd goes nowhere) with a note
/// the guard logs via Slurm. Other panics (the test harness's) keep the previous hook. The
/// hook belongs to this copy of std, so no other Rust code in the process is affected.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_GUARD.with(Cell::get) {
                let note = info.to_string();
                LAST_PANIC.with(|last| *last.borrow_mut() = Some(note));
            } else {
                previous(info);
            }
        }));
    });
}

fn panic_detail(payload: &(dyn Any + Send)) -> String {
    if let Some(note) = LAST_PANIC.with(|last| last.borrow_mut().take()) {
        // "panicked at src/x.rs:1:2:\nmessage" reads better on one log line.
        return note.replace('\n', " ");
    }
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in `context` and returns Slurm's return code, the log and the deferred
    /// failure, each test with its own deferred slot so tests may run in parallel.
    fn drive(
        context: Context,
        callback: Callback,
        body: impl FnOnce(Context) -> Result<(), Error>,
    ) -> (c_int, Vec<String>, Option<String>) {
        let logged = RefCell::new(Vec::new());
        let deferred = Mutex::new(None);
        let rc = run_in(
            context,
            callback,
            &|m| logged.borrow_mut().push(m.to_owned()),
            &deferred,
            body,
        );
        (rc, logged.into_inner(), deferred.into_inner().unwrap())
    }

    #[test]
    fn success_is_zero_and_silent() {
        let (rc, log, deferred) = drive(Context::Remote, Callback::Init, |_| Ok(()));
        assert_eq!((rc, log, deferred), (0, vec![], None));
    }

    #[test]
    fn body_sees_the_context() {
        let (rc, _, _) = drive(Context::Allocator, Callback::Init, |ctx| {
            assert_eq!(ctx, Context::Allocator);
            Ok(())
        });
        assert_eq!(rc, 0);
    }

    #[test]
    fn error_in_srun_fails_the_command() {
        let (rc, log, deferred) = drive(Context::Local, Callback::Option, |_| {
            Err(Error::WritableAndReadonly)
        });
        assert_eq!(rc, -1);
        assert_eq!(log, vec![Error::WritableAndReadonly.to_string()]);
        assert_eq!(deferred, None);
    }

    #[test]
    fn panic_becomes_a_logged_error_with_its_location() {
        let (rc, log, _) = drive(Context::Local, Callback::Init, |_| panic!("boom {}", 7));
        assert_eq!(rc, -1);
        assert_eq!(log.len(), 1);
        assert!(log[0].contains("slurm_spank_init"), "{}", log[0]);
        assert!(log[0].contains("boom 7"), "{}", log[0]);
        assert!(log[0].contains("guard.rs"), "{}", log[0]);
    }

    #[test]
    fn remote_init_never_fails_but_defers_the_first_failure() {
        let logged = RefCell::new(Vec::new());
        let deferred = Mutex::new(None);
        let log = |m: &str| logged.borrow_mut().push(m.to_owned());
        let rc = run_in(Context::Remote, Callback::Init, &log, &deferred, |_| {
            panic!("first")
        });
        assert_eq!(rc, 0, "a failing remote init would drain the node");
        let rc = run_in(Context::Remote, Callback::Option, &log, &deferred, |_| {
            Err(Error::WritableAndReadonly)
        });
        assert_eq!(rc, 0);
        assert_eq!(logged.borrow().len(), 2);
        let kept = deferred.lock().unwrap().clone().unwrap();
        assert!(kept.contains("first"), "{kept}");
    }

    #[test]
    fn remote_task_init_fails_the_task() {
        let (rc, _, deferred) = drive(Context::Remote, Callback::TaskInit, |_| {
            panic!("in the task")
        });
        assert_eq!((rc, deferred), (-1, None));
    }

    #[test]
    fn slurmd_never_fails_and_defers_nothing() {
        let (rc, log, deferred) = drive(Context::Slurmd, Callback::Init, |_| panic!("x"));
        assert_eq!((rc, log.len(), deferred), (0, 1, None));
    }

    #[test]
    fn may_fail_table() {
        use Callback::*;
        use Context::*;
        for callback in [
            Init,
            InitPostOpt,
            UserInit,
            TaskInit,
            TaskExit,
            Exit,
            Option,
        ] {
            assert!(may_fail(Local, callback));
            assert!(may_fail(Allocator, callback));
            assert!(!may_fail(Slurmd, callback));
            assert!(!may_fail(JobScript, callback));
            assert!(!may_fail(Unknown, callback));
        }
        assert!(may_fail(Remote, TaskInit));
        assert!(!may_fail(Remote, Init));
        assert!(!may_fail(Remote, InitPostOpt));
        assert!(!may_fail(Remote, Option));
        assert!(!may_fail(Remote, UserInit));
        assert!(!may_fail(Remote, TaskExit));
        assert!(!may_fail(Remote, Exit));
    }

    #[test]
    fn payload_without_hook_note() {
        assert_eq!(panic_detail(&"static text"), "static text");
        assert_eq!(panic_detail(&String::from("owned")), "owned");
        assert_eq!(panic_detail(&42u8), "panic with a non-text payload");
    }
}
