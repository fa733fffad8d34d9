//! The snapshot file format: writing it, and reading it back with every
//! byte checked. No sled, no openraft calls: `snapshot.rs` uses this.
//!
//! Version 3 (`IDKVSNP3`), all integers little-endian:
//!
//! ```text
//! magic    8 bytes  "IDKVSNP3"
//! frame    u32 len, u32 crc32(payload), payload      the header (≤ 1 MiB)
//! frame    ... then per record: a key frame (≤ 16 KiB),
//!          a record frame (≤ 8 MiB)
//! end      u32 0                                      (no frame is empty)
//! trailer  u64 pairs, [u8; 32] sha256(magic .. end)
//! ```
//!
//! A length over its frame's bound is refused before anything is allocated,
//! so a corrupt length never costs more than the bound. A reader accepts a
//! file only when every frame's crc matches, the end mark is there, the
//! pair count and the digest match, and nothing follows the trailer; any
//! failure is an `InvalidData` error naming the file and the byte offset.
//!
//! Version 2 (`IDKVSNP2`: bare `u32 len` frames, no checksums, ends at end
//! of file) is still read, but only to finish an install that a version
//! using it left half-done; it is never served or installed otherwise.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use crate::codec::{decode, encode};
use crate::raft::types::SnapshotMeta;

pub const MAGIC: &[u8; 8] = b"IDKVSNP3";
const LEGACY_MAGIC: &[u8; 8] = b"IDKVSNP2";
pub const HEADER_MAX: usize = 1024 * 1024;
/// Keys are at most 1 KiB and namespaces 64 bytes by default.
pub const KEY_MAX: usize = 16 * 1024;
/// Results are at most 1 MiB and checkpoints 64 KiB by default.
pub const RECORD_MAX: usize = 8 * 1024 * 1024;

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Header {
    pub meta: SnapshotMeta,
    pub clock_ms: u64,
    /// The token counter: a node restored from this snapshot must never
    /// grant a token already given. `u64::MAX` for a store that has no
    /// counter yet (from before it had one; its tokens follow the log index
    /// until its first grant), so that the node installing it counts the
    /// same way as the rest.
    pub last_token: u64,
}

/// Writes a version 3 file to `w`.
pub struct Writer<W: Write> {
    w: W,
    hash: Sha256,
    pairs: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(w: W, header: &Header) -> io::Result<Self> {
        let mut out = Writer {
            w,
            hash: Sha256::new(),
            pairs: 0,
        };
        out.raw(MAGIC)?;
        out.frame(&encode(header)?, HEADER_MAX, "header")?;
        Ok(out)
    }

    fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hash.update(bytes);
        self.w.write_all(bytes)
    }

    fn frame(&mut self, bytes: &[u8], max: usize, what: &str) -> io::Result<()> {
        if bytes.is_empty() || bytes.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "snapshot {what} of {} bytes is outside the frame bounds (1..={max})",
                    bytes.len()
                ),
            ));
        }
        // In bounds, so it fits a u32.
        let len = bytes.len() as u32;
        self.raw(&len.to_le_bytes())?;
        self.raw(&crc32fast::hash(bytes).to_le_bytes())?;
        self.raw(bytes)
    }

    /// One stored record: its tree key and its encoded value.
    pub fn pair(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.frame(key, KEY_MAX, "key")
            .and_then(|()| self.frame(value, RECORD_MAX, "record"))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{e} (key {:?})", String::from_utf8_lossy(key)),
                )
            })?;
        self.pairs += 1;
        Ok(())
    }

    /// Write the end mark and the trailer; returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.raw(&0u32.to_le_bytes())?;
        let digest = std::mem::take(&mut self.hash).finalize();
        self.w.write_all(&self.pairs.to_le_bytes())?;
        self.w.write_all(&digest)?;
        Ok(self.w)
    }
}

/// One stored record as read: its tree key, its encoded value, and the
/// offset of its key frame (for errors).
pub type Pair = (Vec<u8>, Vec<u8>, u64);

/// Reads a snapshot file, checking it as it goes.
pub struct Reader<R: Read> {
    r: R,
    /// What errors call the file (its path).
    label: String,
    offset: u64,
    hash: Sha256,
    pairs: u64,
    /// Version 3: checksums and a trailer. (Version 2 has neither.)
    checked: bool,
}

