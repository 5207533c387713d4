//! Llama-family decoder (Llama, SmolLM, Qwen2), generic over the burn backend.
//!
//! Attention is computed explicitly — softmax(QKᵀ/√d + mask) — so the probabilities can be
//! handed to the [`KvCache`], which is what eviction policies score.

use burn::module::Param;
use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::TensorData;

use easykv_core::KvCache;

use crate::config::{ModelConfig, RopeLayout};
use crate::error::{Error, Result};
use crate::linear::{EmbeddingTable, Linear, WeightDType};

/// Where weights come from: a GGUF file, a safetensors directory, or a random generator.
///
/// Names follow GGUF (`blk.3.attn_q.weight`); matrices are returned row-major as
/// `[out_features, in_features]`, vectors as `[len]`.
pub trait WeightSource {
    fn tensor(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)>;
    fn has(&self, name: &str) -> bool;
}

/// Rotary position embedding, rotate-half layout.
///
/// Angles are computed on the device for the positions a forward pass needs, not tabulated for
/// the whole context: the context length comes from the model file, and a table sized by it
/// could be forged into a huge allocation.
#[derive(Module, Debug)]
pub struct Rope<B: Backend> {
    /// `[head_dim / 2]`
    inv_freq: Tensor<B, 1>,
    max_positions: usize,
}

/// `cos` and `sin` for a run of positions, each `[1, 1, positions, head_dim]`.
#[derive(Debug, Clone)]
pub struct RopeAngles<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
}

