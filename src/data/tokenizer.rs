//! Tokenizers: turn text into token ids and back.
//!
//! Two kinds:
//! - **char**: one token per Unicode scalar value; the vocabulary is the sorted set of distinct
//!   characters of the text it was built from. Tiny vocabulary, exact, and the classic
//!   "tiny shakespeare" setup.
//! - **BPE**: GPT-2 style byte-level BPE (ByteLevel pre-tokenizer and decoder), trained locally
//!   with the Hugging Face `tokenizers` crate, or loaded from a GPT-2 `tokenizer.json`.
//!
//! Both save as a Hugging Face `tokenizer.json`, so `transformers`/`tokenizers` can read what we
//! write. The char tokenizer is expressed as a WordLevel model over single characters with a
//! pre-tokenizer that isolates every character and a `Fuse` decoder that joins tokens without
//! spaces; a test checks that the `tokenizers` crate encodes and decodes it exactly as we do.
//! [`Tokenizer::load`] recognises it by that shape (WordLevel model + isolate-every-character
//! Split pre-tokenizer). No extra marker key is written: the `tokenizers` deserializer rejects
//! unknown top-level keys, and the file must stay loadable by Hugging Face tools.

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// The special token that separates documents in BPE vocabularies (GPT-2's spelling).
pub const EOT_TOKEN: &str = "<|endoftext|>";

/// Unknown-token name written into the char tokenizer's WordLevel model. It is deliberately not in
/// the vocabulary, so Hugging Face readers fail on unknown characters just as we do instead of
/// silently mapping them to some id.
const CHAR_UNK_TOKEN: &str = "<unk>";

/// Matches exactly one Unicode scalar value in both regex engines Hugging Face uses
/// (fancy-regex in Rust, Oniguruma in the Python wheels), including newlines.
const ONE_CHAR_REGEX: &str = r"[\s\S]";

/// Byte-level BPE needs its 256 byte symbols plus the end-of-text token, so smaller requests
/// cannot be honoured.
pub const MIN_BPE_VOCAB: usize = 257;

/// A tokenizer of either kind. Cheap to share by reference; encoding does not mutate it.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    /// One token per Unicode scalar value.
    Char(CharTokenizer),
    /// Byte-level BPE (Hugging Face `tokenizers`).
    Bpe(Box<BpeTokenizer>),
}

/// Character-level tokenizer: token id = index of the character in the sorted vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CharTokenizer {
    /// Distinct characters, sorted by scalar value; the id of `chars[i]` is `i`.
    chars: Vec<char>,
    /// Reverse map from character to id.
    ids: HashMap<char, u32>,
}

/// Byte-level BPE tokenizer backed by a Hugging Face `tokenizers::Tokenizer`.
#[derive(Clone, Debug)]
pub struct BpeTokenizer {
    inner: tokenizers::Tokenizer,
    /// One past the largest id (model vocabulary plus added tokens).
    vocab_size: usize,
    eot: Option<u32>,
    /// Whether long texts may be cut at plain newlines and encoded in parallel with identical
    /// results (see [`BpeTokenizer::splits_at_plain_newlines`]).
    splittable: bool,
}

/// Texts shorter than this are encoded in one call; splitting them is not worth a thread.
const PARALLEL_ENCODE_MIN_BYTES: usize = 1 << 20;

/// Converts the boxed error type of the `tokenizers` crate into an `anyhow::Error`.
fn hf_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

impl CharTokenizer {
    /// Builds the vocabulary from the distinct characters of `text`.
    pub fn from_text(text: &str) -> Self {
        let set: BTreeSet<char> = text.chars().collect();
        Self::from_chars(set.into_iter().collect())
    }

    /// Builds a tokenizer from an already sorted, duplicate-free character list.
    fn from_chars(chars: Vec<char>) -> Self {
        let ids = chars
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        CharTokenizer { chars, ids }
    }

