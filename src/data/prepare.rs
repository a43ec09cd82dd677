//! `halfling prepare`: turn a UTF-8 text file into a tokenizer and train/val token shards.
//!
//! Output directory contents:
//! - `train.bin`, `val.bin`: token shards (see [`super::shard`]).
//! - `tokenizer.json`: the tokenizer (Hugging Face format).
//! - `meta.json`: what was prepared from what ([`PrepareMeta`]), so [`is_stale`] can tell whether
//!   the outputs still match the source file and options, and `train` re-prepares only then.
//!
//! The split is by characters: the first `1 - val_fraction` of the text is train, the rest val.
//! A BPE tokenizer is trained on the train part only, so validation text never influences the
//! merges. A char tokenizer is built from the whole text: its vocabulary is just the set of
//! characters, and building it from train alone would make any character that appears only in
//! the val tail impossible to encode.

use super::shard::{read_shard_header, write_shard, SHARD_VERSION};
use super::tokenizer::Tokenizer;
use super::{fnv1a64, write_atomic};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Instant, UNIX_EPOCH};

/// Training shard file name inside the output directory.
pub const TRAIN_FILE: &str = "train.bin";
/// Validation shard file name inside the output directory.
pub const VAL_FILE: &str = "val.bin";
/// Tokenizer file name inside the output directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Metadata file name inside the output directory; written last, so its presence means the rest
/// is complete.
pub const META_FILE: &str = "meta.json";

/// Fewest tokens each split must have; anything smaller cannot make even one useful batch.
pub const MIN_SPLIT_TOKENS: usize = 8;

/// Which tokenizer to build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per distinct character.
    Char,
    /// Byte-level BPE with at most `vocab_size` tokens (including `<|endoftext|>`).
    Bpe {
        /// Requested vocabulary size.
        vocab_size: usize,
    },
}

impl TokenizerKind {
    /// `"char"` or `"bpe"`.
    pub fn name(&self) -> &'static str {
        match self {
            TokenizerKind::Char => "char",
            TokenizerKind::Bpe { .. } => "bpe",
        }
    }

    /// The requested BPE vocabulary size; `None` for char.
    pub fn requested_vocab_size(&self) -> Option<usize> {
        match self {
            TokenizerKind::Char => None,
            TokenizerKind::Bpe { vocab_size } => Some(*vocab_size),
        }
    }
}

/// What to prepare and where.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareOptions {
    /// The UTF-8 text corpus (`data.text` in the config).
    pub input: PathBuf,
    /// Directory that receives the shards, tokenizer and meta.json (created if missing).
    pub out_dir: PathBuf,
    /// Which tokenizer to build.
    pub tokenizer: TokenizerKind,
    /// Fraction of the text (by characters, taken from the end) used for validation; in (0, 1).
    pub val_fraction: f64,
}

/// What [`prepare`] produced.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareReport {
    /// Tokens in `train.bin`.
    pub train_tokens: usize,
    /// Tokens in `val.bin`.
    pub val_tokens: usize,
    /// Vocabulary size of the tokenizer actually built (may be below a requested BPE size when
    /// the text is small).
    pub vocab_size: usize,
    /// `"char"` or `"bpe"`.
    pub tokenizer_kind: String,
    /// Seconds spent building/training the tokenizer.
    pub tokenizer_seconds: f64,
    /// Seconds spent encoding both splits.
    pub encode_seconds: f64,
    /// Total wall seconds, including reading and writing files.
    pub seconds: f64,
}