impl<B: Backend> Rope<B> {
    pub fn new(head_dim: usize, theta: f32, max_positions: usize, device: &B::Device) -> Self {
        let half = head_dim / 2;
        // f32 throughout, as HF computes its frequencies, so positions round the same way.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        Self {
            inv_freq: Tensor::from_data(TensorData::new(inv_freq, [half]), device),
            max_positions,
        }
    }

    /// Angles for positions `start..start + len`.
    pub fn angles(&self, start: usize, len: usize) -> RopeAngles<B> {
        let device = self.inv_freq.device();
        let half = self.inv_freq.dims()[0];
        let positions = Tensor::<B, 1, Int>::arange(start as i64..(start + len) as i64, &device)
            .float()
            .reshape([len, 1]);
        let angles = positions * self.inv_freq.clone().reshape([1, half]);
        let both = |t: Tensor<B, 2>| Tensor::cat(vec![t.clone(), t], 1).reshape([1, 1, len, 2 * half]);
        RopeAngles {
            cos: both(angles.clone().cos()),
            sin: both(angles.sin()),
        }
    }

    /// Rotates `x` by `angles` (one position per row of `x`).
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, s, head_dim]` with `s` the angles' positions
    pub fn apply(x: Tensor<B, 4>, angles: &RopeAngles<B>) -> Tensor<B, 4> {
        let d = x.dims()[3];
        let x1 = x.clone().slice_dim(3, 0..d / 2);
        let x2 = x.clone().slice_dim(3, d / 2..d);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * angles.cos.clone() + rotated * angles.sin.clone()
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }
}

/// The rotations one forward pass needs: for the chunk's tokens, and (StreamingLLM) for every
/// slot of the cache.
struct ChunkAngles<B: Backend> {
    chunk: RopeAngles<B>,
    slots: Option<RopeAngles<B>>,
}

/// Grouped-query self-attention with an explicit softmax.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub o: Linear<B>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// - `x`: `[batch, s, hidden]`; `mask`: `[batch, kv_heads, group·s, slots]` additive (0 or −∞),
    ///   `None` when s = 1
    /// - returns `[batch, s, hidden]`
    fn forward<C: KvCache<B> + ?Sized>(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
        angles: &ChunkAngles<B>,
        mask: Option<&Tensor<B, 4>>,
        cache: &mut C,
    ) -> Result<Tensor<B, 3>> {
        let [b, s, _] = x.dims();
        let (hq, hkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let g = hq / hkv;
        let heads = |t: Tensor<B, 3>, h: usize| t.reshape([b, s, h, d]).swap_dims(1, 2);
        let q = Rope::apply(heads(self.q.forward(x.clone()), hq), &angles.chunk);
        let k = heads(self.k.forward(x.clone()), hkv);
        let v = heads(self.v.forward(x), hkv);
        let (keys, values) = match &angles.slots {
            // StreamingLLM: keys are stored unrotated and rotated by their slot index here.
            Some(slot_angles) => {
                let (keys, values) = cache.append(layer, k, v)?;
                (Rope::apply(keys, slot_angles), values)
            }
            None => cache.append(layer, Rope::apply(k, &angles.chunk), v)?,
        };
        let n = keys.dims()[2];
        // Query heads h·g..h·g+g share KV head h: fold them into the row axis instead of
        // repeating K and V.
        let q = q.reshape([b, hkv, g * s, d]);
        let scores = q.matmul(keys.swap_dims(2, 3)).mul_scalar((d as f64).powf(-0.5));
        // The mask has the scores' full shape: flex adds equal shapes far faster than it broadcasts.
        let scores = match mask {
            Some(m) => scores + m.clone(),
            None => scores,
        };
        let probs = softmax(scores, 3);
        if cache.wants_attention(layer) {
            let grouped = probs.clone().reshape([b, hkv, g, s, n]).mean_dim(2);
            cache.observe(layer, grouped.reshape([b, hkv, s, n]))?;
        }
        let out = probs.matmul(values);
        let out = out.reshape([b, hq, s, d]).swap_dims(1, 2).reshape([b, s, hq * d]);
        Ok(self.o.forward(out))
    }
}

/// SwiGLU feed-forward block.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    pub gate: Linear<B>,
    pub up: Linear<B>,
    pub down: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down
            .forward(silu(self.gate.forward(x.clone())) * self.up.forward(x))
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub attn_norm: RmsNorm<B>,
    pub attn: Attention<B>,
    pub ffn_norm: RmsNorm<B>,
    pub ffn: FeedForward<B>,
}

/// Which positions need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (scoring).
    All,
}

/// A decoder-only transformer of the Llama family.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub embed: EmbeddingTable<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// The output projection; `None` when tied to the embedding.
    pub lm_head: Option<EmbeddingTable<B>>,
    pub rope: Rope<B>,
}

impl<B: Backend> Llama<B> {
    /// Runs one chunk of tokens through the model, appending it to `cache`.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, s]`
    /// - returns `[batch, s, vocab]` for [`Logits::All`], `[batch, 1, vocab]` for [`Logits::Last`]
    pub fn forward<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut C,
        logits: Logits,
    ) -> Result<Tensor<B, 3>> {
        let x = self.forward_hidden(tokens, cache)?;
        let [b, s, _] = x.dims();
        let x = match logits {
            Logits::All => x,
            Logits::Last => x.slice([0..b, s - 1..s]),
        };
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(head.logits(self.norm.forward(x)))
    }

    /// Runs one chunk through every layer (appending it to `cache`) without the output
    /// projection: prefill chunks whose logits nobody reads skip the vocabulary-sized matmul.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, s]` → hidden states `[batch, s, hidden]` before the final norm
    pub fn forward_hidden<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut C,
    ) -> Result<Tensor<B, 3>> {
        let [b, s] = tokens.dims();
        let start = cache.next_position();
        if start + s > self.rope.max_positions() {
            return Err(Error::InvalidInput(format!(
                "position {} is past the model's context of {} tokens",
                start + s,
                self.rope.max_positions()
            )));
        }
        let device = tokens.device();
        let mut x = self.embed.embed(tokens);
        // Angles once per chunk, shared by every layer.
        let angles = ChunkAngles {
            chunk: self.rope.angles(start, s),
            slots: cache
                .compact_positions()
                .then(|| self.rope.angles(0, cache.slots(0) + s)),
        };
        // Every layer holds the same number of slots before this chunk, so one mask serves all.
        let mask = (s > 1).then(|| {
            let rows = self.layers.first().map_or(1, |l| l.attn.n_heads);
            let heads = self.layers.first().map_or(1, |l| l.attn.n_kv_heads);
            causal_mask::<B>(s, cache.slots(0) + s, &device)
                .reshape([1, 1, s, cache.slots(0) + s])
                .repeat(&[b, rows, 1, 1])
                .reshape([b, heads, rows / heads * s, cache.slots(0) + s])
        });
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer
                .attn
                .forward(l, layer.attn_norm.forward(x.clone()), &angles, mask.as_ref(), cache)?;
            x = x + h;
            x = x.clone() + layer.ffn.forward(layer.ffn_norm.forward(x));
        }
        cache.end_chunk()?;
        Ok(x)
    }

    /// Loads weights named as in GGUF from `source`, laid out for [`Llama::forward`], with
    /// matrices stored in `dtype`.
    pub fn load(cfg: &ModelConfig, source: &impl WeightSource, dtype: WeightDType, device: &B::Device) -> Result<Self> {
        cfg.validate()?;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let embed = EmbeddingTable::new(
            matrix(source, "token_embd.weight", cfg.vocab_size, h)?,
            cfg.vocab_size,
            h,
            dtype,
            device,
        );
        let lm_head = if source.has("output.weight") {
            let w = matrix(source, "output.weight", cfg.vocab_size, h)?;
            Some(EmbeddingTable::new(w, cfg.vocab_size, h, dtype, device))
        } else {
            None
        };
        let norm = rms_norm(source, "output_norm.weight", h, cfg.rms_eps, device)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let name = |t: &str| format!("blk.{i}.{t}");
            let proj = |t: &str, out: usize, inp: usize, rope_heads: Option<usize>| -> Result<Linear<B>> {
                let mut w = matrix(source, &name(&format!("{t}.weight")), out, inp)?;
                let mut bias = if cfg.qkv_bias && source.has(&name(&format!("{t}.bias"))) {
                    Some(vector(source, &name(&format!("{t}.bias")), out)?)
                } else {
                    None
                };
                if let (Some(heads), RopeLayout::Interleaved) = (rope_heads, cfg.rope_layout) {
                    // Reorder each head's rows from interleaved pairs to rotate-half pairs; the
                    // same permutation on Q and K leaves every QKᵀ score unchanged.
                    w = deinterleave_rows(&w, heads, d, inp);
                    bias = bias.map(|b| deinterleave_rows(&b, heads, d, 1));
                }
                Ok(Linear::new(w, out, inp, bias, dtype, device))
            };
            let attn = Attention {
                q: proj("attn_q", cfg.n_heads * d, h, Some(cfg.n_heads))?,
                k: proj("attn_k", cfg.n_kv_heads * d, h, Some(cfg.n_kv_heads))?,
                v: proj("attn_v", cfg.n_kv_heads * d, h, None)?,
                o: proj("attn_output", h, cfg.n_heads * d, None)?,
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: d,
            };
            let ffn = FeedForward {
                gate: proj("ffn_gate", cfg.intermediate_size, h, None)?,
                up: proj("ffn_up", cfg.intermediate_size, h, None)?,
                down: proj("ffn_down", h, cfg.intermediate_size, None)?,
            };
            layers.push(DecoderLayer {
                attn_norm: rms_norm(source, &name("attn_norm.weight"), h, cfg.rms_eps, device)?,
                attn,
                ffn_norm: rms_norm(source, &name("ffn_norm.weight"), h, cfg.rms_eps, device)?,
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
        })
    }
}

/// Additive causal mask for `s` new queries over `n` slots whose last `s` are the new tokens.
fn causal_mask<B: Backend>(s: usize, n: usize, device: &B::Device) -> Tensor<B, 2> {
    let mut m = vec![0f32; s * n];
    for t in 0..s {
        for v in &mut m[t * n + (n - s + t + 1)..(t + 1) * n] {
            *v = f32::NEG_INFINITY;
        }
    }
    Tensor::from_data(TensorData::new(m, [s, n]), device)
}

fn matrix(source: &impl WeightSource, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let (data, dims) = source.tensor(name)?;
    let flat: usize = dims.iter().product();
    if flat != rows * cols || data.len() != flat {
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
fn deinterleave_rows(w: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len());
    let half = head_dim / 2;
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let r = h * head_dim + 2 * i + j;
                out.extend_from_slice(&w[r * cols..(r + 1) * cols]);
            }
        }
    }
    out
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
mod tests;
