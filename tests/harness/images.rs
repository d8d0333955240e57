//! Test images built by the suites and pushed to the cluster's registries: any layer bytes
//! (hostile ones too) under an OCI manifest written here, so a test controls every byte a
//! node pulls. Layers are gzip tar files: [`busybox_layer`] gives a base with a shell,
//! [`python_layer`] any entries Python's tarfile can write (`..` paths, links out of the
//! root, device nodes, set-id files, headers that lie about sizes).

use std::path::{Path, PathBuf};

use crate::{sh, unique_name, Cluster};

/// An image pushed by a test: its reference, manifest digest and layer digests (in order).
pub struct Pushed {
    /// `HOST/test/NAME:TAG`.
    pub reference: String,
    pub digest: String,
    pub layers: Vec<String>,
}

impl Pushed {
    /// `HOST/test/NAME@sha256:...`.
    pub fn by_digest(&self) -> String {
        let name = self.reference.rsplit_once(':').map_or("", |(n, _)| n);
        format!("{name}@{}", self.digest)
    }
}

/// Pushes an image of the gzip layers `layers` (bottom first) as `test/NAME:TAG` to the
/// registry `host`, with extra `skopeo copy` options (CA, credentials). Its config sets
/// `MARKER=marker`, PATH=/bin and `/bin/sh` as the command. The manifest is pushed as
/// written here (`--preserve-digests`), so its digest is known.
pub fn push_layers(
    host: &str,
    skopeo_options: &[String],
    name: &str,
    tag: &str,
    layers: &[&Path],
    marker: &str,
) -> Pushed {
    let work = Path::new("/var/tmp").join(unique_name("berth-e2e-layout"));
    let layout = work.join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    let mut layer_digests = Vec::new();
    for layer_path in layers {
        let bytes = std::fs::read(layer_path).unwrap();
        let diff_id = sh(&format!("gzip -dc {} | sha256sum", layer_path.display()));
        diff_ids.push(format!(
            "sha256:{}",
            diff_id.split_whitespace().next().unwrap()
        ));
        let digest = add_blob(&blobs, &bytes);
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": bytes.len(),
        }));
        layer_digests.push(digest);
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", format!("MARKER={marker}")], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let config_digest = add_blob(&blobs, config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descriptors,
    })
    .to_string();
    let digest = add_blob(&blobs, manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let reference = format!("{host}/test/{name}:{tag}");
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/templates/skopeo-policy.json");
    let digest_file = work.join("digest");
    sh(&format!(
        "skopeo --policy {} copy -q {} --preserve-digests --digestfile {} oci:{}:{tag} docker://{reference} </dev/null",
        policy.display(),
        skopeo_options.join(" "),
        digest_file.display(),
        layout.display()
    ));
    let pushed_digest = std::fs::read_to_string(&digest_file).unwrap();
    assert_eq!(pushed_digest.trim(), digest, "skopeo changed the manifest");
    std::fs::remove_dir_all(&work).unwrap();
    Pushed {
        reference,
        digest,
        layers: layer_digests,
    }
}

/// Puts the manifest `manifest` (JSON, its blobs already in the repository) as
/// `test/NAME:TAG` on the cluster's TLS registry with the registry API itself, so it may
/// say what skopeo would correct (layer sizes that lie). Returns the reference by digest.
pub fn put_manifest(name: &str, tag: &str, manifest: &serde_json::Value) -> String {
    let cluster = Cluster::get();
    let registry = cluster.tls_registry();
    let body = manifest.to_string();
    let work = Path::new("/var/tmp").join(unique_name("berth-e2e-manifest"));
    std::fs::write(&work, &body).unwrap();
    let headers = sh(&format!(
        "curl -fsS -D - -o /dev/null --cacert {} -X PUT \
         -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
         --data-binary @{} {}/v2/test/{name}/manifests/{tag}",
        cluster.ca_cert().display(),
        work.display(),
        registry.url()
    ));
    std::fs::remove_file(&work).unwrap();
    let digest = headers
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("docker-content-digest:")
                .map(|d| d.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no digest in the registry's answer: {headers}"));
    format!("{}/test/{name}@{digest}", registry.host)
}

/// Stores `bytes` as a blob of an OCI layout's `blobs/sha256`; returns its digest.
fn add_blob(blobs: &Path, bytes: &[u8]) -> String {
    let tmp = blobs.join("incoming");
    std::fs::write(&tmp, bytes).unwrap();
    let out = sh(&format!("sha256sum {}", tmp.display()));
    let hex = out.split_whitespace().next().unwrap().to_string();
    std::fs::rename(&tmp, blobs.join(&hex)).unwrap();
    format!("sha256:{hex}")
}

/// A gzip layer written by Python's tarfile from `script`, which gets `tf` (a GNU-format
/// TarFile writing to the layer) and `t` (tarfile) and may write raw bytes to `out`.
pub fn python_layer(dir: &Path, script: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let tar = dir.join("layer.tar");
    let program = format!(
        "import tarfile as t, io, sys\nout = open({:?}, 'wb')\ntf = t.open(fileobj=out, mode='w', format=t.GNU_FORMAT)\n{script}\n",
        tar.display().to_string()
    );
    std::fs::write(dir.join("layer.py"), program).unwrap();
    sh(&format!(
        "python3 {0}/layer.py && gzip -1 -c {0}/layer.tar > {0}/layer.tar.gz",
        dir.display()
    ));
    dir.join("layer.tar.gz")
}

/// A base layer in `dir`: busybox-static with every applet in /bin, /etc/passwd and the
/// usual empty directories, as `tests/cluster/up` builds its test images.
pub fn busybox_layer(dir: &Path) -> PathBuf {
    let rootfs = dir.join("base");
    std::fs::create_dir_all(&rootfs).unwrap();
    sh(&format!(
        "cd {0} && mkdir -p bin dev etc home proc root run sys tmp usr/bin var/tmp && \
         chmod 1777 tmp var/tmp && install -m 0755 /bin/busybox bin/busybox && \
         for a in $(bin/busybox --list); do [ $a = busybox ] || ln -sf busybox bin/$a; done && \
         echo 'root:x:0:0:root:/root:/bin/sh' > etc/passwd && \
         tar --sort=name --numeric-owner --owner=0 --group=0 --format=gnu -cf - . | gzip -1 > {1}",
        rootfs.display(),
        dir.join("base.tar.gz").display()
    ));
    std::fs::remove_dir_all(&rootfs).unwrap();
    dir.join("base.tar.gz")
}
