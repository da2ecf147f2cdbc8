//! Tokenizer (the `tokenizers` crate) with its chat template ([`crate::chat`]).
use std::path::Path;

pub use crate::chat::{ChatMessage, ChatTemplate, PromptFormat};
use crate::error::{ModelError, Result};

/// A tokenizer with its special tokens and optional chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<ChatTemplate>,
    eos_token_ids: Vec<i64>,
    bos_token_id: Option<i64>,
    pad_token_id: Option<i64>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("eos_token_ids", &self.eos_token_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Wraps a `tokenizers` tokenizer.
    pub fn new(
        inner: tokenizers::Tokenizer,
        chat_template: Option<ChatTemplate>,
        bos_token_id: Option<i64>,
        eos_token_ids: Vec<i64>,
        pad_token_id: Option<i64>,
    ) -> Self {
        Tokenizer { inner, chat_template, eos_token_ids, bos_token_id, pad_token_id }
    }

    /// Loads `tokenizer.json` (and `tokenizer_config.json` for the chat template and special tokens) from an HF
    /// model directory.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let file = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", file.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path: cfg_path.clone(), source })?
        } else {
            serde_json::Value::Null
        };
        let token_str = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let bos = token_str("bos_token");
        let eos = token_str("eos_token");
        let pad = token_str("pad_token");
        let id_of = |t: &Option<String>| t.as_ref().and_then(|t| inner.token_to_id(t)).map(i64::from);
        let mut template = cfg.get("chat_template").and_then(|v| v.as_str()).map(str::to_string);
        let jinja = dir.join("chat_template.jinja");
        if template.is_none() && jinja.exists() {
            template = Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?);
        }
        let chat_template = template.map(|t| ChatTemplate::with_special_tokens(t, bos.clone(), eos.clone()));
        let mut eos_ids: Vec<i64> = id_of(&eos).into_iter().collect();
        let gen_cfg = dir.join("generation_config.json");
        // Optional, but when present it is read as transformers reads it: a file it cannot parse, or end-of-sequence
        // ids that are not integers, are errors (ignoring them would let generation run past the model's stop
        // tokens without a word).
        if gen_cfg.exists() {
            let text = std::fs::read_to_string(&gen_cfg).map_err(|e| ModelError::io(&gen_cfg, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| ModelError::Json { path: gen_cfg.clone(), source })?;
            let bad = |what: &serde_json::Value| ModelError::Config {
                path: gen_cfg.clone(),
                message: format!("`eos_token_id` must be an integer or a list of integers, got {what}"),
            };
            match v.get("eos_token_id") {
                None | Some(serde_json::Value::Null) => {}
                Some(id @ serde_json::Value::Number(_)) => eos_ids.push(id.as_i64().ok_or_else(|| bad(id))?),
                Some(serde_json::Value::Array(a)) => {
                    for x in a {
                        eos_ids.push(x.as_i64().ok_or_else(|| bad(x))?);
                    }
                }
                Some(other) => return Err(bad(other)),
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Tokenizer {
            chat_template,
            bos_token_id: id_of(&bos),
            pad_token_id: id_of(&pad),
            eos_token_ids: eos_ids,
            inner,
        })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// End-of-sequence ids (generation stops on any).
    pub fn eos_token_ids(&self) -> &[i64] {
        &self.eos_token_ids
    }

    /// Beginning-of-sequence id.
    pub fn bos_token_id(&self) -> Option<i64> {
        self.bos_token_id
    }

    /// Padding id.
    pub fn pad_token_id(&self) -> Option<i64> {
        self.pad_token_id
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(tok_err)?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&i| u32::try_from(i).map_err(|_| ModelError::Tokenizer(format!("token id {i} out of range"))))
            .collect::<Result<_>>()?;
        self.inner.decode(&ids, skip_special_tokens).map_err(tok_err)
    }

    /// Renders `messages` with the chat template and the assistant prompt appended
    /// (`apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`).
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        self.render_chat(messages, true)
    }

    /// Renders `messages` with the chat template; a model without one is a [`ModelError::Template`].
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            ModelError::Template(
                "this model has no chat template (a base model: give the prompt as plain text, without `--chat`)"
                    .into(),
            )
        })?;
        t.render(messages, add_generation_prompt)
    }

    /// Ids of `messages` rendered with the chat template, encoded without special tokens (the template carries
    /// its own), as `apply_chat_template(messages, tokenize=True)` gives them.
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<i64>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// Prompt ids as transformers builds them for `format`: [`PromptFormat::Chat`] renders the system message
    /// (if any) and `prompt` as the user turn with the assistant prompt appended ([`Tokenizer::encode_chat`]);
    /// [`PromptFormat::Raw`] encodes the text with the tokenizer's special tokens (as `tokenizer(prompt)` does).
    pub fn encode_prompt(&self, prompt: &str, format: &PromptFormat) -> Result<Vec<i64>> {
        if format.is_chat() {
            self.encode_chat(&format.messages(prompt), true)
        } else {
            self.encode(prompt, true)
        }
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template) into `dir`.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        let file = dir.join("tokenizer.json");
        self.inner.save(&file, false).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", file.display())))?;
        let name = |id: Option<i64>| {
            id.and_then(|i| u32::try_from(i).ok())
                .and_then(|i| self.inner.id_to_token(i))
                .map_or(serde_json::Value::Null, serde_json::Value::String)
        };
        let cfg = serde_json::json!({
            "bos_token": name(self.bos_token_id),
            "eos_token": name(self.eos_token_ids.first().copied()),
            "pad_token": name(self.pad_token_id),
            "chat_template": self.chat_template.as_ref().map(|t| t.source().to_string()),
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        let path = dir.join("tokenizer_config.json");
        let text =
            serde_json::to_string_pretty(&cfg).map_err(|source| ModelError::Json { path: path.clone(), source })?;
        crate::weights::write_atomic(&path, text.as_bytes())
    }
}
