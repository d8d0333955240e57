//! Bounds on what root unpacks for one image, and the reader that enforces the ones the
//! `tar` crate would otherwise overrun.
//!
//! The `tar` crate reads a GNU long name/link (`L`/`K`) or PAX (`x`) member whole into
//! memory before it hands out the entry that member describes, and skips (decompressing
//! every byte) the data of entries berth does not write. So the sizes in the tar headers
//! must be checked before the crate sees them: [`TarGuard`] sits between the decompressed
//! stream and the crate, follows the archive's framing block by block exactly as the crate
//! does (a PAX `size` record overrides the header's size; extension members describe the
//! next entry), and refuses a header as soon as it is read:
//!
//! - an extension member over [`EXTENSION_LIMIT`];
//! - more entries than `[cache] max_entries`, over all layers of the image;
//! - more declared bytes than `[cache] max_image_size`, over all layers: every entry's size
//!   counts, written or not, so the decompressed stream is bounded too;
//! - a GNU sparse file, whose extra header blocks this framing does not follow (berth does
//!   not unpack sparse files anyway).
//!
//! Path length and depth are checked by the applier on the normalised path.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::cache::{format_size, parse_size};
use crate::config::CacheConfig;
use crate::{Error, Result};

/// The largest extension member (long name, long link target, PAX records) berth accepts:
/// paths are limited to `max_path_length` anyway, and PAX records beyond paths (xattrs)
/// are dropped.
pub const EXTENSION_LIMIT: u64 = 64 << 10;
const BLOCK: usize = 512;

/// The `[cache]` limits on one image.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_entries: u64,
    pub max_path_length: usize,
    pub max_path_depth: usize,
    /// `build_memory`: file data in flight in the squashfs writer.
    pub build_memory: usize,
}

impl Limits {
    pub fn from_config(config: &CacheConfig) -> Result<Limits> {
        Ok(Limits {
            max_bytes: parse_size(&config.max_image_size)?,
            max_entries: config.max_entries,
            max_path_length: config.max_path_length,
            max_path_depth: config.max_path_depth,
            build_memory: usize::try_from(parse_size(&config.build_memory)?).unwrap_or(usize::MAX),
        })
    }

    /// Refuses a layer set whose compressed sizes alone exceed `max_image_size`, before
    /// anything is downloaded.
    pub fn check_download(&self, image: &str, compressed: u64) -> Result<()> {
        if compressed > self.max_bytes {
            return Err(exceeded(
                format!(
                    "{image}: its layers are {} compressed",
                    format_size(compressed)
                ),
                "max_image_size",
                format_size(self.max_bytes),
            ));
        }
        Ok(())
    }

    /// Refuses a normalised layer path over the length or depth limits.
    pub fn check_path(&self, layer: &str, path: &[u8]) -> Result<()> {
        let shown = || String::from_utf8_lossy(&path[..path.len().min(80)]).into_owned();
        if path.len() > self.max_path_length {
            return Err(exceeded(
                format!(
                    "layer {layer}: the path {:?}... is {} bytes long",
                    shown(),
                    path.len()
                ),
                "max_path_length",
                self.max_path_length.to_string(),
            ));
        }
        let depth = path.iter().filter(|b| **b == b'/').count() + 1;
        if depth > self.max_path_depth {
            return Err(exceeded(
                format!(
                    "layer {layer}: the path {:?}... is {depth} directories deep",
                    shown()
                ),
                "max_path_depth",
                self.max_path_depth.to_string(),
            ));
        }
        Ok(())
    }
}

/// An image over the `[cache]` limit `key`.
fn exceeded(what: String, key: &'static str, limit: String) -> Error {
    Error::ImageLimit { what, key, limit }
}

/// What the layers of one image have declared so far, against its limits (shared by the
/// layers read at the same time).
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    bytes: AtomicU64,
    entries: AtomicU64,
}

impl Budget {
    pub fn new(limits: Limits) -> Budget {
        Budget {
            limits,
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

/// Where the guard is in the tar framing.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// Reading a 512-byte header; `filled` bytes so far.
    Header { filled: usize },
    /// Passing an entry's data: `left` bytes with padding, of which `payload` are data.
    Data { left: u64, payload: u64 },
    /// After the end-of-archive block, which the crate stops at.
    End,
}

/// A reader over an uncompressed tar stream that refuses, header by header, what the
/// module doc lists, before the `tar` crate reading through it acts on the header.
/// A refusal is an [`io::Error`] to the crate; [`Budget::take_refusal`] tells why.
pub struct TarGuard<'b, R> {
    inner: R,
    budget: &'b Budget,
    /// Why the guard stopped the stream (the `tar` crate sees only an I/O error).
    pub refusal: Option<Error>,
    layer: &'b str,
    header: [u8; BLOCK],
    state: Framing,
    /// The records of the PAX member being read.
    pax: Option<Vec<u8>>,
    /// The size a PAX member set for the next entry.
    pax_size: Option<u64>,
}

impl<'b, R: Read> TarGuard<'b, R> {
    pub fn new(inner: R, budget: &'b Budget, layer: &'b str) -> Self {
        TarGuard {
            inner,
            budget,
            refusal: None,
            layer,
            header: [0; BLOCK],
            state: Framing::Header { filled: 0 },
            pax: None,
            pax_size: None,
        }
    }

