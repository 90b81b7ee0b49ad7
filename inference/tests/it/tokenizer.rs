//! The tokenizer and chat template of the real model (SmolLM2-135M-Instruct).

use mec_inference::gguf::GgufFile;
use mec_inference::tokenizer::{ChatMessage, TextStream, Tokenizer};

fn tokenizer() -> Tokenizer {
    let path = mec_inference::default_model_path();
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup` (the README's test command does)",
        path.display()
    );
    Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
}

#[test]
fn round_trips_text_of_every_kind() {
    let t = tokenizer();
    for text in [
        "Hello, world! The quick brown fox.",
        "移动边缘计算让推理更接近用户。",
        "emoji 👩‍🚀🚀 and ❤️‍🔥",
        "  leading spaces, trailing  ",
        "tabs\tand\nnewlines\n\n\r\n",
        "numbers 1234567890 and 3.14159",
        "",
    ] {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text, "ids {ids:?}");
    }
}

#[test]
fn digits_are_split_one_by_one_and_there_is_no_prefix_space() {
    let t = tokenizer();
    let ids = t.encode("2026").unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    let hello = t.encode("Hello").unwrap();
    assert_eq!(hello.len(), 1);
    assert_eq!(t.decode(&hello, false).unwrap(), "Hello");
}

#[test]
fn special_tokens_in_text_map_to_their_ids() {
    let t = tokenizer();
    let ids = t.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(*ids.last().unwrap(), 2);
    assert!(t.stop_ids().contains(&2), "<|im_end|> ends a turn");
    assert_eq!(t.decode(&ids, true).unwrap(), "user\nhi");
}

#[test]
fn chat_template_renders_chatml_with_the_default_system_prompt() {
    let t = tokenizer();
    let text = t
        .apply_chat_template(&[ChatMessage::user("What is MEC?")])
        .unwrap();
    assert!(text.starts_with("<|im_start|>system\n"), "{text}");
    assert!(
        text.contains("<|im_start|>user\nWhat is MEC?<|im_end|>\n"),
        "{text}"
    );
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
}

#[test]
fn text_stream_never_splits_a_character() {
    let t = tokenizer();
    let text = "ok 👩‍🚀 移动";
    let ids = t.encode(text).unwrap();
    let mut stream = TextStream::default();
    let mut out = String::new();
    for id in ids {
        let delta = stream.push(&t, id);
        assert!(!delta.contains('\u{FFFD}'));
        out.push_str(&delta);
    }
    out.push_str(&stream.finish(&t));
    assert_eq!(out, text);
}
