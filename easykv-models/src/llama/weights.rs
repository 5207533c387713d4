//! Building a Llama-family model's modules from named weights.

use burn::module::Param;
use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::TensorData;

use super::{Attention, DecoderLayer, FeedForward, Llama, Rope};
use crate::backend::BackendProfile;
use crate::config::{ModelConfig, RopeLayout};
use crate::error::{Error, Result};
use crate::linear::{EmbeddingTable, Linear, WeightDType};
use crate::weights::WeightSource;

impl<B: Backend> Llama<B> {
    /// Loads weights named as in GGUF from `source`, laid out for [`Llama::forward`], with
    /// matrices stored in `dtype`.
    pub fn load(cfg: &ModelConfig, source: &impl WeightSource, dtype: WeightDType, device: &B::Device) -> Result<Self> {
        Self::assemble(
            cfg,
            &FileParams {
                cfg,
                source,
                dtype,
                device,
            },
            device,
        )
    }

    /// Builds every module from `params`, by GGUF tensor name.
    pub(crate) fn assemble(cfg: &ModelConfig, params: &impl ParamSource<B>, device: &B::Device) -> Result<Self> {
        cfg.validate()?;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        // f32 weights in host memory are repacked for the host kernels as each module is built
        // (`into_panels`), so the row-major copy of one matrix at a time is held beside them.
        let embed = params.table("token_embd.weight", cfg.vocab_size, h)?.into_panels();
        let lm_head = if params.has("output.weight") {
            Some(params.table("output.weight", cfg.vocab_size, h)?.into_panels())
        } else {
            None
        };
        let norm = params.norm("output_norm.weight", h)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let name = |t: &str| format!("blk.{i}.{t}");
            let attn = Attention {
                qkv: Linear::stacked(vec![
                    params.linear(&name("attn_q"), cfg.n_heads * d, h, Some(cfg.n_heads))?,
                    params.linear(&name("attn_k"), cfg.n_kv_heads * d, h, Some(cfg.n_kv_heads))?,
                    params.linear(&name("attn_v"), cfg.n_kv_heads * d, h, None)?,
                ])
                .into_panels(),
                o: params
                    .linear(&name("attn_output"), h, cfg.n_heads * d, None)?
                    .into_panels(),
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: d,
                window: cfg.sliding_window.unwrap_or(0),
            };
            let ffn = FeedForward {
                gate_up: Linear::stacked(vec![
                    params.linear(&name("ffn_gate"), cfg.intermediate_size, h, None)?,
                    params.linear(&name("ffn_up"), cfg.intermediate_size, h, None)?,
                ])
                .into_panels(),
                down: params
                    .linear(&name("ffn_down"), h, cfg.intermediate_size, None)?
                    .into_panels(),
            };
            layers.push(DecoderLayer {
                attn_norm: params.norm(&name("attn_norm.weight"), h)?,
                attn,
                ffn_norm: params.norm(&name("ffn_norm.weight"), h)?,
                ffn,
            });
        }
        let rope = Rope::new(d, cfg.rope_theta, cfg.context_length, device);
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            rope,
            profile: BackendProfile::detect::<B>(device),
        })
    }
}

/// Makes a model's modules by GGUF tensor name: from a weight file, or at random.
pub(crate) trait ParamSource<B: Backend> {
    /// The projection `name` (`blk.N.attn_q`, without `.weight`), `[out, in]`; `rope_heads` is
    /// set for query and key projections, whose rows RoPE rotates in pairs.
    fn linear(&self, name: &str, out: usize, inp: usize, rope_heads: Option<usize>) -> Result<Linear<B>>;
    /// An embedding or output table `[rows, cols]`.
    fn table(&self, name: &str, rows: usize, cols: usize) -> Result<EmbeddingTable<B>>;
    fn norm(&self, name: &str, len: usize) -> Result<RmsNorm<B>>;
    fn has(&self, name: &str) -> bool;
}

/// Modules from a [`WeightSource`] (a GGUF file).
struct FileParams<'a, S: WeightSource, B: Backend> {
    cfg: &'a ModelConfig,
    source: &'a S,
    dtype: WeightDType,
    device: &'a B::Device,
}

