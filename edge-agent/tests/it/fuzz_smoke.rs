//! The agent's fuzz target (`edge_agent::fuzz_targets::config`, run under
//! libFuzzer from `edge-agent/fuzz/`) on stable, in CI: the example
//! configuration with lines dropped, doubled, cut or given other values,
//! and random text; bounded in count and time.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

#[test]
fn any_configuration_text_is_refused_cleanly_or_checked() {
    let example = include_str!("../../edge-agent.example.toml");
    let lines: Vec<&str> = example.lines().collect();
    let values = [
        "\"\"",
        "0",
        "-1",
        "1e400",
        "\"127.0.0.1:0\"",
        "\"0.0.0.0:80\"",
        "\"[::1]:9\"",
        "true",
        "[]",
        "{}",
        "\"x\"",
        "18446744073709551616",
        "\"\\u0000\"",
        "nan",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6d65_6301);
    let started = Instant::now();
    let mut n = 0;
    while n < 5000 && started.elapsed() < Duration::from_secs(20) {
        let mut text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        for _ in 0..rng.random_range(1..5) {
            let at = rng.random_range(0..text.len());
            match rng.random_range(0..5) {
                0 => {
                    text.remove(at);
                }
                1 => {
                    let l = text[at].clone();
                    text.insert(at, l);
                }
                2 => {
                    let cut = rng.random_range(0..=text[at].len());
                    let cut = (0..=cut)
                        .rev()
                        .find(|&c| text[at].is_char_boundary(c))
                        .unwrap_or(0);
                    text[at].truncate(cut);
                }
                3 => {
                    if let Some((key, _)) = text[at].clone().split_once('=') {
                        let v = values[rng.random_range(0..values.len())];
                        text[at] = format!("{key}= {v}");
                    }
                }
                _ => {
                    let mut junk = vec![0u8; rng.random_range(0..40)];
                    rng.fill(&mut junk[..]);
                    text[at] = String::from_utf8_lossy(&junk).into_owned();
                }
            }
        }
        let input = text.join("\n");
        if std::panic::catch_unwind(|| edge_agent::fuzz_targets::config(input.as_bytes())).is_err()
        {
            panic!("configuration input {n} breaks it:\n{input}");
        }
        n += 1;
    }
    assert!(n >= 100, "only {n} inputs");
}
