//! Fuzz target bodies: every parser of input from outside berth, each a `fn(&[u8])` that
//! must return (any `Err` is fine) without panicking, hanging or exhausting memory.
//!
//! The same bodies run two ways: under libFuzzer with nightly (`fuzz/`, `cargo fuzz run
//! NAME`, for long runs whose results docs/SECURITY.md records), and on stable in CI for a
//! bounded time (`launcher/tests/fuzz.rs`: the seed corpus in `fuzz/corpus/NAME` plus
//! mutated inputs). A crash found either way becomes a seed of that corpus, so it is
//! replayed on every test run.
//!
//! Not part of berth's interface; public only so those two drivers can reach it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::config::{CacheConfig, Config};
use crate::policy::Pattern;
use crate::reference::{Digest, Reference};
use crate::registry::{auth, manifest};
use crate::sif::Sif;
use crate::squash;
use crate::unpack::{self, Budget, Compression, Limits};

/// A target: its name (the `fuzz/` binary and corpus directory) and body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target of the launcher.
pub const TARGETS: &[Target] = &[
    ("reference", reference),
    ("policy_pattern", policy_pattern),
    ("sif", sif),
    ("layer", layer),
    ("manifest", manifest),
    ("image_config", image_config),
    ("auth_challenge", auth_challenge),
    ("token_answer", token_answer),
    ("registry_error", registry_error),
    ("config_toml", config_toml),
    ("login_file", login_file),
];

/// The input as text; parsers of text never see anything else (headers, arguments and files
/// are checked for UTF-8 before them).
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// An image reference as a user writes it, and a digest as a registry sends it.
pub fn reference(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Ok(r) = Reference::parse(s) {
        let _ = (r.name(), r.tag_or_latest(), r.to_string());
        // What the parser accepted prints back to something it accepts as the same.
        let again = Reference::parse(&r.to_string()).expect("a printed reference parses");
        assert_eq!(again.to_string(), r.to_string());
    }
    let _ = crate::reference::shown(s);
    let _ = Digest::parse(s);
}

/// A `[policy] allowed` pattern from the site config, matched against a reference: the
/// input is `PATTERN\nREFERENCE`.
pub fn policy_pattern(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let (pattern, image) = s.split_once('\n').unwrap_or((s, "localhost:5000/a/b"));
    if let (Ok(p), Ok(r)) = (Pattern::parse(pattern), Reference::parse(image)) {
        let _ = p.matches(&r);
    }
}

/// A SIF file (a user's local image, or an image in the shared store): header,
/// descriptors, the partition berth would mount and the config it would read.
pub fn sif(data: &[u8]) {
    let Some(file) = scratch() else { return };
    if file.write_all_at(data, 0).is_err() || file.set_len(data.len() as u64).is_err() {
        return;
    }
    let Ok(sif) = Sif::from_file(file, Path::new("fuzz.sif")) else {
        return;
    };
    let _ = sif.header().uuid();
    for d in sif.descriptors() {
        let _ = (d.name(), d.partition(), sif.squashfs_super(d));
        let _ = sif.read_data(d, 4096);
    }
    let _ = sif.primary_partition();
    let _ = sif.config();
}

/// A layer blob (tar, gzip or zstd as its first byte says) built into a squashfs as a cache
/// build does it, with the default limits: the blob decompressed as it streams, the unpack
/// rules (paths, links, whiteouts, devices, sizes, bombs) applied to the image's tree, file
/// contents into data blocks and the tree into the squashfs tables. It is applied twice, as
/// two layers, so that whiteouts, opaque directories, replacements and hard links meet
/// entries of a lower layer. All on this thread and in memory ([`scratch`]): thousands of
/// inputs a second.
pub fn layer(data: &[u8]) {
    let Some((&kind, blob)) = data.split_first() else {
        return;
    };
    let compression = match kind % 3 {
        0 => Compression::None,
        1 => Compression::Gzip,
        _ => Compression::Zstd,
    };
    let Ok(limits) = Limits::from_config(&CacheConfig::default()) else {
        return;
    };
    let Some(out) = scratch() else { return };
    let budget = Budget::new(limits);
    let _ = squash::build_serial(&out, 0, LAYER_BLOCKS, |data| {
        let mut tree = squash::Tree::new();
        for layer in ["sha256:lower", "sha256:upper"] {
            let tar = unpack::decoder(blob, compression)
                .map_err(|e| crate::Error::io("starting the decoder", e))?;
            unpack::apply_tar(&mut tree, data, tar, layer, &budget)?;
        }
        Ok(tree)
    });
}

/// Data blocks one layer input may stream (4 MiB): a bomb stops there, as it would at
/// `max_image_size`, so that one input costs milliseconds, not the fuzzer's memory.
const LAYER_BLOCKS: usize = 32;

/// A manifest or index as a registry sends it, with the Content-Type chosen by the first
/// byte, then the platform berth would choose from an index.
pub fn manifest(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    const TYPES: [&str; 5] = [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/json; charset=utf-8",
    ];
    let content_type = TYPES[kind as usize % TYPES.len()];
    match manifest::Manifest::parse("fuzz", content_type, body) {
        Ok(manifest::Manifest::Index(index)) => {
            let _ = manifest::choose_platform("fuzz", &index, &manifest::host_platform());
        }
        Ok(manifest::Manifest::Image(_)) | Err(_) => {}
    }
}

/// An image config blob.
pub fn image_config(data: &[u8]) {
    let _ = manifest::parse_image_config("fuzz", data);
}

/// A registry's `WWW-Authenticate` header.
pub fn auth_challenge(data: &[u8]) {
    if let Some(s) = text(data) {
        let _ = auth::parse_challenge(s);
    }
}

/// A token service's answer to berth's request for a pull token (any server the
/// registry's `WWW-Authenticate` names).
pub fn token_answer(data: &[u8]) {
    let _ = crate::registry::token_of(data);
}

/// A registry's error body (its JSON `errors`, or anything else: a proxy's HTML page),
/// which reaches the user's terminal as text: short, with control characters escaped.
pub fn registry_error(data: &[u8]) {
    let text = crate::registry::error_text(data);
    assert!(!text.chars().any(char::is_control), "{text:?}");
    // At most 200 characters and the note of the length cut.
    assert!(text.chars().count() <= 256, "{text:?}");
}

/// A user's registry login file (Docker's `config.json`, Podman's `auth.json`), which root
/// reads with the user's rights for the user's pulls: the entry for a registry, by each
/// spelling of its name, and its base64 `USER:PASSWORD`.
pub fn login_file(data: &[u8]) {
    if let Some(s) = text(data) {
        for registry in ["localhost:5000", "docker.io"] {
            let _ = auth::parse_auth_file(Path::new("config.json"), s, registry);
        }
    }
}

/// The site configuration, `berth.toml`, as `berth config check` reads it.
pub fn config_toml(data: &[u8]) {
    if let Some(s) = text(data) {
        let _ = Config::from_toml(Path::new("berth.toml"), s);
    }
}

/// This thread's scratch file in memory (a memfd), as a new descriptor of it: created once
/// and reused by every input, since creating and freeing a memfd per input cost more than
/// parsing most inputs. Its contents are whatever the last input left.
fn scratch() -> Option<File> {
    thread_local! {
        static SCRATCH: Option<File> = berth_sys::memfd::anonymous(c"berth-fuzz").ok();
    }
    SCRATCH.with(|file| file.as_ref()?.try_clone().ok())
}
