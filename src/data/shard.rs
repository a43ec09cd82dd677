//! Token shards: the `train.bin` / `val.bin` files that `halfling prepare` writes and training
//! memory-maps.
//!
//! Layout (all integers little-endian):
//!
//! | offset | size | field                                            |
//! |--------|------|--------------------------------------------------|
//! | 0      | 8    | magic `b"HLFTOKS1"`                              |
//! | 8      | 4    | format version (u32, = 1)                        |
//! | 12     | 4    | token dtype code (u32): 2 = u16, 4 = u32         |
//! | 16     | 8    | token count (u64)                                |
//! | 24     | 4    | vocabulary size (u32)                            |
//! | 28     | 36   | zero padding up to 64 bytes                      |
//! | 64     | ...  | tokens, `count * dtype` bytes                    |
//!
//! Tokens are stored as u16 whenever the vocabulary fits (<= 65536 ids), halving the file and the
//! page-cache footprint. Writes are atomic (temp file, fsync, rename), and opening validates the
//! header, the exact file length and every token id, so a crash, a truncated copy or a mismatched
//! vocabulary is reported at open time instead of as garbage training.

use anyhow::{bail, Context};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// First 8 bytes of every shard.
pub const SHARD_MAGIC: &[u8; 8] = b"HLFTOKS1";
/// Current shard format version.
pub const SHARD_VERSION: u32 = 1;
/// Size of the fixed header in bytes; tokens start here.
pub const SHARD_HEADER_LEN: usize = 64;
/// Largest vocabulary whose ids fit in u16 storage.
const MAX_U16_VOCAB: usize = 1 << 16;

/// Width of one stored token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenDtype {
    /// 2-byte tokens (vocabulary of at most 65536).
    U16,
    /// 4-byte tokens.
    U32,
}

impl TokenDtype {
    /// The narrowest dtype that can hold every id of a `vocab_size` vocabulary.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= MAX_U16_VOCAB {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    /// Bytes per token; also the code stored in the header.
    pub fn size(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(TokenDtype::U16),
            4 => Some(TokenDtype::U32),
            _ => None,
        }
    }
}

/// The decoded fixed header of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    /// Storage width of the tokens.
    pub dtype: TokenDtype,
    /// Number of tokens in the file.
    pub count: u64,
    /// Vocabulary size the tokens were produced with; every token is below it.
    pub vocab_size: u32,
}

impl ShardHeader {
    /// File length implied by this header; `None` if it would not fit in a u64.
    fn expected_file_len(&self) -> Option<u64> {
        self.count
            .checked_mul(self.dtype.size() as u64)?
            .checked_add(SHARD_HEADER_LEN as u64)
    }

