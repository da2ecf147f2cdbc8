//! A `tokenizers` tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! This follows transformers' GGUF tokenizer converter (`integrations/gguf/gguf_tokenizer_mapping.py`,
//! transformers 5.x) for byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`):
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

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
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
    /// `tokenizer.ggml.add_bos_token` (false when absent).
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
            add_bos: file.get_bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
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

/// Builds the tokenizer a GGUF file describes, as transformers does (see the module docs).
///
/// Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported; other models, missing or
/// mistyped keys, and malformed merges fail with [`ModelError::Gguf`] / [`ModelError::Tokenizer`].
pub fn gguf_tokenizer(file: &GgufFile) -> Result<Tokenizer> {
    let model = file.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(
            file.err(format!("unsupported tokenizer model `{model}` in `tokenizer.ggml.model` (supported: gpt2)"))
        );
    }
    let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
    let merges_raw = file.get_str_array("tokenizer.ggml.merges")?;
    let types = match file.get("tokenizer.ggml.token_type") {
        Some(_) => file.get_i64_array("tokenizer.ggml.token_type")?,
        None => Vec::new(),
    };
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));

    let mut vocab = Vocab::default();
    vocab.reserve(tokens.len());
    for (i, &t) in tokens.iter().enumerate() {
        let id = u32::try_from(i).map_err(|_| file.err("`tokenizer.ggml.tokens` has more than 2^32 entries"))?;
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
    let post = builder.build().map_err(|e| ModelError::Tokenizer(format!("post-processor: {e}")))?;
    tok.with_post_processor(Some(post));

    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, ty)| **ty == 3 && in_alphabet(t))
        .map(|(t, _)| AddedToken::from(*t, true).normalized(false))
        .collect();
    if !control.is_empty() {
        tok.add_special_tokens(control).map_err(|e| ModelError::Tokenizer(format!("adding control tokens: {e}")))?;
    }
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, ty)| **ty == 4 && tok.token_to_id(t).is_some())
        .map(|(t, _)| AddedToken::from(*t, false).normalized(false))
        .collect();
    if !user.is_empty() {
        tok.add_tokens(user).map_err(|e| ModelError::Tokenizer(format!("adding user-defined tokens: {e}")))?;
    }
    Ok(tok)
}
