//! One digest for a whole job when the submitting user cannot resolve the tag: the
//! controller pins it once, before any step, with the site's credentials.
//!
//! At submission the SPANK plugin asks `berth resolve` (as the user) for the digest. A
//! private registry answers 401 to a user without credentials of their own; where the site
//! sets `[registry] controller_pin = true` (its slurm.conf runs `berth pin-job` as
//! `PrologSlurmctld`), `berth resolve` says so with [`DEFERRED_EXIT`], and the plugin puts
//! the image as written into the job's control environment (`BERTH_PIN`). Then:
//!
//! 1. [`record`] (PrologSlurmctld: once per job, on the controller, as SlurmUser, before
//!    slurmctld creates any step) judges the image with the site policy, resolves the tag
//!    with the site's credentials and writes `berth-pin:TAG-REF=PINNED-REF` into the job's
//!    AdminComment. Only root, SlurmUser and Slurm administrators can set AdminComment
//!    (slurmctld refuses it from users at submission and in `scontrol update`), so a user
//!    can neither write a pin nor change one.
//! 2. Every node's plugin, for a step whose request still names a tag, reads the pin back
//!    ([`lookup`], as root, through `squeue`'s one field) and runs that digest. The batch
//!    step also rewrites the job's request in its environment to the pinned reference, so
//!    every `srun` in the script carries the pin.
//!
//! A step that names a tag with no pin recorded for it is refused on the node (except the
//! batch step, which is one step on one node and pins for the steps after it): nodes that
//! resolved a tag each on their own could run different images.

use crate::config::Config;
use crate::policy::{ImageRequest, Policy, Verdict};
use crate::reference::Reference;
use crate::{cache, slurm, Error, Result};

/// `berth resolve`'s exit status for "the registry wants credentials this user lacks, and
/// the controller pins the tag instead" (`[registry] controller_pin`): 77, EX_NOPERM.
pub const DEFERRED_EXIT: i32 = 77;

/// The job control variable that names the image to pin, as PrologSlurmctld sees it:
/// Slurm prefixes every variable of the job's SPANK environment with `SPANK_` there.
pub const PROLOG_VAR: &str = "SPANK_BERTH_PIN";

/// What marks berth's entry in the AdminComment.
const MARK: &str = "berth-pin:";

/// `squeue`'s AdminComment field, whole.
const ADMIN_COMMENT: &str = "--Format=admin_comment:0";

/// The key a pin is recorded under: the canonical name with the tag (`latest` when none was
/// written), so `a/b`, `docker://a/b` and `a/b:latest` find the same pin.
fn key(reference: &Reference) -> String {
    format!("{}:{}", reference.name(), reference.tag_or_latest())
}

/// `comment` with berth's pin for `tagged` in place of any earlier one (a requeued job is
/// pinned again), the site's own words kept.
pub fn with_pin(comment: &str, tagged: &Reference, pinned: &Reference) -> String {
    let mut words: Vec<String> = comment
        .split_whitespace()
        .filter(|w| !w.starts_with(MARK))
        .map(str::to_owned)
        .collect();
    words.push(format!("{MARK}{}={pinned}", key(tagged)));
    words.join(" ")
}

/// The pin `comment` records for `tagged`, if any. A recorded pin must be a digest of the
/// same registry and repository; anything else is not taken for one.
pub fn find(comment: &str, tagged: &Reference) -> Option<Reference> {
    let wanted = key(tagged);
    comment
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(MARK)?.split_once('='))
        .filter(|(k, _)| *k == wanted)
        .filter_map(|(_, pinned)| Reference::parse(pinned).ok())
        .find(|p| p.digest.is_some() && p.name() == tagged.name())
}

/// PrologSlurmctld's work for `job`, whose submission left `image` unpinned: judge it with
/// the site policy, resolve it with the site's credentials and record the pin. Returns the
/// pin; `Ok(None)` where the policy refuses the image (the node refuses the step with the
/// reason, so nothing is recorded).
pub fn record(config: &Config, job: u32, image: &str) -> Result<Option<Reference>> {
    let tagged = match Policy::new(&config.policy).check(image)? {
        (ImageRequest::Registry(r), Verdict::Allow { .. }) if r.digest.is_none() => r,
        _ => return Ok(None),
    };
    let pinned = cache::resolve(config, image)?;
    let comment = slurm::job_field(job, ADMIN_COMMENT).map_err(|m| pin_error(job, m))?;
    slurm::set_admin_comment(job, &with_pin(&comment, &tagged, &pinned))
        .map_err(|m| pin_error(job, m))?;
    Ok(Some(pinned))
}

/// The pin recorded for `image` in `job`'s AdminComment, if any.
pub fn lookup(job: u32, image: &str) -> Result<Option<Reference>> {
    let tagged = Reference::parse(image)?;
    let comment = slurm::job_field(job, ADMIN_COMMENT).map_err(|m| pin_error(job, m))?;
    Ok(find(&comment, &tagged))
}

fn pin_error(job: u32, message: String) -> Error {
    Error::JobPin { job, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn r(text: &str) -> Reference {
        Reference::parse(text).unwrap()
    }

    #[test]
    fn a_pin_is_recorded_beside_the_sites_words_and_found_by_any_spelling() {
        let tagged = r("localhost:5002/p/busybox");
        let pinned = r(&format!("localhost:5002/p/busybox@{D1}"));
        let comment = with_pin("site note", &tagged, &pinned);
        assert_eq!(
            comment,
            format!("site note berth-pin:localhost:5002/p/busybox:latest={pinned}")
        );
        for spelling in [
            "localhost:5002/p/busybox",
            "docker://localhost:5002/p/busybox:latest",
        ] {
            assert_eq!(
                find(&comment, &r(spelling)),
                Some(pinned.clone()),
                "{spelling}"
            );
        }
        assert_eq!(find(&comment, &r("localhost:5002/p/busybox:2")), None);
        assert_eq!(find("", &tagged), None);
        // Pinned again (a requeued job): one entry, the new one.
        let again = with_pin(
            &comment,
            &tagged,
            &r(&format!("localhost:5002/p/busybox@{D2}")),
        );
        assert_eq!(again.matches(MARK).count(), 1, "{again}");
        assert!(
            again.starts_with("site note ") && again.ends_with(D2),
            "{again}"
        );
    }

    #[test]
    fn only_a_digest_of_the_same_repository_counts_as_a_pin() {
        let tagged = r("localhost:5002/p/busybox:1");
        for comment in [
            format!("berth-pin:localhost:5002/p/busybox:1=localhost:5002/other@{D1}"),
            "berth-pin:localhost:5002/p/busybox:1=localhost:5002/p/busybox:2".to_string(),
            "berth-pin:localhost:5002/p/busybox:1=not a reference".to_string(),
        ] {
            assert_eq!(find(&comment, &tagged), None, "{comment}");
        }
    }
}