    fn to_bytes(self) -> [u8; SHARD_HEADER_LEN] {
        let mut h = [0u8; SHARD_HEADER_LEN];
        h[0..8].copy_from_slice(SHARD_MAGIC);
        h[8..12].copy_from_slice(&SHARD_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(self.dtype.size() as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.count.to_le_bytes());
        h[24..28].copy_from_slice(&self.vocab_size.to_le_bytes());
        h
    }

    /// Parses and checks a header, given the file's actual length. Every message says what to do.
    fn parse(bytes: &[u8], file_len: u64, path: &Path) -> anyhow::Result<Self> {
        let shown = path.display();
        if bytes.len() < SHARD_HEADER_LEN && bytes.starts_with(SHARD_MAGIC) {
            bail!(
                "{shown} is truncated or corrupt: the file is {file_len} bytes, shorter than the \
                 {SHARD_HEADER_LEN}-byte header; re-run `halfling prepare`"
            );
        }
        if bytes.len() < SHARD_HEADER_LEN || !bytes.starts_with(SHARD_MAGIC) {
            bail!(
                "{shown} is not a halfling token shard (missing the {:?} header); re-run \
                 `halfling prepare` to regenerate it",
                String::from_utf8_lossy(SHARD_MAGIC)
            );
        }
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != SHARD_VERSION {
            bail!(
                "{shown} has shard format version {version}, but this halfling reads version \
                 {SHARD_VERSION}; re-run `halfling prepare` to regenerate it"
            );
        }
        let code = u32_at(12);
        let Some(dtype) = TokenDtype::from_code(code) else {
            bail!(
                "{shown} has unknown token dtype code {code} (expected 2 or 4); the file is \
                 corrupt: re-run `halfling prepare`"
            );
        };
        let mut count_bytes = [0u8; 8];
        count_bytes.copy_from_slice(&bytes[16..24]);
        let header = ShardHeader {
            dtype,
            count: u64::from_le_bytes(count_bytes),
            vocab_size: u32_at(24),
        };
        match header.expected_file_len() {
            Some(expected) if expected == file_len => Ok(header),
            expected => bail!(
                "{shown} is truncated or corrupt: its header promises {} tokens ({} bytes in \
                 all) but the file is {file_len} bytes; re-run `halfling prepare`",
                header.count,
                expected.map_or_else(|| "an impossible number of".to_string(), |e| e.to_string())
            ),
        }
    }
}

/// Writes `tokens` as a shard at `path`, atomically: the data goes to `path.tmp` in the same
/// directory, is fsynced, then renamed over `path`, so readers see the old file or the new one,
/// never a partial one. Fails if a token is not below `vocab_size`.
pub fn write_shard(
    path: impl AsRef<Path>,
    tokens: &[u32],
    vocab_size: usize,
) -> anyhow::Result<()> {
    let path = path.as_ref();
    let vocab_u32 = u32::try_from(vocab_size).with_context(|| {
        format!(
            "vocab size {vocab_size} does not fit in a shard header (max {})",
            u32::MAX
        )
    })?;
    if let Some((i, &t)) = tokens
        .iter()
        .enumerate()
        .find(|&(_, &t)| t as usize >= vocab_size)
    {
        bail!(
            "cannot write {}: token {t} at index {i} is not below the vocab size {vocab_size}",
            path.display()
        );
    }
    let header = ShardHeader {
        dtype: TokenDtype::for_vocab(vocab_size),
        count: tokens.len() as u64,
        vocab_size: vocab_u32,
    };
    let mut bytes = Vec::with_capacity(SHARD_HEADER_LEN + tokens.len() * header.dtype.size());
    bytes.extend_from_slice(&header.to_bytes());
    match header.dtype {
        // The vocab check above guarantees every token fits in u16 here.
        TokenDtype::U16 => {
            for &t in tokens {
                bytes.extend_from_slice(&(t as u16).to_le_bytes());
            }
        }
        TokenDtype::U32 => {
            for &t in tokens {
                bytes.extend_from_slice(&t.to_le_bytes());
            }
        }
    }
    super::write_atomic(path, &bytes)
}

/// Reads and validates just the header of the shard at `path` (including that the file length
/// matches), without mapping or scanning the tokens. Cheap; used for staleness checks.
pub fn read_shard_header(path: impl AsRef<Path>) -> anyhow::Result<ShardHeader> {
    use std::io::Read;
    let path = path.as_ref();
    let file = File::open(path).with_context(|| {
        format!(
            "cannot open token shard {}; run `halfling prepare` to create it",
            path.display()
        )
    })?;
    let file_len = file.metadata()?.len();
    let mut bytes = Vec::with_capacity(SHARD_HEADER_LEN);
    file.take(SHARD_HEADER_LEN as u64)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read token shard {}", path.display()))?;
    ShardHeader::parse(&bytes, file_len, path)
}

/// A validated, memory-mapped token shard. Cloning is cheap (the mapping is shared).
#[derive(Clone, Debug)]
pub struct Shard {
    inner: Arc<ShardInner>,
}

#[derive(Debug)]
struct ShardInner {
    path: PathBuf,
    header: ShardHeader,
    map: Mmap,
}

impl Shard {
    /// Memory-maps the shard at `path` and validates its header, its exact length and that
    /// every token is below the vocabulary size (a linear scan; ~1 ms per million tokens).
    pub fn open(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).with_context(|| {
            format!(
                "cannot open token shard {}; run `halfling prepare` to create it",
                path.display()
            )
        })?;
        let file_len = file.metadata()?.len();
        // SAFETY: the mapping is read-only and halfling never writes a shard in place (writes go
        // to a temp file that is renamed over the old one, which leaves this mapping's inode
        // untouched). Another program truncating the file while we run could still fault; that
        // is the documented risk of memory-mapping and acceptable for our own data files.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map token shard {}", path.display()))?;
        let header = ShardHeader::parse(&map, file_len, path)?;
        let shard = Shard {
            inner: Arc::new(ShardInner {
                path: path.to_path_buf(),
                header,
                map,
            }),
        };
        shard.check_tokens()?;
        Ok(shard)
    }

