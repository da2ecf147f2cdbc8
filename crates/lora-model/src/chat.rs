//! How a prompt becomes model input: [`PromptFormat`] (raw text, or a chat conversation with an optional system
//! message), [`ChatMessage`] and [`ChatTemplate`], a Jinja chat template rendered as transformers'
//! `apply_chat_template` renders it.
//!
//! transformers renders templates with jinja2 (`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`,
//! the `loopcontrols` extension) and adds `raise_exception`, `strftime_now`, a `tojson` that is Python's
//! `json.dumps` and, as template variables, `messages`, `tools` and `documents` (both `None` here),
//! `add_generation_prompt` and the tokenizer's special tokens. [`ChatTemplate::render`] does the same with
//! minijinja, with Python's way of printing values (`True`, `None`, `['a', 1]`, `2.0`).
use std::sync::{Arc, Mutex};

use minijinja::value::{Kwargs, Value, ValueKind};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage { role: "user".into(), content: content.into() }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        ChatMessage { role: "system".into(), content: content.into() }
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage { role: "assistant".into(), content: content.into() }
    }
}

/// How a prompt is turned into model input — the one place every command, the pipeline, the probe and the trainer
/// take this from.
///
/// ```
/// use lora_model::{ChatMessage, PromptFormat};
///
/// # fn main() -> lora_model::Result<()> {
/// let f = PromptFormat::from_flags(true, Some("Be brief.".into()))?;
/// assert_eq!(f.messages("Hi"), vec![ChatMessage::system("Be brief."), ChatMessage::user("Hi")]);
/// // A system prompt needs the chat template.
/// assert!(PromptFormat::from_flags(false, Some("Be brief.".into())).is_err());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    /// The prompt text as is, with the tokenizer's own special tokens (what `tokenizer(prompt)` gives).
    #[default]
    Raw,
    /// The prompt as the user turn of a conversation rendered with the model's chat template, after the system
    /// message when there is one, with the assistant prompt appended (what
    /// `apply_chat_template(messages, add_generation_prompt=True)` gives).
    Chat {
        /// The system message, if any.
        system: Option<String>,
    },
}

impl PromptFormat {
    /// Raw text.
    pub fn raw() -> Self {
        PromptFormat::Raw
    }

    /// The chat template without a system message.
    pub fn chat() -> Self {
        PromptFormat::Chat { system: None }
    }

    /// The chat template with `system` as the system message.
    pub fn chat_with_system(system: impl Into<String>) -> Self {
        PromptFormat::Chat { system: Some(system.into()) }
    }

    /// From the `--chat` / `--system` flags (or `chat` / `system` keys): a system prompt without `chat` is an
    /// [`ModelError::InvalidArgument`].
    pub fn from_flags(chat: bool, system: Option<String>) -> Result<Self> {
        match (chat, system) {
            (true, system) => Ok(PromptFormat::Chat { system }),
            (false, None) => Ok(PromptFormat::Raw),
            (false, Some(_)) => Err(ModelError::InvalidArgument(
                "a system prompt needs the chat template: set `chat` (--chat) as well as `system` (--system)".into(),
            )),
        }
    }

    /// Whether prompts go through the chat template.
    pub fn is_chat(&self) -> bool {
        matches!(self, PromptFormat::Chat { .. })
    }

    /// The system message, if any.
    pub fn system(&self) -> Option<&str> {
        match self {
            PromptFormat::Chat { system: Some(s) } => Some(s),
            _ => None,
        }
    }

    /// The conversation `prompt` becomes: the system message (if any), then `prompt` as the user turn. For
    /// [`PromptFormat::Raw`] just the user turn.
    pub fn messages(&self, prompt: &str) -> Vec<ChatMessage> {
        let mut m = Vec::with_capacity(2);
        if let Some(s) = self.system() {
            m.push(ChatMessage::system(s));
        }
        m.push(ChatMessage::user(prompt));
        m
    }
}

