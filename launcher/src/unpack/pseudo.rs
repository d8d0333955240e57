//! Owners and modes an unprivileged unpacker cannot put on disk, for mksquashfs.
//!
//! The cache's service user cannot chown files to an image's uids, and must keep its own
//! rights on what it unpacks (a 0555 directory of one layer still has to take the next
//! layer's files; mksquashfs must read a 0000 file). So it records each entry's owner and
//! mode from the tar headers here, unpacks with permissive owner bits and no set-id bits,
//! and mksquashfs applies the recorded values from a pseudo file (`-pf`, lines `"PATH" m
//! MODE UID GID`): the SIF gets the image's real ownership and modes, as a root unpack
//! gives it. squashfs-tools 4.5 reads quoted names with `\` escaping `"` and `\`, but joins
//! a line ending in `\` with the next, so a name holding a newline goes in a `-p`
//! definition instead (one argument, where a quoted newline is just a character).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use crate::{Error, Result};

/// Most bytes of `-p` definitions (names with newlines) one image may need: far more than
/// any real image, well under the kernel's limit on arguments.
const INLINE_LIMIT: usize = 64 << 10;

/// One entry's owner and mode, as its layer declared them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The recorded metadata of an image's entries, by normalised path (no leading `/`).
#[derive(Debug, Default)]
pub struct Ownership {
    entries: BTreeMap<Vec<u8>, Meta>,
}

impl Ownership {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn set(&mut self, path: &[u8], meta: Meta) {
        self.entries.insert(path.to_vec(), meta);
    }

    /// A hard link shares its target's inode, so it takes the target's record: the record
    /// must outlive the target's name, which a later layer may replace.
    pub fn link(&mut self, target: &[u8], path: &[u8]) {
        match self.entries.get(target).copied() {
            Some(meta) => self.set(path, meta),
            None => self.remove_tree(path),
        }
    }

    /// Forgets `path` and everything below it (removed by a whiteout or replaced).
    pub fn remove_tree(&mut self, path: &[u8]) {
        self.entries.remove(path);
        let below = [path, b"/"].concat();
        // Every path below `path` starts with `path/`, and sorts before `path0` ('0' follows
        // '/').
        let end = [path, b"0"].concat();
        let doomed: Vec<Vec<u8>> = self
            .entries
            .range(below..end)
            .map(|(k, _)| k.clone())
            .collect();
        for key in doomed {
            self.entries.remove(&key);
        }
    }

    /// Writes the pseudo file to `file` and returns mksquashfs's arguments for it: `-pf`,
    /// the root directory root's 0755 (as a root unpack makes it), and a `-p` for each name
    /// the file cannot hold.
    pub fn mksquashfs_args(&self, file: &Path) -> Result<Vec<OsString>> {
        let fail = |e| Error::io(format!("writing the pseudo file {}", file.display()), e);
        let mut out = std::io::BufWriter::new(std::fs::File::create(file).map_err(fail)?);
        let mut args: Vec<OsString> = [
            "-root-uid",
            "0",
            "-root-gid",
            "0",
            "-root-mode",
            "755",
            "-pf",
        ]
        .map(OsString::from)
        .into();
        args.push(file.into());
        let mut inline = 0;
        for (path, meta) in &self.entries {
            let line = definition(path, meta);
            if path.contains(&b'\n') {
                inline += line.len();
                if inline > INLINE_LIMIT {
                    return Err(Error::UnsafeLayer {
                        layer: "(the image)".into(),
                        path: String::from_utf8_lossy(path).into_owned(),
                        reason: "the image's file names holding newlines add up to more than \
                                 64 KiB, which mksquashfs can only take as arguments"
                            .into(),
                    });
                }
                args.push("-p".into());
                args.push(OsString::from_vec(line));
            } else {
                out.write_all(&line).map_err(fail)?;
                out.write_all(b"\n").map_err(fail)?;
            }
        }
        out.into_inner()
            .map_err(|e| fail(e.into_error()))?
            .sync_all()
            .map_err(fail)?;
        Ok(args)
    }
}

