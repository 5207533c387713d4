//! Expected attention (Devoto et al., 2025; kvpress's `ExpectedAttentionPress`): the attention
//! queries yet to come are expected to pay each slot — from the mean and covariance of the
//! prompt's queries, rotated by RoPE averaged over the next 512 positions (the cache makes it:
//! [`easykv_core::expected`]) — times the norm of the slot's value. The first four positions
//! are kept and left out of the statistics, as kvpress's `n_sink`.

use burn::tensor::{backend::Backend, Tensor};
use easykv_core::{EvictionContext, ExpectedAttention, SlotStats};

use crate::compose::{ScoreCalculator, ScoredPolicy, KEPT};
use crate::scope::SinksAndRecent;

/// `expected · ‖v‖`, the leading `skip_first` positions kept.
pub struct ExpectedAttentionScore {
    pub future_positions: usize,
    pub skip_first: usize,
}

impl<B: Backend> ScoreCalculator<B> for ExpectedAttentionScore {
    fn score(&self, stats: &SlotStats<B>, _ctx: &EvictionContext<B>) -> Tensor<B, 3> {
        // Not made (a cache without the model's RoPE frequencies): every slot alike.
        let Some(expected) = stats.expected.clone() else {
            return stats.sum.zeros_like();
        };
        let score = match &stats.value_norm {
            Some(norm) => expected * norm.clone(),
            None => expected,
        };
        let leading = stats
            .positions
            .clone()
            .lower_elem(self.skip_first as i64)
            .bool_and(stats.positions.clone().greater_equal_elem(0));
        score.mask_fill(leading, KEPT)
    }

    fn uses_attention(&self) -> bool {
        false
    }

    fn uses_value_norms(&self) -> bool {
        true
    }

    fn expected_attention(&self) -> Option<ExpectedAttention> {
        Some(ExpectedAttention {
            future_positions: self.future_positions,
            skip_first: self.skip_first,
        })
    }
}

/// The expected-attention preset (kvpress's defaults: 512 future positions, 4 leading
/// positions kept, covariance and value norms used).
pub fn expected_attention<B: Backend>() -> ScoredPolicy<B> {
    ScoredPolicy::new(
        "expected-attention",
        ExpectedAttentionScore {
            future_positions: 512,
            skip_first: 4,
        },
        SinksAndRecent { recent_in_decode: true },
    )
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    use super::*;
    use crate::snapkv::tests::{context, one_row};

    /// The score is expected attention times value norm; the leading positions score above all.
    #[test]
    fn expected_attention_times_value_norm_leading_positions_kept() {
        let dev = Default::default();
        let t = |v: Vec<f32>| Tensor::<Flex, 3>::from_data(TensorData::new(v, [1, 1, 6]), &dev);
        let mut stats = one_row(vec![0.0; 6], None);
        stats.expected = Some(t(vec![0.0, 0.0, 0.1, 0.2, 0.3, 0.4]));
        stats.value_norm = Some(t(vec![1.0, 1.0, 2.0, 1.0, 0.5, 1.0]));
        let policy = ExpectedAttentionScore {
            future_positions: 512,
            skip_first: 2,
        };
        let score = ScoreCalculator::<Flex>::score(&policy, &stats, &context(6));
        let got = score.into_data().to_vec::<f32>().unwrap();
        assert_eq!(got[..2], [KEPT, KEPT]);
        let want = [0.2f32, 0.2, 0.15, 0.4];
        assert!(got[2..].iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{got:?}");
        // Without the statistic every slot is alike.
        stats.expected = None;
        let flat = ScoreCalculator::<Flex>::score(&policy, &stats, &context(6));
        assert_eq!(flat.into_data().to_vec::<f32>().unwrap(), vec![0.0; 6]);
    }
}
