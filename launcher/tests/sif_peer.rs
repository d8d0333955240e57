//! SIF reading against the files Apptainer's reference implementation wrote
//! (../shared/peer-data/sif/images), and SIF writing checked by mounting the result with
//! Debian's squashfuse at the partition offset, as `berth exec` does.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use berth::image_config::ImageConfig;
use berth::sif::{create_from_dir, inspect, open_image, write_image, PARTITION_OFFSET};
use berth::Error;

/// The shared peer data, or None (the test says so and is skipped) in a clone without the
/// project's `../shared` beside it.
fn peer_dir() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peer-data/sif");
    if p.join("images").is_dir() {
        return Some(p);
    }
    eprintln!(
        "skipped: {} is missing: these tests read Apptainer's SIF test files from the shared \
         peer data beside the checkout",
        p.display()
    );
    None
}

#[derive(Debug, PartialEq)]
enum Verdict {
    /// Root file system at this offset and size.
    Accept(u64, u64),
    NoRootfs,
    /// A PrimSys partition whose bytes are not a squashfs (Apptainer's legacy fixtures hold
    /// a 4-byte stand-in, 0xdeadbeef).
    NotSquashfs,
}

/// Every file in the peer set, with the verdict berth must give. A new file without a verdict
/// fails the test, so a change in what berth accepts is always a deliberate one.
fn expected() -> BTreeMap<&'static str, Verdict> {
    use Verdict::*;
    // Apptainer's generator puts the squashfs (input/root.squashfs, 4096 bytes) second in
    // group 1, after a 4-byte Raw/System partition at 32768.
    BTreeMap::from([
        ("empty-id.sif", NoRootfs),
        ("empty-launch-script.sif", NoRootfs),
        ("empty.sif", NoRootfs),
        ("one-group-signed-dsse.sif", Accept(36864, 4096)),
        ("one-group-signed-legacy-all.sif", NotSquashfs),
        ("one-group-signed-legacy-group.sif", NotSquashfs),
        ("one-group-signed-legacy.sif", NotSquashfs),
        ("one-group-signed-pgp.sif", Accept(36864, 4096)),
        ("one-group.sif", Accept(36864, 4096)),
        ("one-object-crypt-message.sif", NoRootfs),
        ("one-object-generic-json.sif", NoRootfs),
        ("one-object-oci-blob.sif", NoRootfs),
        ("one-object-oci-root-index.sif", NoRootfs),
        ("one-object-sbom.sif", NoRootfs),
        ("one-object-time.sif", NoRootfs),
        ("two-groups-signed-dsse.sif", Accept(36864, 4096)),
        ("two-groups-signed-legacy-all.sif", NotSquashfs),
        ("two-groups-signed-legacy-group.sif", NotSquashfs),
        ("two-groups-signed-legacy.sif", NotSquashfs),
        ("two-groups-signed-pgp.sif", Accept(36864, 4096)),
        ("two-groups.sif", Accept(36864, 4096)),
    ])
}

#[test]
fn every_peer_file_is_accepted_or_refused_for_the_right_reason() {
    let Some(peer) = peer_dir() else { return };
    let dir = peer.join("images");
    let mut want = expected();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let verdict = want
            .remove(name.as_str())
            .unwrap_or_else(|| panic!("{name}: new peer file; inspect it and add its verdict"));
        let got = open_image(&path);
        match (&verdict, &got) {
            (Verdict::Accept(offset, size), Ok(src)) => {
                assert_eq!((src.offset, src.size), (*offset, *size), "{name}");
                assert_eq!(
                    src.config,
                    ImageConfig::default(),
                    "{name}: no berth config"
                );
            }
            (Verdict::NoRootfs, Err(e @ Error::SifNoRootfs { .. })) => {
                assert!(
                    e.to_string().contains("no partition of type PrimSys"),
                    "{e}"
                )
            }
            (Verdict::NotSquashfs, Err(Error::SifCorrupt { message, .. })) => {
                assert!(
                    message.contains("4 bytes, too small to be a squashfs"),
                    "{message}"
                )
            }
            _ => panic!("{name}: expected {verdict:?}, got {got:?}"),
        }
        // Every file, runnable or not, can be inspected.
        let text = inspect(&path).unwrap_or_else(|e| panic!("{name}: inspect failed: {e}"));
        assert!(text.starts_with("SIF version 01"), "{name}: {text}");
        assert!(text.contains("root file system: "), "{name}: {text}");
    }
    assert!(want.is_empty(), "peer files missing: {:?}", want.keys());
}

/// Mounts `image` at `offset` with squashfuse, runs `f` on the mount point, then unmounts.
fn with_squashfuse<T>(image: &Path, offset: u64, f: impl FnOnce(&Path) -> T) -> T {
    let mnt = tempfile::tempdir().unwrap();
    let st = Command::new("squashfuse")
        .arg("-o")
        .arg(format!("offset={offset}"))
        .arg(image)
        .arg(mnt.path())
        .status()
        .expect("squashfuse is needed for this test (apt-get install squashfuse)");
    assert!(
        st.success(),
        "squashfuse {} at offset {offset} failed",
        image.display()
    );
    // Unmount even when `f` panics, so no FUSE mount outlives the test.
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("fusermount3").arg("-u").arg(self.0).status();
        }
    }
    let _u = Unmount(mnt.path());
    f(mnt.path())
}

