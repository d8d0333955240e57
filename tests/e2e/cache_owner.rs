//! Issue 10, the cache owner: with `[cache] owner = "berth"` (the shipped config and the
//! cluster's), root's fetch builds as the service user `berth` and seals what it built, and
//! an image's own owners and modes survive the unprivileged build. Needs
//! `tests/cluster/up` (which creates the user through the package and puts a root-owned
//! 0700 directory and a file of uid 1234 in the test images); fails without it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use berth_e2e::{sh, Cluster, Cmd, ScratchBerth};

/// A private cache owned by `berth`, so the fetch is cold and no other test's cache moves.
fn owner_env() -> ScratchBerth {
    let cluster = Cluster::get();
    ScratchBerth::new("berth-e2e-owner", |dir| {
        format!(
            "[policy]\nallowed = [\"{}/*\"]\n[cache]\ndir = \"{}\"\nowner = \"berth\"\n\
             [registry]\ncerts_dir = \"{}\"\n",
            cluster.tls_registry().host,
            dir.join("cache").display(),
            cluster.certs_dir().display()
        )
    })
}

fn berth_uid() -> u32 {
    sh("id -u berth")
        .trim()
        .parse()
        .expect("the package creates the user berth")
}

fn owner_and_mode(path: &Path) -> (u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.uid(), meta.mode() & 0o7777)
}

/// A cold fetch as root: the cache's subdirectories and the build's lock are `berth`'s (a
/// build that ran as root would leave a root-owned lock), the SIF is sealed by root, and
/// its squashfs has the layers' owners and modes, not the builder's.
#[test]
fn a_cold_fetch_is_built_by_the_service_user_and_sealed_by_root() {
    let cluster = Cluster::get();
    let env = owner_env();
    let uid = berth_uid();
    let run = env.berth(&["fetch", &cluster.image_tls().reference]);
    assert!(run.success(), "{run:?}");
    let sif = PathBuf::from(run.stdout.trim());
    let cache = env.dir.join("cache");
    assert_eq!(owner_and_mode(&cache), (0, 0o755));
    for (sub, mode) in [
        ("images", 0o755),
        ("index", 0o755),
        ("locks", 0o700),
        ("tmp", 0o700),
    ] {
        assert_eq!(owner_and_mode(&cache.join(sub)), (uid, mode), "{sub}");
    }
    let locks: Vec<_> = std::fs::read_dir(cache.join("locks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!locks.is_empty(), "the build took no lock");
    for lock in &locks {
        assert_eq!(
            owner_and_mode(lock).0,
            uid,
            "{} was not made by berth",
            lock.display()
        );
    }
    assert_eq!(owner_and_mode(&sif), (0, 0o644), "not sealed by root");

    let inspect = env.berth(&["sif", "inspect", &sif.display().to_string()]);
    assert!(inspect.success(), "{inspect:?}");
    let offset = inspect
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("root file system: "))
        .and_then(|l| l.split("offset ").nth(1))
        .and_then(|l| l.split(',').next())
        .expect("inspect names the root file system's offset");
    let listing = sh(&format!(
        "unsquashfs -lln -o {offset} -d '' {}",
        sif.display()
    ));
    for (path, want) in [
        ("/owners", "drwxr-xr-x 0/0"),
        ("/bin/busybox", "-rwxr-xr-x 0/0"),
        ("/owners/private", "drwx------ 0/0"),
        ("/owners/private/key", "-rw------- 0/0"),
        ("/owners/by-1234", "-rw-r----- 1234/1235"),
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(want) && l.ends_with(&format!(" {path}"))),
            "{path} is not {want} in the SIF:\n{listing}"
        );
    }
    assert!(
        !listing.contains(&format!(" {uid}/")),
        "files owned by the builder:\n{listing}"
    );

    // A second fetch hits without building: still sealed, still the same file.
    let again = env.berth(&["fetch", &cluster.image_tls().by_digest()]);
    assert!(again.success(), "{again:?}");
    assert_eq!(again.stdout.trim(), sif.display().to_string());
}

/// A job on the cluster (whose installed config names `berth` as the owner): the container
/// shows the image's modes, and every file as the user's own (as enroot's unpacked images
/// are: one id maps no other), so the SIF's modes, not the builder's, reach the container.
#[test]
fn a_container_sees_the_images_owners_and_modes() {
    let cluster = Cluster::get();
    let run = Cmd::user([
        "srun".to_string(),
        format!("--container-image={}", cluster.image_tls().reference),
        "stat".into(),
        "-c".into(),
        "%n %a %u".into(),
        "/owners/private".into(),
        "/owners/by-1234".into(),
        "/bin/busybox".into(),
    ])
    .run();
    assert!(run.success(), "{run:?}");
    let user = cluster.uid();
    assert_eq!(
        run.stdout.lines().collect::<Vec<_>>(),
        [
            format!("/owners/private 700 {user}"),
            // Not nobody: an image's other owners are the user's too.
            format!("/owners/by-1234 640 {user}"),
            format!("/bin/busybox 755 {user}"),
        ],
        "{run:?}"
    );
    cluster.assert_node_healthy();
}
