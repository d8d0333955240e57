//! The plugin's one error type. Every message is printed by Slurm after a "berth: " prefix
//! (see `spank::log_error`) into a place the reader can act on: srun/sbatch's stderr on the
//! login node, the task's stderr (srun output or the batch output file) on the node, or the
//! slurmd log for the admin. So each says what went wrong and what to do about it.

use crate::options::{IMAGE_MAX_BYTES, IMAGE_OPTION};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "--{IMAGE_OPTION} needs a value: give an image reference such as \
         --{IMAGE_OPTION}=registry.example.com/team/app:1.0"
    )]
    ImageEmpty,

    #[error(
        "--{IMAGE_OPTION} is {len} bytes long, more than the {IMAGE_MAX_BYTES} allowed: give a \
         registry reference such as registry.example.com/team/app:1.0"
    )]
    ImageTooLong { len: usize },

    #[error(
        "--{IMAGE_OPTION} is not valid UTF-8: type the image reference again as plain text, \
         e.g. registry.example.com/team/app:1.0"
    )]
    ImageNotUtf8,

    #[error(
        "--{IMAGE_OPTION} contains {what} at byte {at}: an image reference has no spaces or \
         control characters; remove it (or quote the shell variable that produced it)"
    )]
    ImageBadCharacter { what: String, at: usize },

    #[error(
        "the job asks for container image '{image}' (from {origin}), but this berth build does \
         not run containers on compute nodes yet; remove --container-image / --container to \
         run on the host"
    )]
    ContainersNotSupportedYet { image: String, origin: &'static str },

    #[error(
        "unknown argument '{arg}' for spank_berth.so in plugstack.conf, ignored: the plugin \
         takes berth=/path/to/berth"
    )]
    UnknownPluginArgument { arg: String },

    #[error(
        "berth={value} for spank_berth.so in plugstack.conf is not an absolute path, ignored \
         (using {default}): write e.g. berth=/usr/local/bin/berth"
    )]
    RelativeLauncherPath {
        value: String,
        default: &'static str,
    },

    #[error(
        "Slurm refused {call} ({reason}): check that spank_berth.so was built against this \
         Slurm version's headers"
    )]
    Spank { call: &'static str, reason: String },

    #[error(
        "internal error in the plugin's {callback} callback ({detail}); please report this to \
         your site's admins"
    )]
    Panicked {
        callback: &'static str,
        detail: String,
    },

    #[error(
        "this step was stopped rather than run outside its container, because the plugin \
         failed earlier on this node: {earlier}"
    )]
    EarlierFailure { earlier: String },
}
