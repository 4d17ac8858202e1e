//! The tar format, both directions, as Docker layers use it.
//!
//! Reading is done here rather than with the `tar` crate's iterator: that
//! crate splits PAX records on `\n` instead of honouring their length prefix,
//! so a binary xattr value (a `security.capability` blob can contain `0x0a`)
//! or a path with a newline is misparsed, and the misparse also makes it drop
//! later records such as `size`, so it would disagree with Go's reader
//! (dockerd's) about where entries start. This reader follows POSIX pax and
//! Go's `archive/tar`: ustar prefix, GNU long names (`L`/`K`), pax `path`,
//! `linkpath`, `size`, `uid`, `gid`, `mtime`, `atime`, `SCHILY.xattr.*`, octal
//! or base-256 numbers, signed or unsigned checksums, end at a zero block.
//!
//! Writing uses `tar::Header` for the 512-byte block, with the name bytes
//! placed by hand (so non-UTF-8 names survive) and pax records for what does
//! not fit.

use std::io::{self, Read};

/// Size of a tar block.
pub(crate) const BLOCK: usize = 512;
/// Largest pax or GNU long-name payload accepted (Go's limit too).
const MAX_SPECIAL: u64 = 1 << 20;

/// Why a tar stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TarFormatError {
    /// The stream ended inside a header or inside an entry's data.
    #[error("the tar stream is truncated at byte {offset}")]
    Truncated {
        /// Bytes read before the stream ended.
        offset: u64,
    },
    /// Reading the stream failed.
    #[error("reading the tar stream at byte {offset}")]
    Io {
        /// Bytes read before the failure.
        offset: u64,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// A header block's checksum does not match.
    #[error("tar header at byte {offset} has a bad checksum")]
    Checksum {
        /// Offset of the header block.
        offset: u64,
    },
    /// A numeric header field is not a number.
    #[error("tar header at byte {offset}: field {field} is not a number")]
    BadNumber {
        /// Offset of the header block.
        offset: u64,
        /// Which field.
        field: &'static str,
    },
    /// A pax extended header is malformed.
    #[error("pax header at byte {offset} is malformed: {reason}")]
    BadPax {
        /// Offset of the header block.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A pax or GNU long-name payload larger than 1 MiB.
    #[error("extension header at byte {offset} is {size} bytes, more than 1 MiB")]
    TooLarge {
        /// Offset of the header block.
        offset: u64,
        /// Its declared size.
        size: u64,
    },
    /// A non-zero block after the first zero block of the end marker.
    #[error("tar stream at byte {offset} has data after an end-of-archive block")]
    DataAfterEnd {
        /// Offset of the offending block.
        offset: u64,
    },
}

/// One tar member, its extensions (pax, GNU long names) already merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Member {
    /// Offset of the member's own header block (for error messages).
    pub offset: u64,
    /// Raw name bytes.
    pub name: Vec<u8>,
    /// Raw link target bytes (hardlinks and symlinks).
    pub link: Vec<u8>,
    /// Type flag byte, `\0` already normalised to `0` or `5`.
    pub kind: u8,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    /// Owner as stored (container ID).
    pub uid: u64,
    /// Group as stored (container ID).
    pub gid: u64,
    /// Bytes of data following the header.
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, u32),
    /// Access time when a pax record gives one.
    pub atime: Option<(i64, u32)>,
    /// Device major number.
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// `SCHILY.xattr.<name>` records, in stream order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Type flags.
pub(crate) mod kind {
    pub const REG: u8 = b'0';
    pub const REG_OLD: u8 = 0;
    pub const LINK: u8 = b'1';
    pub const SYMLINK: u8 = b'2';
    pub const CHAR: u8 = b'3';
    pub const BLOCK: u8 = b'4';
    pub const DIR: u8 = b'5';
    pub const FIFO: u8 = b'6';
    pub const CONTIGUOUS: u8 = b'7';
    pub const PAX: u8 = b'x';
    pub const PAX_GLOBAL: u8 = b'g';
    pub const GNU_LONGNAME: u8 = b'L';
    pub const GNU_LONGLINK: u8 = b'K';
    pub const GNU_DUMPDIR: u8 = b'D';
    pub const GNU_VOLUME: u8 = b'V';
}

/// Pull reader of tar members.
pub(crate) struct TarReader<R> {
    r: R,
    offset: u64,
    /// Data bytes of the current member not yet consumed.
    remaining: u64,
    /// Padding after the current member's data.
    padding: u64,
    done: bool,
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(r: R) -> Self {
        Self {
            r,
            offset: 0,
            remaining: 0,
            padding: 0,
            done: false,
        }
    }

    /// Bytes consumed so far.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// The underlying reader (to drain what follows the archive).
    pub(crate) fn into_inner(self) -> R {
        self.r
    }

