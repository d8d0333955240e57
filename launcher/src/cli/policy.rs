//! `berth policy check [--json] [--fetch] [--as-user UID:GID[:GIDS]] [--] IMAGE`: say whether
//! the site policy allows an image, and why; with `--fetch`, also pull an allowed registry
//! image into the node cache.
//! `berth policy require-container [--partition P | --job JOBID]`: say whether jobs must use a
//! container.
//! The SPANK plugin runs both at submission (a clear error before the job queues) and on the
//! node (authoritative). `check` without `--fetch` has no registry client, so it cannot touch
//! the network.
//!
//! On the node the plugin runs `check --fetch --as-user` (as root, before the step's container
//! starts): the verdict and the fetch in one launcher start and one configuration parse, which
//! every containerized step would otherwise pay twice. `--as-user` makes root look a local
//! image path up with the job user's rights (see `Policy::resolving_as`). The allow line of a
//! local image names the resolved, vetted file, which the plugin opens and hands to `berth
//! start --image-fd`. On the node `require-container --job` asks Slurm for the job's
//! partition, which the step's environment cannot be trusted to tell.
//!
//! Exit status: 0 allowed / required, 1 refused / not required (including malformed or tricky
//! references), 78 the configuration is unreadable or invalid, 125 berth itself failed (e.g.
//! with `--fetch` a failed pull; reported by `main`).

use std::ffi::OsString;

use serde_json::json;

use super::Globals;
use crate::cache::FetchOptions;
use crate::config::Config;
use crate::policy::{FsUser, ImageRequest, Policy, Verdict};
use crate::registry::{self, Endpoint};
use crate::{audit, metrics, slurm};
use crate::{Error, Result};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print `allow: IMAGE (rule: RULE)` and exit 0, or `deny: REASON` and exit 1.
    Check(CheckArgs),
    /// Exit 0 (printing why) if jobs must run in a container, 1 if they may run on the host.
    RequireContainer(RequireArgs),
}

#[derive(Debug, clap::Args)]
pub struct RequireArgs {
    /// The job's partition, or a comma-separated list: a container is required if any of
    /// them requires one. Without it (and --job), the global `require_container` answers.
    #[arg(long, value_name = "PARTITION", conflicts_with = "job")]
    pub partition: Option<String>,
    /// The job whose partition Slurm itself names (asked with `squeue` from the system's
    /// directories). Where Slurm cannot tell, the strictest rule answers: a container is
    /// required if the global rule or any partition's requires one.
    #[arg(long, value_name = "JOBID")]
    pub job: Option<u32>,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Print one JSON object instead: {"image", "verdict": "allow"|"deny", "rule" or
    /// "reason", "reference" or "local_file"}.
    #[arg(long)]
    pub json: bool,
    /// If the image is allowed and comes from a registry, also fetch it into the node cache
    /// (progress on stderr), as `berth fetch` does; a local image file needs no fetch.
    #[arg(long)]
    pub fetch: bool,
    /// The job step the decision is for (the plugin on the node): recorded in the audit trail.
    #[command(flatten)]
    pub step: crate::audit::StepArgs,
    /// Look a local image path up with this user's rights (`UID:GID`, optionally followed by
    /// `:GID,GID,...`, the supplementary groups) instead of the caller's: root judging a
    /// job's image so tells the user nothing about files they cannot see themselves.
    #[arg(long, value_name = "UID:GID[:GIDS]", value_parser = parse_user)]
    pub as_user: Option<FsUser>,
    /// A registry reference (`host[:port]/repo[:tag][@sha256:...]`, `docker://...`,
    /// `REGISTRY#IMAGE`) or a local image file path, as given to --container-image.
    // OsString, so a non-UTF-8 argument reaches us and is refused with a message instead of
    // failing inside the argument parser.
    #[arg(value_name = "IMAGE")]
    pub image: OsString,
}

pub fn run(command: Command, globals: &Globals) -> Result<i32> {
    match command {
        Command::Check(args) => check(args, globals),
        Command::RequireContainer(args) => require_container(args, globals),
    }
}

fn require_container(args: RequireArgs, globals: &Globals) -> Result<i32> {
    let config = Config::load_for_caller(globals.config.as_deref())?;
    let policy = Policy::new(&config.policy);
    let partition = match args.job {
        // Every partition answers alike: no need to ask Slurm.
        Some(_) if !policy.partition_matters() => None,
        Some(job) => match job_partition(job) {
            Ok(partition) => Some(partition),
            Err(why) => {
                if !policy.requires_container_anywhere() {
                    return Ok(1);
                }
                println!(
                    "the partition of job {job} could not be learnt from Slurm ({why}), so the \
                     strictest rule applies and the job must run in a container: add \
                     --container-image=IMAGE (or --container=IMAGE) with an image from an \
                     approved registry"
                );
                return Ok(0);
            }
        },
        None => args.partition.filter(|p| !p.is_empty()),
    };
    if !policy.requires_container(partition.as_deref()) {
        return Ok(1);
    }
    let scope = match partition {
        Some(p) => format!("partition `{p}`"),
        None => "this cluster".to_string(),
    };
    println!(
        "{scope} requires every job to run in a container: add --container-image=IMAGE \
         (or --container=IMAGE) with an image from an approved registry"
    );
    Ok(0)
}

/// The partition slurmctld records for `job` (`squeue --format=%P`: that field alone, see
/// [`slurm`]).
fn job_partition(job: u32) -> std::result::Result<String, String> {
    let partition = slurm::job_field(job, "--format=%P")?;
    if is_partition_list(&partition) {
        Ok(partition)
    } else {
        Err(format!(
            "squeue named the partition of job {job} {partition:?}"
        ))
    }
}

/// A partition name or comma-separated list as Slurm prints them: no spaces, nothing empty.
fn is_partition_list(text: &str) -> bool {
    !text.is_empty()
        && text.split(',').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b',' && b != b'=')
        })
}