/// A Jinja chat template with the special-token strings it may reference, rendered like transformers'
/// `apply_chat_template` (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// A template with the special-token strings it may reference.
    pub fn new(source: impl Into<String>, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Self {
        ChatTemplate { source: source.into(), bos_token: Some(bos_token.into()), eos_token: Some(eos_token.into()) }
    }

    /// A template whose model may lack a BOS or EOS token: a missing one is undefined in the template, as it is
    /// for transformers (which passes only the special tokens the tokenizer has).
    pub fn with_special_tokens(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        ChatTemplate { source: source.into(), bos_token, eos_token }
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`, appending the assistant prompt when `add_generation_prompt`.
    ///
    /// A conversation the template refuses (its `raise_exception`, e.g. Mistral's "roles must alternate") is a
    /// [`ModelError::TemplateRejected`] with the template's message; a template that does not compile or fails
    /// otherwise is a [`ModelError::Template`].
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let raised: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            if !value.is_undefined() {
                out.write_str(&py::str(value))
                    .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, e.to_string()))?;
            }
            Ok(())
        });
        let cell = Arc::clone(&raised);
        env.add_function("raise_exception", move |msg: String| -> std::result::Result<String, minijinja::Error> {
            if let Ok(mut slot) = cell.lock() {
                slot.get_or_insert_with(|| msg.clone());
            }
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", py::strftime_now);
        env.add_filter("tojson", py::tojson);
        env.add_filter("string", |v: Value| py::str(&v));
        env.add_template("chat", &self.source).map_err(|e| ModelError::Template(e.to_string()))?;
        let tmpl = env.get_template("chat").map_err(|e| ModelError::Template(e.to_string()))?;
        let rendered = tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => Value::from(()),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().map_or(Value::UNDEFINED, Value::from),
            eos_token => self.eos_token.as_deref().map_or(Value::UNDEFINED, Value::from),
        });
        rendered.map_err(|e| match raised.lock().ok().and_then(|mut s| s.take()) {
            Some(message) => ModelError::TemplateRejected(message),
            None => ModelError::Template(e.to_string()),
        })
    }
}

/// Python's ways of turning values into text: `str()`, `repr()`, `json.dumps` and `datetime.strftime`.
mod py {
    use std::fmt::Write as _;

    use super::{Kwargs, Value, ValueKind};
    use minijinja::{Error, ErrorKind};

    fn invalid(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidOperation, msg.into())
    }

    /// Widest `tojson(indent=N)` a template may ask for (chat templates use 2 or 4).
    const MAX_TOJSON_INDENT: i64 = 256;

    /// `repr(float)`: the shortest round-trip digits, positional for exponents -4..16, else `d.ddde±XX`.
    pub fn float(f: f64) -> String {
        if f.is_nan() {
            return "nan".into();
        }
        if f.is_infinite() {
            return if f < 0.0 { "-inf".into() } else { "inf".into() };
        }
        if f == 0.0 {
            return if f.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
        }
        // `{:e}` gives the shortest round-trip mantissa, e.g. `1.5e-5`, `-2e20`.
        let sci = format!("{f:e}");
        let (mant, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0")); // ok: `{:e}` always has an `e`
        let exp: i32 = exp.parse().unwrap_or(0);
        let (sign, mant) = mant.strip_prefix('-').map_or(("", mant), |m| ("-", m));
        let digits: String = mant.chars().filter(|c| *c != '.').collect();
        if (-4..16).contains(&exp) {
            let point = exp + 1; // digits before the decimal point
            let s = if point <= 0 {
                format!("0.{}{}", "0".repeat(point.unsigned_abs() as usize), digits)
            } else if point as usize >= digits.len() {
                format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
            } else {
                format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
            };
            format!("{sign}{s}")
        } else {
            let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
            format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.unsigned_abs())
        }
    }

    /// `repr(str)`: single quotes unless the text has a `'` and no `"`; `\\`, `\n`, `\r`, `\t` and other
    /// non-printable characters escaped.
    pub fn repr_str(s: &str) -> String {
        let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
        let mut out = String::with_capacity(s.len() + 2);
        out.push(quote);
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c == quote => {
                    out.push('\\');
                    out.push(c);
                }
                c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c => out.push(c),
            }
        }
        out.push(quote);
        out
    }

    /// `str(value)`: text as is, numbers and containers as Python prints them.
    pub fn str(v: &Value) -> String {
        match v.kind() {
            ValueKind::String => v.as_str().unwrap_or_default().to_string(),
            _ => repr(v),
        }
    }

    /// `repr(value)`.
    pub fn repr(v: &Value) -> String {
        match v.kind() {
            ValueKind::Undefined => String::new(),
            ValueKind::None => "None".into(),
            ValueKind::Bool => (if v.is_true() { "True" } else { "False" }).into(),
            ValueKind::String => repr_str(v.as_str().unwrap_or_default()),
            ValueKind::Number if !v.is_integer() => f64::try_from(v.clone()).map_or_else(|_| v.to_string(), float),
            ValueKind::Seq | ValueKind::Iterable => match v.try_iter() {
                Ok(items) => format!("[{}]", items.map(|x| repr(&x)).collect::<Vec<_>>().join(", ")),
                Err(_) => v.to_string(),
            },
            ValueKind::Map => match v.try_iter() {
                Ok(keys) => {
                    let parts: Vec<String> = keys
                        .map(|k| format!("{}: {}", repr(&k), repr(&v.get_item(&k).unwrap_or(Value::UNDEFINED))))
                        .collect();
                    format!("{{{}}}", parts.join(", "))
                }
                Err(_) => v.to_string(),
            },
            _ => v.to_string(),
        }
    }

    struct Json {
        ensure_ascii: bool,
        indent: Option<String>,
        item_sep: String,
        key_sep: String,
        sort_keys: bool,
    }

    impl Json {
        fn string(&self, s: &str, out: &mut String) {
            out.push('"');
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    '\u{8}' => out.push_str("\\b"),
                    '\u{c}' => out.push_str("\\f"),
                    c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                        let mut buf = [0u16; 2];
                        for unit in c.encode_utf16(&mut buf) {
                            let _ = write!(out, "\\u{unit:04x}");
                        }
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
        }

        fn newline(&self, level: usize, out: &mut String) {
            if let Some(ind) = &self.indent {
                out.push('\n');
                for _ in 0..level {
                    out.push_str(ind);
                }
            }
        }

        fn key(&self, k: &Value) -> Result<String, Error> {
            Ok(match k.kind() {
                ValueKind::String => k.as_str().unwrap_or_default().to_string(),
                ValueKind::None => "null".into(),
                ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
                ValueKind::Number => repr(k),
                other => {
                    return Err(invalid(format!("tojson: keys must be str, int, float, bool or None, not {other}")))
                }
            })
        }

        fn value(&self, v: &Value, level: usize, out: &mut String) -> Result<(), Error> {
            match v.kind() {
                ValueKind::None => out.push_str("null"),
                ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
                ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
                ValueKind::Number => {
                    let f = f64::try_from(v.clone()).map_err(|_| invalid("tojson: number out of range"))?;
                    out.push_str(&if f.is_nan() {
                        "NaN".into()
                    } else if f.is_infinite() {
                        if f < 0.0 { "-Infinity" } else { "Infinity" }.into()
                    } else {
                        float(f)
                    });
                }
                ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
                ValueKind::Seq | ValueKind::Iterable => {
                    let items: Vec<Value> = v.try_iter()?.collect();
                    if items.is_empty() {
                        out.push_str("[]");
                        return Ok(());
                    }
                    out.push('[');
                    for (i, x) in items.iter().enumerate() {
                        if i > 0 {
                            out.push_str(&self.item_sep);
                        }
                        self.newline(level + 1, out);
                        self.value(x, level + 1, out)?;
                    }
                    self.newline(level, out);
                    out.push(']');
                }
                ValueKind::Map => {
                    let mut entries: Vec<(String, Value)> = Vec::new();
                    for k in v.try_iter()? {
                        let val = v.get_item(&k)?;
                        entries.push((self.key(&k)?, val));
                    }
                    if self.sort_keys {
                        entries.sort_by(|a, b| a.0.cmp(&b.0));
                    }
                    if entries.is_empty() {
                        out.push_str("{}");
                        return Ok(());
                    }
                    out.push('{');
                    for (i, (k, x)) in entries.iter().enumerate() {
                        if i > 0 {
                            out.push_str(&self.item_sep);
                        }
                        self.newline(level + 1, out);
                        self.string(k, out);
                        out.push_str(&self.key_sep);
                        self.value(x, level + 1, out)?;
                    }
                    self.newline(level, out);
                    out.push('}');
                }
                other => return Err(invalid(format!("tojson: object of type {other} is not JSON serializable"))),
            }
            Ok(())
        }
    }

    /// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
    /// sort_keys=False)`, every option settable by keyword.
    pub fn tojson(value: Value, kwargs: Kwargs) -> Result<String, Error> {
        let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
        let indent: Option<Value> = kwargs.get("indent")?;
        let separators: Option<Value> = kwargs.get("separators")?;
        let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
        kwargs.assert_all_used()?;
        let indent = match indent {
            None => None,
            Some(v) if v.is_none() => None,
            Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            Some(v) => match v.as_i64() {
                // The template comes with the model's files: an indent of millions would repeat for every level.
                Some(n) if n > MAX_TOJSON_INDENT => {
                    return Err(invalid(format!(
                        "tojson: indent {n} is past the largest supported ({MAX_TOJSON_INDENT})"
                    )))
                }
                Some(n) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
                None => return Err(invalid("tojson: indent must be an int, a string or None")),
            },
        };
        let (item_sep, key_sep) = match separators {
            Some(s) if !s.is_none() => {
                let parts: Vec<Value> = s.try_iter()?.collect();
                match parts.as_slice() {
                    [a, b] if a.kind() == ValueKind::String && b.kind() == ValueKind::String => {
                        (a.as_str().unwrap_or_default().to_string(), b.as_str().unwrap_or_default().to_string())
                    }
                    _ => return Err(invalid("tojson: separators must be a pair of strings")),
                }
            }
            // Python's defaults: ", " between items, or "," when indenting.
            _ => ((if indent.is_some() { "," } else { ", " }).to_string(), ": ".to_string()),
        };
        let json = Json {
            ensure_ascii: ensure_ascii.unwrap_or(false),
            indent,
            item_sep,
            key_sep,
            sort_keys: sort_keys.unwrap_or(false),
        };
        let mut out = String::new();
        json.value(&value, 0, &mut out)?;
        Ok(out)
    }

    /// transformers' `strftime_now(format)`: `datetime.now().strftime(format)` — the local time through C's
    /// `strftime`, with Python's own `%f` (microseconds) and, for a naive datetime, empty `%z` and `%Z`.
    pub fn strftime_now(format: String) -> Result<String, Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| invalid(format!("strftime_now: clock before 1970: {e}")))?;
        let mut c_format = String::with_capacity(format.len());
        let mut chars = format.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                c_format.push(c);
                continue;
            }
            match chars.next() {
                Some('f') => {
                    let _ = write!(c_format, "{:06}", now.subsec_micros());
                }
                Some('z' | 'Z') => {}
                Some(other) => {
                    c_format.push('%');
                    c_format.push(other);
                }
                None => c_format.push('%'),
            }
        }
        local_strftime(&c_format, now.as_secs())
    }

    #[cfg(unix)]
    fn local_strftime(format: &str, secs: u64) -> Result<String, Error> {
        if format.is_empty() {
            return Ok(String::new());
        }
        let fmt = std::ffi::CString::new(format).map_err(|_| invalid("strftime_now: format contains a NUL byte"))?;
        let t = libc::time_t::try_from(secs).map_err(|_| invalid("strftime_now: time out of range"))?;
        // SAFETY: `tm` is a plain C struct for which all-zero is a valid value; `localtime_r` only writes into it.
        // Aliasing and threads: a fresh local, no other reference to it exists.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid for the call and point at locals no one else references (aliasing);
        // `localtime_r` writes only `tm` and is the thread-safe variant (threads). It reads the process's `TZ`
        // without std's environment lock, so a host program calling `set_var`/`remove_var` on another thread at
        // the same moment could race with it; no crate of this workspace changes the environment.
        if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
            return Err(invalid("strftime_now: localtime_r failed"));
        }
        let mut size = 256usize;
        while size <= 1 << 16 {
            let mut buf = vec![0u8; size];
            // SAFETY: `buf` has `size` writable bytes, `fmt` is NUL-terminated and `tm` was filled above;
            // `strftime` writes at most `size` bytes and returns how many (without the NUL), or 0 if too small.
            // Aliasing: `buf`, `fmt` and `tm` are locals of this call, `buf` its only writable one. Threads: as for
            // `localtime_r` (locale and time zone are read, never changed by this crate).
            let n = unsafe { libc::strftime(buf.as_mut_ptr().cast::<libc::c_char>(), size, fmt.as_ptr(), &tm) };
            if n > 0 {
                buf.truncate(n);
                return String::from_utf8(buf).map_err(|_| invalid("strftime_now: output is not UTF-8"));
            }
            size *= 4;
        }
        // Only formats whose whole output is empty (e.g. `%p` in some locales) get here.
        Ok(String::new())
    }

    #[cfg(not(unix))]
    fn local_strftime(_format: &str, _secs: u64) -> Result<String, Error> {
        Err(invalid("strftime_now is only available on Unix"))
    }
}

#[cfg(test)]
mod tests {
    use super::py::float;

    #[test]
    fn floats_print_as_python_repr() {
        for (f, s) in [
            (2.0, "2.0"),
            (2.5, "2.5"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (-1.25e20, "-1.25e+20"),
            (123456.789, "123456.789"),
            (-0.0, "-0.0"),
        ] {
            assert_eq!(float(f), s, "{f}");
        }
    }
}