    /// The vocabulary, in id order.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len());
        for (char_index, c) in text.chars().enumerate() {
            match self.ids.get(&c) {
                Some(&id) => out.push(id),
                None => bail!(
                    "character {c:?} (U+{:04X}) at character position {char_index} is not in the \
                     char tokenizer's vocabulary of {} characters; re-run `halfling prepare` on a \
                     text that contains it",
                    c as u32,
                    self.chars.len()
                ),
            }
        }
        Ok(out)
    }

    fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&id| {
                self.chars
                    .get(id as usize)
                    .copied()
                    .unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect()
    }

    /// The Hugging Face tokenizer JSON describing this tokenizer (see the module docs).
    fn to_hf_json(&self) -> Value {
        // serde_json's default map is a BTreeMap, so keys come out sorted by UTF-8 bytes, which is
        // scalar-value order, which is id order: the file reads naturally.
        let vocab: serde_json::Map<String, Value> = self
            .chars
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), json!(i)))
            .collect();
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {
                "type": "Split",
                "pattern": { "Regex": ONE_CHAR_REGEX },
                "behavior": "Isolated",
                "invert": false
            },
            "post_processor": null,
            "decoder": { "type": "Fuse" },
            "model": {
                "type": "WordLevel",
                "vocab": vocab,
                "unk_token": CHAR_UNK_TOKEN
            }
        })
    }

    /// Reads the vocabulary back from our char tokenizer JSON, checking that every entry is one
    /// character and the ids are exactly 0..n.
    fn from_hf_json(value: &Value, path: &Path) -> anyhow::Result<Self> {
        let vocab = value
            .pointer("/model/vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                anyhow!(
                    "{} looks like a halfling char tokenizer but has no model.vocab object; \
                     re-run `halfling prepare`",
                    path.display()
                )
            })?;
        let mut slots: Vec<Option<char>> = vec![None; vocab.len()];
        for (token, id) in vocab {
            let mut token_chars = token.chars();
            let (Some(c), None) = (token_chars.next(), token_chars.next()) else {
                bail!(
                    "{}: char tokenizer entry {token:?} is not a single character; re-run \
                     `halfling prepare`",
                    path.display()
                );
            };
            let slot = id
                .as_u64()
                .and_then(|i| slots.get_mut(usize::try_from(i).ok()?))
                .ok_or_else(|| {
                    anyhow!(
                        "{}: char tokenizer id {id} for {token:?} is not in 0..{}; re-run \
                         `halfling prepare`",
                        path.display(),
                        vocab.len()
                    )
                })?;
            if slot.replace(c).is_some() {
                bail!(
                    "{}: char tokenizer id {id} is used twice; re-run `halfling prepare`",
                    path.display()
                );
            }
        }
        // Every slot is filled: n distinct ids in 0..n, none reused.
        let chars: Vec<char> = slots.into_iter().flatten().collect();
        Ok(Self::from_chars(chars))
    }
}

