//! Tokenizer and chat template, both built from GGUF metadata.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, MetaValue};

/// llama.cpp's pre-tokenizer regexes, by the value of `tokenizer.ggml.pre`.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The `tokenizer.ggml.pre` values this build understands.
pub const SUPPORTED_PRE: &[&str] = &["default", "gpt2", "smollm", "qwen2", "llama-bpe", "llama3"];

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A SentencePiece BPE vocabulary (GGUF `llama` tokenizers) as a `tokenizers` pipeline, built as
/// Hugging Face converts such vocabularies: merges of every token splittable into two tokens,
/// ordered by the merged token's score; spaces as `▁` with one prepended; unknown characters
/// as `<0xNN>` byte tokens.
fn sentencepiece_bpe(tokens: &[String], scores: &[f64], types: &[i64]) -> Result<Tokenizer> {
    if scores.len() != tokens.len() {
        return Err(Error::Tokenizer(format!(
            "{} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut merges: Vec<(f64, u32, u32, String, String)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let cuts = piece.char_indices().map(|(i, _)| i).skip(1);
        for cut in cuts {
            let (l, r) = piece.split_at(cut);
            if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                merges.push((score, a, b, l.to_owned(), r.to_owned()));
            }
        }
    }
    // Highest score first; a piece's own splits by the ids of their halves (a stable order).
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges = merges.into_iter().map(|(_, _, _, l, r)| (l, r)).collect();
    let unk = tokens
        .iter()
        .zip(types)
        .find(|(_, &t)| t == TOKEN_TYPE_UNKNOWN)
        .map_or_else(|| "<unk>".to_string(), |(t, _)| t.clone());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true)
        .unk_token(unk)
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut inner = Tokenizer::new(bpe);
    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(|e| Error::Tokenizer(e.to_string()));
    inner.with_normalizer(Some(NormalizerSequence::new(vec![
        Prepend::new("▁".into()).into(),
        replace(" ", "▁")?.into(),
    ])));
    inner.with_decoder(Some(DecoderSequence::new(vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    Ok(inner)
}

/// Text ↔ token ids for one model, with the ids that end a reply.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Ids that stop generation (EOS and end-of-turn tokens).
    pub stop_ids: Vec<u32>,
    pub bos_id: Option<u32>,
    pub add_bos: bool,
    pub vocab_size: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

fn string_array(file: &GgufFile, key: &str) -> Result<Vec<String>> {
    let arr = file
        .meta(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| Error::MissingMetadata(key.into()))?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| Error::Tokenizer(format!("{key} holds a non-string")))
        })
        .collect()
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    match pre {
        "default" | "gpt2" => Ok(ByteLevel::new(false, true, true).into()),
        // SmolLM: every digit on its own, then GPT-2's byte-level split.
        "smollm" => Ok(Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()),
        "qwen2" => split(QWEN2_REGEX),
        "llama-bpe" | "llama3" => split(LLAMA3_REGEX),
        other => Err(Error::Unsupported(format!(
            "tokenizer pre-tokenizer '{other}' (supported: {})",
            SUPPORTED_PRE.join(", ")
        ))),
    }
}

/// Runs a call into the tokenizers crate, whose panics on some files (found by fuzzing) become
/// errors naming `what`.
fn guarded<T>(what: &str, call: impl FnOnce() -> tokenizers::Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(Error::Tokenizer(format!("{what}: {e}"))),
        Err(_) => Err(Error::Tokenizer(format!(
            "{what}: the tokenizer library failed on this tokenizer"
        ))),
    }
}

