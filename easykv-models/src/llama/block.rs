//! A decoder layer: attention, then the SwiGLU feed-forward block, each with its norm and
//! residual connection.

use burn::nn::RmsNorm;
use burn::prelude::*;

use super::{Attention, Needed};
use crate::backend::BackendProfile;
use crate::linear::Linear;

impl<B: Backend> DecoderLayer<B> {
    /// The residual stream after this layer, given its attention output `attn`
    /// (`[batch, n_heads, s, head_dim]`), for the positions `needed` says: `[batch, s, hidden]`,
    /// `[batch, 1, hidden]` (last), or `x` untouched (nothing). With it, for a decode step
    /// where a kernel can, the stream times the `γ` of `next` (the norm that reads it next).
    pub(super) fn finish(
        &self,
        p: &BackendProfile,
        x: Tensor<B, 3>,
        attn: Tensor<B, 4>,
        needed: Needed,
        next: Option<&RmsNorm<B>>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
        let (s, s_attn) = (x.dims()[1], attn.dims()[2]);
        match needed {
            Needed::Nothing => (x, None),
            Needed::Last if s > 1 => {
                let attn = attn.slice_dim(2, s_attn - 1..s_attn);
                let x = self.finish_merged(p, x.slice_dim(1, s - 1..s), Attention::merge_heads(attn, true));
                (x, None)
            }
            _ => self.finish_scaling(p, x, Attention::merge_heads(attn, false), next),
        }
    }

    /// [`finish`](Self::finish) for an attention output with its heads merged
    /// (`[batch, s, n_heads·head_dim]`).
    pub(super) fn finish_merged(&self, p: &BackendProfile, x: Tensor<B, 3>, heads: Tensor<B, 3>) -> Tensor<B, 3> {
        self.finish_scaling(p, x, heads, None).0
    }

    /// [`finish_merged`](Self::finish_merged), and the stream times `next`'s `γ` where a
    /// kernel wrote it.
    fn finish_scaling(
        &self,
        p: &BackendProfile,
        x: Tensor<B, 3>,
        heads: Tensor<B, 3>,
        next: Option<&RmsNorm<B>>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
        let (x, scaled) = self.attn.o.forward_residual_scaling(p, heads, x, Some(&self.ffn_norm));
        let hidden = self
            .ffn
            .gate_up
            .forward_swiglu_normed(p, x.clone(), scaled, &self.ffn_norm);
        self.ffn.down.forward_residual_scaling(p, hidden, x, next)
    }
}

/// SwiGLU feed-forward block (run by [`DecoderLayer::finish`]).
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// Gate and up projections stacked into one product: `[2·intermediate, hidden]`.
    pub gate_up: Linear<B>,
    pub down: Linear<B>,
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub attn_norm: RmsNorm<B>,
    pub attn: Attention<B>,
    pub ffn_norm: RmsNorm<B>,
    pub ffn: FeedForward<B>,
}
