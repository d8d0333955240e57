//! The audit trail: every allow/deny decision the node makes for a job step (the root
//! `berth policy check --fetch --job ID --step ID --uid N` the SPANK plugin runs) becomes one
//! JSON object, sent to syslog (`/dev/log`, facility auth, so the journal has it) and
//! appended to the audit file (`[audit] file`). `berth audit --job ID` reads the file back:
//! which image and digest each step of a job ran, or why it was refused.
//!
//! Recording never changes the decision: a missing syslog or an unwritable file is reported
//! on stderr (which the plugin forwards to the job's stderr and slurmd's log) and the step
//! goes on as decided.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where syslog listens.
const SYSLOG_SOCKET: &str = "/dev/log";
/// `<PRI>` for facility auth (4) and severity info (6): decisions are security events.
const SYSLOG_PRI: u32 = 4 * 8 + 6;

/// `[audit]`: where decisions are recorded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Append-only JSON-lines file of decisions; empty: none (syslog only).
    pub file: PathBuf,
    /// Also send each decision to syslog.
    pub syslog: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            file: PathBuf::from("/var/log/berth/audit.jsonl"),
            syslog: true,
        }
    }
}

/// The job step a decision is for, as the plugin passes it to `berth policy check`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StepArgs {
    /// The Slurm job id the decision is for; the decision is then recorded in the audit
    /// trail (syslog and [audit] file). Passed by the SPANK plugin on the node.
    #[arg(long, value_name = "ID")]
    pub job: Option<String>,
    /// The job step id (with --job).
    #[arg(long, value_name = "ID", requires = "job")]
    pub step: Option<String>,
    /// The uid of the job's user (with --job).
    #[arg(long, value_name = "UID", requires = "job")]
    pub uid: Option<u32>,
}

/// The step name the SPANK plugin's job prolog gives its prefetch at job start: audited
/// like every node decision, but not counted as one in the metrics (the step that runs the
/// image makes the decision that counts).
pub const PREFETCH_STEP: &str = "prolog";

/// One decision, as one line of the audit file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// UTC, RFC 3339.
    pub time: String,
    pub node: String,
    pub uid: Option<u32>,
    pub user: Option<String>,
    pub job: String,
    pub step: Option<String>,
    /// The image as the user gave it (after submission pinned it).
    pub image: String,
    /// "allow" or "deny".
    pub verdict: String,
    /// The `allowed` pattern that let it run.
    pub rule: Option<String>,
    /// Why it was refused.
    pub reason: Option<String>,
    /// The manifest digest of the image the step ran.
    pub digest: Option<String>,
}

/// What was decided.
pub enum Decision<'a> {
    Allow {
        rule: &'a str,
        digest: Option<String>,
    },
    Deny {
        reason: &'a str,
    },
}

impl Record {
    pub fn new(step: &StepArgs, image: &str, decision: Decision<'_>) -> Option<Record> {
        let job = step.job.clone()?;
        let (verdict, rule, reason, digest) = match decision {
            Decision::Allow { rule, digest } => ("allow", Some(rule.to_owned()), None, digest),
            Decision::Deny { reason } => ("deny", None, Some(reason.to_owned()), None),
        };
        Some(Record {
            time: rfc3339(SystemTime::now()),
            node: crate::slurm::node_name(),
            uid: step.uid,
            user: step
                .uid
                .and_then(berth_sys::identity::user_info)
                .map(|u| u.name),
            job,
            step: step.step.clone(),
            image: image.to_owned(),
            verdict: verdict.into(),
            rule,
            reason,
            digest,
        })
    }
}

/// The digest of a cached image from its path (named as the cache names it).
pub fn digest_of_cached(sif: &Path) -> Option<String> {
    let name = sif.file_name()?.to_str()?;
    crate::cache::digest_of_name(name).map(|d| d.to_string())
}

