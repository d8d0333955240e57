//! The `berth` binary: parse the command line, run, turn errors into a message on stderr and
//! an exit status. 125 means berth itself failed (the convention of docker, podman and
//! crun), so it is never confused with the status of the user's command; 78 (EX_CONFIG)
//! means the site configuration is unreadable or invalid, so the SPANK plugin can tell the
//! user the node is misconfigured instead of blaming the image.

#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    let cli = berth::cli::Cli::parse();
    let code = match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("berth: {e}");
            match e {
                berth::Error::ConfigAt { .. } | berth::Error::ConfigUnreadable { .. } => {
                    berth::config::EXIT_MISCONFIGURED
                }
                _ => 125,
            }
        }
    };
    std::process::exit(code);
}
