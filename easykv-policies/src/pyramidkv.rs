//! PyramidKV (Cai et al., 2024; kvpress's `PyramidKVPress`): SnapKV's score with per-layer
//! budgets that shrink linearly with depth and average to the overall budget — lower layers,
//! whose attention is spread wide, keep more. The budgets apply to a prompt cut once
//! (`--mode once`); elsewhere every layer keeps the overall budget (SnapKV).

use burn::tensor::{backend::Backend, Tensor};
use easykv_core::{EvictionContext, SlotStats};

use crate::compose::{ScoreCalculator, ScoredPolicy};
use crate::scope::SinksAndRecent;
use crate::snapkv::WindowAttention;

/// [`WindowAttention`] with pyramid budgets of steepness `beta` (≥ 1).
pub struct PyramidWindowAttention {
    pub attention: WindowAttention,
    pub beta: f64,
}

/// Capacities of `n_layers` layers for a prompt of `prompt_len` tokens cut to `capacity`
/// slots per layer on average, by PyramidKV's rule as kvpress computes it: linear from `max`
/// at layer 0 down to `min` at the last, `min = capacity / beta` and `max = 2·capacity − min`,
/// with `max` clamped to the prompt beyond the `window` (and `min` raised to keep the mean);
/// uniform where that pyramid does not fit (`min` below the window). Rounded half to even, as
/// Python's `round`.
pub fn pyramid_capacities(n_layers: usize, prompt_len: usize, capacity: usize, window: usize, beta: f64) -> Vec<usize> {
    let (q, w, kept) = (prompt_len as f64, window as f64, capacity as f64);
    let uniform = vec![capacity; n_layers];
    if n_layers < 2 || beta < 1.0 {
        return uniform;
    }
    let mut min = kept / beta;
    let mut max = kept * 2.0 - min;
    if max >= q - w {
        max = q - w;
        min = kept * 2.0 - max;
    }
    if !(q >= max && max >= min && min >= w) {
        return uniform;
    }
    let steps = (max - min) / (n_layers - 1) as f64;
    (0..n_layers)
        .map(|l| (max - l as f64 * steps).round_ties_even() as usize)
        .collect()
}

impl<B: Backend> ScoreCalculator<B> for PyramidWindowAttention {
    fn score(&self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3> {
        self.attention.score(stats, ctx)
    }

    fn query_window(&self) -> usize {
        ScoreCalculator::<B>::query_window(&self.attention)
    }

    fn layer_capacities(&self, n_layers: usize, prompt_len: usize, capacity: usize) -> Option<Vec<usize>> {
        Some(pyramid_capacities(
            n_layers,
            prompt_len,
            capacity,
            self.attention.window,
            self.beta,
        ))
    }
}

/// The PyramidKV preset: SnapKV's defaults and `beta` = 20 (kvpress's).
pub fn pyramidkv<B: Backend>() -> ScoredPolicy<B> {
    ScoredPolicy::new(
        "pyramidkv",
        PyramidWindowAttention {
            attention: WindowAttention { window: 64, kernel: 5 },
            beta: 20.0,
        },
        SinksAndRecent { recent_in_decode: true },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kvpress's budgets for SmolLM2's 30 layers on the 1,274-token prompt at ratio 0.5: from
    /// 1,210 down by ~39.5 a layer, averaging the overall budget.
    #[test]
    fn budgets_follow_kvpress() {
        let caps = pyramid_capacities(30, 1274, 637, 64, 20.0);
        assert_eq!(&caps[..5], &[1210, 1170, 1131, 1091, 1052]);
        assert_eq!(caps[29], 64);
        let mean = caps.iter().sum::<usize>() as f64 / 30.0;
        assert!((mean - 637.0).abs() < 1.0, "{mean}");
        // Too small a prompt for a pyramid: uniform.
        assert_eq!(pyramid_capacities(4, 100, 20, 64, 20.0), vec![20; 4]);
    }
}