/// `"PATH" m MODE UID GID`, the name quoted with `"` and `\` escaped.
fn definition(path: &[u8], meta: &Meta) -> Vec<u8> {
    let mut line = Vec::with_capacity(path.len() + 32);
    line.push(b'"');
    for &b in path {
        if b == b'"' || b == b'\\' {
            line.push(b'\\');
        }
        line.push(b);
    }
    line.extend_from_slice(format!("\" m {:o} {} {}", meta.mode, meta.uid, meta.gid).as_bytes());
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(mode: u32, uid: u32) -> Meta {
        Meta {
            mode,
            uid,
            gid: uid,
        }
    }

    #[test]
    fn names_are_quoted_and_escaped() {
        assert_eq!(
            definition(br#"a "b"\c d"#, &meta(0o4755, 7)),
            br#""a \"b\"\\c d" m 4755 7 7"#.to_vec()
        );
        assert_eq!(
            definition(b"#x\ty", &meta(0o700, 0)),
            b"\"#x\ty\" m 700 0 0".to_vec()
        );
    }

    #[test]
    fn removing_a_tree_forgets_what_is_below_only() {
        let mut o = Ownership::default();
        for p in ["a", "a/b", "a/b/c", "a0", "a.b", "ab", "a-"] {
            o.set(p.as_bytes(), meta(0o644, 1));
        }
        o.remove_tree(b"a");
        let left: Vec<&[u8]> = o.entries.keys().map(Vec::as_slice).collect();
        assert_eq!(left, [&b"a-"[..], b"a.b", b"a0", b"ab"]);
    }

    #[test]
    fn a_hard_link_keeps_its_targets_record_after_the_target_goes() {
        let mut o = Ownership::default();
        o.set(b"bin/a", meta(0o4755, 0));
        o.link(b"bin/a", b"bin/b");
        o.remove_tree(b"bin/a");
        assert_eq!(o.entries.get(&b"bin/b"[..]), Some(&meta(0o4755, 0)));
    }

    /// The real mksquashfs reads every odd name back with its recorded owner and mode.
    #[test]
    fn mksquashfs_applies_the_records_to_odd_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let names: [&[u8]; 9] = [
            b"sp ace",
            b"q\"uote",
            b"back\\slash",
            b"tab\tx",
            b"#hash",
            b" lead",
            b"new\nline",
            b"x m 1 2 3",
            b"\xff",
        ];
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(root.join("d ir")).unwrap();
        let mut o = Ownership::default();
        o.set(b"d ir", meta(0o700, 0));
        for (i, name) in names.iter().enumerate() {
            let path = [&b"d ir/"[..], name].concat();
            std::fs::write(root.join(std::ffi::OsStr::from_bytes(&path)), b"x").unwrap();
            o.set(&path, meta(0o640, 1000 + i as u32));
        }
        let args = o.mksquashfs_args(&dir.path().join("pseudo")).unwrap();
        let sqfs = dir.path().join("out.sqfs");
        let status = std::process::Command::new("mksquashfs")
            .arg(&root)
            .arg(&sqfs)
            .args(["-noappend", "-quiet", "-no-progress"])
            .args(&args)
            .status()
            .unwrap();
        assert!(status.success());
        let listing = std::process::Command::new("unsquashfs")
            .args(["-lln", "-d", ""])
            .arg(&sqfs)
            .output()
            .unwrap();
        let listing = listing.stdout;
        let text = String::from_utf8_lossy(&listing);
        assert!(text.contains("drwxr-xr-x 0/0"), "{text}");
        assert!(text.contains("drwx------ 0/0"), "{text}");
        for (i, name) in names.iter().enumerate() {
            let owner = format!("-rw-r----- {0}/{0} ", 1000 + i);
            let found = contains_entry(&listing, owner.as_bytes(), name);
            assert!(
                found,
                "{:?} not owned by {}: {text}",
                String::from_utf8_lossy(name),
                1000 + i
            );
        }
    }

    /// Whether the listing has an entry owned as `owner` (`-rw-r----- U/G `) that ends with
    /// `/d ir/NAME` (a name may span lines).
    fn contains_entry(listing: &[u8], owner: &[u8], name: &[u8]) -> bool {
        let tail = [&b"/d ir/"[..], name].concat();
        listing
            .windows(owner.len())
            .enumerate()
            .filter(|(_, w)| *w == owner)
            .any(|(i, _)| {
                let rest = &listing[i..];
                let end = rest
                    .windows(tail.len())
                    .position(|w| w == tail.as_slice())
                    .map(|p| p + tail.len());
                end.is_some_and(|end| {
                    // The entry's own line(s): no other entry's owner field in between.
                    !rest[owner.len()..end]
                        .windows(4)
                        .any(|w| w == b"\n-rw" || w == b"\ndrw")
                        && rest.get(end).is_none_or(|b| *b == b'\n')
                })
            })
    }

    use std::os::unix::ffi::OsStrExt;
}