    /// The next member, or `None` at the end of the archive. Skips whatever
    /// of the previous member's data was not read.
    pub(crate) fn next_member(&mut self) -> Result<Option<Member>, TarFormatError> {
        if self.done {
            return Ok(None);
        }
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<PaxRecord>> = None;
        loop {
            self.skip_current()?;
            let offset = self.offset;
            let mut block = [0u8; BLOCK];
            if !self.read_block(&mut block)? {
                self.done = true;
                return if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    Err(TarFormatError::Truncated { offset })
                } else {
                    Ok(None)
                };
            }
            if block.iter().all(|b| *b == 0) {
                // End of archive: a second zero block, or a clean EOF.
                let second_at = self.offset;
                let mut second = [0u8; BLOCK];
                self.done = true;
                if self.read_block(&mut second)? && second.iter().any(|b| *b != 0) {
                    return Err(TarFormatError::DataAfterEnd { offset: second_at });
                }
                return Ok(None);
            }
            verify_checksum(&block, offset)?;
            let mut m = parse_header(&block, offset)?;
            self.remaining = m.size;
            self.padding = pad(m.size);
            match m.kind {
                kind::PAX => {
                    let data = self.read_special(m.size, offset)?;
                    pax = Some(parse_pax(&data, offset)?);
                    continue;
                }
                kind::PAX_GLOBAL => {
                    // Global records are ignored, as moby does.
                    continue;
                }
                kind::GNU_LONGNAME => {
                    long_name = Some(trim_nul(self.read_special(m.size, offset)?));
                    continue;
                }
                kind::GNU_LONGLINK => {
                    long_link = Some(trim_nul(self.read_special(m.size, offset)?));
                    continue;
                }
                _ => {}
            }
            if let Some(name) = long_name.take() {
                m.name = name;
            }
            if let Some(link) = long_link.take() {
                m.link = link;
            }
            if let Some(records) = pax.take() {
                apply_pax(&mut m, records, offset)?;
                m.size = data_size(m.kind, m.size);
                self.remaining = m.size;
                self.padding = pad(m.size);
            }
            if m.kind == kind::REG_OLD {
                m.kind = if m.name.ends_with(b"/") {
                    kind::DIR
                } else {
                    kind::REG
                };
            }
            return Ok(Some(m));
        }
    }

    /// Reads the current member's data.
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, TarFormatError> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.read_some(&mut buf[..want])?;
        if n == 0 {
            return Err(TarFormatError::Truncated {
                offset: self.offset,
            });
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    /// Discards the rest of the current member and its padding.
    fn skip_current(&mut self) -> Result<(), TarFormatError> {
        let mut left = self.remaining + self.padding;
        let mut buf = [0u8; 8192];
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(buf.len()).min(buf.len());
            let n = self.read_some(&mut buf[..want])?;
            if n == 0 {
                return Err(TarFormatError::Truncated {
                    offset: self.offset,
                });
            }
            left -= n as u64;
        }
        self.remaining = 0;
        self.padding = 0;
        Ok(())
    }

    fn read_special(&mut self, size: u64, offset: u64) -> Result<Vec<u8>, TarFormatError> {
        if size > MAX_SPECIAL {
            return Err(TarFormatError::TooLarge { offset, size });
        }
        let mut data = vec![0u8; usize::try_from(size).unwrap_or(0)];
        let mut filled = 0;
        while filled < data.len() {
            let n = self.read_data(&mut data[filled..])?;
            filled += n;
        }
        Ok(data)
    }

    /// Reads a whole block; `false` on a clean EOF at a block boundary.
    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, TarFormatError> {
        let mut filled = 0;
        while filled < BLOCK {
            let n = self.read_some(&mut block[filled..])?;
            if n == 0 {
                return if filled == 0 {
                    Ok(false)
                } else {
                    Err(TarFormatError::Truncated {
                        offset: self.offset,
                    })
                };
            }
            filled += n;
        }
        Ok(true)
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, TarFormatError> {
        loop {
            match self.r.read(buf) {
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(TarFormatError::Truncated {
                        offset: self.offset,
                    });
                }
                Err(source) => {
                    return Err(TarFormatError::Io {
                        offset: self.offset,
                        source,
                    });
                }
            }
        }
    }
}

/// Links, directories and device nodes carry no data whatever the size field
/// says (Go's reader: `isHeaderOnlyType`), so the next header follows at once.
fn data_size(kind: u8, size: u64) -> u64 {
    match kind {
        kind::LINK | kind::SYMLINK | kind::CHAR | kind::BLOCK | kind::DIR | kind::FIFO => 0,
        _ => size,
    }
}

fn pad(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(end) = v.iter().position(|b| *b == 0) {
        v.truncate(end);
    }
    v
}

