//! RULER-style synthetic tasks (Hsieh et al., 2024), generated locally from a seed: needles
//! in a haystack of real text (single, multi-key, multi-value, multi-query), variable
//! tracking, and common- and frequent-word extraction. Each sample is a context of a target
//! length in tokens, a question, the prefix the answer starts with, and the strings a correct
//! answer contains; its score is the share of them the output holds (RULER's
//! `string_match_all`).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;

/// The tasks, in report order.
pub const RULER_TASKS: &[&str] = &[
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
];

/// One generated sample.
#[derive(Debug, Clone, PartialEq)]
pub struct RulerSample {
    /// The context and the question (the user's message).
    pub question: String,
    /// What the answer starts with (appended after the prompt, as RULER does).
    pub answer_prefix: String,
    /// Strings a correct answer contains.
    pub answers: Vec<String>,
    /// Tokens to generate.
    pub new_tokens: usize,
}

/// RULER's `string_match_all`: the share of `answers` found in `output`, case-insensitive.
pub fn ruler_score(output: &str, answers: &[String]) -> f64 {
    let out = output.to_lowercase();
    let found = answers.iter().filter(|a| out.contains(&a.to_lowercase())).count();
    found as f64 / answers.len().max(1) as f64
}

/// Keys of the needles (RULER draws English words).
const KEYS: &[&str] = &[
    "apple", "harbor", "lantern", "meadow", "falcon", "pepper", "violin", "glacier", "saddle", "thimble", "orchard",
    "compass", "marble", "walrus", "cinder", "quartz", "ribbon", "tundra", "pillow", "beacon", "canyon", "ember",
    "feather", "garnet", "hammock", "island", "jasmine", "kettle", "lagoon", "magnet", "nectar", "oyster", "pebble",
    "quiver", "raven", "sapphire", "trellis", "umbrella", "velvet", "willow", "yarrow", "zephyr", "anchor", "bramble",
    "candle", "dolphin", "easel", "fjord", "gazelle", "hazel",
];

/// A random 7-digit number (RULER's values).
fn number(rng: &mut StdRng) -> String {
    rng.random_range(1_000_000..10_000_000u32).to_string()
}

/// A pronounceable made-up word of `syllables` syllables.
fn made_up_word(rng: &mut StdRng, syllables: usize) -> String {
    const C: &[u8] = b"bdfgklmnprstvz";
    const V: &[u8] = b"aeiou";
    (0..syllables)
        .flat_map(|_| {
            [
                C[rng.random_range(0..C.len())] as char,
                V[rng.random_range(0..V.len())] as char,
            ]
        })
        .collect()
}

/// `n` distinct made-up words.
fn distinct_words(rng: &mut StdRng, n: usize, syllables: usize) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut words = Vec::with_capacity(n);
    // Bounded: 14·5 = 70 syllables give 70^3 ≈ 343,000 words of three syllables.
    for _ in 0..n.saturating_mul(50).max(100) {
        if words.len() == n {
            break;
        }
        let w = made_up_word(rng, syllables);
        if seen.insert(w.clone()) {
            words.push(w);
        }
    }
    words
}

/// Haystack sentences of about `tokens` tokens with `inserts` placed at random sentence
/// boundaries, in order.
fn haystack(tok: &TextTokenizer, text: &str, tokens: usize, inserts: &[String], rng: &mut StdRng) -> Result<String> {
    let units: Vec<&str> = text.split_inclusive(['\n', '.', '?', '!']).collect();
    if units.is_empty() {
        return Err(Error::InvalidInput("the haystack text is empty".into()));
    }
    let mut chosen = Vec::new();
    let mut used = 0usize;
    // Counted unit by unit; start from a random unit so samples differ.
    let start = rng.random_range(0..units.len());
    for u in units.iter().cycle().skip(start).take(units.len().saturating_mul(8)) {
        let n = tok.encode(u)?.len();
        if used + n > tokens {
            break;
        }
        used += n;
        chosen.push(*u);
    }
    let mut at: Vec<usize> = (0..inserts.len()).map(|_| rng.random_range(0..=chosen.len())).collect();
    at.sort_unstable();
    let mut out = String::new();
    let mut next = 0;
    for (i, u) in chosen.iter().enumerate() {
        while next < inserts.len() && at[next] == i {
            out.push_str(&format!(" {} ", inserts[next]));
            next += 1;
        }
        out.push_str(u);
    }
    for insert in &inserts[next..] {
        out.push_str(&format!(" {insert} "));
    }
    Ok(out)
}

