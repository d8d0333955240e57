//! What an image says about how to run it: the subset of the OCI image config
//! (`config` object of application/vnd.oci.image.config.v1+json) that berth honours. It is
//! stored inside every SIF berth writes, so `berth exec` needs nothing but the SIF file.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// `KEY=VALUE` strings, in image order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// The image's `User`; berth never switches to it (tasks keep the caller's uid) but
    /// reports it in `berth sif inspect`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// The manifest digest the image was converted from (`sha256:...`), empty for images
    /// built locally with `berth sif create`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manifest_digest: String,
    /// The reference the image was pulled as, for display.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// SHA-256 of the SIF's root partition, recorded by the writer once the squashfs is
    /// complete, so `berth images --verify` can tell a whole image from a damaged one
    /// (a disk error, a copy cut short). Empty in images berth wrote before it recorded one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rootfs_sha256: String,
    /// The same check for the images berth builds from layer streams (`squash`), which
    /// record this instead: the SHA-256 of the root partition's bytes after its squashfs
    /// superblock, then of the superblock, the order the writer writes them in, so it hashes
    /// them as it writes them and reads nothing back (see `squash::digest`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rootfs_sha256_superblock_last: String,
}

impl ImageConfig {
    /// The image's PATH, or the conventional default when the image sets none, so commands
    /// that exist only in the image are still found.
    pub fn path(&self) -> &str {
        self.env
            .iter()
            .find_map(|kv| kv.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_comes_from_env_or_default() {
        let mut c = ImageConfig::default();
        assert!(c.path().contains("/usr/bin"));
        c.env = vec!["A=1".into(), "PATH=/opt/x/bin".into()];
        assert_eq!(c.path(), "/opt/x/bin");
    }

    #[test]
    fn round_trips_oci_field_names() {
        let j = r#"{"Env":["A=1"],"Entrypoint":["/bin/sh"],"Cmd":["-c","true"],"WorkingDir":"/w"}"#;
        let c: ImageConfig = serde_json::from_str(j).unwrap();
        assert_eq!(c.entrypoint, vec!["/bin/sh"]);
        assert_eq!(c.working_dir, "/w");
        let back: ImageConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