fn cstr_field(field: &[u8]) -> &[u8] {
    match field.iter().position(|b| *b == 0) {
        Some(end) => &field[..end],
        None => field,
    }
}

fn verify_checksum(block: &[u8; BLOCK], offset: u64) -> Result<(), TarFormatError> {
    let stored = parse_number(&block[148..156]).ok_or(TarFormatError::BadNumber {
        offset,
        field: "chksum",
    })?;
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { *b };
        unsigned += i64::from(b);
        signed += i64::from(b as i8);
    }
    if stored == unsigned || stored == signed {
        Ok(())
    } else {
        Err(TarFormatError::Checksum { offset })
    }
}

/// Octal (NUL/space padded) or base-256 (high bit set) number.
fn parse_number(field: &[u8]) -> Option<i64> {
    if let Some(first) = field.first()
        && first & 0x80 != 0
    {
        // Base-256, big-endian two's complement (Go's parseNumeric).
        let inv: u8 = if first & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, b) in field.iter().enumerate() {
            let mut c = b ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 != 0 {
                return None;
            }
            x = (x << 8) | u64::from(c);
        }
        let x = i64::try_from(x).ok()?;
        return Some(if inv == 0xff { !x } else { x });
    }
    let text = cstr_field(field);
    let text = std::str::from_utf8(text).ok()?.trim_matches(|c| c == ' ');
    if text.is_empty() {
        return Some(0);
    }
    i64::from_str_radix(text, 8).ok()
}

fn number(
    block: &[u8; BLOCK],
    range: std::ops::Range<usize>,
    offset: u64,
    field: &'static str,
) -> Result<i64, TarFormatError> {
    parse_number(&block[range]).ok_or(TarFormatError::BadNumber { offset, field })
}

fn unsigned(value: i64, offset: u64, field: &'static str) -> Result<u64, TarFormatError> {
    u64::try_from(value).map_err(|_| TarFormatError::BadNumber { offset, field })
}