    /// Fails naming the first token that is not below the vocabulary size.
    fn check_tokens(&self) -> anyhow::Result<()> {
        let vocab = self.inner.header.vocab_size;
        let bad = match self.inner.header.dtype {
            TokenDtype::U16 => self
                .token_bytes()
                .chunks_exact(2)
                .position(|c| u32::from(u16::from_le_bytes([c[0], c[1]])) >= vocab),
            TokenDtype::U32 => self
                .token_bytes()
                .chunks_exact(4)
                .position(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) >= vocab),
        };
        if let Some(i) = bad {
            bail!(
                "token shard {} is corrupt: token {} at index {i} is not below its vocab size \
                 {vocab}; re-run `halfling prepare`",
                self.inner.path.display(),
                self.get(i)
            );
        }
        Ok(())
    }

    /// The token bytes after the header (length validated at open).
    fn token_bytes(&self) -> &[u8] {
        &self.inner.map[SHARD_HEADER_LEN..]
    }

    /// Where the shard was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        // The whole file is mapped, so the count fits in memory and therefore in usize.
        self.inner.header.count as usize
    }

    /// True when the shard holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The vocabulary size recorded in the header; every token is below it.
    pub fn vocab_size(&self) -> usize {
        self.inner.header.vocab_size as usize
    }

    /// Storage width of the tokens.
    pub fn dtype(&self) -> TokenDtype {
        self.inner.header.dtype
    }

    /// Token `i`. Panics if `i >= len()` (a caller bug, like slice indexing).
    pub fn get(&self, i: usize) -> u32 {
        assert!(
            i < self.len(),
            "token index {i} out of range for shard of {}",
            self.len()
        );
        let bytes = self.token_bytes();
        match self.inner.header.dtype {
            TokenDtype::U16 => {
                let at = i * 2;
                u32::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
            }
            TokenDtype::U32 => {
                let at = i * 4;
                u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
            }
        }
    }

    /// Copies tokens `start..start + len` into `out[..len]`. Panics if the range is outside the
    /// shard or `out` is shorter than `len` (caller bugs, like slice indexing).
    pub fn copy_range(&self, start: usize, len: usize, out: &mut [u32]) {
        let end = start
            .checked_add(len)
            .filter(|&end| end <= self.len())
            .unwrap_or_else(|| {
                panic!(
                    "token range {start}+{len} out of range for shard of {}",
                    self.len()
                )
            });
        let out = &mut out[..len];
        match self.inner.header.dtype {
            TokenDtype::U16 => {
                let src = &self.token_bytes()[start * 2..end * 2];
                for (dst, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *dst = u32::from(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            TokenDtype::U32 => {
                let src = &self.token_bytes()[start * 4..end * 4];
                for (dst, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *dst = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
    }

    /// All tokens, copied out.
    pub fn to_vec(&self) -> Vec<u32> {
        let mut out = vec![0; self.len()];
        self.copy_range(0, self.len(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_u16() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.bin");
        let tokens: Vec<u32> = (0..1000u32).map(|i| (i * 7919) % 65536).collect();
        write_shard(&path, &tokens, 65536).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (SHARD_HEADER_LEN + 2 * tokens.len()) as u64
        );
        assert!(!dir.path().join("train.bin.tmp").exists());
        let shard = Shard::open(&path).unwrap();
        assert_eq!(shard.dtype(), TokenDtype::U16);
        assert_eq!(shard.len(), 1000);
        assert_eq!(shard.vocab_size(), 65536);
        assert_eq!(shard.to_vec(), tokens);
        assert_eq!(shard.get(999), tokens[999]);
        let mut out = [0u32; 5];
        shard.copy_range(10, 3, &mut out);
        assert_eq!(&out[..3], &tokens[10..13]);
        assert_eq!(&out[3..], &[0, 0]);
        let header = read_shard_header(&path).unwrap();
        assert_eq!(header.count, 1000);
    }

    #[test]
    fn round_trip_u32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("val.bin");
        let tokens: Vec<u32> = vec![0, 65536, 100_000, 99_999, 7];
        write_shard(&path, &tokens, 100_001).unwrap();
        let shard = Shard::open(&path).unwrap();
        assert_eq!(shard.dtype(), TokenDtype::U32);
        assert_eq!(shard.to_vec(), tokens);
        assert_eq!(shard.vocab_size(), 100_001);
    }

    #[test]
    fn empty_shard_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.bin");
        write_shard(&path, &[], 10).unwrap();
        let shard = Shard::open(&path).unwrap();
        assert!(shard.is_empty());
    }

    #[test]
    fn write_rejects_token_outside_vocab() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_shard(dir.path().join("x.bin"), &[1, 2, 10], 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("token 10 at index 2"), "{err}");
    }

    #[test]
    fn truncated_shard_is_reported_with_byte_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.bin");
        write_shard(&path, &[1, 2, 3, 4], 10).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        for err in [
            Shard::open(&path).unwrap_err().to_string(),
            read_shard_header(&path).unwrap_err().to_string(),
        ] {
            assert!(err.contains("truncated or corrupt"), "{err}");
            assert!(err.contains("72 bytes"), "{err}");
            assert!(err.contains("file is 69 bytes"), "{err}");
            assert!(err.contains("halfling prepare"), "{err}");
        }
        // Shorter than a header.
        std::fs::write(&path, &bytes[..20]).unwrap();
        let err = Shard::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("truncated") && err.contains("20 bytes"),
            "{err}"
        );
        std::fs::write(&path, b"HLF").unwrap();
        let err = Shard::open(&path).unwrap_err().to_string();
        assert!(err.contains("not a halfling token shard"), "{err}");
        // Zero-length file (memory-mapping an empty file must not be what fails).
        std::fs::write(&path, b"").unwrap();
        let err = Shard::open(&path).unwrap_err().to_string();
        assert!(err.contains("not a halfling token shard"), "{err}");
    }

    #[test]
    fn bad_magic_version_and_dtype_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.bin");
        write_shard(&path, &[1, 2, 3], 10).unwrap();
        let good = std::fs::read(&path).unwrap();

        let mut bad = good.clone();
        bad[0] = b'X';
        std::fs::write(&path, &bad).unwrap();
        let err = Shard::open(&path).unwrap_err().to_string();
        assert!(err.contains("not a halfling token shard"), "{err}");

        let mut bad = good.clone();
        bad[8] = 9;
        std::fs::write(&path, &bad).unwrap();
        let err = Shard::open(&path).unwrap_err().to_string();
        assert!(err.contains("version 9"), "{err}");

        let mut bad = good.clone();
        bad[12] = 3;
        std::fs::write(&path, &bad).unwrap();
        let err = Shard::open(&path).unwrap_err().to_string();
        assert!(err.contains("dtype code 3"), "{err}");

        // An absurd count must not overflow.
        let mut bad = good;
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        let err = Shard::open(&path).unwrap_err().to_string();
        assert!(err.contains("truncated or corrupt"), "{err}");
    }

    #[test]
    fn token_outside_vocab_is_reported_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.bin");
        write_shard(&path, &[1, 2, 3], 10).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        // Token index 1 lives at bytes 66..68 (u16).
        bytes[66] = 42;
        std::fs::write(&path, &bytes).unwrap();
        let err = Shard::open(&path).unwrap_err().to_string();
        assert!(err.contains("token 42 at index 1"), "{err}");
        assert!(err.contains("vocab size 10"), "{err}");
    }

    #[test]
    fn missing_shard_says_to_prepare() {
        let dir = tempfile::tempdir().unwrap();
        let err = Shard::open(dir.path().join("nope.bin"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nope.bin") && err.contains("halfling prepare"),
            "{err}"
        );
    }
}
