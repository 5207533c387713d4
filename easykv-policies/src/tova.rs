//! TOVA (Oren et al., 2024): the attention of the latest query.

use burn::tensor::{backend::Backend, Tensor};
use easykv_core::{EvictionContext, Phase, SlotStats};

use crate::compose::{ScoreCalculator, ScoredPolicy};
use crate::scope::SinksAndRecent;

/// The last query row's attention; during prefill averaged over the KV heads so every head of
/// a layer evicts the same slots (as EasyKV does).
pub struct LastQuery {
    pub head_mean_in_prefill: bool,
}

impl<B: Backend> ScoreCalculator<B> for LastQuery {
    fn score(&self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3> {
        let [_, h, _] = stats.last.dims();
        if self.head_mean_in_prefill && ctx.phase == Phase::Prefill {
            stats.last.clone().mean_dim(1).repeat_dim(1, h)
        } else {
            stats.last.clone()
        }
    }
}

/// The TOVA preset.
pub fn tova<B: Backend>() -> ScoredPolicy<B> {
    ScoredPolicy::new(
        "tova",
        LastQuery {
            head_mean_in_prefill: true,
        },
        SinksAndRecent {
            recent_in_decode: false,
        },
    )
}
