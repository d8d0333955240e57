//! Fuzz target bodies of the plugin's parsers of outside input: the plugstack.conf
//! arguments, and the values of every `--container-*` option and `BERTH_CONTAINER_*`
//! variable (users write those; Slurm replays them on the node). Each must return without
//! panicking: a panic would be caught by the guard, but fail the user's step. Run like the
//! launcher's (`fuzz/driver.rs`: `spank-plugin/tests/fuzz.rs` on stable, `fuzz/` with
//! cargo-fuzz). Not part of the plugin; public only so those drivers can reach it.

use crate::config::Config;
use crate::options::{settings, Given, Opt, Origin};

/// A target: its name (the cargo-fuzz binary and corpus directory) and body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target of the plugin.
pub const TARGETS: &[Target] = &[
    ("plugstack_args", plugstack_args),
    ("option_values", option_values),
];

/// plugstack.conf's arguments after the plugin's path, one per line.
pub fn plugstack_args(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let args: Vec<&str> = text.split('\n').collect();
    let _ = Config::from_plugin_args(&args);
}

/// Options as given: records of `OPTION ORIGIN VALUE\0`, the option and its origin each one
/// byte (taken modulo their counts); what follows the last record is the value of every
/// `BERTH_CONTAINER_*` variable, the environment of a submission.
pub fn option_values(data: &[u8]) {
    let options = (0..).take_while(|&i| Opt::from_index(i).is_some()).count();
    let mut given = Vec::new();
    let mut rest = data;
    while let [opt, origin, tail @ ..] = rest {
        let Some(end) = tail.iter().position(|&b| b == 0) else {
            break;
        };
        let Some(opt) = Opt::from_index(*opt as usize % options) else {
            return;
        };
        let origin = match origin % 3 {
            0 => Origin::Environment,
            1 => Origin::Inherited,
            _ => Origin::CommandLine,
        };
        given.push(Given {
            opt,
            value: tail[..end].to_vec(),
            origin,
        });
        rest = &tail[end + 1..];
    }
    let _ = settings(&given, None);
    let env = |_: &str| Some(rest.to_vec());
    let _ = settings(&given, Some(&env));
}