/// `length` words of `text` from a random word on (wrapping around): what
/// [`pad_to_length`] pads a prompt with.
pub fn filler_words<'t>(text: &'t str, length: usize, rng: &mut StdRng) -> Vec<&'t str> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() {
        return Vec::new();
    }
    let start = rng.random_range(0..words.len());
    words.iter().cycle().skip(start).take(length).copied().collect()
}

/// A prompt's ids padded to exactly `length` tokens with words of `filler` before the task's
/// text: `render(pad)` gives the whole prompt's ids with `pad` (empty, or words and a blank
/// line) at the start of the user's message. Every sample of one length then has one shape,
/// so a GPU build compiles its kernels for the first sample only (each new sequence length
/// costs compilations there: about a minute a sample for Qwen2.5-1.5B on an H100). A prompt
/// already at or over `length`, or one no word brings exactly to it, comes back as the longest
/// that fits.
pub fn pad_to_length(
    render: &mut dyn FnMut(&str) -> Result<Vec<u32>>,
    filler: &[&str],
    length: usize,
) -> Result<Vec<u32>> {
    let pad = |words: &[&str]| match words.is_empty() {
        true => String::new(),
        false => format!("{}\n\n", words.join(" ")),
    };
    let mut best = render("")?;
    if best.len() >= length {
        return Ok(best);
    }
    // A word is at least one token, so `length - tokens` words always reach the length; the
    // most that fit, by bisection (tokens grow with words).
    let words = &filler[..filler.len().min(length - best.len())];
    let (mut lo, mut hi) = (0, words.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let ids = render(&pad(&words[..mid]))?;
        if ids.len() <= length {
            (lo, best) = (mid, ids);
        } else {
            hi = mid - 1;
        }
    }
    // Then single words from further on, each kept if it stays within the length: the next
    // word may take two tokens where one is missing.
    let mut chosen = words[..lo].to_vec();
    for &w in filler.iter().skip(lo + 1).take(256) {
        if best.len() == length {
            break;
        }
        chosen.push(w);
        let ids = render(&pad(&chosen))?;
        if ids.len() <= length {
            best = ids;
        } else {
            chosen.pop();
        }
    }
    Ok(best)
}

/// Tokens the fixed parts of a prompt take, so the haystack fills the rest of `length`.
fn room(tok: &TextTokenizer, length: usize, fixed: &[&str]) -> Result<usize> {
    let taken: usize = fixed
        .iter()
        .map(|f| tok.encode(f).map(|t| t.len()))
        .sum::<Result<usize>>()?;
    // A margin for a chat template's wrapping and tokens that merge across the joins.
    let margin = 48;
    length.checked_sub(taken + margin).filter(|&r| r > 0).ok_or_else(|| {
        Error::InvalidInput(format!(
            "a length of {length} tokens leaves no room for the task's text"
        ))
    })
}

/// One sample of `task` of about `length` tokens over the haystack `text`.
pub fn ruler_sample(
    task: &str,
    tok: &TextTokenizer,
    text: &str,
    length: usize,
    rng: &mut StdRng,
) -> Result<RulerSample> {
    match task {
        "niah_single" | "niah_multikey" | "niah_multivalue" | "niah_multiquery" => niah(task, tok, text, length, rng),
        "vt" => variable_tracking(tok, text, length, rng),
        "cwe" => common_words(tok, length, rng),
        "fwe" => frequent_words(tok, length, rng),
        _ => Err(Error::InvalidInput(format!(
            "unknown RULER task '{task}' (valid: {})",
            RULER_TASKS.join(", ")
        ))),
    }
}

