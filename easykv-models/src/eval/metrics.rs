//! Text similarity of a constrained generation to a reference: ROUGE-L, BLEU, exact match.
//!
//! Both work on lower-cased word tokens (runs of letters and digits), as the usual reference
//! implementations do after their default normalization.

/// Lower-cased runs of alphanumeric characters.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// ROUGE-L: precision, recall and F1 of the longest common subsequence of words.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RougeL {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// ROUGE-L of `candidate` against `reference`. Two empty texts agree perfectly; an empty text
/// against a non-empty one scores 0.
pub fn rouge_l(candidate: &str, reference: &str) -> RougeL {
    let (c, r) = (words(candidate), words(reference));
    if c.is_empty() || r.is_empty() {
        let same = c.is_empty() && r.is_empty();
        let v = if same { 1.0 } else { 0.0 };
        return RougeL {
            precision: v,
            recall: v,
            f1: v,
        };
    }
    let lcs = lcs_len(&c, &r) as f64;
    let (precision, recall) = (lcs / c.len() as f64, lcs / r.len() as f64);
    let f1 = if lcs == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    RougeL { precision, recall, f1 }
}

fn lcs_len(a: &[String], b: &[String]) -> usize {
    // One row of the dynamic programme at a time.
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Sentence BLEU-4 (Papineni et al., 2002) with add-one smoothing of the 2- to 4-gram
/// precisions (Lin & Och, 2004) and the brevity penalty; in [0, 1].
pub fn bleu(candidate: &str, reference: &str) -> f64 {
    let (c, r) = (words(candidate), words(reference));
    if c.is_empty() || r.is_empty() {
        return if c.is_empty() && r.is_empty() { 1.0 } else { 0.0 };
    }
    let mut log_sum = 0.0;
    for n in 1..=4usize {
        let cand = ngrams(&c, n);
        let refs = ngrams(&r, n);
        let total: usize = cand.values().sum();
        let matched: usize = cand
            .iter()
            .map(|(g, &k)| k.min(refs.get(g).copied().unwrap_or(0)))
            .sum();
        let (num, den) = if n == 1 {
            (matched as f64, total as f64)
        } else {
            (matched as f64 + 1.0, total as f64 + 1.0)
        };
        if num == 0.0 || den == 0.0 {
            return 0.0;
        }
        log_sum += (num / den).ln() / 4.0;
    }
    let bp = if c.len() >= r.len() {
        1.0
    } else {
        (1.0 - r.len() as f64 / c.len() as f64).exp()
    };
    bp * log_sum.exp()
}

fn ngrams(w: &[String], n: usize) -> std::collections::HashMap<&[String], usize> {
    let mut m = std::collections::HashMap::new();
    for g in w.windows(n) {
        *m.entry(g).or_insert(0) += 1;
    }
    m
}

/// Whether the two texts are equal after trimming surrounding whitespace.
pub fn exact_match(candidate: &str, reference: &str) -> bool {
    candidate.trim() == reference.trim()
}

/// The first step at which two generations differ (`None` when they are identical).
pub fn first_divergence(a: &[u32], b: &[u32]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Some(i),
        None if a.len() == b.len() => None,
        None => Some(a.len().min(b.len())),
    }
}

/// The mean of `values`, the half-width of its 95 % confidence interval (1.96 standard
/// errors, the sample standard deviation; 0 for one value) and their count; `None` if empty.
pub fn mean_ci95(values: &[f64]) -> Option<(f64, f64, usize)> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let half = match n {
        1 => 0.0,
        _ => {
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            1.96 * (var / n as f64).sqrt()
        }
    };
    Some((mean, half, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rouge_l_by_hand() {
        // LCS of "the cat sat on the mat" / "the cat lay on a mat" is "the cat on mat" (4).
        let r = rouge_l("The cat sat on the mat.", "the cat lay on a mat");
        assert!((r.precision - 4.0 / 6.0).abs() < 1e-12);
        assert!((r.recall - 4.0 / 6.0).abs() < 1e-12);
        assert!((r.f1 - 4.0 / 6.0).abs() < 1e-12);
        let r = rouge_l("police killed the gunman", "the gunman was shot dead by police");
        // LCS "the gunman" (2): P = 2/4, R = 2/7.
        assert!((r.precision - 0.5).abs() < 1e-12 && (r.recall - 2.0 / 7.0).abs() < 1e-12);
        assert_eq!(rouge_l("", "").f1, 1.0);
        assert_eq!(rouge_l("a", "").f1, 0.0);
        assert_eq!(rouge_l("x y", "z").f1, 0.0);
    }

    #[test]
    fn bleu_by_hand() {
        assert!((bleu("the quick brown fox jumps", "the quick brown fox jumps") - 1.0).abs() < 1e-12);
        assert_eq!(bleu("completely different words here", "nothing in common at all"), 0.0);
        // 4 words, 3 unigrams match; 2-grams 1 of 3, 3-grams 0 of 2, 4-grams 0 of 1 (smoothed);
        // same length: no brevity penalty.
        let got = bleu("the cat sat down", "the cat lay down");
        let want = ((3.0f64 / 4.0).ln() + (2.0f64 / 4.0).ln() + (1.0f64 / 3.0).ln() + (1.0f64 / 2.0).ln()) / 4.0;
        assert!((got - want.exp()).abs() < 1e-12, "{got}");
        // A short candidate pays the brevity penalty.
        assert!(bleu("the cat", "the cat sat on the mat") < bleu("the cat sat on the mat", "the cat sat on the mat"));
    }

    #[test]
    fn exact_match_and_divergence() {
        assert!(exact_match(" 12345\n", "12345"));
        assert!(!exact_match("12345", "12346"));
        assert_eq!(first_divergence(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_divergence(&[1, 2, 3], &[1, 5, 3]), Some(1));
        assert_eq!(first_divergence(&[1, 2], &[1, 2, 3]), Some(2));
    }
}