fn parse_header(block: &[u8; BLOCK], offset: u64) -> Result<Member, TarFormatError> {
    let magic = &block[257..263];
    let version = &block[263..265];
    let is_ustar = magic == b"ustar\0" && version == b"00";
    let is_gnu = magic == b"ustar " && version == b" \0";
    let mut name = cstr_field(&block[0..100]).to_vec();
    if is_ustar {
        let prefix = cstr_field(&block[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
    }
    let mode = number(block, 100..108, offset, "mode")?;
    let uid = unsigned(number(block, 108..116, offset, "uid")?, offset, "uid")?;
    let gid = unsigned(number(block, 116..124, offset, "gid")?, offset, "gid")?;
    let size = unsigned(number(block, 124..136, offset, "size")?, offset, "size")?;
    let mtime = number(block, 136..148, offset, "mtime")?;
    let kind = block[156];
    let link = cstr_field(&block[157..257]).to_vec();
    let (dev_major, dev_minor) = if is_ustar || is_gnu {
        let major = number(block, 329..337, offset, "devmajor")?;
        let minor = number(block, 337..345, offset, "devminor")?;
        (
            u32::try_from(major).map_err(|_| TarFormatError::BadNumber {
                offset,
                field: "devmajor",
            })?,
            u32::try_from(minor).map_err(|_| TarFormatError::BadNumber {
                offset,
                field: "devminor",
            })?,
        )
    } else {
        (0, 0)
    };
    let size = data_size(kind, size);
    Ok(Member {
        offset,
        name,
        link,
        kind,
        mode: u32::try_from(mode & 0o7777).unwrap_or(0),
        uid,
        gid,
        size,
        mtime: (mtime, 0),
        atime: None,
        dev_major,
        dev_minor,
        xattrs: Vec::new(),
    })
}

/// One pax record: raw key, raw value.
type PaxRecord = (Vec<u8>, Vec<u8>);

/// Parses pax records (`"<len> <key>=<value>\n"`, length-delimited, so values
/// may hold any byte).
fn parse_pax(data: &[u8], offset: u64) -> Result<Vec<PaxRecord>, TarFormatError> {
    let bad = |reason| TarFormatError::BadPax { offset, reason };
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|b| *b == 0) {
            break;
        }
        let space = rest
            .iter()
            .position(|b| *b == b' ')
            .ok_or(bad("record without a length"))?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(bad("record length is not a number"))?;
        if len <= space + 1 || len > rest.len() {
            return Err(bad("record length out of range"));
        }
        let record = &rest[space + 1..len];
        let Some((b'\n', body)) = record.split_last() else {
            return Err(bad("record does not end with a newline"));
        };
        let eq = body
            .iter()
            .position(|b| *b == b'=')
            .ok_or(bad("record without '='"))?;
        records.push((body[..eq].to_vec(), body[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(records)
}

fn apply_pax(m: &mut Member, records: Vec<PaxRecord>, offset: u64) -> Result<(), TarFormatError> {
    let bad = |reason| TarFormatError::BadPax { offset, reason };
    for (key, value) in records {
        if let Some(xattr) = key.strip_prefix(b"SCHILY.xattr.") {
            m.xattrs.retain(|(k, _)| k.as_slice() != xattr);
            m.xattrs.push((xattr.to_vec(), value));
            continue;
        }
        match key.as_slice() {
            b"path" => m.name = value,
            b"linkpath" => m.link = value,
            b"size" => m.size = parse_decimal(&value).ok_or(bad("size is not a number"))?,
            b"uid" => m.uid = parse_decimal(&value).ok_or(bad("uid is not a number"))?,
            b"gid" => m.gid = parse_decimal(&value).ok_or(bad("gid is not a number"))?,
            b"mtime" => m.mtime = parse_time(&value).ok_or(bad("mtime is not a time"))?,
            b"atime" => m.atime = Some(parse_time(&value).ok_or(bad("atime is not a time"))?),
            key if key.starts_with(b"GNU.sparse.") => {
                return Err(bad("GNU sparse files are not supported"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `[-]seconds[.fraction]`.
fn parse_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    if negative {
        // -1.5 is 1.5 s before the epoch: (-2 s, 0.5 s).
        if nanos == 0 {
            Some((-secs, 0))
        } else {
            Some((-secs - 1, 1_000_000_000 - nanos))
        }
    } else {
        Some((secs, nanos))
    }
}

/// Appends one pax record, `"<len> <key>=<value>\n"`, to `out`.
pub(crate) fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = 3 + key.len() + value.len(); // ' ', '=', '\n'
    let mut digits = 1;
    while rest + digits > 10usize.pow(digits as u32) - 1 {
        digits += 1;
    }
    let len = rest + digits;
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// A pax extended header block plus its padded records, ready to write
/// before the member it describes.
pub(crate) fn pax_header(records: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::XHeader);
    set_name_bytes(&mut header, b"././@PaxHeader");
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(records.len() as u64);
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(records);
    out.resize(out.len() + pad(records.len() as u64) as usize, 0);
    out
}

/// Writes `name` into the 100-byte name field (truncated; the caller adds a
/// pax `path` record when it does not fit).
pub(crate) fn set_name_bytes(header: &mut tar::Header, name: &[u8]) {
    let field = &mut header.as_old_mut().name;
    field.fill(0);
    let n = name.len().min(field.len());
    field[..n].copy_from_slice(&name[..n]);
}

/// Writes `link` into the 100-byte linkname field (truncated likewise).
pub(crate) fn set_link_bytes(header: &mut tar::Header, link: &[u8]) {
    let field = &mut header.as_old_mut().linkname;
    field.fill(0);
    let n = link.len().min(field.len());
    field[..n].copy_from_slice(&link[..n]);
}

/// Zero padding after `size` bytes of data.
pub(crate) fn padding_for(size: u64) -> usize {
    pad(size) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_are_self_consistent() {
        for n in [0usize, 1, 5, 90, 95, 96, 97, 98, 990, 995, 996, 997] {
            let mut out = Vec::new();
            pax_record(&mut out, b"k", &vec![b'v'; n]);
            let parsed = parse_pax(&out, 0).expect("parse");
            assert_eq!(
                parsed,
                vec![(b"k".to_vec(), vec![b'v'; n])],
                "value length {n}"
            );
        }
    }

    #[test]
    fn pax_values_may_hold_newlines_and_nuls() {
        let mut out = Vec::new();
        pax_record(
            &mut out,
            b"SCHILY.xattr.security.capability",
            b"\x01\x00\n\x02\n",
        );
        pax_record(&mut out, b"path", b"a\nb");
        let parsed = parse_pax(&out, 0).expect("parse");
        assert_eq!(parsed[0].1, b"\x01\x00\n\x02\n");
        assert_eq!(parsed[1].1, b"a\nb");
    }

    #[test]
    fn numbers_octal_and_base256() {
        assert_eq!(parse_number(b"0000644\0"), Some(0o644));
        assert_eq!(parse_number(b"  644 \0"), Some(0o644));
        assert_eq!(parse_number(b"\0\0\0\0\0\0\0\0"), Some(0));
        assert_eq!(parse_number(&[0x80, 0, 0, 0, 0, 0, 0x01, 0x00]), Some(256));
        assert_eq!(parse_number(&[0xff; 8]), Some(-1));
        assert_eq!(parse_number(b"12x4\0"), None);
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_time(b"1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(
            parse_time(b"1700000000.25"),
            Some((1_700_000_000, 250_000_000))
        );
        assert_eq!(parse_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_time(b"x"), None);
    }
}
