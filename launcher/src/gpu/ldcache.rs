//! The dynamic loader's cache, `/etc/ld.so.cache`, read and written in glibc's format
//! ("glibc-ld.so.cache1.1", glibc >= 2.32 writes only this; the older compat layout with an
//! "ld.so-1.7.0" part in front is read too).
//!
//! berth reads the host's cache to find the driver's libraries exactly where the host's
//! loader finds them, and writes the container's: the image's own entries plus the bound
//! driver libraries. The result is bound read-only over the image's `/etc/ld.so.cache`, so
//! the loader inside finds `libcuda.so.1` in any glibc image without running anything from
//! the image (no ldconfig inside, nothing written into the image).

use std::cmp::Ordering;

const OLD_MAGIC: &[u8] = b"ld.so-1.7.0";
const NEW_MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
const NEW_HEADER: usize = 48;
const NEW_ENTRY: usize = 24;
/// `hwcap` bit of entries that live in a glibc-hwcaps subdirectory (named in the cache's
/// extension section, which berth does not copy).
const HWCAP_EXTENSION: u64 = 1 << 62;
/// Endianness flag of the header: little endian.
const FLAGS_LE: u8 = 2;

/// `FLAG_ELF_LIBC6` with this architecture's flag, as ldconfig marks this machine's libraries.
#[cfg(target_arch = "x86_64")]
pub const NATIVE_FLAGS: i32 = 0x0303;
#[cfg(target_arch = "aarch64")]
pub const NATIVE_FLAGS: i32 = 0x0a03;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const NATIVE_FLAGS: i32 = 0x0003;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub flags: i32,
    /// The name programs ask for (`libcuda.so.1`).
    pub key: String,
    /// The file's path.
    pub value: String,
    pub hwcap: u64,
}

impl Entry {
    /// A library of this machine's architecture.
    pub fn native(key: &str, value: &str) -> Entry {
        Entry {
            flags: NATIVE_FLAGS,
            key: key.into(),
            value: value.into(),
            hwcap: 0,
        }
    }
}