/// Contents of `meta.json`: the inputs and results of one prepare run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrepareMeta {
    /// Shard format version the shards were written with.
    pub halfling_shard_version: u32,
    /// Absolute path of the source text.
    pub source_path: String,
    /// Source length in bytes.
    pub source_bytes: u64,
    /// Source modification time: whole seconds since the Unix epoch.
    pub source_mtime_secs: u64,
    /// Source modification time: nanoseconds within the second.
    pub source_mtime_nanos: u32,
    /// FNV-1a 64 of the source bytes, as 16 hex digits.
    pub source_fnv1a64: String,
    /// Tokenizer options used.
    pub tokenizer: TokenizerKind,
    /// Vocabulary size of the tokenizer built.
    pub vocab_size: usize,
    /// Fraction of characters used for validation.
    pub val_fraction: f64,
    /// Characters in the train split.
    pub train_chars: usize,
    /// Characters in the val split.
    pub val_chars: usize,
    /// Tokens in `train.bin`.
    pub train_tokens: usize,
    /// Tokens in `val.bin`.
    pub val_tokens: usize,
}

/// The source file as read and fingerprinted.
struct Source {
    text: String,
    absolute_path: PathBuf,
    mtime_secs: u64,
    mtime_nanos: u32,
    hash: String,
}

/// Reads the corpus with the errors a user needs: which path, that the config points at it,
/// empty files, and the byte offset of the first invalid UTF-8 byte.
fn read_source(path: &Path) -> anyhow::Result<Source> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "text file {} does not exist; `data.text` in the config points at it: fix the path \
             or put a UTF-8 text corpus there",
            path.display()
        ),
        Err(e) => bail!(
            "cannot read text file {} ({e}); `data.text` in the config points at it",
            path.display()
        ),
    };
    if bytes.is_empty() {
        bail!(
            "text file {} is empty; point `data.text` at a corpus with some text",
            path.display()
        );
    }
    let metadata = std::fs::metadata(path)
        .with_context(|| format!("cannot read metadata of {}", path.display()))?;
    let mtime = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    let hash = format!("{:016x}", fnv1a64(&bytes));
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "text file {} is not valid UTF-8: the first invalid byte is at byte offset {}; \
             convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let absolute_path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(Source {
        text,
        absolute_path,
        mtime_secs: mtime.as_secs(),
        mtime_nanos: mtime.subsec_nanos(),
        hash,
    })
}

fn check_val_fraction(val_fraction: f64) -> anyhow::Result<()> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        bail!(
            "data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}; 0.1 is a \
             good default"
        );
    }
    Ok(())
}

/// Splits `text` by characters: the first `1 - val_fraction` of them for train, the rest for
/// val (at least one character each when the text has two or more).
fn split_by_chars(text: &str, val_fraction: f64) -> (&str, &str) {
    let n_chars = text.chars().count();
    let val_chars = ((n_chars as f64 * val_fraction).ceil() as usize).clamp(1, n_chars.max(1));
    let train_chars = n_chars - val_chars;
    let split_byte = text
        .char_indices()
        .nth(train_chars)
        .map_or(text.len(), |(i, _)| i);
    text.split_at(split_byte)
}