fn niah(task: &str, tok: &TextTokenizer, text: &str, length: usize, rng: &mut StdRng) -> Result<RulerSample> {
    let mut keys: Vec<&str> = KEYS.to_vec();
    keys.shuffle(rng);
    let needle = |k: &str, v: &str| format!("One of the special magic numbers for {k} is: {v}.");
    // (needles, asked keys, answers)
    let (needles, asked, answers) = match task {
        "niah_single" => {
            let v = number(rng);
            (vec![needle(keys[0], &v)], vec![keys[0]], vec![v])
        }
        "niah_multikey" => {
            let values: Vec<String> = (0..4).map(|_| number(rng)).collect();
            let needles = (0..4).map(|i| needle(keys[i], &values[i])).collect();
            (needles, vec![keys[0]], vec![values[0].clone()])
        }
        "niah_multivalue" => {
            let values: Vec<String> = (0..4).map(|_| number(rng)).collect();
            let needles = values.iter().map(|v| needle(keys[0], v)).collect();
            (needles, vec![keys[0]], values)
        }
        _ => {
            let values: Vec<String> = (0..4).map(|_| number(rng)).collect();
            let needles = (0..4).map(|i| needle(keys[i], &values[i])).collect();
            (needles, keys[..4].to_vec(), values)
        }
    };
    let mut needles: Vec<String> = needles;
    needles.shuffle(rng);
    let keys_text = asked.join(", ");
    let (question, answer_prefix) = match task {
        "niah_single" | "niah_multikey" => (
            format!("What is the special magic number for {keys_text} mentioned in the provided text?"),
            format!(" The special magic number for {keys_text} mentioned in the provided text is"),
        ),
        _ => (
            format!("What are all the special magic numbers for {keys_text} mentioned in the provided text?"),
            format!(" The special magic numbers for {keys_text} mentioned in the provided text are"),
        ),
    };
    let intro = "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards.\n";
    let fixed: Vec<&str> = [intro, question.as_str(), answer_prefix.as_str()]
        .into_iter()
        .chain(needles.iter().map(String::as_str))
        .collect();
    let context = haystack(tok, text, room(tok, length, &fixed)?, &needles, rng)?;
    Ok(RulerSample {
        question: format!("{intro}{context}\n{question}"),
        answer_prefix,
        new_tokens: 12 * answers.len() + 8,
        answers,
    })
}

fn variable_tracking(tok: &TextTokenizer, text: &str, length: usize, rng: &mut StdRng) -> Result<RulerSample> {
    let value = rng.random_range(10_000..100_000u32).to_string();
    let names: Vec<String> = (0..5)
        .map(|_| (0..5).map(|_| (b'A' + rng.random_range(0..26u8)) as char).collect())
        .collect();
    let mut chain = vec![format!("VAR {} = {value}.", names[0])];
    chain.extend(names.windows(2).map(|w| format!("VAR {} = VAR {}.", w[1], w[0])));
    let intro = "Memorize and track the chain of variable assignments hidden in the following text.\n\n";
    let question = format!("Question: Find all variables that are assigned the value {value} in the text above.");
    let answer_prefix = format!(
        " Answer: According to the chain of variable assignments in the text above, 5 variables are assigned the value {value}, they are:"
    );
    let fixed: Vec<&str> = [intro, question.as_str(), answer_prefix.as_str()]
        .into_iter()
        .chain(chain.iter().map(String::as_str))
        .collect();
    let context = haystack(tok, text, room(tok, length, &fixed)?, &chain, rng)?;
    Ok(RulerSample {
        question: format!("{intro}{context}\n{question}"),
        answer_prefix,
        answers: names,
        new_tokens: 32,
    })
}

/// Builds a context of about `budget` tokens from `make(n)` (a context of `n` items and its
/// answers): starts from `n` = `budget / per_item` and rescales `n` by the tokens measured,
/// keeping the last context that fits.
fn fit_items(
    tok: &TextTokenizer,
    budget: usize,
    per_item: usize,
    rng: &mut StdRng,
    make: impl Fn(usize, &mut StdRng) -> (String, Vec<String>),
) -> Result<(String, Vec<String>)> {
    let mut n = (budget / per_item).max(1);
    let mut fitting = None;
    for _ in 0..12 {
        let (context, answers) = make(n, rng);
        let tokens = tok.encode(&context)?.len().max(1);
        if tokens <= budget {
            fitting = Some((context, answers));
            if tokens * 100 >= budget * 95 {
                break;
            }
        }
        let next = ((n * budget) as f64 / tokens as f64 * 0.98) as usize;
        if next == n || next == 0 {
            break;
        }
        n = next;
    }
    fitting.ok_or_else(|| Error::InvalidInput(format!("no word list fits in {budget} tokens")))
}

