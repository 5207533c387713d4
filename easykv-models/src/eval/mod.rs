//! What `easykv eval` measures: scorers, prompt builders for the retrieval tasks, and the
//! public-domain text they run on.

pub mod corpus;
pub mod metrics;
pub mod tasks;

pub use corpus::{fetch_corpus, Corpus};
pub use metrics::{bleu, exact_match, first_divergence, rouge_l, RougeL};
pub use tasks::{niah_prompt, passkey_prompt, RetrievalPrompt, NEEDLE_ANSWER};
