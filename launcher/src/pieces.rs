//! Reading bytes a piece at a time for what hashes them on the way: a SIF's recorded hash
//! (`berth images --verify`), a squashfs tail copied in the kernel, a resumed blob's staged
//! bytes, a SIF copied to or from the shared store. One loop, so each caller says only what
//! it does with a piece.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

/// Large enough that hashing, not the system calls, sets the pace; small enough to cost
/// nothing against the build's memory.
const PIECE: usize = 1 << 20;

/// Gives `each` everything `input` yields, in order, in pieces of at most 1 MiB, and stops
/// at the first error of either.
pub(crate) fn for_each<E: From<io::Error>>(
    mut input: impl Read,
    mut each: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut buf = vec![0u8; PIECE];
    loop {
        match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => each(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The `len` bytes at `offset` of `file` as a reader, read with `pread` (so threads that
/// share the file keep their own positions); a file that ends first is an `UnexpectedEof`
/// error, never a short read that would hash as something else.
pub(crate) fn at(file: &File, offset: u64, len: u64) -> At<'_> {
    At {
        file,
        next: offset,
        end: offset + len,
    }
}

pub(crate) struct At<'f> {
    file: &'f File,
    next: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.next).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.next)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file ends at {} where {} more bytes were to be read",
                    self.next,
                    self.end - self.next
                ),
            ));
        }
        self.next += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file_of(len: usize) -> (File, Vec<u8>) {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        (file, bytes)
    }

    fn collect(input: impl Read) -> io::Result<(Vec<u8>, usize)> {
        let (mut all, mut pieces) = (Vec::new(), 0);
        for_each(input, |piece: &[u8]| -> io::Result<()> {
            assert!(!piece.is_empty() && piece.len() <= PIECE);
            all.extend_from_slice(piece);
            pieces += 1;
            Ok(())
        })?;
        Ok((all, pieces))
    }

    #[test]
    fn a_range_comes_whole_and_in_order_in_pieces_of_at_most_a_mib() {
        let (file, bytes) = file_of(PIECE * 2 + 123);
        let (got, pieces) = collect(at(&file, 100, (PIECE * 2) as u64)).unwrap();
        assert_eq!(got, bytes[100..100 + PIECE * 2]);
        assert_eq!(pieces, 2);
        let (got, _) = collect(at(&file, 5, 0)).unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn a_file_shorter_than_the_range_is_an_error_not_a_short_hash() {
        let (file, _) = file_of(1000);
        let err = collect(at(&file, 900, 200)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            err.to_string().contains("ends at 1000 where 100 more"),
            "{err}"
        );
    }

    #[test]
    fn the_callers_error_stops_the_reading() {
        let (file, _) = file_of(PIECE * 3);
        let mut seen = 0;
        let err = for_each(at(&file, 0, (PIECE * 3) as u64), |_| {
            seen += 1;
            Err(io::Error::other("enough"))
        })
        .unwrap_err();
        assert_eq!((seen, err.to_string().as_str()), (1, "enough"));
    }
}
