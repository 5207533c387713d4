//! Prompts of the retrieval tasks: EasyKV's passkey test and a needle in a haystack of real
//! text, built to a target length in tokens with the key at a chosen depth.

use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;

/// EasyKV's passkey filler, repeated.
pub const PASSKEY_FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const PASSKEY_TASK: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there. ";
const PASSKEY_QUESTION: &str = "What is the pass key? The pass key is";

/// The needle and the word that shows it was found.
pub const NEEDLE: &str = "The secret ingredient in the duke's favourite pie is cardamom. ";
pub const NEEDLE_ANSWER: &str = "cardamom";
const NEEDLE_QUESTION: &str =
    "\n\nQuestion: What is the secret ingredient in the duke's favourite pie?\nAnswer: The secret ingredient is";

/// A retrieval prompt and where its key went.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalPrompt {
    pub text: String,
    /// What a correct answer contains.
    pub answer: String,
    /// The sentence holding the key.
    pub needle: String,
    /// Byte offset of the needle in `text`.
    pub needle_offset: usize,
    /// Bytes of `text` that are filler around the needle (the needle excluded): the needle
    /// sits at `depth` of them.
    pub filler_bytes: usize,
    /// Byte offset where the filler starts (after the task's preamble).
    pub filler_start: usize,
    /// Tokens in `text`.
    pub tokens: usize,
}

/// EasyKV's passkey prompt: filler around `The pass key is KEY. Remember it. KEY is the pass
/// key.` placed at `depth` (0 = start, 1 = end) of about `target_tokens` tokens.
pub fn passkey_prompt(tok: &TextTokenizer, key: u32, target_tokens: usize, depth: f64) -> Result<RetrievalPrompt> {
    let needle = format!("The pass key is {key}. Remember it. {key} is the pass key. ");
    let units = vec![PASSKEY_FILLER.to_string(); 1];
    build(
        tok,
        PASSKEY_TASK,
        &units,
        true,
        &needle,
        PASSKEY_QUESTION,
        &key.to_string(),
        target_tokens,
        depth,
    )
}

/// A needle in a haystack of `haystack` (real text, used line by line from the start) of
/// about `target_tokens` tokens, at `depth`.
pub fn niah_prompt(tok: &TextTokenizer, haystack: &str, target_tokens: usize, depth: f64) -> Result<RetrievalPrompt> {
    // Sentences and lines, so that the needle lands between them at any length.
    let lines: Vec<String> = haystack
        .split_inclusive(['\n', '.', '?', '!'])
        .map(str::to_string)
        .collect();
    build(
        tok,
        "",
        &lines,
        false,
        NEEDLE,
        NEEDLE_QUESTION,
        NEEDLE_ANSWER,
        target_tokens,
        depth,
    )
}

/// `prefix`, then filler units (cycled when `cycle`) up to the token target with `needle`
/// inserted between units at `depth`, then `question`.
#[allow(clippy::too_many_arguments)]
fn build(
    tok: &TextTokenizer,
    prefix: &str,
    units: &[String],
    cycle: bool,
    needle: &str,
    question: &str,
    answer: &str,
    target_tokens: usize,
    depth: f64,
) -> Result<RetrievalPrompt> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(Error::InvalidInput(format!("depth must be in [0, 1], got {depth}")));
    }
    let fixed = tok.encode(&format!("{prefix}{needle}{question}"))?.len();
    if target_tokens <= fixed {
        return Err(Error::InvalidInput(format!(
            "a length of {target_tokens} tokens leaves no room for text around the key ({fixed} tokens)"
        )));
    }
    // Units whose tokens fill the rest (counted one by one: token counts of pieces add up to
    // within a token or two of the whole).
    let mut chosen = Vec::new();
    let mut budget = target_tokens - fixed;
    let take = if cycle { usize::MAX } else { units.len() };
    let mut partial = String::new();
    for u in units.iter().cycle().take(take) {
        let n = tok.encode(u)?.len();
        if n > budget {
            // Fill the rest with the words of this unit that fit.
            for w in u.split_inclusive(' ') {
                let longer = format!("{partial}{w}");
                if tok.encode(&longer)?.len() > budget {
                    break;
                }
                partial = longer;
            }
            break;
        }
        budget -= n;
        chosen.push(u.as_str());
    }
    if !partial.is_empty() {
        chosen.push(partial.as_str());
    }
    if chosen.is_empty() {
        return Err(Error::InvalidInput(format!(
            "no text fits in {target_tokens} tokens around the key"
        )));
    }
    // The unit boundary nearest to `depth` of the filler's bytes.
    let total: usize = chosen.iter().map(|u| u.len()).sum();
    let goal = depth * total as f64;
    let mut at = 0;
    let mut bytes = 0usize;
    for (i, u) in chosen.iter().enumerate() {
        if ((bytes + u.len()) as f64 - goal).abs() < (bytes as f64 - goal).abs() {
            at = i + 1;
        }
        bytes += u.len();
    }
    let mut text = String::from(prefix);
    text.extend(chosen[..at].iter().copied());
    let needle_offset = text.len();
    text.push_str(needle);
    text.extend(chosen[at..].iter().copied());
    let filler_bytes = text.len() - prefix.len() - needle.len();
    text.push_str(question);
    let tokens = tok.encode(&text)?.len();
    Ok(RetrievalPrompt {
        text,
        answer: answer.into(),
        needle: needle.trim().into(),
        needle_offset,
        filler_bytes,
        filler_start: prefix.len(),
        tokens,
    })
}

/// Whether a generated answer holds the expected one: for digits, the first run of digits
/// must equal it; otherwise it must appear as a word (case-insensitive).
pub fn answer_found(output: &str, answer: &str) -> bool {
    if answer.chars().all(|c| c.is_ascii_digit()) {
        let digits: String = output
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(|c| c.is_ascii_digit())
            .collect();
        return digits == answer;
    }
    crate::eval::metrics::words(output).contains(&answer.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_recognized() {
        assert!(answer_found(" 48213. The pass key", "48213"));
        assert!(!answer_found(" 4821 3", "48213"));
        assert!(!answer_found("no digits", "48213"));
        assert!(answer_found("The secret ingredient is Cardamom!", "cardamom"));
        assert!(!answer_found("cinnamon", "cardamom"));
    }
}
