//! The `berth` binary: parse the command line, run, turn errors into a message on stderr and
//! an exit status. 125 means berth itself failed (the convention of docker, podman and
//! crun), so it is never confused with the status of the user's command.

#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    let cli = berth::cli::Cli::parse();
    let code = match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("berth: {e}");
            125
        }
    };
    std::process::exit(code);
}