impl BpeTokenizer {
    /// Wraps a Hugging Face tokenizer, working out its vocabulary size and end-of-text id.
    fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let eot = inner.token_to_id(EOT_TOKEN);
        let splittable = Self::splits_at_plain_newlines(&inner);
        BpeTokenizer {
            inner,
            vocab_size,
            eot,
            splittable,
        }
    }

    /// True when encoding `a + b` equals encoding `a` then `b` whenever `a` ends in
    /// "non-space, newline" and `b` starts with a non-space character. That holds for GPT-2's
    /// byte-level setup: no normalizer, ByteLevel pre-tokenizer with the GPT-2 regex and no prefix
    /// space, and no added token containing a newline. There the regex has no look-behind, a
    /// single newline between non-spaces is always a pre-token of its own (both `\s+(?!\S)` at
    /// the end of a chunk and `\s+` in the middle of the text match exactly it), and BPE merges
    /// never cross pre-tokens. Other tokenizer.json files are encoded in one piece.
    fn splits_at_plain_newlines(inner: &tokenizers::Tokenizer) -> bool {
        use tokenizers::PreTokenizerWrapper;
        let gpt2_byte_level = matches!(
            inner.get_pre_tokenizer(),
            Some(PreTokenizerWrapper::ByteLevel(bl)) if bl.use_regex && !bl.add_prefix_space
        );
        let newline_free_added_tokens = inner
            .get_added_tokens_decoder()
            .values()
            .all(|t| !t.content.contains('\n'));
        inner.get_normalizer().is_none() && gpt2_byte_level && newline_free_added_tokens
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if !self.splittable || threads < 2 || text.len() < PARALLEL_ENCODE_MIN_BYTES {
            return self.encode_one(text);
        }
        // A few chunks per thread so one slow chunk does not leave the other cores idle.
        let chunks = split_at_plain_newlines(text, threads * 4);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut results: Vec<Option<anyhow::Result<Vec<u32>>>> = Vec::new();
        results.resize_with(chunks.len(), || None);
        let results = std::sync::Mutex::new(results);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(chunk) = chunks.get(i) else { break };
                    let ids = self.encode_one(chunk);
                    if let Ok(mut slots) = results.lock() {
                        slots[i] = Some(ids);
                    }
                });
            }
        });
        let results = results
            .into_inner()
            .map_err(|_| anyhow!("a BPE encoding thread panicked"))?;
        let mut out = Vec::new();
        for result in results {
            out.extend(result.ok_or_else(|| anyhow!("a BPE encoding thread panicked"))??);
        }
        Ok(out)
    }

    /// Encodes `text` in one call to the Hugging Face tokenizer.
    fn encode_one(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        // `encode_fast` skips offset tracking, which we never use.
        let encoding = self.inner.encode_fast(text, false).map_err(hf_err)?;
        Ok(encoding.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> String {
        // The HF decoder silently drops ids it does not know; we want a visible U+FFFD instead,
        // so decode each run of known ids separately and put the marker between runs.
        let mut out = String::new();
        let mut start = 0;
        for (i, &id) in ids.iter().enumerate() {
            if self.inner.id_to_token(id).is_none() {
                out.push_str(&self.decode_known(&ids[start..i]));
                out.push(char::REPLACEMENT_CHARACTER);
                start = i + 1;
            }
        }
        out.push_str(&self.decode_known(&ids[start..]));
        out
    }

    fn decode_known(&self, ids: &[u32]) -> String {
        if ids.is_empty() {
            return String::new();
        }
        self.inner
            .decode(ids, false)
            .unwrap_or_else(|_| char::REPLACEMENT_CHARACTER.to_string())
    }
}

/// Cuts `text` into about `pieces` consecutive chunks, each cut placed right after a newline
/// that has a non-space character on both sides (see
/// [`BpeTokenizer::splits_at_plain_newlines`]). Concatenating the chunks gives back `text`.
fn split_at_plain_newlines(text: &str, pieces: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let target = text.len() / pieces.max(1) + 1;
    let mut chunks = Vec::with_capacity(pieces + 1);
    let mut start = 0;
    while text.len() - start > target {
        let mut cut = None;
        let mut pos = start + target;
        while let Some(offset) = bytes
            .get(pos..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        {
            let newline = pos + offset;
            let before = text[start..newline].chars().next_back();
            let after = text[newline + 1..].chars().next();
            let is_plain = |c: Option<char>| c.is_some_and(|c| !c.is_whitespace());
            if is_plain(before) && is_plain(after) {
                cut = Some(newline + 1);
                break;
            }
            pos = newline + 1;
        }
        let Some(cut) = cut else { break };
        chunks.push(&text[start..cut]);
        start = cut;
    }
    chunks.push(&text[start..]);
    chunks
}

impl Tokenizer {
    /// A char-level tokenizer whose vocabulary is the distinct characters of `text`.
    pub fn train_char(text: &str) -> Self {
        Tokenizer::Char(CharTokenizer::from_text(text))
    }

    /// Trains a GPT-2 style byte-level BPE on `text` with at most `vocab_size` tokens (fewer when
    /// the text has too few distinct pairs to merge). The 256 byte symbols are always in the
    /// vocabulary, so any text can be encoded afterwards, and `<|endoftext|>` is added as a
    /// special token.
    pub fn train_bpe(text: &str, vocab_size: usize) -> anyhow::Result<Self> {
        use tokenizers::models::bpe::{BpeTrainer, BPE};
        use tokenizers::models::TrainerWrapper;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::AddedToken;

        if vocab_size < MIN_BPE_VOCAB {
            bail!(
                "BPE vocab size {vocab_size} is too small: byte-level BPE needs at least \
                 {MIN_BPE_VOCAB} (256 bytes + <|endoftext|>); raise data.vocab_size"
            );
        }
        if text.is_empty() {
            bail!("cannot train a BPE tokenizer on empty text; point data.text at a real corpus");
        }
        // GPT-2's settings: no prefix space (so decode(encode(x)) == x exactly), GPT-2 regex
        // split. The same ByteLevel component serves as pre-tokenizer, decoder and (offsets-only)
        // post-processor, as in GPT-2's own tokenizer.json.
        let byte_level = ByteLevel::new(false, false, true);
        let mut hf = tokenizers::Tokenizer::new(BPE::default());
        hf.with_pre_tokenizer(Some(byte_level));
        hf.with_decoder(Some(byte_level));
        hf.with_post_processor(Some(byte_level));
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![AddedToken::from(EOT_TOKEN, true)])
            .build()
            .into();
        // Feed lines (with their newlines) so the trainer can count words in parallel. This only
        // changes how runs of blank lines are counted during training; encoding always sees the
        // whole text, and any merge table encodes any text exactly.
        hf.train(&mut trainer, text.split_inclusive('\n'))
            .map_err(hf_err)
            .context("training the BPE tokenizer failed")?;
        Ok(Tokenizer::Bpe(Box::new(BpeTokenizer::from_inner(hf))))
    }

    /// Loads a Hugging Face `tokenizer.json` (e.g. GPT-2's) as a BPE tokenizer.
    pub fn from_hf_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read tokenizer file {}; check the path",
                path.display()
            )
        })?;
        Self::bpe_from_str(&text, path)
    }

    fn bpe_from_str(text: &str, path: &Path) -> anyhow::Result<Self> {
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| {
            anyhow!(
                "{} is not a valid Hugging Face tokenizer.json ({e}); re-run `halfling prepare` \
                 or bring a GPT-2 style tokenizer.json",
                path.display()
            )
        })?;
        Ok(Tokenizer::Bpe(Box::new(BpeTokenizer::from_inner(inner))))
    }

    /// Token ids of `text`. The char tokenizer fails on the first character outside its
    /// vocabulary, naming it and its character position.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        match self {
            Tokenizer::Char(t) => t.encode(text),
            Tokenizer::Bpe(t) => t.encode(text),
        }
    }

    /// Text of `ids`. Ids outside the vocabulary become U+FFFD, as do byte sequences that are
    /// not valid UTF-8 (a BPE sample cut in the middle of a character).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Char(t) => t.decode(ids),
            Tokenizer::Bpe(t) => t.decode(ids),
        }
    }

    /// Number of token ids (one past the largest id), including special tokens.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char(t) => t.chars.len(),
            Tokenizer::Bpe(t) => t.vocab_size,
        }
    }

    /// `"char"` or `"bpe"`, as written in meta.json and configs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Tokenizer::Char(_) => "char",
            Tokenizer::Bpe(_) => "bpe",
        }
    }

    /// Id of `<|endoftext|>` (BPE tokenizers that have it); `None` for char tokenizers.
    pub fn eot_token(&self) -> Option<u32> {
        match self {
            Tokenizer::Char(_) => None,
            Tokenizer::Bpe(t) => t.eot,
        }
    }

    /// The tokenizer as Hugging Face `tokenizer.json` text.
    pub fn to_json_string(&self) -> anyhow::Result<String> {
        match self {
            Tokenizer::Char(t) => Ok(serde_json::to_string_pretty(&t.to_hf_json())?),
            Tokenizer::Bpe(t) => t.inner.to_string(true).map_err(hf_err),
        }
    }

    /// Writes the tokenizer to `path` (normally `.../tokenizer.json`) atomically: a reader never
    /// sees a half-written file.
    pub fn save(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        let text = self.to_json_string()?;
        super::write_atomic(path, text.as_bytes())
    }

    /// Reads a tokenizer written by [`Tokenizer::save`] (either kind) or any Hugging Face
    /// byte-level BPE `tokenizer.json`.
    pub fn load(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read tokenizer {}; re-run `halfling prepare` to create it",
                path.display()
            )
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "{} is not valid JSON ({e}); re-run `halfling prepare`",
                path.display()
            )
        })?;
        if is_char_tokenizer_json(&value) {
            Ok(Tokenizer::Char(CharTokenizer::from_hf_json(&value, path)?))
        } else {
            Self::bpe_from_str(&text, path)
        }
    }
}

