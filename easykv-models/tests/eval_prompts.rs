//! The retrieval prompts of `easykv eval` with the real SmolLM2 tokenizer: the key sits at the
//! requested depth and the prompt has the requested length.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use easykv_models::eval::tasks::{answer_found, niah_prompt, passkey_prompt, NEEDLE_ANSWER};
use easykv_models::WeightDType;

#[test]
fn passkey_and_needle_sit_at_the_requested_depth_and_length() {
    let model = common::load_model("smollm2", WeightDType::F32);
    let tok = &model.tokenizer;
    let haystack = std::fs::read_to_string(common::shared("data/last_of_the_mohicans.txt")).unwrap();
    for target in [256usize, 1024] {
        for depth in [0.0, 0.3, 0.5, 1.0] {
            let p = passkey_prompt(tok, 48213, target, depth).unwrap();
            assert!(p
                .text
                .contains("The pass key is 48213. Remember it. 48213 is the pass key."));
            assert!(p.text.ends_with("What is the pass key? The pass key is"));
            assert_eq!(p.answer, "48213");
            // Within a few tokens of the target, never over by more than the joins add.
            assert!(
                p.tokens <= target + 4 && p.tokens + 40 >= target,
                "{} vs {target}",
                p.tokens
            );
            let at = (p.needle_offset - p.filler_start) as f64 / p.filler_bytes as f64;
            assert!((at - depth).abs() < 0.06, "depth {depth}: needle at {at:.2}");
            assert!(answer_found(" 48213.", &p.answer));

            let n = niah_prompt(tok, &haystack, target, depth).unwrap();
            assert_eq!(n.text.matches("cardamom").count(), 1);
            assert_eq!(n.answer, NEEDLE_ANSWER);
            assert!(
                n.tokens <= target + 4 && n.tokens + 60 >= target,
                "{} vs {target}",
                n.tokens
            );
            // Sentences of real text are coarser steps than the passkey filler's.
            let tolerance = if target < 512 { 0.2 } else { 0.08 };
            let at = (n.needle_offset - n.filler_start) as f64 / n.filler_bytes as f64;
            assert!((at - depth).abs() < tolerance, "depth {depth}: needle at {at:.2}");
        }
    }
    assert!(passkey_prompt(tok, 1, 10, 0.5).is_err(), "no room for filler");
    assert!(passkey_prompt(tok, 1, 500, 1.5).is_err(), "depth out of range");
}

/// Every RULER-style task, with the real tokenizer: the sample is seeded, fits its length
/// (within the margin left for a chat template) without falling far short, and its answers
/// are in the context — for the needle and variable tasks literally, for the word tasks as the
/// most frequent words.
#[test]
fn ruler_samples_are_seeded_fit_their_length_and_hold_their_answers() {
    use easykv_models::eval::{ruler_sample, RULER_TASKS};
    use rand::SeedableRng;
    let model = common::load_model("smollm2", WeightDType::F32);
    let tok = &model.tokenizer;
    let haystack = std::fs::read_to_string(common::shared("data/last_of_the_mohicans.txt")).unwrap();
    for &task in RULER_TASKS {
        for length in [512usize, 2048] {
            let make =
                || ruler_sample(task, tok, &haystack, length, &mut rand::rngs::StdRng::seed_from_u64(7)).unwrap();
            let s = make();
            assert_eq!(s, make(), "{task}: seeded");
            let tokens = tok.encode(&format!("{}{}", s.question, s.answer_prefix)).unwrap().len();
            // The margin left for a chat template and the fixed text: at most a quarter and 64.
            assert!(
                tokens <= length && tokens + length / 4 + 64 >= length,
                "{task} {length}: {tokens} tokens"
            );
            assert!(!s.answers.is_empty() && s.new_tokens > 0);
            let count = |a: &str| s.question.matches(a).count();
            match task {
                "cwe" | "fwe" => {
                    // Each answer occurs at least as often as any word that is not one.
                    let least = s.answers.iter().map(|a| count(&format!(" {a}"))).min().unwrap();
                    let words: std::collections::BTreeSet<&str> = s
                        .question
                        .split_whitespace()
                        .filter(|w| w.chars().all(|c| c.is_ascii_lowercase()))
                        .collect();
                    let others = words
                        .iter()
                        .filter(|w| w.len() >= 4 && !s.answers.iter().any(|a| a == *w))
                        .map(|w| count(&format!(" {w}\n")) + count(&format!(" {w} ")))
                        .max()
                        .unwrap_or(0);
                    assert!(
                        least > 0 && least >= others,
                        "{task}: answers {least}, others up to {others}"
                    );
                }
                _ => assert!(
                    s.answers.iter().all(|a| count(a) >= 1),
                    "{task}: answers in the context"
                ),
            }
        }
    }
}

/// RULER prompts are exactly their length in tokens, chat template included, so every sample
/// of a length has one shape (a GPU compiles kernels per shape). The padding is words of the
/// haystack in front of the task's text, which stays whole.
#[test]
fn ruler_prompts_have_exactly_their_length() {
    use easykv_models::eval::matrix::build_samples;
    use easykv_models::eval::{pad_to_length, EvalSettings, Sample, RULER_TASKS};
    let loaded = common::load_model("smollm2", WeightDType::F32);
    let settings = EvalSettings {
        tasks: RULER_TASKS.iter().map(|t| t.to_string()).collect(),
        model: "smollm2".into(),
        dtype: "f32".into(),
        policies: Vec::new(),
        budgets: vec!["0.5".into()],
        mode: "once".into(),
        stride: 8,
        samples: 2,
        lengths: vec![512, 2048],
        depths: vec![0.5],
        ppl_tokens: 64,
        new_tokens: 8,
        text_file: Some(common::shared("data/last_of_the_mohicans.txt").display().to_string()),
        seed: 5,
    };
    let samples = build_samples(&loaded, &settings, &mut |_| {}).unwrap();
    assert_eq!(samples.len(), RULER_TASKS.len() * 2 * 2);
    for (task, name, sample) in &samples {
        let Sample::Ruler { ids, .. } = sample else {
            panic!("{task}: not a RULER sample")
        };
        let length: usize = name.split(' ').nth(1).unwrap().parse().unwrap();
        assert_eq!(ids.len(), length, "{task} {name}");
    }

    let tok = &loaded.tokenizer;
    let text = "Whither wilt thou lead me? Speak, I'll go no further. ".repeat(200);
    let filler: Vec<&str> = text.split_whitespace().collect();
    let mut render = |pad: &str| tok.encode(&format!("{pad}What is the special magic number?"));
    let unpadded = render("").unwrap();
    for length in [unpadded.len() + 8, 300, 1000] {
        let ids = pad_to_length(&mut render, &filler, length).unwrap();
        assert_eq!(ids.len(), length);
        let text = tok.decode(&ids, false).unwrap();
        assert!(text.ends_with("\n\nWhat is the special magic number?"), "{text}");
    }
    // A prompt already at or over the length is left as it is, and so is one that a word and
    // the blank line after it would take past the length.
    assert_eq!(pad_to_length(&mut render, &filler, 3).unwrap(), unpadded);
    assert_eq!(
        pad_to_length(&mut render, &filler, unpadded.len() + 1).unwrap(),
        unpadded
    );
}