impl<S: WeightSource, B: Backend> ParamSource<B> for FileParams<'_, S, B> {
    fn linear(&self, name: &str, out: usize, inp: usize, rope_heads: Option<usize>) -> Result<Linear<B>> {
        let (source, d) = (self.source, self.cfg.head_dim);
        let bias_name = format!("{name}.bias");
        let mut bias = if self.cfg.qkv_bias && source.has(&bias_name) {
            Some(vector(source, &bias_name, out)?)
        } else {
            None
        };
        let interleaved = rope_heads.filter(|_| self.cfg.rope_layout == RopeLayout::Interleaved);
        if let Some((m, activations)) = self.packed(&format!("{name}.weight"), out, inp) {
            let (m, bias) = match interleaved {
                Some(heads) => (
                    m.select_rows(&deinterleave_order(heads, d)),
                    bias.map(|b| deinterleave_rows(&b, heads, d, 1)),
                ),
                None => (m, bias),
            };
            return Ok(Linear::quantized(m, activations, bias, self.device));
        }
        let mut w = matrix(source, &format!("{name}.weight"), out, inp)?;
        if let Some(heads) = interleaved {
            // Reorder each head's rows from interleaved pairs to rotate-half pairs; the same
            // permutation on Q and K leaves every QKᵀ score unchanged.
            w = deinterleave_rows(&w, heads, d, inp);
            bias = bias.map(|b| deinterleave_rows(&b, heads, d, 1));
        }
        Ok(Linear::new(w, out, inp, bias, self.dtype, self.device))
    }

    fn table(&self, name: &str, rows: usize, cols: usize) -> Result<EmbeddingTable<B>> {
        if let Some((m, activations)) = self.packed(name, rows, cols) {
            return Ok(EmbeddingTable::quantized(m, activations, self.device));
        }
        let w = matrix(self.source, name, rows, cols)?;
        Ok(EmbeddingTable::new(w, rows, cols, self.dtype, self.device))
    }

    fn norm(&self, name: &str, len: usize) -> Result<RmsNorm<B>> {
        rms_norm(self.source, name, len, self.cfg.rms_eps, self.device)
    }

    fn has(&self, name: &str) -> bool {
        self.source.has(name)
    }
}

impl<S: WeightSource, B: Backend> FileParams<'_, S, B> {
    /// The matrix in its file's blocks, when `--dtype native` or `q8` asks for them and they are of a
    /// type the quantized products take (others are widened to f32).
    fn packed(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Option<(crate::quantized::QuantMatrix, crate::quantized::Activations)> {
        let activations = self.dtype.packed_activations()?;
        Some((self.source.quantized(name, rows, cols)?, activations))
    }
}

fn matrix(source: &impl WeightSource, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let (data, dims) = source.tensor(name)?;
    let flat: usize = dims.iter().product();
    // The shape itself, not only the element count: a transposed matrix has the same count.
    let leading_ones = |d: &[usize]| d.iter().skip_while(|&&x| x == 1).copied().collect::<Vec<_>>();
    if leading_ones(&dims) != leading_ones(&[rows, cols]) || data.len() != flat {
        return Err(Error::TensorShape {
            name: name.into(),
            found: dims,
            expected: vec![rows, cols],
        });
    }
    Ok(data)
}

fn vector(source: &impl WeightSource, name: &str, len: usize) -> Result<Vec<f32>> {
    matrix(source, name, 1, len)
}

/// Within each head, rows `0,2,4,…` then `1,3,5,…`: interleaved RoPE pairs → rotate-half pairs.
pub(crate) fn deinterleave_rows(w: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len());
    for r in deinterleave_order(heads, head_dim) {
        out.extend_from_slice(&w[r * cols..(r + 1) * cols]);
    }
    out
}

/// The row order of [`deinterleave_rows`]: output row `k` is input row `order[k]`.
fn deinterleave_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    (0..heads)
        .flat_map(|h| (0..2).flat_map(move |j| (0..half).map(move |i| h * head_dim + 2 * i + j)))
        .collect()
}

fn rms_norm<B: Backend>(
    source: &impl WeightSource,
    name: &str,
    len: usize,
    eps: f32,
    device: &B::Device,
) -> Result<RmsNorm<B>> {
    let gamma = vector(source, name, len)?;
    Ok(RmsNorm {
        gamma: Param::from_tensor(Tensor::from_data(TensorData::new(gamma, [len]), device)),
        epsilon: eps as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One tensor of six values with the dimensions given.
    struct OneTensor(Vec<usize>);

    impl WeightSource for OneTensor {
        fn tensor(&self, _: &str) -> Result<(Vec<f32>, Vec<usize>)> {
            Ok((vec![0.0; 6], self.0.clone()))
        }

        fn has(&self, _: &str) -> bool {
            true
        }
    }

    #[test]
    fn a_weight_is_checked_by_its_shape_not_only_its_size() {
        assert!(matrix(&OneTensor(vec![2, 3]), "w", 2, 3).is_ok());
        assert!(matrix(&OneTensor(vec![1, 2, 3]), "w", 2, 3).is_ok());
        let err = matrix(&OneTensor(vec![3, 2]), "w", 2, 3).unwrap_err().to_string();
        assert!(err.contains("[3, 2]") && err.contains("[2, 3]"), "{err}");
        assert!(vector(&OneTensor(vec![6]), "v", 6).is_ok());
        assert!(vector(&OneTensor(vec![2, 3]), "v", 6).is_err());
    }
}
