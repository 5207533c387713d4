//! SnapKV (Li et al., 2024; kvpress's `SnapKVPress`): the attention an observation window of
//! the latest queries pays each slot, smoothed over neighbouring slots; the window's own slots
//! are kept. With `--mode once` the window is the prompt's last queries, as in kvpress; with
//! strided prefill it is each stride's last queries, and while decoding the latest query.

use burn::tensor::{backend::Backend, Tensor};
use easykv_core::{EvictionContext, SlotStats};

use crate::compose::{ScoreCalculator, ScoredPolicy};
use crate::scope::SinksAndRecent;

/// Above every attention score, below the scope's out-of-scope mark: the window's slots.
const KEPT: f32 = 1.0e30;

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
