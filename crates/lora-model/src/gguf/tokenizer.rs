//! A `tokenizers` tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! This follows transformers' GGUF tokenizer converter (`integrations/gguf/gguf_tokenizer_mapping.py`,
//! transformers 5.x) for two kinds of vocabulary.
//!
//! **Byte-level BPE** (`tokenizer.ggml.model == "gpt2"`, e.g. SmolLM2):
//!
//! * model: BPE over `tokenizer.ggml.tokens` (id = position) and `tokenizer.ggml.merges`
//!   (`"a b"` pairs), no unknown token, no dropout, no byte fallback; a token that is not written in
//!   the byte-level alphabet is respelled byte by byte into it;
//! * pre-tokenizer: `ByteLevel(add_prefix_space = false, use_regex = true)` (the GPT-2 split), unless
//!   `tokenizer.ggml.pre` names a split transformers knows (`llama-bpe`, `qwen2`, ...), in which case
//!   `Split(regex, Isolated)` then `ByteLevel(use_regex = false)`; `tokenizer.ggml.add_space_prefix`
//!   is ignored, as transformers ignores it for `gpt2` files;
//! * tokens typed 3 (control) become special added tokens (unless they use characters outside the
//!   byte-level alphabet, a llama.cpp mislabel), tokens typed 4 (user-defined) that are in the
//!   vocabulary plain added tokens, all with `normalized = false`;
//! * decoder: `ByteLevel`; post-processor: BOS / EOS only when `tokenizer.ggml.add_bos_token` /
//!   `tokenizer.ggml.add_eos_token` say so (both absent or false for SmolLM2: no BOS is added).
//!
//! **SentencePiece BPE** (`tokenizer.ggml.model == "llama"`) of the Gemma family (`general.architecture`
//! `gemma`, `gemma2` or `gemma3`), as transformers' `gemma_tokenizer` builder and `GemmaTokenizer` make it:
//!
//! * a token made only of whitespace that holds a space (llama.cpp stores Gemma's `"▁▁"` runs as real
//!   spaces) is respelled as that many `▁`;
//! * model: BPE with byte fallback (`<0xNN>` tokens), `fuse_unk`, the unknown token named by
//!   `tokenizer.ggml.unknown_token_id` (`<unk>` when absent); the file has no merges, so they are rebuilt
//!   from the vocabulary: every split of a token into two vocabulary tokens is a merge, ranked by the
//!   merged token's position in the file (not by `tokenizer.ggml.scores`, which do not follow Gemma's
//!   merge order), then by the longer left part first;
//! * normalizer: `Replace(" ", "▁")` (no prefix space: `tokenizer.ggml.add_space_prefix` is not read);
//!   pre-tokenizer: `Split(" ", MergedWithPrevious)`; decoder: `Replace("▁", " ")`, `ByteFallback`,
//!   `Fuse`;
//! * added tokens as for byte-level files (control → special, user-defined that are still in the
//!   vocabulary after the respelling → plain), and BOS / EOS as the flags say, where an absent
//!   `tokenizer.ggml.add_bos_token` means true (llama.cpp's default for SentencePiece vocabularies).
//!
//! `tokenizer.ggml.token_type` values are llama.cpp's: 1 normal, 2 unknown, 3 control, 4 user-defined,
//! 5 unused, 6 byte.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::GgufFile;
use crate::error::{ModelError, Result};

/// The special-token ids a GGUF file names (`tokenizer.ggml.*_token_id`), each `None` when absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GgufSpecialTokens {
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`; when absent, true for SentencePiece vocabularies
    /// (`tokenizer.ggml.model == "llama"`, llama.cpp's and transformers' default) and false otherwise.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token` (false when absent).
    pub add_eos: bool,
}