#[test]
fn accepted_peer_file_mounts_at_its_offset() {
    let Some(peer) = peer_dir() else { return };
    let src = open_image(&peer.join("images/two-groups-signed-pgp.sif")).unwrap();
    let hello = with_squashfuse(&src.path, src.offset, |m| {
        std::fs::read(m.join("hello.txt")).unwrap()
    });
    let original = with_squashfuse(&peer.join("input/root.squashfs"), 0, |m| {
        std::fs::read(m.join("hello.txt")).unwrap()
    });
    assert_eq!(hello, original);
    assert_eq!(hello, b"Hello from Sylabs!\n");
}

#[test]
fn created_sif_mounts_with_squashfuse_and_gives_back_the_files() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    // Incompressible bytes spanning several 128 KiB squashfs blocks, plus a small text file.
    let mut big = vec![0u8; 300_000];
    let mut x: u32 = 12345;
    for b in big.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    std::fs::write(root.join("bin/tool"), &big).unwrap();
    std::fs::set_permissions(
        root.join("bin/tool"),
        std::fs::Permissions::from_mode(0o751),
    )
    .unwrap();
    std::fs::write(root.join("etc/motd"), b"welcome\n").unwrap();
    std::os::unix::fs::symlink("../etc/motd", root.join("bin/motd")).unwrap();

    let config = ImageConfig {
        env: vec!["PATH=/bin".into()],
        cmd: vec!["/bin/tool".into()],
        working_dir: "/etc".into(),
        ..Default::default()
    };
    let out = t.path().join("out.sif");
    create_from_dir(&out, &root, &config).unwrap();
    let src = open_image(&out).unwrap();
    assert_eq!(src.offset, PARTITION_OFFSET);
    assert_eq!(src.offset % 4096, 0);
    assert_eq!(src.config.rootfs_sha256.len(), 64);
    assert_eq!(
        src.config,
        ImageConfig {
            rootfs_sha256: src.config.rootfs_sha256.clone(),
            ..config.clone()
        }
    );

    with_squashfuse(&out, src.offset, |m| {
        assert_eq!(std::fs::read(m.join("bin/tool")).unwrap(), big);
        assert_eq!(std::fs::read(m.join("etc/motd")).unwrap(), b"welcome\n");
        assert_eq!(
            std::fs::read_link(m.join("bin/motd")).unwrap(),
            Path::new("../etc/motd")
        );
        let meta = std::fs::metadata(m.join("bin/tool")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o751);
        let on_disk = std::fs::metadata(root.join("bin/tool")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (on_disk.uid(), on_disk.gid()));
    });

    // The same squashfs, written from a file rather than a directory, reads the same.
    let sq = t.path().join("root.sqfs");
    std::fs::write(
        &sq,
        &std::fs::read(&out).unwrap()[src.offset as usize..(src.offset + src.size) as usize],
    )
    .unwrap();
    let out2 = t.path().join("out2.sif");
    write_image(&out2, &sq, &config).unwrap();
    let src2 = open_image(&out2).unwrap();
    with_squashfuse(&out2, src2.offset, |m| {
        assert_eq!(std::fs::read(m.join("bin/tool")).unwrap(), big);
    });
    // A bare squashfs is an image too.
    let bare = open_image(&sq).unwrap();
    assert_eq!((bare.offset, bare.size), (0, src.size));
}

fn berth(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn berth_sif_create_and_inspect_commands() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("f"), b"x").unwrap();
    let conf = t.path().join("oci-config.json");
    std::fs::write(
        &conf,
        br#"{"architecture":"amd64","config":{"Env":["PATH=/bin","A=1"],"Cmd":["old"]}}"#,
    )
    .unwrap();
    let out = t.path().join("img.sif");
    let o = berth(&[
        "sif",
        "create",
        "--image-config",
        conf.to_str().unwrap(),
        "--env",
        "A=2",
        "--entrypoint",
        "/bin/sh",
        "--entrypoint",
        "-c",
        "--cmd",
        "echo hi",
        "--workdir",
        "/tmp",
        root.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let src = open_image(&out).unwrap();
    assert_eq!(src.config.env, vec!["PATH=/bin", "A=2"]);
    assert_eq!(src.config.entrypoint, vec!["/bin/sh", "-c"]);
    assert_eq!(src.config.cmd, vec!["echo hi"]);
    assert_eq!(src.config.working_dir, "/tmp");

    let o = berth(&["sif", "inspect", out.to_str().unwrap()]);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.contains("descriptors:   2 used, 46 free, 48 total"),
        "{text}"
    );
    assert!(text.contains("Squashfs/PrimSys/"), "{text}");
    assert!(text.contains("\"berth-image-config.json\""), "{text}");
    assert!(
        text.contains("root file system: object 1, squashfs 4.0 (lz4), offset 32768"),
        "{text}"
    );
    assert!(text.contains("\"echo hi\""), "{text}");

    // Errors: berth's status 125 and a message naming the cause.
    let o = berth(&["sif", "inspect", conf.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a container image"));
    let o = berth(&[
        "sif",
        "create",
        "--env",
        "NOEQUALS",
        root.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("KEY=VALUE"));
}