impl TextTokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` keys: byte-level BPE
    /// (`gpt2`: Llama 3, Qwen2, SmolLM) or SentencePiece BPE (`llama`: Llama 2, Mistral).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model = file.meta_str("tokenizer.ggml.model")?;
        let tokens = string_array(file, "tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match file.meta("tokenizer.ggml.token_type").and_then(MetaValue::as_array) {
            Some(arr) => arr.iter().map(|v| v.as_f64().map_or(1, |x| x as i64)).collect(),
            None => vec![1; tokens.len()],
        };
        let mut inner = match model {
            "gpt2" => {
                let merges = string_array(file, "tokenizer.ggml.merges")?
                    .into_iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_owned(), b.to_owned()))
                            .ok_or_else(|| Error::Tokenizer(format!("merge '{m}' has no space")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                let pre = file
                    .meta("tokenizer.ggml.pre")
                    .and_then(MetaValue::as_str)
                    .unwrap_or("default");
                let mut inner = Tokenizer::new(bpe);
                inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
                inner.with_decoder(Some(ByteLevelDecoder::default()));
                inner
            }
            "llama" => {
                let scores: Vec<f64> = match file.meta("tokenizer.ggml.scores").and_then(MetaValue::as_array) {
                    Some(arr) => arr.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
                    None => return Err(Error::MissingMetadata("tokenizer.ggml.scores".into())),
                };
                sentencepiece_bpe(&tokens, &scores, &types)?
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "tokenizer model '{other}' (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)"
                )))
            }
        };
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, &t)| AddedToken::from(tok.clone(), t == TOKEN_TYPE_CONTROL))
            .collect();
        inner.add_special_tokens(&added);

        let id_of = |key: &str| file.meta(key).and_then(MetaValue::as_u64).map(|v| v as u32);
        let mut stop_ids: Vec<u32> = id_of("tokenizer.ggml.eos_token_id").into_iter().collect();
        for end_of_turn in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"] {
            if let Some(id) = inner.token_to_id(end_of_turn) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        Ok(Self {
            vocab_size: tokens.len(),
            inner,
            stop_ids,
            bos_id: id_of("tokenizer.ggml.bos_token_id"),
            // SentencePiece (Llama 2, Mistral) models expect a BOS unless the file says not.
            add_bos: file
                .meta("tokenizer.ggml.add_bos_token")
                .and_then(MetaValue::as_bool)
                .unwrap_or(model == "llama"),
        })
    }

    /// Loads a Hugging Face `tokenizer.json`; BOS, EOS and the chat template's special tokens
    /// come from `tokenizer_config.json` (`config`), extra stop ids from
    /// `generation_config.json`.
    pub fn from_hf_file(
        path: &std::path::Path,
        config: &crate::hf::HfTokenizerConfig,
        extra_stop: &[u32],
    ) -> Result<Self> {
        let inner = guarded(&path.display().to_string(), || Tokenizer::from_file(path))?;
        let id = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
        let mut stop_ids: Vec<u32> = extra_stop.to_vec();
        let eos = id(&config.eos_token);
        for candidate in eos.into_iter().chain(
            ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"]
                .iter()
                .filter_map(|t| inner.token_to_id(t)),
        ) {
            if !stop_ids.contains(&candidate) {
                stop_ids.push(candidate);
            }
        }
        Ok(Self {
            vocab_size: inner.get_vocab_size(true),
            bos_id: id(&config.bos_token),
            add_bos: config.add_bos_token,
            stop_ids,
            inner,
        })
    }

    /// A stand-in for models with random weights, which have no vocabulary: token `i` is the
    /// word `t<i>`, words are split on whitespace, and there are no stop tokens.
    pub fn numbered(vocab_size: usize) -> Result<Self> {
        let vocab: std::collections::HashMap<String, u32> =
            (0..vocab_size as u32).map(|i| (format!("t{i}"), i)).collect();
        let model = tokenizers::models::wordlevel::WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("t0".into())
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut inner = Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::WhitespaceSplit));
        Ok(Self {
            inner,
            stop_ids: Vec::new(),
            bos_id: None,
            add_bos: false,
            vocab_size,
        })
    }

    /// The tokenizer as Hugging Face `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The written form of token `id`.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Token ids of `text`; control tokens written in the text (`<|im_start|>`) are recognized.
    /// A BOS is prepended only when the model asks for one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = guarded("encoding", || self.inner.encode(text, false))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        guarded("decoding", || self.inner.decode(ids, skip_special))
    }

    /// The id of a token written out, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// A streaming decoder: feed ids one at a time, get text as soon as it is whole UTF-8.
    pub fn stream(&self, skip_special: bool) -> TextStream<&Self> {
        TextStream::new(self, skip_special)
    }
}

/// Incremental detokenization that never splits a multi-byte character.
///
/// Each step decodes only the ids since the last emitted text (plus the few before them that
/// give it context), so the cost per token stays constant however long the output grows.
/// `T` is how the tokenizer is held: borrowed, or shared (`Arc`) by a server's streams.
pub struct TextStream<T: std::ops::Deref<Target = TextTokenizer>> {
    tokenizer: T,
    ids: Vec<u32>,
    /// Start of the context window: decoding `ids[prefix..read]` gives the text already emitted.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
    skip_special: bool,
}