/// A numbered list in which 10 words appear often (30 times at 4k tokens) and the rest a few
/// times each (RULER's cwe), as many as fit.
fn common_words(tok: &TextTokenizer, length: usize, rng: &mut StdRng) -> Result<RulerSample> {
    let intro = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n";
    let question = "Question: What are the 10 most common words in the above list?";
    let answer_prefix = " Answer: The top 10 words that appear most often in the list are:";
    let budget = room(tok, length, &[intro, question, answer_prefix])?;
    let (context, answers) = fit_items(tok, budget, 5, rng, |entries, rng| {
        let common = 10usize;
        let repeats = (entries / 30).clamp(4, 30);
        let rare_times = 3.min(repeats - 1);
        let rare_count = entries.saturating_sub(common * repeats) / rare_times;
        let words = distinct_words(rng, common + rare_count, 3);
        let mut list: Vec<&str> = Vec::new();
        for (i, w) in words.iter().enumerate() {
            list.extend(std::iter::repeat_n(
                w.as_str(),
                if i < common { repeats } else { rare_times },
            ));
        }
        list.shuffle(rng);
        let context = list
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{}. {w}\n", i + 1))
            .collect();
        (context, words[..common.min(words.len())].to_vec())
    })?;
    Ok(RulerSample {
        question: format!("{intro}{context}{question}"),
        answer_prefix: answer_prefix.into(),
        answers,
        new_tokens: 64,
    })
}

/// Coded words drawn from a Zipf law (exponent 2): the three most frequent are the answer.
fn frequent_words(tok: &TextTokenizer, length: usize, rng: &mut StdRng) -> Result<RulerSample> {
    let intro = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words.\n";
    let question = "Question: Do not provide any explanation. What are the three most frequently appeared words in the above coded text?";
    let answer_prefix = " Answer: According to the coded text above, the three most frequently appeared words are:";
    let budget = room(tok, length, &[intro, question, answer_prefix])?;
    let vocab = distinct_words(rng, 200, 2);
    // Weights 1/k², drawn by walking the cumulative sum.
    let weights: Vec<f64> = (1..=vocab.len()).map(|k| 1.0 / (k * k) as f64).collect();
    let total: f64 = weights.iter().sum();
    let (context, answers) = fit_items(tok, budget, 3, rng, |n, rng| {
        let mut counts = vec![0usize; vocab.len()];
        let mut words = Vec::with_capacity(n);
        for _ in 0..n {
            let mut x = rng.random::<f64>() * total;
            let mut k = 0;
            while k + 1 < weights.len() && x >= weights[k] {
                x -= weights[k];
                k += 1;
            }
            counts[k] += 1;
            words.push(vocab[k].as_str());
        }
        let mut ranked: Vec<usize> = (0..vocab.len()).collect();
        ranked.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
        (words.join(" "), ranked[..3].iter().map(|&k| vocab[k].clone()).collect())
    })?;
    Ok(RulerSample {
        question: format!("{intro}{context}\n{question}"),
        answer_prefix: answer_prefix.into(),
        answers,
        new_tokens: 24,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_count_the_answers_found() {
        let answers = vec!["1234567".to_string(), "Apple".to_string()];
        assert_eq!(ruler_score("it is 1234567 and apple", &answers), 1.0);
        assert_eq!(ruler_score("it is 1234567", &answers), 0.5);
        assert_eq!(ruler_score("nothing", &answers), 0.0);
    }

    #[test]
    fn made_up_words_are_distinct_and_seeded() {
        let mut a = StdRng::seed_from_u64(3);
        let mut b = StdRng::seed_from_u64(3);
        let (x, y) = (distinct_words(&mut a, 300, 3), distinct_words(&mut b, 300, 3));
        assert_eq!(x, y);
        assert_eq!(x.iter().collect::<std::collections::BTreeSet<_>>().len(), 300);
    }

    use rand::SeedableRng;
}