/// `UID:GID` or `UID:GID:GID,GID,...`.
fn parse_user(text: &str) -> std::result::Result<FsUser, String> {
    let number = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("`{s}` is not a numeric id; write UID:GID[:GID,GID,...]"))
    };
    let mut parts = text.splitn(3, ':');
    let uid = number(parts.next().unwrap_or_default())?;
    let gid = number(parts.next().ok_or("no GID; write UID:GID[:GID,GID,...]")?)?;
    let groups = match parts.next() {
        None | Some("") => Vec::new(),
        Some(list) => list
            .split(',')
            .map(number)
            .collect::<std::result::Result<_, _>>()?,
    };
    Ok(FsUser { uid, gid, groups })
}

fn check(args: CheckArgs, globals: &Globals) -> Result<i32> {
    let config = Config::load_for_caller(globals.config.as_deref())?;
    let policy = match args.as_user.clone() {
        Some(user) => Policy::new(&config.policy).resolving_as(user),
        None => Policy::new(&config.policy),
    };
    let Some(image) = args.image.to_str() else {
        let shown = args.image.to_string_lossy();
        let reason = format!(
            "image `{}` refused: it is not valid UTF-8 (shown with U+FFFD for the bad bytes); \
             image references are ASCII",
            shown.escape_debug()
        );
        return Ok(report(args.json, &shown, Outcome::Deny(reason), &[]));
    };
    let mut digest = None;
    let mut observed = metrics::Observation::default();
    let outcome = match policy.check(image) {
        Ok((request, Verdict::Allow { rule })) => {
            if let (true, ImageRequest::Registry(r)) = (args.fetch, &request) {
                // Before the verdict is printed: exit 0 promises the image is in the cache.
                // The canonical form names its registry, so the fetch's own check cannot take
                // it for a file that root, unlike the --as-user look-up, can see.
                let canonical = r.to_string();
                // For the job's user: their own login where the site allows it, and their
                // access checked on an image another user's login pulled.
                let options = FetchOptions {
                    quiet: false,
                    user: args.as_user.clone(),
                };
                let fetched = metrics::fetch(&config, &canonical, &options, &mut observed);
                if fetched.is_err() && args.step.job.is_some() {
                    publish_metrics(&config, &observed);
                }
                digest = audit::digest_of_cached(&fetched?);
            }
            Outcome::Allow(request, rule)
        }
        Ok((_, Verdict::Deny { reason })) => Outcome::Deny(reason),
        // A reference that is not one at all is refused like any other image, so callers
        // (the SPANK plugin) see exit 1 and pass the message on to the user.
        Err(e @ Error::InvalidReference { .. }) => Outcome::Deny(e.to_string()),
        Err(e) => return Err(e),
    };
    let decision = match &outcome {
        Outcome::Allow(_, rule) => audit::Decision::Allow { rule, digest },
        Outcome::Deny(reason) => audit::Decision::Deny { reason },
    };
    if let Some(record) = audit::Record::new(&args.step, image, decision) {
        for warning in audit::record(&config.audit, &record) {
            eprintln!("berth: {warning}");
        }
        if args.step.step.as_deref() != Some(audit::PREFETCH_STEP) {
            observed.decision(match &outcome {
                Outcome::Allow(_, rule) => Ok(rule),
                Outcome::Deny(reason) => Err(reason),
            });
        }
        publish_metrics(&config, &observed);
    }
    let pull_from = match &outcome {
        Outcome::Allow(ImageRequest::Registry(r), _) => {
            registry::mirrors::endpoints(&config.registry, &r.registry)
        }
        _ => Vec::new(),
    };
    // Asked by hand, where a mirror rule sends the pull. Not with --fetch, the node's check of
    // every job step, whose stderr is the job's: a pull that happens names its source on its
    // progress line, and a cached image needs no word.
    let hosts: Vec<String> = pull_from.iter().map(Endpoint::describe).collect();
    if !args.json && !args.fetch && pull_from.iter().any(|e| e.mirror_of.is_some()) {
        eprintln!("berth: pull from: {}", hosts.join(", then "));
    }
    Ok(report(args.json, image, outcome, &hosts))
}

