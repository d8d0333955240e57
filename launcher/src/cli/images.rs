//! `berth images`: list the node cache; `berth prune`: evict from it.

use std::time::SystemTime;

use super::Globals;
use crate::cache::{format_size, parse_size, Cache, CachedImage};
use crate::config::Config;
use crate::{sif, Result};

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Check each image instead of listing it: sealed where a service user owns the cache,
    /// and its root file system matching the SHA-256 recorded when it was built. Exits 1
    /// when one is damaged.
    #[arg(long)]
    pub verify: bool,
}

#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// Evict every image not in use.
    #[arg(long, conflicts_with = "max_size")]
    pub all: bool,
    /// Evict least recently used images until the cache is at most SIZE (e.g. 10G);
    /// the default is the configured `[cache] max_size`.
    #[arg(long, value_name = "SIZE")]
    pub max_size: Option<String>,
}

pub fn run_list(args: ListArgs, globals: &Globals) -> Result<i32> {
    let config = Config::load_for_caller(globals.config.as_deref())?;
    let cache = Cache::open(&config.cache)?;
    if args.verify {
        return verify(&cache);
    }
    let images = cache.list()?;
    println!(
        "{:<71}  {:>8}  {:>10}  SOURCE",
        "DIGEST", "SIZE", "LAST USED"
    );
    // Most recently used first, as people read a list top down.
    for image in images.iter().rev() {
        println!(
            "{:<71}  {:>8}  {:>10}  {}",
            image.digest.to_string(),
            format_size(image.size),
            ago(image.last_used),
            source(image)
        );
    }
    Ok(0)
}

pub fn run_prune(args: PruneArgs, globals: &Globals) -> Result<i32> {
    let config = Config::load_for_caller(globals.config.as_deref())?;
    let cache = Cache::open(&config.cache)?;
    let max = match (&args.max_size, args.all) {
        (_, true) => 0,
        (Some(size), false) => parse_size(size)?,
        (None, false) => cache.max_size(),
    };
    for image in cache.evict_to(max, None)? {
        println!("evicted {} {}", image.digest, format_size(image.size));
    }
    Ok(0)
}

/// `berth images --verify`: one line per image, `ok` or `DAMAGED` with the reason and fix.
fn verify(cache: &Cache) -> Result<i32> {
    let mut damaged = 0;
    for (image, verdict) in cache.verify()? {
        match verdict {
            Ok(sif::Verified::Hash) => println!("ok       {}", image.path.display()),
            Ok(sif::Verified::NotRecorded) => println!(
                "ok       {} (built before berth recorded hashes: structure checked only)",
                image.path.display()
            ),
            Err(e) => {
                damaged += 1;
                println!("DAMAGED  {}: {e}", image.path.display());
            }
        }
    }
    Ok(i32::from(damaged > 0))
}

/// The reference the image was fetched as, from the config stored in the SIF.
fn source(image: &CachedImage) -> String {
    match sif::open_image(&image.path) {
        Ok(opened) if !opened.config.source.is_empty() => opened.config.source,
        Ok(_) => "-".into(),
        Err(e) => format!("(unreadable: {e})"),
    }
}

fn ago(when: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(when)
        .map_or(0, |d| d.as_secs());
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}
