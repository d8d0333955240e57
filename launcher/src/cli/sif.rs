//! `berth sif create` and `berth sif inspect`.

use std::path::{Path, PathBuf};

use super::Globals;
use crate::image_config::ImageConfig;
use crate::{sif, Error, Result};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Build a SIF from a directory (squashed with mksquashfs) or an existing squashfs file,
    /// storing the image config (env, entrypoint, cmd, workdir) that `berth exec` applies.
    Create(CreateArgs),
    /// Print a SIF's header and descriptors, its root file system and its stored config.
    Inspect {
        /// A SIF or bare squashfs file.
        file: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Start from this image config: berth's JSON (`{"Env":[...],"Cmd":[...],...}`) or an OCI
    /// image config, whose `config` object is used. The options below override it. (Not
    /// `--config`: that global option names berth's own berth.toml.)
    #[arg(long = "image-config", value_name = "FILE.json")]
    config_file: Option<PathBuf>,
    /// Set an environment variable (KEY=VALUE), replacing the same key from --image-config.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<String>,
    /// Entrypoint, one argument per use (--entrypoint /bin/sh --entrypoint -c).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    entrypoint: Vec<String>,
    /// Default command, one argument per use.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    cmd: Vec<String>,
    /// Working directory inside the container.
    #[arg(long, value_name = "DIR", value_parser = parse_workdir)]
    workdir: Option<String>,
    /// A directory (the root file system) or a squashfs file.
    source: PathBuf,
    /// The SIF file to write (replaced atomically if it exists).
    out: PathBuf,
}

pub fn run(c: Command, _g: &Globals) -> Result<i32> {
    match c {
        Command::Create(a) => {
            let config = build_config(&a)?;
            if a.source.is_dir() {
                sif::create_from_dir(&a.out, &a.source, &config)?;
            } else {
                sif::write_image(&a.out, &a.source, &config)?;
            }
            Ok(0)
        }
        Command::Inspect { file } => {
            print!("{}", sif::inspect(&file)?);
            Ok(0)
        }
    }
}

fn build_config(a: &CreateArgs) -> Result<ImageConfig> {
    let mut config = match &a.config_file {
        Some(p) => read_config(p)?,
        None => ImageConfig::default(),
    };
    for kv in &a.env {
        let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
        config
            .env
            .retain(|old| old.split_once('=').map_or(old.as_str(), |(k, _)| k) != key);
        config.env.push(kv.clone());
    }
    if !a.entrypoint.is_empty() {
        config.entrypoint = a.entrypoint.clone();
    }
    if !a.cmd.is_empty() {
        config.cmd = a.cmd.clone();
    }
    if let Some(w) = &a.workdir {
        config.working_dir = w.clone();
    }
    Ok(config)
}

/// Reads berth's own config JSON or an OCI image config (which nests it under `config`).
fn read_config(path: &Path) -> Result<ImageConfig> {
    let bad = |message: String| Error::Config {
        path: path.to_owned(),
        message,
    };
    let text =
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let mut v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    if let Some(inner) = v.get_mut("config").filter(|c| c.is_object()) {
        v = inner.take();
    }
    serde_json::from_value(v).map_err(|e| {
        bad(format!(
            "not an image config ({e}); expected {{\"Env\":[...],\"Entrypoint\":[...],\"Cmd\":[...],\"WorkingDir\":\"...\"}}"
        ))
    })
}

fn parse_env(kv: &str) -> std::result::Result<String, String> {
    match kv.split_once('=') {
        Some((k, _)) if !k.is_empty() => Ok(kv.to_owned()),
        _ => Err("expected KEY=VALUE, e.g. --env PATH=/usr/bin:/bin".to_owned()),
    }
}

fn parse_workdir(w: &str) -> std::result::Result<String, String> {
    if w.starts_with('/') {
        Ok(w.to_owned())
    } else {
        Err("the working directory must be an absolute path inside the image".to_owned())
    }
}
