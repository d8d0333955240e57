//! `berth policy check [--json] [--fetch] IMAGE`: say whether the site policy allows an image,
//! and why; with `--fetch`, also pull an allowed registry image into the node cache.
//! `berth policy require-container [--partition P]`: say whether jobs must use a container.
//! The SPANK plugin runs both at submission (a clear error before the job queues) and on the
//! node (authoritative). Neither has a registry client, so they cannot touch the network.
//!
//! On the node the plugin runs `check --fetch` (as root, before the step's container starts):
//! the verdict and the fetch in one launcher start and one configuration parse, which every
//! containerized step would otherwise pay twice.
//!
//! Exit status: 0 allowed / required, 1 refused / not required (including malformed or tricky
//! references), 78 the configuration is unreadable or invalid, 125 berth itself failed (e.g.
//! with `--fetch` a failed pull; reported by `main`).

use std::ffi::OsString;

use serde_json::json;

use super::Globals;
use crate::config::Config;
use crate::policy::{ImageRequest, Policy, Verdict};
use crate::registry::{self, Endpoint};
use crate::{audit, metrics};
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
    /// them requires one. Without it, the global `require_container` answers.
    #[arg(long, value_name = "PARTITION")]
    pub partition: Option<String>,
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
    let partition = args.partition.as_deref().filter(|p| !p.is_empty());
    if !policy.requires_container(partition) {
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

fn check(args: CheckArgs, globals: &Globals) -> Result<i32> {
    let config = Config::load_for_caller(globals.config.as_deref())?;
    let policy = Policy::new(&config.policy);
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
            if let (true, ImageRequest::Registry(_)) = (args.fetch, &request) {
                // Before the verdict is printed: exit 0 promises the image is in the cache.
                let fetched = metrics::fetch(&config, image, &mut observed);
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
        observed.decision(match &outcome {
            Outcome::Allow(_, rule) => Ok(rule),
            Outcome::Deny(reason) => Err(reason),
        });
        publish_metrics(&config, &observed);
    }
    let pull_from = match &outcome {
        Outcome::Allow(ImageRequest::Registry(r), _) => {
            registry::mirrors::endpoints(&config.registry, &r.registry)
        }
        _ => Vec::new(),
    };
    Ok(report(args.json, image, outcome, &pull_from))
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

/// Prints the verdict on stdout and returns the exit status. For a registry image it also
/// says where the bytes would come from: always in JSON (`pull_from`), and in text as a
/// second line where `[[registry.mirrors]]` sends the pull elsewhere than the name written.
fn report(as_json: bool, image: &str, outcome: Outcome, pull_from: &[Endpoint]) -> i32 {
    let hosts: Vec<String> = pull_from.iter().map(Endpoint::describe).collect();
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
            let mut line = format!("allow: {what} (rule: {rule})");
            if pull_from.iter().any(|e| e.mirror_of.is_some()) {
                line.push_str(&format!("\npull from: {}", hosts.join(", then ")));
            }
            (line, object, 0)
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
