//! easykv-policies: eviction policies as an importance score plus an eviction scope.
//!
//! A policy is a [`ScoreCalculator`] (lower score = evicted first) and a [`ScopeBuilder`]
//! (which slots may be evicted at all), composed by [`ScoredPolicy`]. The presets are one file
//! each; [`PolicyTable`] names them (one row per policy) for the CLI, the evaluation and
//! library users, who can add their own rows.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod ada;
mod compose;
mod expected_attention;
mod h2o;
mod knorm;
mod pyramidkv;
mod random;
mod recency;
mod roco;
mod scope;
mod snapkv;
mod table;
mod tova;

pub use ada::{ada, per_head_choice, AdaHeads, ALPHA_SAFEGUARD};
pub use compose::{ScopeBuilder, ScoreCalculator, ScoredPolicy};
pub use expected_attention::{expected_attention, ExpectedAttentionScore};
pub use h2o::{h2o, SumAttention};
pub use knorm::{knorm, KeyNorm};
pub use pyramidkv::{pyramid_capacities, pyramidkv, PyramidWindowAttention};
pub use random::{random, SeededRandom};
pub use recency::{recency, Position};
pub use roco::{roco, MeanAttention, RobustStdScope};
pub use scope::{SinksAndRecent, SinksOnly};
pub use snapkv::{snapkv, WindowAttention};
pub use table::{builtin_policies, canonical_policy_name, PolicyConstructor, PolicyEntry, PolicyInfo, PolicyTable};
pub use tova::{tova, LastQuery};

/// Errors of this crate.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("unknown policy '{name}' (valid: {valid})")]
    UnknownPolicy { name: String, valid: String },
}

#[cfg(test)]
mod tests;
