//! `berth stage in [--job N] SRC[:DST][,...]`, `berth stage out SRC:DST[,...]`,
//! `berth stage clean [--job N]`:
//! node-local copies of the caller's data (see `stage`). Runs as the calling user: what is
//! copied is what that user can read. `stage in` prints one line per source, `SRC LOCAL
//! DST` (tab-separated), for binding LOCAL at DST; progress goes to stderr.

use std::path::{Path, PathBuf};

use super::Globals;
use crate::config::Config;
use crate::stage::{self, stage_error, Area};
use crate::Result;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Copy files or trees to node-local storage, reusing unchanged earlier copies.
    In(InArgs),
    /// Copy node-local results back to shared storage.
    Out(OutArgs),
    /// Remove everything the caller has staged on this node.
    Clean(CleanArgs),
}

#[derive(Debug, clap::Args)]
pub struct InArgs {
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// The Slurm job the data is for: its copies in progress (and, with `[stage] after_job
    /// = "remove"`, its copies) are removed by `berth stage clean --job` at its end, and
    /// kept copies it binds are not evicted meanwhile.
    #[arg(long, value_name = "JOBID")]
    pub job: Option<u32>,
    /// `SRC[:DST][,SRC[:DST]...]`: absolute source paths, each with where a container sees
    /// it (default: the same path).
    #[arg(value_name = "SRC[:DST],...")]
    pub specs: String,
}

#[derive(Debug, clap::Args)]
pub struct OutArgs {
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// `SRC:DST[,SRC:DST...]`: node-local results and where they go.
    #[arg(value_name = "SRC:DST,...")]
    pub specs: String,
}

#[derive(Debug, clap::Args)]
pub struct CleanArgs {
    /// Remove only what job JOBID staged for itself (the job epilog runs this at job end).
    #[arg(long, value_name = "JOBID")]
    pub job: Option<u32>,
}

pub fn run(command: Command, globals: &Globals) -> Result<i32> {
    let config = Config::load_for_caller(globals.config.as_deref())?;
    match command {
        Command::In(args) => {
            let area = Area::open(&config.stage, args.job, args.quiet)?;
            for (src, dst) in parse(&args.specs, false)? {
                let staged = area.stage_in(&src)?;
                println!(
                    "{}\t{}\t{}",
                    src.display(),
                    staged.path.display(),
                    dst.display()
                );
            }
        }
        Command::Out(args) => {
            for (src, dst) in parse(&args.specs, true)? {
                stage::stage_out(&src, &dst, config.stage.threads, args.quiet)?;
            }
        }
        Command::Clean(CleanArgs { job: Some(job) }) => stage::clean_job(&config.stage, job)?,
        Command::Clean(CleanArgs { job: None }) => {
            Area::open(&config.stage, None, true)?.clean()?
        }
    }
    Ok(0)
}

/// Parses `SRC[:DST],...`; `need_dst`: stage-out, where DST is required.
fn parse(specs: &str, need_dst: bool) -> Result<Vec<(PathBuf, PathBuf)>> {
    specs
        .split(',')
        .map(|spec| {
            let (src, dst) = match spec.split_once(':') {
                Some((src, dst)) => (src, dst),
                None if need_dst => {
                    return Err(stage_error(format!(
                        "{spec:?} has no destination; write SRC:DST"
                    )))
                }
                None => (spec, spec),
            };
            for path in [src, dst] {
                if !Path::new(path).is_absolute() {
                    return Err(stage_error(format!(
                        "{path:?} in {spec:?} is not an absolute path; write absolute paths \
                         such as $PWD/data"
                    )));
                }
            }
            Ok((PathBuf::from(src), PathBuf::from(dst)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            parse("/a,/b:/in", false).unwrap(),
            vec![(p("/a"), p("/a")), (p("/b"), p("/in"))]
        );
        assert!(parse("/a", true)
            .unwrap_err()
            .to_string()
            .contains("SRC:DST"));
        assert!(parse("a:/x", false)
            .unwrap_err()
            .to_string()
            .contains("$PWD"));
        assert!(parse("/a,", false).is_err());
    }
}