/// Records `record` in syslog and the audit file as configured; each failure is returned
/// as a warning for stderr, never as an error.
pub fn record(config: &AuditConfig, record: &Record) -> Vec<String> {
    let line = serde_json::to_string(record).expect("a record serializes");
    let mut warnings = Vec::new();
    if config.syslog {
        let message = format!("<{SYSLOG_PRI}>berth[{}]: audit {line}", std::process::id());
        // Never blocking: a syslog daemon that is not reading (its queue holds only
        // net.unix.max_dgram_qlen messages) must not hold a job step up; the audit file
        // still has the decision.
        if let Err(e) = UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            s.send_to(message.as_bytes(), SYSLOG_SOCKET)
        }) {
            warnings.push(format!(
                "audit: could not send to syslog ({SYSLOG_SOCKET}: {e}); is a syslog daemon or \
                 journald running?"
            ));
        }
    }
    if !config.file.as_os_str().is_empty() {
        if let Err(e) = append(&config.file, &line) {
            warnings.push(format!("audit: {e}"));
        }
    }
    warnings
}

/// Appends one line with a single write(2) on an O_APPEND descriptor, so concurrent steps'
/// lines never interleave. The file (and its directory) are created root-only readable by
/// group adm, as /var/log files are.
fn append(path: &Path, line: &str) -> Result<()> {
    let fail =
        |e: std::io::Error| Error::io(format!("appending to the audit file {}", path.display()), e);
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(fail)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(fail)?;
    file.write_all(format!("{line}\n").as_bytes()).map_err(fail)
}

use std::os::unix::fs::DirBuilderExt;

/// The records of `job` in the audit file, oldest first. Lines that are not records (a
/// line cut short by a full disk) are skipped.
pub fn records_of_job(path: &Path, job: &str) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::io(
            format!(
                "reading the audit file {} (set by [audit] file)",
                path.display()
            ),
            e,
        )
    })?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<Record>(line).ok())
        .filter(|r| r.job == job)
        .collect())
}

/// `time` as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    crate::sif::format::format_time(i64::try_from(secs).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn step() -> StepArgs {
        StepArgs {
            job: Some("42".into()),
            step: Some("0".into()),
            uid: Some(0),
        }
    }

    #[test]
    fn dates_are_utc_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T01:01:01Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(rfc3339(t), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn only_a_decision_for_a_job_is_a_record() {
        let none = Record::new(&StepArgs::default(), "x", Decision::Deny { reason: "r" });
        assert!(none.is_none());
        let r = Record::new(
            &step(),
            "h/r:1",
            Decision::Deny {
                reason: "not approved",
            },
        )
        .unwrap();
        assert_eq!(
            (r.verdict.as_str(), r.reason.as_deref()),
            ("deny", Some("not approved"))
        );
        assert_eq!(r.user.as_deref(), Some("root"));
    }

    #[test]
    fn records_append_as_lines_and_read_back_by_job() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            file: dir.path().join("log/audit.jsonl"),
            syslog: false,
        };
        let digest = format!("sha256:{}", "a".repeat(64));
        let allow = Record::new(
            &step(),
            "h/r:1",
            Decision::Allow {
                rule: "h/*",
                digest: Some(digest.clone()),
            },
        )
        .unwrap();
        let mut other = allow.clone();
        other.job = "43".into();
        assert!(record(&config, &allow).is_empty());
        assert!(record(&config, &other).is_empty());
        let found = records_of_job(&config.file, "42").unwrap();
        assert_eq!(found, vec![allow]);
        assert_eq!(found[0].digest.as_deref(), Some(digest.as_str()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&config.file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    #[test]
    fn an_unwritable_audit_file_is_a_warning() {
        let config = AuditConfig {
            file: PathBuf::from("/proc/no/such/audit.jsonl"),
            syslog: false,
        };
        let r = Record::new(&step(), "x", Decision::Deny { reason: "r" }).unwrap();
        let warnings = record(&config, &r);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    #[test]
    fn cached_paths_name_their_digest() {
        let hex = "b".repeat(64);
        let path = PathBuf::from(format!("/var/cache/berth/images/{hex}.sif"));
        assert_eq!(digest_of_cached(&path), Some(format!("sha256:{hex}")));
        let keyed = PathBuf::from(format!(
            "/var/cache/berth/images/{hex}-{}.sif",
            "c".repeat(32)
        ));
        assert_eq!(digest_of_cached(&keyed), Some(format!("sha256:{hex}")));
        assert_eq!(digest_of_cached(Path::new("/x/y.sif")), None);
    }
}
