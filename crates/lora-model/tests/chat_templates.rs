//! Chat templates render exactly as transformers' `apply_chat_template` renders them: every conversation of
//! `tests/fixtures/chat_templates/cases.json` (made by `scripts/fixtures/model/make_chat_template_fixtures.py` from
//! the real Llama-3.1-8B-Instruct, Qwen2.5-7B-Instruct, Mistral-Nemo-Instruct-2407 and Mixtral-8x7B-Instruct-v0.1
//! templates, plus a template exercising the Jinja features templates use) is rendered byte for byte, and a
//! conversation the template refuses is a typed error with the template's message. Then the system prompt through
//! [`PromptFormat`] and [`Tokenizer::encode_prompt`]: the ids equal `apply_chat_template(tokenize=True)`.
#[path = "../../../tests/support/mod.rs"]
mod common;

use lora_model::{ChatMessage, ChatTemplate, ModelError, PromptFormat, Tokenizer};
use serde_json::Value;

fn cases() -> Value {
    let path = common::fixtures().join("chat_templates/cases.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read cases.json")).expect("parse cases.json")
}

fn template(entry: &Value) -> ChatTemplate {
    let dir = common::fixtures().join("chat_templates");
    let source = std::fs::read_to_string(dir.join(entry["file"].as_str().unwrap())).expect("template file");
    let tok = |k: &str| entry[k].as_str().map(str::to_string);
    ChatTemplate::with_special_tokens(source, tok("bos_token"), tok("eos_token"))
}

fn messages(case: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(case["messages"].clone()).expect("messages")
}

#[test]
fn every_fixture_conversation_renders_as_transformers_does() {
    let doc = cases();
    let mut checked = 0;
    let mut rejected = 0;
    for (name, entry) in doc["templates"].as_object().unwrap() {
        let t = template(entry);
        for case in entry["cases"].as_array().unwrap() {
            let what = format!("{name} / {}", case["name"].as_str().unwrap());
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let got = t.render(&messages(case), gen);
            match (case.get("text"), case.get("error")) {
                (Some(text), None) => {
                    let got = got.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(got, text.as_str().unwrap(), "{what}");
                }
                (None, Some(error)) => {
                    match got {
                        Err(ModelError::TemplateRejected(m)) => assert_eq!(m, error.as_str().unwrap(), "{what}"),
                        other => panic!("{what}: expected the template to reject it ({error}), got {other:?}"),
                    }
                    rejected += 1;
                }
                _ => panic!("{what}: a case has either `text` or `error`"),
            }
            checked += 1;
        }
    }
    // 4 model templates × 11 conversations + 3 feature cases; Mistral rejects 2, Mixtral 8, features 1.
    assert_eq!((checked, rejected), (47, 11));
}

#[test]
fn a_template_that_does_not_compile_is_a_template_error() {
    let t = ChatTemplate::new("{% for m in messages %}{{ m.content }", "<s>", "</s>");
    assert!(matches!(t.render(&[ChatMessage::user("x")], true), Err(ModelError::Template(_))));
    // A failure other than raise_exception (here, an unknown filter) is a Template error too.
    let t = ChatTemplate::new("{{ messages | no_such_filter }}", "<s>", "</s>");
    assert!(matches!(t.render(&[ChatMessage::user("x")], true), Err(ModelError::Template(_))));
    // `tojson(indent=N)` as templates use it, and an indent from the model's files that would repeat megabytes
    // per nesting level refused.
    let t = ChatTemplate::new("{{ messages | tojson(indent=2) }}", "<s>", "</s>");
    let out = t.render(&[ChatMessage::user("x")], true).unwrap();
    assert!(out.contains("\n  {\n    \"role\": \"user\""), "{out}");
    let t = ChatTemplate::new("{{ messages | tojson(indent=100000000) }}", "<s>", "</s>");
    let err = t.render(&[ChatMessage::user("x")], true).unwrap_err().to_string();
    assert!(err.contains("indent 100000000"), "{err}");
}

