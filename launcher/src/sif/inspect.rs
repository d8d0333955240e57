//! The text `berth sif inspect` prints: what is in an image file and whether berth can run it.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::format::{arch_name, format_time, trim_nul, SQUASHFS_MAGIC};
use super::reader::check_squashfs;
use super::{open_image, Sif};
use crate::{Error, Result};

/// Describes the image at `path`: for a SIF the header, one line per used descriptor, the
/// root file system berth would mount (or why it refuses the file) and the stored config;
/// for a bare squashfs its superblock. Fails only when the file is not a readable SIF or
/// squashfs at all, so even images berth refuses to run can be examined.
pub fn inspect(path: &Path) -> Result<String> {
    let mut out = String::new();
    let file = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut magic = [0u8; 4];
    if file.read_exact_at(&mut magic, 0).is_ok() && &magic == SQUASHFS_MAGIC {
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading the size of {}", path.display()), e))?
            .len();
        let s = check_squashfs(&file, path, 0, len)?;
        writeln!(
            out,
            "bare squashfs {}.{}, {} compression, {} bytes used of {len}\n\
             root file system: the whole file (offset 0); no stored config",
            s.major,
            s.minor,
            s.compression_name(),
            s.bytes_used
        )
        .unwrap();
        return Ok(out);
    }

    let sif = Sif::from_file(file, path)?;
    let h = sif.header();
    let used = sif.descriptors().len();
    writeln!(out, "SIF version 01, arch {}", arch_name(&h.arch)).unwrap();
    writeln!(out, "launch script: {:?}", trim_nul(&h.launch)).unwrap();
    writeln!(out, "id:            {}", h.uuid()).unwrap();
    writeln!(
        out,
        "created:       {} ({})",
        format_time(h.created),
        h.created
    )
    .unwrap();
    writeln!(
        out,
        "modified:      {} ({})",
        format_time(h.modified),
        h.modified
    )
    .unwrap();
    writeln!(
        out,
        "descriptors:   {used} used, {} free, {} total; table at {} ({} bytes)",
        h.descriptors_free, h.descriptors_total, h.descriptors_offset, h.descriptors_size
    )
    .unwrap();
    writeln!(
        out,
        "data:          at {} ({} bytes); file {} bytes",
        h.data_offset,
        h.data_size,
        sif.file_len()
    )
    .unwrap();
    writeln!(
        out,
        "{:>4} {:>5} {:>5} {:<22} {:>10} {:>10}  {:<24} PARTITION",
        "ID", "GROUP", "LINK", "TYPE", "OFFSET", "SIZE", "NAME"
    )
    .unwrap();
    for d in sif.descriptors() {
        let link = match d.link {
            0 => "-".to_owned(),
            l if l & super::format::GROUP_MASK != 0 => {
                format!("g{}", l & !super::format::GROUP_MASK)
            }
            l => l.to_string(),
        };
        let group = match d.group() {
            0 => "-".to_owned(),
            g => g.to_string(),
        };
        let part = d.partition().map_or(String::new(), |p| {
            format!("{}/{}/{}", p.fs.name(), p.part.name(), arch_name(&p.arch))
        });
        writeln!(
            out,
            "{:>4} {:>5} {:>5} {:<22} {:>10} {:>10}  {:<24} {part}",
            d.id,
            group,
            link,
            d.data_type.name(),
            d.offset,
            d.size,
            format!("{:?}", d.name()),
        )
        .unwrap();
    }

    match open_image(path) {
        Ok(src) => {
            let prim = sif.primary_partition()?;
            let s = sif.squashfs_super(prim)?;
            writeln!(
                out,
                "root file system: object {}, squashfs {}.{} ({}), offset {}, {} bytes",
                prim.id,
                s.major,
                s.minor,
                s.compression_name(),
                src.offset,
                src.size
            )
            .unwrap();
        }
        Err(e) => writeln!(out, "root file system: none usable: {e}").unwrap(),
    }
    match sif.config() {
        Ok(Some(c)) => writeln!(
            out,
            "image config ({}):\n{}",
            super::CONFIG_NAME,
            serde_json::to_string_pretty(&c).expect("ImageConfig always serializes")
        )
        .unwrap(),
        Ok(None) => writeln!(out, "image config: none stored").unwrap(),
        Err(e) => writeln!(out, "image config: unreadable: {e}").unwrap(),
    }
    Ok(out)
}