    /// Checks a complete header and returns the framing that follows it. Mirrors
    /// `tar::Archive::entries` (tar 0.4.46 `EntriesFields::next_entry{,_raw}`).
    fn inspect(&mut self) -> io::Result<Framing> {
        if self.header.iter().all(|b| *b == 0) {
            return Ok(Framing::End);
        }
        let header = tar::Header::from_byte_slice(&self.header);
        let kind = header.entry_type();
        let extension = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions();
        let recognised = header.as_gnu().is_some() || header.as_ustar().is_some();
        // Members the crate folds into the next entry instead of returning them.
        let folded = recognised && extension && !kind.is_pax_global_extensions();
        let mut size = header.entry_size()?;
        if !extension {
            if let Some(pax_size) = self.pax_size {
                size = pax_size;
            }
        }
        if !folded {
            // The entry the PAX member described: it ends here.
            self.pax_size = None;
            let entries = self.budget.entries.fetch_add(1, Ordering::Relaxed) + 1;
            if entries > self.budget.limits.max_entries {
                return Err(self.refuse(exceeded(
                    format!(
                        "layer {}: the image has more than {} entries",
                        self.layer, self.budget.limits.max_entries
                    ),
                    "max_entries",
                    self.budget.limits.max_entries.to_string(),
                )));
            }
        }
        if kind.is_gnu_sparse() {
            return Err(self.refuse(self.unsafe_entry("GNU sparse files are not supported")));
        }
        if extension && size > EXTENSION_LIMIT {
            let what = format!(
                "a tar extension header (type {:?}) of {size} bytes; berth accepts at most {} \
                 (long names and PAX records longer than any usable path)",
                kind.as_byte() as char,
                format_size(EXTENSION_LIMIT)
            );
            return Err(self.refuse(self.unsafe_entry(&what)));
        }
        let charge = |bytes: u64| Some(bytes.saturating_add(size));
        let before = (self.budget.bytes)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, charge)
            .expect("the update always succeeds");
        if before.saturating_add(size) > self.budget.limits.max_bytes {
            return Err(self.refuse(exceeded(
                format!(
                    "layer {}: the image unpacks to more than {} (an entry of {})",
                    self.layer,
                    format_size(self.budget.limits.max_bytes),
                    format_size(size)
                ),
                "max_image_size",
                format_size(self.budget.limits.max_bytes),
            )));
        }
        if folded && kind.is_pax_local_extensions() {
            self.pax = Some(Vec::with_capacity(size as usize));
        }
        let padded = size
            .checked_add(BLOCK as u64 - 1)
            .map(|s| s & !(BLOCK as u64 - 1))
            .ok_or_else(|| io::Error::other("size overflow"))?;
        if padded == 0 {
            self.end_entry();
            return Ok(Framing::Header { filled: 0 });
        }
        Ok(Framing::Data {
            left: padded,
            payload: size,
        })
    }

    fn end_entry(&mut self) {
        if let Some(records) = self.pax.take() {
            self.pax_size = pax_size(&records);
        }
    }

    fn unsafe_entry(&self, reason: &str) -> Error {
        Error::UnsafeLayer {
            layer: self.layer.to_string(),
            path: "(tar header)".into(),
            reason: reason.to_string(),
        }
    }

    fn refuse(&mut self, error: Error) -> io::Error {
        let message = error.to_string();
        self.refusal = Some(error);
        io::Error::other(message)
    }
}

impl<R: Read> Read for TarGuard<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.state {
            Framing::End => self.inner.read(buf),
            Framing::Header { filled } => {
                let want = (BLOCK - filled).min(buf.len());
                let n = self.inner.read(&mut buf[..want])?;
                self.header[filled..filled + n].copy_from_slice(&buf[..n]);
                self.state = Framing::Header { filled: filled + n };
                if n > 0 && filled + n == BLOCK {
                    self.state = self.inspect()?;
                }
                Ok(n)
            }
            Framing::Data { left, payload } => {
                let want = left.min(buf.len() as u64) as usize;
                let n = self.inner.read(&mut buf[..want])?;
                if let Some(records) = &mut self.pax {
                    records.extend_from_slice(&buf[..n.min(payload as usize)]);
                }
                let (left, payload) = (left - n as u64, payload.saturating_sub(n as u64));
                self.state = Framing::Data { left, payload };
                if n > 0 && left == 0 {
                    self.end_entry();
                    self.state = Framing::Header { filled: 0 };
                }
                Ok(n)
            }
        }
    }
}

/// The `size` record of a PAX member, exactly as the `tar` crate reads it (its
/// `pax_extensions_value`): the first `size` record, and none at all if a record before
/// it is malformed or its value is not a number.
fn pax_size(records: &[u8]) -> Option<u64> {
    for record in tar::PaxExtensions::new(records) {
        let record = record.ok()?;
        if record.key() == Ok("size") {
            return record.value().ok()?.parse().ok();
        }
    }
    None
}