/// Runs the whole pipeline (read, split, tokenizer, encode, write) and reports sizes and times.
pub fn prepare(opts: &PrepareOptions) -> anyhow::Result<PrepareReport> {
    let started = Instant::now();
    check_val_fraction(opts.val_fraction)?;
    let source = read_source(&opts.input)?;
    let (train_text, val_text) = split_by_chars(&source.text, opts.val_fraction);

    let tokenizer_started = Instant::now();
    let tokenizer = match &opts.tokenizer {
        TokenizerKind::Char => Tokenizer::train_char(&source.text),
        TokenizerKind::Bpe { vocab_size } => Tokenizer::train_bpe(train_text, *vocab_size)?,
    };
    let tokenizer_seconds = tokenizer_started.elapsed().as_secs_f64();

    let encode_started = Instant::now();
    // The two splits are independent; encode them on two threads (the BPE encoder is
    // single-threaded per call).
    let (train_tokens, val_tokens) = std::thread::scope(|scope| {
        let val_job = scope.spawn(|| tokenizer.encode(val_text));
        let train = tokenizer.encode(train_text);
        let val = val_job
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the val encoding thread panicked")));
        (train, val)
    });
    let train_tokens = train_tokens.context("encoding the train split failed")?;
    let val_tokens = val_tokens.context("encoding the val split failed")?;
    let encode_seconds = encode_started.elapsed().as_secs_f64();

    for (name, count) in [("train", train_tokens.len()), ("val", val_tokens.len())] {
        if count < MIN_SPLIT_TOKENS {
            bail!(
                "text too short: the {name} split of {} has {count} tokens (need at least \
                 {MIN_SPLIT_TOKENS}); use a longer text or adjust data.val_fraction (now {})",
                opts.input.display(),
                opts.val_fraction
            );
        }
    }

    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("cannot create output directory {}", opts.out_dir.display()))?;
    // Remove the old meta first: if we crash half-way, the directory reads as stale rather than
    // as a complete prepare whose shards no longer match it.
    let meta_path = opts.out_dir.join(META_FILE);
    match std::fs::remove_file(&meta_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot remove old {} ({e})", meta_path.display()),
    }
    let vocab_size = tokenizer.vocab_size();
    write_shard(opts.out_dir.join(TRAIN_FILE), &train_tokens, vocab_size)?;
    write_shard(opts.out_dir.join(VAL_FILE), &val_tokens, vocab_size)?;
    tokenizer.save(opts.out_dir.join(TOKENIZER_FILE))?;

    let meta = PrepareMeta {
        halfling_shard_version: SHARD_VERSION,
        source_path: source.absolute_path.display().to_string(),
        source_bytes: source.text.len() as u64,
        source_mtime_secs: source.mtime_secs,
        source_mtime_nanos: source.mtime_nanos,
        source_fnv1a64: source.hash,
        tokenizer: opts.tokenizer.clone(),
        vocab_size,
        val_fraction: opts.val_fraction,
        train_chars: train_text.chars().count(),
        val_chars: val_text.chars().count(),
        train_tokens: train_tokens.len(),
        val_tokens: val_tokens.len(),
    };
    let meta_json = serde_json::to_string_pretty(&meta)?;
    write_atomic(&meta_path, meta_json.as_bytes())?;

    Ok(PrepareReport {
        train_tokens: train_tokens.len(),
        val_tokens: val_tokens.len(),
        vocab_size,
        tokenizer_kind: tokenizer.kind_name().to_string(),
        tokenizer_seconds,
        encode_seconds,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// True when `prepare(opts)` needs to run: an output is missing or unreadable, or `meta.json`
/// disagrees with the options or with the source file's length, modification time or content
/// hash. Fails (with prepare's message) when the source itself is missing or unreadable.
pub fn is_stale(opts: &PrepareOptions) -> anyhow::Result<bool> {
    Ok(stale_reason(opts)?.is_some())
}

/// Like [`is_stale`], but says why (for a log line such as "re-preparing data: source changed").
/// `None` means the prepared data is up to date.
pub fn stale_reason(opts: &PrepareOptions) -> anyhow::Result<Option<String>> {
    check_val_fraction(opts.val_fraction)?;
    let source = read_source(&opts.input)?;
    for file in [TRAIN_FILE, VAL_FILE, TOKENIZER_FILE, META_FILE] {
        if !opts.out_dir.join(file).is_file() {
            return Ok(Some(format!(
                "{} is missing",
                opts.out_dir.join(file).display()
            )));
        }
    }
    let meta_path = opts.out_dir.join(META_FILE);
    let meta: PrepareMeta = match std::fs::read_to_string(&meta_path)
        .map_err(anyhow::Error::from)
        .and_then(|s| Ok(serde_json::from_str(&s)?))
    {
        Ok(meta) => meta,
        Err(e) => return Ok(Some(format!("{} is unreadable ({e})", meta_path.display()))),
    };
    let source_path = source.absolute_path.display().to_string();
    let differences = [
        (
            meta.halfling_shard_version != SHARD_VERSION,
            "shard format version",
        ),
        (meta.source_path != source_path, "source path"),
        (
            meta.source_bytes != source.text.len() as u64,
            "source length",
        ),
        (
            (meta.source_mtime_secs, meta.source_mtime_nanos)
                != (source.mtime_secs, source.mtime_nanos),
            "source modification time",
        ),
        (meta.source_fnv1a64 != source.hash, "source content"),
        (meta.tokenizer != opts.tokenizer, "tokenizer options"),
        (
            // JSON may not round-trip the last bit of an f64; anything closer is the same option.
            (meta.val_fraction - opts.val_fraction).abs() > 1e-12,
            "val_fraction",
        ),
    ];
    if let Some((_, what)) = differences.iter().find(|(differs, _)| *differs) {
        return Ok(Some(format!("{what} changed since the last prepare")));
    }
    for (file, expected) in [(TRAIN_FILE, meta.train_tokens), (VAL_FILE, meta.val_tokens)] {
        let path = opts.out_dir.join(file);
        match read_shard_header(&path) {
            Ok(h) if h.count == expected as u64 && h.vocab_size as usize == meta.vocab_size => {}
            Ok(_) => return Ok(Some(format!("{} does not match meta.json", path.display()))),
            Err(e) => return Ok(Some(format!("{e}"))),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::super::shard::Shard;
    use super::*;

    const VERSE: &str = "Shall I compare thee to a summer's day?\n\
        Thou art more lovely and more temperate:\n\
        Rough winds do shake the darling buds of May,\n\
        And summer's lease hath all too short a date.\n\n";

    fn options(dir: &Path, tokenizer: TokenizerKind) -> PrepareOptions {
        PrepareOptions {
            input: dir.join("input.txt"),
            out_dir: dir.join("prepared"),
            tokenizer,
            val_fraction: 0.1,
        }
    }

    #[test]
    fn split_is_by_characters() {
        let (train, val) = split_by_chars("ééééééééé𝔘", 0.1);
        assert_eq!(train, "ééééééééé");
        assert_eq!(val, "𝔘");
        let (train, val) = split_by_chars("ab", 0.01);
        assert_eq!((train, val), ("a", "b"));
    }

    #[test]
    fn prepare_char_end_to_end_and_staleness() {
        let dir = tempfile::tempdir().unwrap();
        let text = VERSE.repeat(10);
        std::fs::write(dir.path().join("input.txt"), &text).unwrap();
        let opts = options(dir.path(), TokenizerKind::Char);
        assert!(is_stale(&opts).unwrap());
        let report = prepare(&opts).unwrap();
        assert_eq!(report.tokenizer_kind, "char");
        assert_eq!(
            report.train_tokens + report.val_tokens,
            text.chars().count()
        );
        assert!(report.val_tokens >= text.chars().count() / 10);

        let out = &opts.out_dir;
        let tok = Tokenizer::load(out.join(TOKENIZER_FILE)).unwrap();
        let train = Shard::open(out.join(TRAIN_FILE)).unwrap();
        let val = Shard::open(out.join(VAL_FILE)).unwrap();
        assert_eq!(train.vocab_size(), tok.vocab_size());
        let mut round_trip = tok.decode(&train.to_vec());
        round_trip.push_str(&tok.decode(&val.to_vec()));
        assert_eq!(round_trip, text);

        let meta: PrepareMeta =
            serde_json::from_str(&std::fs::read_to_string(out.join(META_FILE)).unwrap()).unwrap();
        assert_eq!(meta.train_tokens, report.train_tokens);
        assert_eq!(meta.source_bytes, text.len() as u64);
        assert_eq!(meta.halfling_shard_version, SHARD_VERSION);

        assert_eq!(stale_reason(&opts).unwrap(), None);

        // Changing options makes it stale.
        let mut other = opts.clone();
        other.val_fraction = 0.2;
        assert!(is_stale(&other).unwrap());
        let mut other = opts.clone();
        other.tokenizer = TokenizerKind::Bpe { vocab_size: 300 };
        assert!(is_stale(&other).unwrap());

        // Touching the source (same bytes, new mtime) makes it stale.
        let file = std::fs::File::options()
            .write(true)
            .open(&opts.input)
            .unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        file.set_modified(later).unwrap();
        drop(file);
        let reason = stale_reason(&opts).unwrap().unwrap();
        assert!(reason.contains("modification time"), "{reason}");
        prepare(&opts).unwrap();
        assert!(!is_stale(&opts).unwrap());

        // Same length, same mtime, different content: caught by the hash.
        let mtime = std::fs::metadata(&opts.input).unwrap().modified().unwrap();
        let edited = text.replacen("Shall", "Will ", 1);
        assert_eq!(edited.len(), text.len());
        std::fs::write(&opts.input, &edited).unwrap();
        let file = std::fs::File::options()
            .write(true)
            .open(&opts.input)
            .unwrap();
        file.set_modified(mtime).unwrap();
        drop(file);
        let reason = stale_reason(&opts).unwrap().unwrap();
        assert!(reason.contains("source content"), "{reason}");

        // A missing output makes it stale.
        prepare(&opts).unwrap();
        std::fs::remove_file(out.join(VAL_FILE)).unwrap();
        assert!(is_stale(&opts).unwrap());
        prepare(&opts).unwrap();
        // A truncated shard makes it stale.
        let bytes = std::fs::read(out.join(TRAIN_FILE)).unwrap();
        std::fs::write(out.join(TRAIN_FILE), &bytes[..bytes.len() - 2]).unwrap();
        assert!(is_stale(&opts).unwrap());
    }

    #[test]
    fn prepare_bpe_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let text = VERSE.repeat(30);
        std::fs::write(dir.path().join("input.txt"), &text).unwrap();
        let opts = options(dir.path(), TokenizerKind::Bpe { vocab_size: 320 });
        let report = prepare(&opts).unwrap();
        assert_eq!(report.tokenizer_kind, "bpe");
        assert!(report.vocab_size <= 320);
        assert!(report.train_tokens + report.val_tokens < text.len() / 2);
        let tok = Tokenizer::load(opts.out_dir.join(TOKENIZER_FILE)).unwrap();
        let train = Shard::open(opts.out_dir.join(TRAIN_FILE)).unwrap();
        let val = Shard::open(opts.out_dir.join(VAL_FILE)).unwrap();
        let joined = tok.decode(&train.to_vec()) + &tok.decode(&val.to_vec());
        assert_eq!(joined, text);
        assert!(!is_stale(&opts).unwrap());
        let mut other = opts.clone();
        other.tokenizer = TokenizerKind::Bpe { vocab_size: 400 };
        assert!(is_stale(&other).unwrap());
    }

    #[test]
    fn input_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(dir.path(), TokenizerKind::Char);

        let err = prepare(&opts).unwrap_err().to_string();
        assert!(
            err.contains("input.txt") && err.contains("does not exist"),
            "{err}"
        );
        assert!(err.contains("data.text"), "{err}");
        let err = is_stale(&opts).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");

        std::fs::write(&opts.input, "").unwrap();
        let err = prepare(&opts).unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");

        std::fs::write(&opts.input, b"hello \xff world").unwrap();
        let err = prepare(&opts).unwrap_err().to_string();
        assert!(err.contains("not valid UTF-8"), "{err}");
        assert!(err.contains("byte offset 6"), "{err}");

        std::fs::write(&opts.input, "tiny text").unwrap();
        let err = prepare(&opts).unwrap_err().to_string();
        assert!(err.contains("text too short"), "{err}");
        assert!(!opts.out_dir.join(META_FILE).exists());

        std::fs::write(&opts.input, VERSE).unwrap();
        let mut bad = opts.clone();
        bad.val_fraction = 1.0;
        let err = prepare(&bad).unwrap_err().to_string();
        assert!(err.contains("val_fraction"), "{err}");
    }
}