/// Node decisions (for a job step) and fetches update the metrics textfile.
fn publish_metrics(config: &Config, observed: &metrics::Observation) {
    if let Some(warning) = metrics::publish(config, observed) {
        eprintln!("berth: {warning}");
    }
}

enum Outcome {
    Allow(ImageRequest, String),
    Deny(String),
}

/// Prints the verdict on stdout (in text exactly the one line the plugin reads) and returns
/// the exit status. For a registry image the JSON also says where the bytes would come from
/// (`pull_from`).
fn report(as_json: bool, image: &str, outcome: Outcome, hosts: &[String]) -> i32 {
    let (line, object, code) = match outcome {
        Outcome::Allow(request, rule) => {
            let (what, object) = match request {
                ImageRequest::Registry(r) => (
                    r.to_string(),
                    json!({"image": image, "verdict": "allow", "rule": rule,
                           "reference": r.to_string(), "pull_from": hosts}),
                ),
                ImageRequest::LocalFile(path) => (
                    path.display().to_string(),
                    json!({"image": image, "verdict": "allow", "rule": rule,
                           "local_file": path}),
                ),
            };
            (format!("allow: {what} (rule: {rule})"), object, 0)
        }
        Outcome::Deny(reason) => (
            format!("deny: {reason}"),
            json!({"image": image, "verdict": "deny", "reason": reason}),
            1,
        ),
    };
    if as_json {
        println!("{object}");
    } else {
        println!("{line}");
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_numeric_with_optional_groups() {
        let user = |uid, gid, groups: &[u32]| FsUser {
            uid,
            gid,
            groups: groups.to_vec(),
        };
        assert_eq!(parse_user("1100:1100"), Ok(user(1100, 1100, &[])));
        assert_eq!(parse_user("1100:100:"), Ok(user(1100, 100, &[])));
        assert_eq!(
            parse_user("1100:100:27,1100"),
            Ok(user(1100, 100, &[27, 1100]))
        );
        for bad in ["", "1100", "alice:1", "1:x", "1:2:3,,4", "-1:2", "1:2:a"] {
            assert!(parse_user(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn partition_lists_as_slurm_prints_them() {
        for good in ["debug", "strict", "gpu,cpu", "a-b_c.1"] {
            assert!(is_partition_list(good), "{good}");
        }
        for bad in ["", "a b", "a,,b", ",a", "Partition=x", "a\tb"] {
            assert!(!is_partition_list(bad), "{bad}");
        }
    }
}
