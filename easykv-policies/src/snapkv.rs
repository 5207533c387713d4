//! SnapKV (Li et al., 2024; kvpress's `SnapKVPress`): the attention an observation window of
//! the latest queries pays each slot, smoothed over neighbouring slots; the window's own slots
//! are kept. With `--mode once` the window is the prompt's last queries, as in kvpress; with
//! strided prefill it is each stride's last queries, and while decoding the latest query.

use burn::tensor::{backend::Backend, Tensor};
use easykv_core::{EvictionContext, SlotStats};

use crate::compose::{ScoreCalculator, ScoredPolicy, KEPT};
use crate::scope::SinksAndRecent;

/// Window attention, average-pooled over `kernel` neighbouring slots (zero-padded, as
/// `avg_pool1d` with `padding = kernel / 2` counts the padding); the last `window` slots are
/// scored above all others.
pub struct WindowAttention {
    pub window: usize,
    pub kernel: usize,
}

impl<B: Backend> ScoreCalculator<B> for WindowAttention {
    fn score(&self, stats: &SlotStats<B>, _ctx: &EvictionContext<B>) -> Tensor<B, 3> {
        let attention = stats.window.clone().unwrap_or_else(|| stats.last.clone());
        let [rows, h, n] = attention.dims();
        let window = self.window.min(n);
        let m = n - window;
        let device = attention.device();
        let kept = Tensor::<B, 3>::full([rows, h, window], KEPT, &device);
        if m == 0 {
            return kept;
        }
        let pad = self.kernel / 2;
        let zeros = || Tensor::<B, 3>::zeros([rows, h, pad], &device);
        let older = attention.slice_dim(2, 0..m);
        let padded = match pad {
            0 => older,
            _ => Tensor::cat(vec![zeros(), older, zeros()], 2),
        };
        let kernel = 2 * pad + 1;
        let pooled = (1..kernel).fold(padded.clone().slice_dim(2, 0..m), |acc, k| {
            acc + padded.clone().slice_dim(2, k..k + m)
        });
        Tensor::cat(vec![pooled.div_scalar(kernel as f32), kept], 2)
    }

    fn query_window(&self) -> usize {
        self.window
    }
}

/// The SnapKV preset: a window of 64 queries, pooled over 5 slots (kvpress's defaults).
pub fn snapkv<B: Backend>() -> ScoredPolicy<B> {
    ScoredPolicy::new(
        "snapkv",
        WindowAttention { window: 64, kernel: 5 },
        SinksAndRecent { recent_in_decode: true },
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Int, TensorData};
    use easykv_core::{Phase, Ranker, Ranking};

    use super::*;

    /// One row of `n` slots whose window statistic is `window` (the others zero).
    pub(crate) fn one_row(window: Vec<f32>, key_norm: Option<Vec<f32>>) -> SlotStats<Flex> {
        let n = window.len();
        let dev = Default::default();
        let t = |v: Vec<f32>| Tensor::<Flex, 3>::from_data(TensorData::new(v, [1, 1, n]), &dev);
        SlotStats {
            sum: t(vec![0.0; n]),
            sum_sq: t(vec![0.0; n]),
            count: t(vec![0.0; n]),
            last: t(vec![0.0; n]),
            positions: Tensor::<Flex, 1, Int>::arange(0..n as i64, &dev).reshape([1, 1, n]),
            key_norm: key_norm.map(t),
            window: Some(t(window)),
            value_norm: None,
            expected: None,
        }
    }

    pub(crate) fn context(slots: usize) -> EvictionContext<Flex> {
        EvictionContext {
            phase: Phase::Prefill,
            slots,
            n_evict: 1,
            sinks: 0,
            recent: 0,
            robust_k: 1,
            protected_positions: 0,
            seed: 0,
            step: 0,
            layers: 0..1,
            ranking: Ranker::plain(Ranking::Sort),
        }
    }

    /// Slots before the window are average-pooled over five neighbours with zero padding (as
    /// `avg_pool1d(kernel 5, padding 2)`); the window's slots score above every other.
    #[test]
    fn window_attention_pools_five_slots_and_keeps_the_window() {
        let stats = one_row(vec![5.0, 0.0, 0.0, 0.0, 0.0, 10.0, 1.0, 1.0], None);
        let score = WindowAttention { window: 2, kernel: 5 }.score(&stats, &context(8));
        let got = score.into_data().to_vec::<f32>().unwrap();
        assert_eq!(&got[..6], &[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        assert!(got[6..].iter().all(|&s| s == KEPT));
    }
}