/// True for our char tokenizer JSON: a WordLevel model behind the pre-tokenizer that isolates
/// every character (the vocabulary itself is checked when it is read).
fn is_char_tokenizer_json(value: &Value) -> bool {
    let is_word_level = value.pointer("/model/type").and_then(Value::as_str) == Some("WordLevel");
    let splits_every_char = value
        .pointer("/pre_tokenizer/pattern/Regex")
        .and_then(Value::as_str)
        == Some(ONE_CHAR_REGEX);
    is_word_level && splits_every_char
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Tokenizer {
        fn as_char_json(&self) -> Value {
            match self {
                Tokenizer::Char(t) => t.to_hf_json(),
                Tokenizer::Bpe(_) => panic!("not a char tokenizer"),
            }
        }
    }

    const SAMPLE: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n\
        All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n\
        All:\nResolved. resolved.\n\nCafé — naïve “quotes” 日本語 🙂\ttab\r\n";

    fn sample_corpus() -> String {
        SAMPLE.repeat(20)
    }

    #[test]
    fn char_round_trip_including_non_ascii() {
        let tok = Tokenizer::train_char(SAMPLE);
        let ids = tok.encode(SAMPLE).unwrap();
        assert_eq!(ids.len(), SAMPLE.chars().count());
        assert_eq!(tok.decode(&ids), SAMPLE);
        assert_eq!(tok.kind_name(), "char");
        assert_eq!(tok.eot_token(), None);
        // Vocabulary is sorted distinct chars.
        let Tokenizer::Char(inner) = &tok else {
            panic!("expected char tokenizer")
        };
        assert!(inner.chars().windows(2).all(|w| w[0] < w[1]));
        assert_eq!(tok.vocab_size(), inner.chars().len());
        assert!(inner.chars().contains(&'🙂'));
    }

    #[test]
    fn char_unknown_character_error_names_char_and_position() {
        let tok = Tokenizer::train_char("abc");
        let err = tok.encode("abZc").unwrap_err().to_string();
        assert!(err.contains("'Z'"), "{err}");
        assert!(err.contains("position 2"), "{err}");
        assert!(err.contains("U+005A"), "{err}");
    }

    #[test]
    fn char_decode_unknown_id_gives_replacement() {
        let tok = Tokenizer::train_char("ab");
        assert_eq!(tok.decode(&[0, 99, 1]), "a\u{FFFD}b");
    }

    #[test]
    fn char_json_matches_hugging_face_behaviour_exactly() {
        let tok = Tokenizer::train_char(SAMPLE);
        let json = tok.to_json_string().unwrap();
        let hf: tokenizers::Tokenizer = json.parse().unwrap();
        let ours = tok.encode(SAMPLE).unwrap();
        let theirs = hf.encode(SAMPLE, true).unwrap().get_ids().to_vec();
        assert_eq!(ours, theirs);
        assert_eq!(hf.decode(&ours, false).unwrap(), SAMPLE);
        // Hugging Face also refuses unknown characters (no silent <unk>).
        assert!(hf.encode("§", true).is_err());
    }

    #[test]
    fn char_save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let tok = Tokenizer::train_char(SAMPLE);
        tok.save(&path).unwrap();
        let loaded = Tokenizer::load(&path).unwrap();
        assert_eq!(loaded.kind_name(), "char");
        assert_eq!(loaded.vocab_size(), tok.vocab_size());
        assert_eq!(loaded.encode(SAMPLE).unwrap(), tok.encode(SAMPLE).unwrap());

        // Still detected as char after a Hugging Face tool re-saves it.
        let hf: tokenizers::Tokenizer = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        let resaved = dir.path().join("resaved.json");
        hf.save(&resaved, true).unwrap();
        let reloaded = Tokenizer::load(&resaved).unwrap();
        assert_eq!(reloaded.kind_name(), "char");
        assert_eq!(
            reloaded.encode(SAMPLE).unwrap(),
            tok.encode(SAMPLE).unwrap()
        );
    }

    #[test]
    fn char_load_rejects_corrupt_vocab() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let with_vocab = |vocab: Value| {
            let mut value = Tokenizer::train_char("x").as_char_json();
            value["model"]["vocab"] = vocab;
            value.to_string()
        };
        std::fs::write(&path, with_vocab(json!({"a": 0, "b": 0}))).unwrap();
        let err = Tokenizer::load(&path).unwrap_err().to_string();
        assert!(err.contains("used twice"), "{err}");
        std::fs::write(&path, with_vocab(json!({"ab": 0}))).unwrap();
        let err = Tokenizer::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a single character"), "{err}");
        std::fs::write(&path, with_vocab(json!({"a": 0, "b": 5}))).unwrap();
        let err = Tokenizer::load(&path).unwrap_err().to_string();
        assert!(err.contains("is not in 0..2"), "{err}");
        std::fs::write(&path, "{not json").unwrap();
        let err = Tokenizer::load(&path).unwrap_err().to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn bpe_train_round_trips_exactly() {
        let corpus = sample_corpus();
        let tok = Tokenizer::train_bpe(&corpus, 400).unwrap();
        assert_eq!(tok.kind_name(), "bpe");
        assert!(
            tok.vocab_size() <= 400 && tok.vocab_size() > 300,
            "{}",
            tok.vocab_size()
        );
        let ids = tok.encode(&corpus).unwrap();
        // Merges were learned: far fewer tokens than bytes.
        assert!(
            ids.len() < corpus.len() / 2,
            "{} vs {}",
            ids.len(),
            corpus.len()
        );
        assert_eq!(tok.decode(&ids), corpus);
        // Text with characters never seen in training still round-trips (byte fallback).
        let unseen = "Zebra § ∑ 𝔘 ok";
        assert_eq!(tok.decode(&tok.encode(unseen).unwrap()), unseen);
        let eot = tok.eot_token().expect("eot token");
        assert_eq!(tok.decode(&[eot]), EOT_TOKEN);
        assert_eq!(tok.encode(EOT_TOKEN).unwrap(), vec![eot]);
        assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
    }

    #[test]
    fn bpe_chunked_encoding_equals_whole_encoding() {
        let corpus = sample_corpus();
        let Tokenizer::Bpe(tok) = Tokenizer::train_bpe(&corpus, 400).unwrap() else {
            panic!("expected BPE")
        };
        assert!(tok.splittable);
        // Add awkward boundaries: blank lines, spaces before newlines, CRLF, and text that ends
        // without a newline.
        let text = corpus.replace("All:", "All: \n\n  \r\nx\ny") + "tail";
        let whole = tok.encode_one(&text).unwrap();
        for pieces in [2, 7, 50, 400] {
            let chunks = split_at_plain_newlines(&text, pieces);
            assert!(chunks.len() >= pieces.min(20), "{pieces}: {}", chunks.len());
            assert_eq!(chunks.concat(), text);
            let mut chunked = Vec::new();
            for chunk in &chunks {
                chunked.extend(tok.encode_one(chunk).unwrap());
            }
            assert_eq!(chunked, whole, "pieces {pieces}");
        }
        // Text without any usable cut stays whole.
        assert_eq!(split_at_plain_newlines("a\n\nb c", 4), vec!["a\n\nb c"]);
    }

    #[test]
    fn bpe_decode_unknown_id_gives_replacement() {
        let tok = Tokenizer::train_bpe(&sample_corpus(), 300).unwrap();
        let ids = tok.encode("All: speak").unwrap();
        let mut with_bad = ids.clone();
        with_bad.insert(1, 1_000_000);
        let text = tok.decode(&with_bad);
        assert!(text.contains('\u{FFFD}'), "{text}");
        assert_eq!(text.replace('\u{FFFD}', ""), tok.decode(&ids));
    }

    #[test]
    fn bpe_rejects_tiny_vocab() {
        let err = Tokenizer::train_bpe("hello", 100).unwrap_err().to_string();
        assert!(err.contains("too small"), "{err}");
    }

    #[test]
    fn bpe_save_load_round_trip_and_hf_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let corpus = sample_corpus();
        let tok = Tokenizer::train_bpe(&corpus, 320).unwrap();
        tok.save(&path).unwrap();
        for loaded in [
            Tokenizer::load(&path).unwrap(),
            Tokenizer::from_hf_file(&path).unwrap(),
        ] {
            assert_eq!(loaded.kind_name(), "bpe");
            assert_eq!(loaded.vocab_size(), tok.vocab_size());
            assert_eq!(loaded.eot_token(), tok.eot_token());
            assert_eq!(
                loaded.encode(&corpus).unwrap(),
                tok.encode(&corpus).unwrap()
            );
        }
        let err = Tokenizer::from_hf_file(dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }
}
