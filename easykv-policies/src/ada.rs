//! AdaKV (Feng et al., 2024; kvpress's `AdaKVPress`): per-head budgets within a layer, around
//! any score. At the prompt's one cut (`--mode once`) the heads of a layer keep `heads ×
//! capacity` slots between them, chosen by score across the heads, each head keeping at least
//! `alpha_safeguard` of an even share (its best-scoring slots): a head whose attention is
//! concentrated gives slots to one whose attention is spread. The cache then stores each head's
//! slots in buffers of their own, so the bytes follow the budgets (kvpress masks the pruned
//! keys and frees nothing). Outside that cut (strided prefill, decoding) the wrapped policy
//! evicts with even heads.

use burn::tensor::{backend::Backend, Bool, Int, Tensor};
use easykv_core::{EvictionContext, EvictionPolicy, ExpectedAttention, SlotStats};

use crate::compose::ScoredPolicy;

/// kvpress's default share of an even budget every head keeps.
pub const ALPHA_SAFEGUARD: f64 = 0.2;

/// A [`ScoredPolicy`] whose one cut gives every head a budget of its own.
pub struct AdaHeads<B: Backend> {
    name: String,
    inner: ScoredPolicy<B>,
    /// Each head keeps at least this share of `capacity`, its best-scoring slots.
    pub alpha_safeguard: f64,
}

/// `policy` with per-head budgets, named `ada-<its name>`.
pub fn ada<B: Backend>(policy: ScoredPolicy<B>) -> AdaHeads<B> {
    AdaHeads {
        name: format!("ada-{}", policy.name()),
        inner: policy,
        alpha_safeguard: ALPHA_SAFEGUARD,
    }
}

/// For one row's heads (`scores[h][slot]`, higher kept), the slots each keeps, ascending:
/// every head's `safe` best first, then the best of what remains across heads until the heads
/// hold `heads × capacity` (kvpress's rule; ties go to the lower head, then the lower slot).
pub fn per_head_choice(scores: &[Vec<f32>], capacity: usize, safe: usize) -> Vec<Vec<usize>> {
    let n = scores.first().map_or(0, Vec::len);
    let total = (scores.len() * capacity).min(scores.len() * n);
    let order = |a: &(usize, usize), b: &(usize, usize)| scores[b.0][b.1].total_cmp(&scores[a.0][a.1]).then(a.cmp(b));
    let mut kept = vec![vec![false; n]; scores.len()];
    let mut count = 0;
    for (h, row) in scores.iter().enumerate() {
        let mut slots: Vec<(usize, usize)> = (0..row.len()).map(|j| (h, j)).collect();
        slots.sort_by(order);
        for &(_, j) in slots.iter().take(safe.min(capacity)) {
            kept[h][j] = true;
            count += 1;
        }
    }
    let mut rest: Vec<(usize, usize)> = (0..scores.len())
        .flat_map(|h| (0..n).map(move |j| (h, j)))
        .filter(|&(h, j)| !kept[h][j])
        .collect();
    rest.sort_by(order);
    for &(h, j) in rest.iter().take(total.saturating_sub(count)) {
        kept[h][j] = true;
    }
    kept.iter().map(|row| (0..n).filter(|&j| row[j]).collect()).collect()
}

impl<B: Backend> EvictionPolicy<B> for AdaHeads<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn uses_attention(&self) -> bool {
        self.inner.uses_attention()
    }

    fn uses_key_norms(&self) -> bool {
        self.inner.uses_key_norms()
    }

    fn query_window(&self) -> usize {
        self.inner.query_window()
    }

    fn uses_value_norms(&self) -> bool {
        self.inner.uses_value_norms()
    }

    fn expected_attention(&self) -> Option<ExpectedAttention> {
        self.inner.expected_attention()
    }

    fn per_head_budgets(&self) -> bool {
        true
    }

    fn select_per_head(
        &mut self,
        stats: &SlotStats<B>,
        ctx: &EvictionContext<B>,
        capacity: usize,
    ) -> Option<Vec<Vec<usize>>> {
        let scores = self.inner.scores(stats, ctx);
        let [rows, h, n] = scores.dims();
        let values = scores.into_data().convert::<f32>().into_vec::<f32>().ok()?;
        // kvpress: int(capacity · alpha), at least 1 where anything is kept.
        let safe = match capacity {
            0 => 0,
            c => ((c as f64 * self.alpha_safeguard) as usize).max(1),
        };
        let per_row = h * n;
        Some(
            (0..rows)
                .flat_map(|r| {
                    let heads: Vec<Vec<f32>> = (0..h)
                        .map(|k| values[r * per_row + k * n..r * per_row + (k + 1) * n].to_vec())
                        .collect();
                    per_head_choice(&heads, capacity, safe)
                })
                .collect(),
        )
    }

    fn select(&mut self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3, Int> {
        self.inner.select(stats, ctx)
    }

    fn select_mask(&mut self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3, Bool> {
        self.inner.select_mask(stats, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head with one strong slot gives room to a head whose scores are flat, but keeps its
    /// safeguard; the heads keep `heads × capacity` together.
    #[test]
    fn budgets_move_to_the_head_that_needs_them() {
        let concentrated = vec![9.0, 0.1, 0.1, 0.1, 0.1, 0.1];
        let spread = vec![0.5, 0.6, 0.7, 0.8, 0.9, 0.4];
        let kept = per_head_choice(&[concentrated, spread], 3, 1);
        assert_eq!(kept[0], vec![0]);
        assert_eq!(kept[1], vec![0, 1, 2, 3, 4]);
        // A larger safeguard holds slots in the concentrated head (ties to the lower slot).
        let kept = per_head_choice(&[vec![9.0, 0.1, 0.1, 0.1], vec![0.5, 0.6, 0.7, 0.8]], 2, 2);
        assert_eq!(kept, vec![vec![0, 1], vec![2, 3]]);
        // Nothing to choose: everything kept.
        assert_eq!(per_head_choice(&[vec![1.0, 2.0]], 5, 1), vec![vec![0, 1]]);
    }
}