impl<R: Read> Reader<R> {
    /// Read the magic and the header. `legacy`: accept version 2 too.
    pub fn open(r: R, label: impl Into<String>, legacy: bool) -> io::Result<(Self, Header)> {
        let mut rd = Reader {
            r,
            label: label.into(),
            offset: 0,
            hash: Sha256::new(),
            pairs: 0,
            checked: true,
        };
        let mut magic = [0u8; 8];
        rd.read_exact(&mut magic, "the magic")?;
        if &magic == LEGACY_MAGIC && legacy {
            rd.checked = false;
        } else if &magic != MAGIC {
            let what = if &magic == LEGACY_MAGIC {
                "an idemkv snapshot of the previous format (no checksums), not accepted here"
                    .to_string()
            } else {
                format!("not an idemkv snapshot (magic {magic:02x?})")
            };
            return Err(rd.err(0, what));
        }
        let at = rd.offset;
        let header = rd
            .frame(HEADER_MAX, "header")?
            .ok_or_else(|| rd.err(at, "no header"))?;
        let header = decode(&header).map_err(|e| rd.err(at, format!("header: {e}")))?;
        Ok((rd, header))
    }

    /// An `InvalidData` error at byte `at` of this file.
    pub fn err(&self, at: u64, what: impl std::fmt::Display) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("snapshot {}: byte {at}: {what}", self.label),
        )
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> io::Result<()> {
        let at = self.offset;
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                self.err(at, format!("truncated: the file ends inside {what}"))
            }
            _ => io::Error::new(e.kind(), format!("snapshot {}: byte {at}: {e}", self.label)),
        })?;
        self.hash.update(&*buf);
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Fill `buf`, or `false` at a clean end of file (nothing read).
    fn read_or_eof(&mut self, buf: &mut [u8], what: &str) -> io::Result<bool> {
        let mut first = [0u8; 1];
        let n = loop {
            match self.r.read(&mut first) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        }
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("snapshot {}: byte {}: {e}", self.label, self.offset),
            )
        })?;
        if n == 0 {
            return Ok(false);
        }
        buf[0] = first[0];
        self.hash.update(first);
        self.offset += 1;
        self.read_exact(&mut buf[1..], what)?;
        Ok(true)
    }

    /// The next frame, or `None` at the end mark (version 3) or at the end
    /// of the file (version 2).
    fn frame(&mut self, max: usize, what: &str) -> io::Result<Option<Vec<u8>>> {
        let at = self.offset;
        let mut len = [0u8; 4];
        if !self.read_or_eof(&mut len, "a frame length")? {
            if self.checked {
                return Err(self.err(at, "truncated: the file ends without its end mark"));
            }
            return Ok(None);
        }
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 && self.checked {
            return Ok(None);
        }
        if len == 0 || len > max {
            return Err(self.err(
                at,
                format!("{what} frame length {len} is outside its bounds (1..={max})"),
            ));
        }
        let mut crc = [0u8; 4];
        if self.checked {
            self.read_exact(&mut crc, "a frame checksum")?;
        }
        let mut buf = vec![0u8; len];
        self.read_exact(&mut buf, &format!("a {what} frame"))?;
        if self.checked && crc32fast::hash(&buf) != u32::from_le_bytes(crc) {
            return Err(self.err(at, format!("{what} frame fails its checksum")));
        }
        Ok(Some(buf))
    }

    /// The next [`Pair`], or `None` at the end. Call [`Self::finish`] after `None` before trusting anything.
    pub fn pair(&mut self) -> io::Result<Option<Pair>> {
        let at = self.offset;
        let Some(k) = self.frame(KEY_MAX, "key")? else {
            return Ok(None);
        };
        let v = self
            .frame(RECORD_MAX, "record")?
            .ok_or_else(|| self.err(at, "a key frame without its record"))?;
        self.pairs += 1;
        Ok(Some((k, v, at)))
    }

    /// Check the trailer (version 3) and that nothing follows it.
    pub fn finish(mut self) -> io::Result<()> {
        if !self.checked {
            return Ok(());
        }
        let digest = std::mem::take(&mut self.hash).finalize();
        let at = self.offset;
        let mut pairs = [0u8; 8];
        let mut sum = [0u8; 32];
        self.read_exact(&mut pairs, "the trailer")?;
        self.read_exact(&mut sum, "the trailer")?;
        let pairs = u64::from_le_bytes(pairs);
        if pairs != self.pairs {
            return Err(self.err(
                at,
                format!(
                    "the trailer counts {pairs} records, the file holds {}",
                    self.pairs
                ),
            ));
        }
        if sum[..] != digest[..] {
            return Err(self.err(at, "the file fails its sha256 digest"));
        }
        let end = self.offset;
        if self.read_or_eof(&mut [0u8; 1], "trailing bytes")? {
            return Err(self.err(end, "unexpected bytes after the trailer"));
        }
        Ok(())
    }
}
