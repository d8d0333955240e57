//! Whether the job ended while slurmstepd's `user_init` waits for a launcher call (a cold
//! image's fetch, a stage-in, the container's start), so the wait stops instead of running
//! to its end for a job nobody wants any more.
//!
//! Slurm does not tell: slurmd's request to signal the step's processes waits in slurmstepd
//! until the tasks run, up to two minutes for each signal, while slurmctld, whose own request
//! slurmd answers only after that, marks the node "not responding" (`idle*`). So the wait
//! looks for itself. slurmd rewrites its credential state file (revoking the job's
//! credentials) before it signals a job's steps to end: a `stat` a second is all a long
//! wait costs, and slurmctld is asked (`berth job-state`, that is squeue) only when the file
//! changed, once a few seconds into the wait (an end that came before it), and once a minute
//! (a Slurm that writes no such file).

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// How often a waiting call looks at the credential state file.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);
/// When slurmctld is first asked, and then at the latest.
const FIRST_ASK: Duration = Duration::from_secs(5);
const ASK_EVERY: Duration = Duration::from_secs(60);

/// The states of a job whose steps may still start (squeue's `%T`); anything else (COMPLETING
/// after a cancel, TIMEOUT, REQUEUED, ...) ended it here.
const ALIVE: [&str; 5] = [
    "RUNNING",
    "CONFIGURING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
];

/// The job a launcher call waits for, and slurmd's credential state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub job: u32,
    cred_state: Option<PathBuf>,
}

impl Watch {
    /// `spool` is slurm.conf's SlurmdSpoolDir as written, where `%n` stands for the node's
    /// name (`node`, slurmd's SLURMD_NODENAME) and `%h` for its host name; without it the
    /// wait only asks slurmctld now and then.
    pub fn new(job: u32, spool: Option<&[u8]>, node: Option<&str>) -> Watch {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let cred_state = spool
            .and_then(|spool| expand_spool(spool, node, host.trim()))
            .map(|dir| dir.join("cred_state"));
        Watch { job, cred_state }
    }

    /// A wait starting now.
    pub fn start(&self) -> Looking<'_> {
        let now = Instant::now();
        Looking {
            watch: self,
            next_ask: now + FIRST_ASK,
            last_look: now,
            seen: self.changed_at(),
        }
    }

    fn changed_at(&self) -> Option<SystemTime> {
        let path = self.cred_state.as_ref()?;
        std::fs::metadata(path).and_then(|m| m.modified()).ok()
    }
}

/// One wait's looks.
pub struct Looking<'a> {
    watch: &'a Watch,
    next_ask: Instant,
    last_look: Instant,
    seen: Option<SystemTime>,
}

impl Looking<'_> {
    /// The state the job ended in, where it did; `ask` asks slurmctld (None: it could not
    /// tell, and the wait goes on: only Slurm's word stops it).
    pub fn ended(&mut self, ask: &dyn Fn(u32) -> Option<String>) -> Option<String> {
        let now = Instant::now();
        if now < self.last_look + LOOK_EVERY {
            return None;
        }
        self.last_look = now;
        let changed = self.watch.changed_at();
        if changed == self.seen && now < self.next_ask {
            return None;
        }
        self.seen = changed;
        self.next_ask = now + ASK_EVERY;
        ask(self.watch.job).filter(|state| !ALIVE.contains(&state.as_str()))
    }
}

/// SlurmdSpoolDir with `%n` and `%h` replaced, as slurmd expands it; None where it holds
/// another `%` escape this does not know, or `%n` and the node's name is not known.
fn expand_spool(spool: &[u8], node: Option<&str>, host: &str) -> Option<PathBuf> {
    let text = std::str::from_utf8(spool).ok()?;
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push_str(node?),
            'h' => out.push_str(host),
            _ => return None,
        }
    }
    Some(PathBuf::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn the_spool_directory_is_expanded_as_slurmd_does() {
        let spool = |s: &str| expand_spool(s.as_bytes(), Some("n1"), "host");
        assert_eq!(spool("/var/spool/slurmd"), Some("/var/spool/slurmd".into()));
        assert_eq!(spool("/s/slurmd-%n"), Some("/s/slurmd-n1".into()));
        assert_eq!(spool("/s/%h/%n"), Some("/s/host/n1".into()));
        assert_eq!(spool("/s/%x"), None);
        assert_eq!(spool("/s/%"), None);
        assert_eq!(expand_spool(b"/s/%n", None, "host"), None);
        assert_eq!(expand_spool(b"/s/%h", None, "host"), Some("/s/host".into()));
    }

    /// Asks slurmctld a few seconds in, then only when the credential state file changes
    /// (or a minute passed), and stops on a state that is not a live job's.
    #[test]
    fn slurmctld_is_asked_when_the_credential_state_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cred_state = dir.path().join("cred_state");
        std::fs::write(&cred_state, "1").unwrap();
        let watch = Watch::new(7, Some(dir.path().as_os_str().as_encoded_bytes()), None);
        assert_eq!(watch.cred_state.as_ref(), Some(&cred_state));
        let asked = Cell::new(0);
        let state = Cell::new("RUNNING");
        let ask = |job: u32| {
            assert_eq!(job, 7);
            asked.set(asked.get() + 1);
            Some(state.get().to_owned())
        };
        let mut looking = watch.start();
        assert_eq!(looking.ended(&ask), None);
        assert_eq!(asked.get(), 0, "asked at once");
        // A few seconds in: asked once, whatever the file.
        looking.last_look -= LOOK_EVERY;
        looking.next_ask = Instant::now();
        assert_eq!(looking.ended(&ask), None);
        assert_eq!(asked.get(), 1);
        looking.last_look -= LOOK_EVERY;
        assert_eq!(looking.ended(&ask), None);
        assert_eq!(asked.get(), 1, "asked again with nothing changed");
        // slurmd rewrote the file: asked, and the job was cancelled.
        let later = SystemTime::now() + Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&cred_state)
            .unwrap()
            .set_modified(later)
            .unwrap();
        state.set("COMPLETING");
        looking.last_look -= LOOK_EVERY;
        assert_eq!(looking.ended(&ask), Some("COMPLETING".to_owned()));
        assert_eq!(asked.get(), 2);
    }

    #[test]
    fn a_job_slurm_cannot_tell_about_goes_on() {
        let watch = Watch::new(7, None, None);
        let mut looking = watch.start();
        looking.last_look -= LOOK_EVERY;
        looking.next_ask = Instant::now();
        assert_eq!(looking.ended(&|_| None), None);
    }
}