impl GgufSpecialTokens {
    /// Reads the ids and flags from `file`'s metadata.
    pub fn from_file(file: &GgufFile) -> Result<Self> {
        let id = |key: &str| -> Result<Option<u32>> {
            match file.get_u64_opt(key)? {
                None => Ok(None),
                Some(v) => u32::try_from(v)
                    .map(Some)
                    .map_err(|_| file.err(format!("metadata `{key}` = {v} is not a token id"))),
            }
        };
        Ok(GgufSpecialTokens {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            add_bos: match file.get_bool_opt("tokenizer.ggml.add_bos_token")? {
                Some(flag) => flag,
                None => file.get_str_opt("tokenizer.ggml.model")? == Some("llama"),
            },
            add_eos: file.get_bool_opt("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        })
    }
}

/// The chat template stored in the file (`tokenizer.chat_template`), if any.
pub fn gguf_chat_template(file: &GgufFile) -> Option<String> {
    file.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_owned)
}

/// GPT-2's byte → printable character table (`bytes_to_unicode`).
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            extra += 1;
            255 + extra
        };
        // ok: every code here is below 0x200, a valid scalar value.
        table[usize::from(b)] = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

/// The split regexes transformers uses for known `tokenizer.ggml.pre` values.
fn pre_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// llama.cpp's token type for control tokens (`<bos>`, `<eos>`, `<unusedN>`, ...).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// llama.cpp's token type for user-defined tokens (matched whole in the text).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The vocabularies [`gguf_tokenizer`] rebuilds.
const SUPPORTED: &str = "gpt2 (byte-level BPE), llama (SentencePiece BPE) for gemma, gemma2, gemma3";

/// Builds the tokenizer a GGUF file describes, as transformers does (see the module docs).
///
/// Supported: byte-level BPE (`tokenizer.ggml.model == "gpt2"`) and the Gemma family's SentencePiece
/// BPE (`"llama"` with `general.architecture` `gemma`, `gemma2` or `gemma3`). Other models (including
/// `"llama"` vocabularies of other architectures, whose transformers tokenizer differs), missing or
/// mistyped keys, and malformed merges fail with [`ModelError::Gguf`] / [`ModelError::Tokenizer`].
pub fn gguf_tokenizer(file: &GgufFile) -> Result<Tokenizer> {
    let model = file.get_str("tokenizer.ggml.model")?;
    match model {
        "gpt2" => byte_level_bpe(file),
        "llama" => {
            let arch = file.get_str_opt("general.architecture")?.unwrap_or("");
            if matches!(arch, "gemma" | "gemma2" | "gemma3") {
                gemma_sentencepiece(file)
            } else {
                Err(file.err(format!(
                    "unsupported tokenizer: `tokenizer.ggml.model` = `llama` with `general.architecture` = `{arch}` \
                     (supported: {SUPPORTED})"
                )))
            }
        }
        _ => Err(file
            .err(format!("unsupported tokenizer model `{model}` in `tokenizer.ggml.model` (supported: {SUPPORTED})"))),
    }
}

/// `tokenizer.ggml.token_type`, or no types when the key is absent.
fn token_types(file: &GgufFile) -> Result<Vec<i64>> {
    match file.get("tokenizer.ggml.token_type") {
        Some(_) => file.get_i64_array("tokenizer.ggml.token_type"),
        None => Ok(Vec::new()),
    }
}

/// Position of token `i` as a token id.
fn token_id(file: &GgufFile, i: usize) -> Result<u32> {
    u32::try_from(i).map_err(|_| file.err("`tokenizer.ggml.tokens` has more than 2^32 entries"))
}

fn byte_level_bpe(file: &GgufFile) -> Result<Tokenizer> {
    let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
    let merges_raw = file.get_str_array("tokenizer.ggml.merges")?;
    let types = token_types(file)?;
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));

    let mut vocab = Vocab::default();
    vocab.reserve(tokens.len());
    for (i, &t) in tokens.iter().enumerate() {
        let id = token_id(file, i)?;
        let spelled = if in_alphabet(t) { t.to_owned() } else { t.bytes().map(|b| alphabet[usize::from(b)]).collect() };
        vocab.insert(spelled, id);
    }
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let mut parts = m.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_owned(), b.to_owned())),
            _ => {
                return Err(
                    file.err(format!("`tokenizer.ggml.merges`[{i}] = {m:?} is not two tokens separated by one space"))
                )
            }
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(format!("{}: BPE: {e}", file.path().display())))?;
    let mut tok = Tokenizer::new(bpe);

    let pre = file.get_str_opt("tokenizer.ggml.pre")?.unwrap_or("");
    let pre_tokenizer: PreTokenizerWrapper = match pre_split(pre) {
        Some(re) => {
            let split = Split::new(SplitPattern::Regex(re.to_owned()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| ModelError::Tokenizer(format!("split regex for `{pre}`: {e}")))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
        None => ByteLevel::new(false, true, true).into(),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.with_post_processor(Some(post_processor(file, &tokens)?));
    // A control token written outside the byte-level alphabet is a llama.cpp mislabel: skipped.
    add_typed_tokens(&mut tok, &tokens, &types, in_alphabet)?;
    Ok(tok)
}

/// Python's `str.isspace` for one character (Rust's `char::is_whitespace` lacks U+001C..U+001F).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The Gemma vocabulary as transformers spells it: whitespace-only tokens holding a space become `▁` runs.
fn gemma_spelling(t: &str) -> String {
    if t.contains(' ') && t.chars().all(is_py_space) {
        "\u{2581}".repeat(t.chars().count())
    } else {
        t.to_owned()
    }
}

/// The merges a vocabulary without merges implies (transformers' `generate_merges` with every token's
/// position as its score): each split of a token into two vocabulary tokens, ordered by the merged
/// token's position, then by the left part's length in characters, longest first.
fn merges_from_positions(vocab: &HashMap<&str, u32>) -> Vec<(String, String)> {
    // (merged token's position, left length, left, right): the key is unique, so the order is total.
    let mut found: Vec<(u32, usize, &str, &str)> = Vec::new();
    for (&t, &pos) in vocab {
        for (n_chars, (at, _)) in t.char_indices().enumerate().skip(1) {
            let (l, r) = t.split_at(at);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                found.push((pos, n_chars, l, r));
            }
        }
    }
    found.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    found.into_iter().map(|(_, _, l, r)| (l.to_owned(), r.to_owned())).collect()
}

fn gemma_sentencepiece(file: &GgufFile) -> Result<Tokenizer> {
    let raw = file.get_str_array("tokenizer.ggml.tokens")?;
    let types = token_types(file)?;
    let tokens: Vec<String> = raw.iter().map(|t| gemma_spelling(t)).collect();
    // A repeated spelling keeps its last position, as transformers' dict does.
    let mut positions: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        positions.insert(t.as_str(), token_id(file, i)?);
    }
    let merges = merges_from_positions(&positions);
    let mut vocab = Vocab::default();
    vocab.reserve(positions.len());
    for (t, &id) in &positions {
        vocab.insert((*t).to_owned(), id);
    }
    let special = GgufSpecialTokens::from_file(file)?;
    let unk = match special.unk {
        Some(id) => raw
            .get(id as usize)
            .map(|t| (*t).to_owned())
            .ok_or_else(|| file.err(format!("unknown token id {id} is outside the vocabulary")))?,
        None => "<unk>".to_owned(),
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| ModelError::Tokenizer(format!("{}: BPE: {e}", file.path().display())))?;
    let mut tok = Tokenizer::new(bpe);
    let tk_err = |what: &str, e: tokenizers::Error| ModelError::Tokenizer(format!("{what}: {e}"));
    tok.with_normalizer(Some(Replace::new(" ", "\u{2581}").map_err(|e| tk_err("normalizer", e))?))
        .map_err(|e| tk_err("normalizer", e))?;
    tok.with_pre_tokenizer(Some(
        Split::new(SplitPattern::String(" ".to_owned()), SplitDelimiterBehavior::MergedWithPrevious, false)
            .map_err(|e| tk_err("pre-tokenizer", e))?,
    ));
    tok.with_decoder(Some(DecoderSequence::new(vec![
        Replace::new("\u{2581}", " ").map_err(|e| tk_err("decoder", e))?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    tok.with_post_processor(Some(post_processor(file, &raw)?));
    add_typed_tokens(&mut tok, &raw, &types, |_| true)?;
    Ok(tok)
}

/// BOS / EOS around each sequence as `tokenizer.ggml.add_bos_token` / `add_eos_token` say.
fn post_processor(file: &GgufFile, tokens: &[&str]) -> Result<TemplateProcessing> {
    let special = GgufSpecialTokens::from_file(file)?;
    let name_of = |id: Option<u32>, what: &str| -> Result<Option<(String, u32)>> {
        match id {
            None => Ok(None),
            Some(id) => tokens
                .get(id as usize)
                .map(|t| Some(((*t).to_owned(), id)))
                .ok_or_else(|| file.err(format!("{what} token id {id} is outside the vocabulary"))),
        }
    };
    let bos = if special.add_bos { name_of(special.bos, "BOS")? } else { None };
    let eos = if special.add_eos { name_of(special.eos, "EOS")? } else { None };
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if let Some((b, id)) = &bos {
        single.push(format!("{b}:0"));
        pair.push(format!("{b}:0"));
        specials.push((b.clone(), *id));
    }
    single.push("$A:0".to_owned());
    pair.push("$A:0".to_owned());
    if let Some((e, _)) = &eos {
        single.push(format!("{e}:0"));
        pair.push(format!("{e}:0"));
    }
    if let Some((b, _)) = &bos {
        pair.push(format!("{b}:1"));
    }
    pair.push("$B:1".to_owned());
    if let Some((e, id)) = &eos {
        pair.push(format!("{e}:1"));
        if !specials.iter().any(|(t, _)| t == e) {
            specials.push((e.clone(), *id));
        }
    }
    let mut builder = TemplateProcessing::builder();
    builder.try_single(single.join(" ")).map_err(|e| ModelError::Tokenizer(format!("post-processor template: {e}")))?;
    builder.try_pair(pair.join(" ")).map_err(|e| ModelError::Tokenizer(format!("post-processor template: {e}")))?;
    builder.special_tokens(specials);
    builder.build().map_err(|e| ModelError::Tokenizer(format!("post-processor: {e}")))
}

/// Control tokens (those `keep_control` accepts) as special added tokens, then user-defined tokens that
/// the tokenizer knows as plain added tokens, all matched on the raw text (`normalized = false`).
fn add_typed_tokens(
    tok: &mut Tokenizer,
    tokens: &[&str],
    types: &[i64],
    keep_control: impl Fn(&str) -> bool,
) -> Result<()> {
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(t, ty)| **ty == TOKEN_TYPE_CONTROL && keep_control(t))
        .map(|(t, _)| AddedToken::from(*t, true).normalized(false))
        .collect();
    if !control.is_empty() {
        tok.add_special_tokens(control).map_err(|e| ModelError::Tokenizer(format!("adding control tokens: {e}")))?;
    }
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(t, ty)| **ty == TOKEN_TYPE_USER_DEFINED && tok.token_to_id(t).is_some())
        .map(|(t, _)| AddedToken::from(*t, false).normalized(false))
        .collect();
    if !user.is_empty() {
        tok.add_tokens(user).map_err(|e| ModelError::Tokenizer(format!("adding user-defined tokens: {e}")))?;
    }
    Ok(())
}
