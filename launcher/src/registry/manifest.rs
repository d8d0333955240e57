//! OCI and Docker v2 manifests, image indexes and image configs: just the fields berth uses.

use serde::Deserialize;

use crate::image_config::ImageConfig;
use crate::reference::Digest;
use crate::{Error, Result};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Sent with every manifest request: registries (Debian's docker-registry among them) answer
/// 404 for a format the client did not list.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

impl Descriptor {
    pub fn digest(&self) -> Result<Digest> {
        Digest::parse(&self.digest)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    pub manifests: Vec<Descriptor>,
}

/// What a manifest request returned.
#[derive(Debug, Clone)]
pub enum Manifest {
    Image(ImageManifest),
    Index(Index),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
}

impl Manifest {
    /// Parses manifest bytes; `content_type` is the response's Content-Type, used when the
    /// document does not name its own media type (OCI makes `mediaType` optional).
    pub fn parse(reference: &str, content_type: &str, bytes: &[u8]) -> Result<Manifest> {
        let bad = |message: String| Error::Manifest {
            reference: reference.to_string(),
            message,
        };
        let probe: Probe = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("the registry sent an unreadable manifest ({e})")))?;
        if probe.schema_version == Some(1) {
            return Err(bad(
                "Docker schema 1 manifests are not supported; push the image again with a \
                 current tool (it then gets a schema 2 or OCI manifest)"
                    .into(),
            ));
        }
        let content_type = content_type.split(';').next().unwrap_or("").trim();
        let media_type = probe.media_type.as_deref().unwrap_or(content_type);
        let is_index = match media_type {
            OCI_INDEX | DOCKER_LIST => true,
            OCI_MANIFEST | DOCKER_MANIFEST => false,
            _ => probe.manifests.is_some(),
        };
        let parsed = if is_index {
            serde_json::from_slice(bytes).map(Manifest::Index)
        } else {
            serde_json::from_slice(bytes).map(Manifest::Image)
        };
        parsed.map_err(|e| bad(format!("malformed {media_type} manifest ({e})")))
    }
}

/// The host's platform in OCI terms.
pub fn host_platform() -> Platform {
    let (architecture, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", Some("v7")),
        "x86" => ("386", None),
        "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
        "riscv64" => ("riscv64", None),
        "s390x" => ("s390x", None),
        other => (other, None),
    };
    Platform {
        architecture: architecture.into(),
        os: "linux".into(),
        variant: variant.map(String::from),
    }
}

/// Chooses the index entry for `platform`: same OS and architecture, preferring the same
/// variant (an entry without a variant counts as the architecture's default).
pub fn choose_platform<'a>(
    reference: &str,
    index: &'a Index,
    platform: &Platform,
) -> Result<&'a Descriptor> {
    let candidates: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == platform.os && p.architecture == platform.architecture)
        })
        .collect();
    let variant_of = |d: &Descriptor| d.platform.as_ref().and_then(|p| p.variant.clone());
    candidates
        .iter()
        .find(|d| variant_of(d) == platform.variant)
        .or_else(|| candidates.iter().find(|d| variant_of(d).is_none()))
        .or_else(|| candidates.first())
        .copied()
        .ok_or_else(|| {
            let available: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect();
            Error::Manifest {
                reference: reference.to_string(),
                message: format!(
                    "the image has no {}/{} variant (it has: {}); use an image built for \
                     this node's platform",
                    platform.os,
                    platform.architecture,
                    available.join(", ")
                ),
            }
        })
}

#[derive(Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<RunConfig>,
}

/// Docker writes `null` for unset lists, so every field is optional here.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

/// Reads the run settings from an image config blob (OCI or Docker; same fields).
pub fn parse_image_config(reference: &str, bytes: &[u8]) -> Result<ImageConfig> {
    let blob: ConfigBlob = serde_json::from_slice(bytes).map_err(|e| Error::Manifest {
        reference: reference.to_string(),
        message: format!("unreadable image config ({e})"),
    })?;
    let c = blob.config.unwrap_or(RunConfig {
        env: None,
        entrypoint: None,
        cmd: None,
        working_dir: None,
        user: None,
    });
    Ok(ImageConfig {
        env: c.env.unwrap_or_default(),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        working_dir: c.working_dir.unwrap_or_default(),
        user: c.user.unwrap_or_default(),
        ..ImageConfig::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST_A: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const DIGEST_B: &str =
        "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn parses_docker_and_oci_manifests() {
        let docker = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":10,"digest":"{DIGEST_A}"}},
            "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":20,"digest":"{DIGEST_B}"}}]}}"#
        );
        let Manifest::Image(m) = Manifest::parse("r", "", docker.as_bytes()).unwrap() else {
            panic!("not an image manifest")
        };
        assert_eq!(m.layers[0].size, 20);
        assert_eq!(m.config.digest().unwrap().to_string(), DIGEST_A);
        // OCI without mediaType in the body: the Content-Type decides.
        let oci = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","size":1,"digest":"{DIGEST_A}"}},"layers":[]}}"#
        );
        assert!(matches!(
            Manifest::parse("r", OCI_MANIFEST, oci.as_bytes()).unwrap(),
            Manifest::Image(_)
        ));
        let err = Manifest::parse("r", "", br#"{"schemaVersion":1,"fsLayers":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("schema 1"), "{err}");
        assert!(Manifest::parse("r", "", b"<html>").is_err());
    }

    fn index() -> Index {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","size":1,"digest":"{DIGEST_A}","platform":{{"architecture":"arm","os":"linux","variant":"v6"}}}},
            {{"mediaType":"{OCI_MANIFEST}","size":1,"digest":"{DIGEST_B}","platform":{{"architecture":"arm","os":"linux","variant":"v7"}}}},
            {{"mediaType":"{OCI_MANIFEST}","size":1,"digest":"{DIGEST_A}","platform":{{"architecture":"amd64","os":"linux"}}}},
            {{"mediaType":"{OCI_MANIFEST}","size":1,"digest":"{DIGEST_B}","platform":{{"architecture":"unknown","os":"unknown"}}}}]}}"#
        );
        match Manifest::parse("r", "", json.as_bytes()).unwrap() {
            Manifest::Index(i) => i,
            Manifest::Image(_) => panic!("index parsed as image"),
        }
    }

    #[test]
    fn chooses_the_platform() {
        let index = index();
        let p = |arch: &str, variant: Option<&str>| Platform {
            architecture: arch.into(),
            os: "linux".into(),
            variant: variant.map(String::from),
        };
        assert_eq!(
            choose_platform("r", &index, &p("arm", Some("v7")))
                .unwrap()
                .digest,
            DIGEST_B
        );
        assert_eq!(
            choose_platform("r", &index, &p("amd64", None))
                .unwrap()
                .digest,
            DIGEST_A
        );
        let err = choose_platform("r", &index, &p("riscv64", None))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("linux/arm/v7") && err.contains("linux/riscv64"),
            "{err}"
        );
        assert_eq!(host_platform().os, "linux");
    }

    #[test]
    fn reads_image_config_with_nulls() {
        let c = parse_image_config(
            "r",
            br#"{"architecture":"amd64","config":{"Env":["PATH=/bin"],"Entrypoint":null,"Cmd":["sh"],"WorkingDir":"/w"}}"#,
        )
        .unwrap();
        assert_eq!(c.env, vec!["PATH=/bin"]);
        assert!(c.entrypoint.is_empty());
        assert_eq!(c.cmd, vec!["sh"]);
        assert_eq!(c.working_dir, "/w");
        assert_eq!(
            parse_image_config("r", b"{}").unwrap(),
            ImageConfig::default()
        );
    }
}
