//! `berth save [--changes DIR [--keep-changes] [--below NAMED_DIR]] IMAGE DEST`: writes
//! IMAGE with the changes a container left in DIR (`berth start --keep-changes`, or a named
//! container's; with those of the named container below a copy's) to DEST as a SIF file,
//! then removes DIR unless told to keep it. The SPANK plugin runs it as the
//! job's user for `--container-save` when the step's container has stopped.

use std::path::PathBuf;

use super::Globals;
use crate::cache;
use crate::config::Config;
use crate::container::{self, save, spec, writable};
use crate::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container's changes directory (holding upper/ and work/); without it, the image
    /// as it is.
    #[arg(long, value_name = "DIR")]
    pub changes: Option<PathBuf>,
    /// Leave DIR in place (a named container's, which the job goes on using).
    #[arg(long)]
    pub keep_changes: bool,
    /// The named container's changes directory below DIR, where DIR is a copy's (its spec's
    /// org.berth.changes-below annotation): saved as the copy saw it. Never removed.
    #[arg(long, value_name = "NAMED_DIR", requires = "changes")]
    pub below: Option<PathBuf>,
    /// The image the container ran: a registry reference or a .sif or squashfs file.
    pub image: String,
    /// Where the SIF file goes (replaced if it exists).
    pub dest: PathBuf,
}

pub fn run(a: Args, g: &Globals) -> Result<i32> {
    if let Some(dir) = a
        .changes
        .iter()
        .chain(&a.below)
        .find(|d| !d.join("upper").is_dir())
    {
        return Err(Error::io(
            format!("{} holds no container's changes", dir.display()),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let config = Config::load_for_caller(g.config.as_deref())?;
    // Held until the SIF is written: a cached image stays locked against eviction.
    let image = cache::runnable(&config, &a.image)?;
    let source = crate::sif::open_image(&container::canonical_image(&image.path)?)?;
    let options = spec::Options {
        writable: true,
        no_home: true,
        command: vec!["/bin/sh".into()],
        ..Default::default()
    };
    let image_ref = spec::ImageRef {
        path: &source.path,
        offset: source.offset,
        config: &source.config,
    };
    let mut spec = spec::build(&image_ref, &options, &spec::Host::current())?;
    if let Some(dir) = &a.changes {
        writable::annotate(&mut spec, dir, a.below.as_deref());
    }
    save::save(&spec, &config.runtime, &source.config, &a.dest)?;
    match &a.changes {
        Some(dir) if !a.keep_changes => writable::remove(dir)?,
        _ => {}
    }
    eprintln!("berth: saved the container to {}", a.dest.display());
    Ok(0)
}
