//! What `easykv eval` measures: scorers, prompt builders for the retrieval tasks, the
//! public-domain text they run on, and the policies × budgets matrix that runs them.

pub mod corpus;
pub mod matrix;
pub mod metrics;
pub mod ruler;
pub mod shared;
pub mod tasks;

pub use corpus::{fetch_corpus, Corpus};
pub use matrix::{main_metrics, run_matrix, to_csv, Cell, EvalSettings, Results, Sample, TASKS};
pub use metrics::{bleu, exact_match, first_divergence, rouge_l, RougeL};
pub use ruler::{filler_words, pad_to_length, ruler_sample, ruler_score, RulerSample, RULER_TASKS};
pub use tasks::{answer_found, niah_prompt, passkey_prompt, RetrievalPrompt, NEEDLE_ANSWER};
