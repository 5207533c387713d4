//! easykv-policies: eviction policies as an importance score plus an eviction scope.
//!
//! A policy is a [`ScoreCalculator`] (lower score = evicted first) and a [`ScopeBuilder`]
//! (which slots may be evicted at all), composed by [`ScoredPolicy`]. The presets are one file
//! each; [`policy_by_name`] is the registry the CLI uses.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod compose;
mod h2o;
mod random;
mod recency;
mod roco;
mod scope;
mod tova;

pub use compose::{ScopeBuilder, ScoreCalculator, ScoredPolicy};
pub use h2o::{h2o, SumAttention};
pub use random::{random, SeededRandom};
pub use recency::{recency, Position};
pub use roco::{roco, MeanAttention, RobustStdScope};
pub use scope::{SinksAndRecent, SinksOnly};
pub use tova::{tova, LastQuery};

use burn::tensor::backend::Backend;
use easykv_core::EvictionPolicy;

/// Names accepted by [`policy_by_name`]; `full` means no eviction (a `FullCache`).
pub const POLICY_NAMES: &[&str] = &["roco", "h2o", "tova", "recency", "random", "full"];

/// Errors of this crate.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("unknown policy '{0}' (valid: roco, h2o, tova, recency, random, full)")]
    UnknownPolicy(String),
}

/// The evicting policy called `name`; `Ok(None)` for `full`.
pub fn policy_by_name<B: Backend>(name: &str) -> Result<Option<Box<dyn EvictionPolicy<B>>>, Error> {
    Ok(Some(match name {
        "roco" => Box::new(roco::<B>()),
        // EasyKV calls its per-head H2O "h2o_head".
        "h2o" | "h2o_head" => Box::new(h2o::<B>()),
        "tova" => Box::new(tova::<B>()),
        "recency" | "streamingllm" => Box::new(recency::<B>()),
        "random" => Box::new(random::<B>()),
        "full" => return Ok(None),
        other => return Err(Error::UnknownPolicy(other.to_string())),
    }))
}

#[cfg(test)]
mod tests;