impl<T: std::ops::Deref<Target = TextTokenizer>> TextStream<T> {
    pub fn new(tokenizer: T, skip_special: bool) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            skip_special,
        }
    }

    /// Adds one id; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let text = self.tokenizer.decode(&self.ids[self.prefix..], self.skip_special)?;
        // A trailing replacement character means the last token ended inside a UTF-8 sequence.
        if text.ends_with('\u{FFFD}') || text.len() <= before.len() || !text.is_char_boundary(before.len()) {
            return Ok(None);
        }
        let new = text[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(Some(new))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A Llama-2-style vocabulary: unknown, BOS, EOS, 256 byte tokens, then pieces with
    /// SentencePiece scores (more frequent, higher).
    fn vocabulary() -> (Vec<String>, Vec<f64>, Vec<i64>) {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        types.extend(std::iter::repeat_n(6, 256));
        let mut scores = vec![0.0; tokens.len()];
        let pieces = [
            "▁", "H", "e", "l", "o", "w", "r", "d", "ll", "He", "or", "▁w", "llo", "orl", "Hello", "orld", "▁Hello",
            "▁world",
        ];
        for (i, p) in pieces.iter().enumerate() {
            tokens.push(p.to_string());
            types.push(1);
            scores.push(-(i as f64));
        }
        (tokens, scores, types)
    }

    #[test]
    fn sentencepiece_vocabularies_merge_by_score_and_fall_back_to_bytes() {
        let (tokens, scores, types) = vocabulary();
        let tok = sentencepiece_bpe(&tokens, &scores, &types).unwrap();
        let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
        let enc = tok.encode("Hello world!é", false).unwrap();
        let want = vec![id("▁Hello"), id("▁world"), id("<0x21>"), id("<0xC3>"), id("<0xA9>")];
        assert_eq!(enc.get_ids(), want.as_slice());
        assert_eq!(tok.decode(&want, false).unwrap(), "Hello world!é");
        // Mismatched scores are an error, not a silent guess.
        assert!(sentencepiece_bpe(&tokens, &scores[1..], &types).is_err());
    }

    /// The pieces a pre-tokenizer cuts `text` into (byte-level form: a space shows as `Ġ`).
    fn splits(pre: &str, text: &str) -> Vec<String> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let mut s = PreTokenizedString::from(text);
        pre_tokenizer(pre).unwrap().pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.to_string())
            .collect()
    }

    #[test]
    fn pre_tokenizers_split_as_their_models_expect() {
        // Llama 3 (`llama-bpe`): digits in runs of up to three; Qwen2: one digit at a time; both
        // cut contractions off and join a space to the word after it (as tiktoken does).
        assert_eq!(
            splits("llama-bpe", "I've 12345 apples"),
            ["I", "'ve", "Ġ", "123", "45", "Ġapples"]
        );
        assert_eq!(
            splits("qwen2", "I've 12345 apples"),
            ["I", "'ve", "Ġ", "1", "2", "3", "4", "5", "Ġapples"]
        );
        assert!(pre_tokenizer("no-such-pre").is_err());
    }

    #[test]
    fn numbered_tokens_round_trip() {
        let t = TextTokenizer::numbered(100).unwrap();
        assert_eq!(t.encode("t5 t99  t0").unwrap(), vec![5, 99, 0]);
        assert_eq!(t.decode(&[5, 99], true).unwrap(), "t5 t99");
        assert!(t.stop_ids.is_empty());
    }

    #[test]
    fn a_tokenizer_with_an_empty_replace_pattern_returns() {
        // A `Replace` normalizer with an empty pattern has made the tokenizers crate panic.
        let dir = std::env::temp_dir().join(format!("easykv-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(
            &path,
            r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": {"type": "Replace", "pattern": {"Regex": ""}, "content": "x"},
                "pre_tokenizer": null, "post_processor": null, "decoder": null,
                "model": {"type": "WordLevel", "vocab": {"a": 0, "x": 1}, "unk_token": "a"}}"#,
        )
        .unwrap();
        // Whatever the library makes of it (this version encodes it), the call returns.
        let result = TextTokenizer::from_hf_file(&path, &Default::default(), &[]).and_then(|t| t.encode("hello"));
        assert!(matches!(result, Ok(_) | Err(Error::Tokenizer(_))), "{result:?}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
