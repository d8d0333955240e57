//! berth's srun/sbatch/salloc options: their names and help text (what Slurm shows in
//! `srun --help`), and the validation of their values. Pure: nothing here touches Slurm, so
//! every rule is unit-tested. Registration with Slurm is in `spank.rs`.
//!
//! Slurm's own `--container` is deliberately absent: a SPANK option of that name conflicts
//! with the native one and is dropped by Slurm; its value reaches the node as SLURM_CONTAINER.

use std::ffi::CStr;

use crate::error::Error;

/// `--container-image`, named as in pyxis so scripts written for pyxis keep working.
pub const IMAGE_OPTION: &str = "container-image";

/// The longest image value accepted. Real references are far shorter (registries cap a
/// repository name at 255 bytes); the cap keeps a runaway value out of the job environment
/// and the launch message.
pub const IMAGE_MAX_BYTES: usize = 4096;

/// One option as Slurm needs it described. C strings because Slurm keeps the pointers.
#[derive(Debug)]
pub struct OptionSpec {
    pub name: &'static CStr,
    pub arginfo: &'static CStr,
    pub usage: &'static CStr,
}

pub const CONTAINER_IMAGE: OptionSpec = OptionSpec {
    name: c"container-image",
    arginfo: c"IMAGE",
    usage: c"[berth] the container image to run tasks in (registry reference)",
};

/// Checks a `--container-image` value as given on the command line and returns it as text.
/// Only the shape is checked here; whether the reference parses, and whether policy allows
/// its registry, is the launcher's job.
pub fn validate_image(value: &[u8]) -> Result<&str, Error> {
    if value.is_empty() {
        return Err(Error::ImageEmpty);
    }
    if value.len() > IMAGE_MAX_BYTES {
        return Err(Error::ImageTooLong { len: value.len() });
    }
    let text = std::str::from_utf8(value).map_err(|_| Error::ImageNotUtf8)?;
    if let Some((at, ch)) = text
        .char_indices()
        .find(|(_, c)| c.is_whitespace() || c.is_control())
    {
        return Err(Error::ImageBadCharacter {
            what: describe(ch),
            at,
        });
    }
    Ok(text)
}

/// Names an offending character so the user can find it even when it does not print.
fn describe(ch: char) -> String {
    match ch {
        ' ' => "a space".to_owned(),
        '\t' => "a tab".to_owned(),
        '\n' => "a newline".to_owned(),
        c => format!("the character U+{:04X}", u32::from(c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_registry_references() {
        for image in [
            "busybox",
            "registry.example.com:5000/team/app:1.0",
            "nvcr.io#nvidia/pytorch:24.01-py3",
            "docker://ubuntu@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "127.0.0.1:5000/é/app", // UTF-8 is shape-valid; the reference parser judges it
        ] {
            assert_eq!(validate_image(image.as_bytes()), Ok(image));
        }
    }

    #[test]
    fn refuses_empty() {
        assert_eq!(validate_image(b""), Err(Error::ImageEmpty));
    }

    #[test]
    fn length_limit_is_inclusive() {
        let max = "a".repeat(IMAGE_MAX_BYTES);
        assert!(validate_image(max.as_bytes()).is_ok());
        let over = "a".repeat(IMAGE_MAX_BYTES + 1);
        assert_eq!(
            validate_image(over.as_bytes()),
            Err(Error::ImageTooLong {
                len: IMAGE_MAX_BYTES + 1
            })
        );
    }

    #[test]
    fn refuses_invalid_utf8() {
        assert_eq!(validate_image(b"app\xff:1"), Err(Error::ImageNotUtf8));
    }

    #[test]
    fn refuses_whitespace_and_control_characters_with_their_position() {
        let cases: [(&str, &str, usize); 5] = [
            ("app 1", "a space", 3),
            ("\tapp", "a tab", 0),
            ("app\n", "a newline", 3),
            ("a\u{7f}pp", "the character U+007F", 1),
            ("app\u{a0}x", "the character U+00A0", 3), // no-break space, pasted from a web page
        ];
        for (value, what, at) in cases {
            assert_eq!(
                validate_image(value.as_bytes()),
                Err(Error::ImageBadCharacter {
                    what: what.to_owned(),
                    at
                }),
                "{value:?}"
            );
        }
    }

    #[test]
    fn messages_name_the_option_and_the_fix() {
        let msg = validate_image(b"").unwrap_err().to_string();
        assert!(msg.starts_with("--container-image needs a value"), "{msg}");
        assert!(
            msg.contains("--container-image=registry.example.com/"),
            "{msg}"
        );
        let msg = validate_image(b"a b").unwrap_err().to_string();
        assert!(msg.contains("a space at byte 1"), "{msg}");
    }

    #[test]
    fn spec_fits_slurm_limits() {
        // Slurm ignores options whose name is longer than SPANK_OPTION_MAXLEN (75).
        assert!(CONTAINER_IMAGE.name.to_bytes().len() <= 75);
        assert_eq!(CONTAINER_IMAGE.name.to_str(), Ok(IMAGE_OPTION));
        assert!(CONTAINER_IMAGE.usage.to_bytes().starts_with(b"[berth] "));
    }
}