#[test]
fn strftime_now_formats_the_local_date() {
    let t = ChatTemplate::new(
        "{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%Y%z%Z') }}|{{ strftime_now('%f') }}",
        "",
        "",
    );
    let out = t.render(&[], false).unwrap();
    let parts: Vec<&str> = out.split('|').collect();
    let re = regex::Regex::new(r"^\d{2} [A-Z][a-z]{2} \d{4}$").unwrap();
    assert!(re.is_match(parts[0]), "{out}");
    // `%z` and `%Z` are empty for Python's naive datetime.now(); `%f` is six digits of microseconds.
    assert_eq!(parts[1].len(), 4, "{out}");
    let year: i64 = parts[1].parse().unwrap();
    let utc_year = 1970
        + (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64
            / (365.2425 * 86400.0)) as i64;
    assert!((year - utc_year).abs() <= 1, "{year} vs {utc_year}");
    assert!(parts[2].len() == 6 && parts[2].chars().all(|c| c.is_ascii_digit()), "{out}");
}

#[test]
fn prompt_format_system_prompt_reaches_the_ids() {
    let dir = common::fixtures().join("chat_templates/tokenizer-llama31");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).expect("reference.json");
    let tok = Tokenizer::from_dir(&dir).expect("load tokenizer");
    let prompt = r["prompt"].as_str().unwrap();
    let system = r["system"].as_str().unwrap();
    let ids = |v: &Value| -> Vec<i64> { v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };

    let with_system = PromptFormat::chat_with_system(system);
    assert_eq!(
        tok.apply_chat_template(&with_system.messages(prompt)).unwrap(),
        r["system_user"]["text"].as_str().unwrap()
    );
    assert_eq!(tok.encode_prompt(prompt, &with_system).unwrap(), ids(&r["system_user"]["ids"]));
    assert_eq!(tok.encode_prompt(prompt, &PromptFormat::chat()).unwrap(), ids(&r["user"]["ids"]));
    assert_eq!(tok.encode_prompt(prompt, &PromptFormat::raw()).unwrap(), ids(&r["raw_ids"]));
    assert_ne!(r["system_user"]["ids"], r["user"]["ids"]);
    assert_eq!(PromptFormat::from_flags(true, Some(system.into())).unwrap(), with_system);
    assert!(matches!(PromptFormat::from_flags(false, Some(system.into())), Err(ModelError::InvalidArgument(_))));
}

#[test]
fn a_template_that_refuses_the_system_message_is_a_typed_error() {
    let doc = cases();
    let t = template(&doc["templates"]["mixtral-v0.1"]);
    let tok = tokenizer_with(t.clone());
    let err = tok.encode_prompt("Hi", &PromptFormat::chat_with_system("Be brief.")).unwrap_err();
    assert!(matches!(&err, ModelError::TemplateRejected(m) if m.contains("must alternate")), "{err}");
    // The same template without a system message is fine.
    assert_eq!(
        tok.render_chat(&PromptFormat::chat().messages("Hi"), true).unwrap(),
        t.render(&[ChatMessage::user("Hi")], true).unwrap()
    );
}

/// A byte-level tokenizer (no merges) carrying `template`.
fn tokenizer_with(template: ChatTemplate) -> Tokenizer {
    let file = common::fixtures().join("chat_templates/tokenizer-llama31/tokenizer.json");
    let inner = tokenizers::Tokenizer::from_file(file).expect("tokenizer.json");
    Tokenizer::new(inner, Some(template), None, vec![], None)
}

#[test]
fn generation_config_eos_ids_are_read_and_a_broken_file_is_an_error() {
    let src = common::fixtures().join("chat_templates/tokenizer-llama31");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let gen = tmp.path().join("generation_config.json");
    std::fs::write(&gen, r#"{"eos_token_id": [128001, 128008, 128009]}"#).unwrap();
    let tok = Tokenizer::from_dir(tmp.path()).expect("load tokenizer");
    for id in [128001, 128008, 128009] {
        assert!(tok.eos_token_ids().contains(&id), "{:?}", tok.eos_token_ids());
    }
    for (body, needle) in [
        (r#"{"eos_token_id": [128001, "x"]}"#, "eos_token_id"),
        (r#"{"eos_token_id": 1.5}"#, "eos_token_id"),
        (r#"{"eos_token_id": [128001"#, "generation_config.json"),
    ] {
        std::fs::write(&gen, body).unwrap();
        let Err(err) = Tokenizer::from_dir(tmp.path()) else {
            panic!("{body}: a broken generation_config.json loaded")
        };
        let msg = err.to_string();
        assert!(msg.contains(needle) && msg.contains("generation_config.json"), "{body}: {msg}");
    }
}