/// Parses a cache file; `None` when `bytes` is not one.
pub fn parse(bytes: &[u8]) -> Option<Vec<Entry>> {
    let mut base = 0;
    if bytes.starts_with(OLD_MAGIC) {
        let nlibs = u32_at(bytes, 12)? as usize;
        let end = 16usize.checked_add(nlibs.checked_mul(12)?)?;
        base = end.checked_add(7)? & !7;
    }
    let new = bytes.get(base..)?;
    if !new.starts_with(NEW_MAGIC) || new.len() < NEW_HEADER {
        return None;
    }
    let nlibs = u32_at(new, 20)? as usize;
    let string = |off: u32| -> Option<String> {
        let s = new.get(off as usize..)?;
        let end = s.iter().position(|&b| b == 0)?;
        String::from_utf8(s[..end].to_vec()).ok()
    };
    (0..nlibs)
        .map(|i| {
            let at = NEW_HEADER.checked_add(i.checked_mul(NEW_ENTRY)?)?;
            Some(Entry {
                flags: u32_at(new, at)? as i32,
                key: string(u32_at(new, at + 4)?)?,
                value: string(u32_at(new, at + 8)?)?,
                hwcap: u64::from_le_bytes(new.get(at + 16..at + 24)?.try_into().ok()?),
            })
        })
        .collect()
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Writes a cache holding `entries`, sorted as the loader's binary search expects (by
/// [`libcmp`], descending). Entries whose key is repeated keep the first one given, so
/// callers put the entries that must win first.
pub fn write(entries: &[Entry]) -> Vec<u8> {
    let mut kept: Vec<&Entry> = Vec::new();
    for e in entries {
        if e.hwcap & HWCAP_EXTENSION == 0
            && !kept.iter().any(|k| k.key == e.key && k.flags == e.flags)
        {
            kept.push(e);
        }
    }
    // Stable: equal keys (other flags) keep their order.
    kept.sort_by(|a, b| libcmp(&b.key, &a.key));
    let mut strings = Vec::new();
    let strings_at = NEW_HEADER + kept.len() * NEW_ENTRY;
    let mut intern = |s: &str| -> u32 {
        let off = strings_at + strings.len();
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        off as u32
    };
    let mut table = Vec::with_capacity(kept.len() * NEW_ENTRY);
    for e in &kept {
        table.extend_from_slice(&e.flags.to_le_bytes());
        table.extend_from_slice(&intern(&e.key).to_le_bytes());
        table.extend_from_slice(&intern(&e.value).to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        table.extend_from_slice(&e.hwcap.to_le_bytes());
    }
    let mut out = Vec::with_capacity(strings_at + strings.len());
    out.extend_from_slice(NEW_MAGIC);
    out.extend_from_slice(&(kept.len() as u32).to_le_bytes());
    out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
    out.extend_from_slice(&[FLAGS_LE, 0, 0, 0]);
    // No extension section; three unused words.
    out.extend_from_slice(&[0; 16]);
    out.extend_from_slice(&table);
    out.extend_from_slice(&strings);
    out
}

/// glibc's `_dl_cache_libcmp`: runs of digits compare as numbers, digits sort after
/// other characters.
pub fn libcmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let number = |s: &[u8], k: &mut usize| {
        let mut v: u64 = 0;
        while *k < s.len() && s[*k].is_ascii_digit() {
            v = v.saturating_mul(10).saturating_add(u64::from(s[*k] - b'0'));
            *k += 1;
        }
        v
    };
    while i < a.len() {
        let (x, y) = (a[i], b.get(j).copied().unwrap_or(0));
        if x.is_ascii_digit() {
            if !y.is_ascii_digit() {
                return Ordering::Greater;
            }
            let (v, w) = (number(a, &mut i), number(b, &mut j));
            if v != w {
                return v.cmp(&w);
            }
        } else if y.is_ascii_digit() {
            return Ordering::Less;
        } else if x != y {
            return x.cmp(&y);
        } else {
            i += 1;
            j += 1;
        }
    }
    0u8.cmp(&b.get(j).copied().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libcmp_is_glibcs() {
        assert_eq!(libcmp("libc.so.6", "libc.so.6"), Ordering::Equal);
        assert_eq!(libcmp("libfoo.so.10", "libfoo.so.9"), Ordering::Greater);
        assert_eq!(libcmp("libfoo.so.1", "libfoo.so"), Ordering::Greater);
        assert_eq!(libcmp("liba1", "libab"), Ordering::Greater);
        assert_eq!(libcmp("libcuda.so.1", "libc.so.6"), Ordering::Greater);
    }

    #[test]
    fn written_caches_read_back_sorted_for_the_loader() {
        let entries = [
            Entry::native("libcuda.so.1", "/usr/local/nvidia/lib64/libcuda.so.1"),
            Entry::native("libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
            Entry::native("libcuda.so.1", "/image/libcuda.so.1"),
            Entry {
                hwcap: HWCAP_EXTENSION | 1,
                ..Entry::native("libz.so.1", "/lib/glibc-hwcaps/x86-64-v3/libz.so.1")
            },
            Entry::native("libz.so.1", "/lib/libz.so.1"),
        ];
        let back = parse(&write(&entries)).unwrap();
        let keys: Vec<_> = back
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("libz.so.1", "/lib/libz.so.1"),
                ("libcuda.so.1", "/usr/local/nvidia/lib64/libcuda.so.1"),
                ("libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
            ]
        );
        assert!(back.iter().all(|e| e.flags == NATIVE_FLAGS));
    }

    #[test]
    fn the_compat_layout_and_garbage() {
        let new = write(&[Entry::native("libm.so.6", "/lib/libm.so.6")]);
        let mut compat = Vec::new();
        compat.extend_from_slice(OLD_MAGIC);
        compat.push(0);
        compat.extend_from_slice(&1u32.to_le_bytes());
        compat.extend_from_slice(&[0; 12]);
        // 16 + 12 = 28, aligned to 32.
        compat.extend_from_slice(&[0; 4]);
        compat.extend_from_slice(&new);
        assert_eq!(parse(&compat).unwrap()[0].key, "libm.so.6");
        assert!(parse(b"not a cache").is_none());
        assert!(parse(&new[..60]).is_none());
    }

    /// The host's own cache parses and names libc (every glibc system has one).
    #[test]
    fn the_hosts_cache_parses() {
        let Ok(bytes) = std::fs::read("/etc/ld.so.cache") else {
            return;
        };
        let entries = parse(&bytes).expect("the host's ld.so.cache parses");
        assert!(entries.iter().any(|e| e.key == "libc.so.6"), "{entries:?}");
    }
}
