//! Llama-family decoder (Llama, SmolLM, Qwen2), generic over the burn backend.
//!
//! Attention is computed explicitly — softmax(QKᵀ/√d + mask) — so the probabilities can be
//! handed to the [`KvCache`], which is what eviction policies score.

use burn::module::Param;
use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::{DType, TensorCreationOptions, TensorData};

use easykv_core::{CachedKv, KvCache};

use crate::config::{ModelConfig, RopeLayout};
use crate::error::{Error, Result};
use crate::gpu_kernels::{self, HeadShape};
use crate::host_kernels::{join_positions_first, HeadsFirstChunks};
use crate::linear::{normalize, EmbeddingTable, Linear, WeightDType};

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
/// Angles are computed for the positions a forward pass needs, not tabulated for the whole
/// context: the context length comes from the model file, and a table sized by it could be
/// forged into a huge allocation.
#[derive(Module, Debug)]
pub struct Rope<B: Backend> {
    /// `[head_dim / 2]`
    inv_freq: Tensor<B, 1>,
    max_positions: usize,
    head_dim: usize,
    theta: f32,
}

/// `1 / θ^(2i/d)` for `i < d/2`, in f32 as HF computes them.
fn inverse_frequencies(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
        .collect()
}

/// `cos` and `sin` for a run of positions, with the sign of rotate-half folded into `sin`'s
/// first half and an optional scale folded into both: per position (`rows`, what the fused GPU
/// kernel reads) and, made on first use, expanded to the full shape of the tensors they rotate
/// (flex multiplies equal shapes far faster than it broadcasts). Made lazily because on GPUs
/// every operation costs host time and the fused kernel needs none of them.
#[derive(Debug, Clone)]
pub struct RopeAngles<B: Backend> {
    /// `cos` and `sin` per position, `[len, head_dim]`.
    rows: (Tensor<B, 2>, Tensor<B, 2>),
    batch: usize,
    heads: usize,
    axes: RopeLayoutAxes,
    /// `cos` and `sin` in the rotated tensors' shape.
    expanded: std::sync::OnceLock<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// For single-token steps in half precision: the whole rotation as one `[1, d, d]` matrix,
    /// so a decode step rotates with one product instead of six element-wise operations.
    rotation: std::sync::OnceLock<Option<Tensor<B, 3>>>,
}

impl<B: Backend> RopeAngles<B> {
    fn expanded(&self) -> &(Tensor<B, 4>, Tensor<B, 4>) {
        self.expanded.get_or_init(|| {
            let [len, d] = self.rows.0.dims();
            let (b, h) = (self.batch, self.heads);
            let expand = |t: &Tensor<B, 2>| match self.axes {
                RopeLayoutAxes::PositionsFirst => t.clone().reshape([1, len, 1, d]).repeat(&[b, 1, h, 1]),
                RopeLayoutAxes::HeadsFirst => t.clone().reshape([1, 1, len, d]).repeat(&[b, h, 1, 1]),
            };
            (expand(&self.rows.0), expand(&self.rows.1))
        })
    }

    fn rotation(&self) -> Option<&Tensor<B, 3>> {
        self.rotation
            .get_or_init(|| {
                let (cos, sin) = &self.rows;
                let single = cos.dims()[0] == 1 && cos.dtype() != DType::F32;
                (single && self.axes == RopeLayoutAxes::PositionsFirst)
                    .then(|| rotation_matrix(cos.clone(), sin.clone()))
            })
            .as_ref()
    }
}

/// Where the position axis sits in the tensors a [`RopeAngles`] rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayoutAxes {
    /// `[batch, positions, heads, head_dim]`: projections as they come out of the matmul.
    PositionsFirst,
    /// `[batch, heads, positions, head_dim]`: the cache's layout (StreamingLLM re-rotation).
    HeadsFirst,
}

impl<B: Backend> Rope<B> {
    pub fn new(head_dim: usize, theta: f32, max_positions: usize, device: &B::Device) -> Self {
        let half = head_dim / 2;
        Self {
            inv_freq: Tensor::from_data(TensorData::new(inverse_frequencies(head_dim, theta), [half]), device),
            max_positions,
            head_dim,
            theta,
        }
    }

    /// Angles for positions `start..start + len`, for `batch × heads` rows laid out as `axes`
    /// says, multiplied by `scale` (queries fold the attention scale 1/√d in here), in `dtype`
    /// (the activations').
    #[allow(clippy::too_many_arguments)]
    pub fn angles(
        &self,
        start: usize,
        len: usize,
        batch: usize,
        heads: usize,
        scale: f64,
        axes: RopeLayoutAxes,
        dtype: DType,
    ) -> RopeAngles<B> {
        let rows = match len {
            1 => self.rows_on_host(start, scale, dtype),
            _ => self.rows_on_device(start, len, scale, dtype),
        };
        RopeAngles {
            rows,
            batch,
            heads,
            axes,
            expanded: Default::default(),
            rotation: Default::default(),
        }
    }

    /// `cos` and `sin` rows (`[len, head_dim]`) by tensor operations on the device.
    fn rows_on_device(&self, start: usize, len: usize, scale: f64, dtype: DType) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let device = self.inv_freq.device();
        let half = self.inv_freq.dims()[0];
        let positions = Tensor::<B, 1, Int>::arange(start as i64..(start + len) as i64, &device)
            .float()
            .reshape([len, 1]);
        let angles = positions * self.inv_freq.clone().reshape([1, half]);
        let (cos, sin) = (angles.clone().cos().mul_scalar(scale), angles.sin().mul_scalar(scale));
        (
            Tensor::cat(vec![cos.clone(), cos], 1).cast(dtype),
            Tensor::cat(vec![sin.clone().neg(), sin], 1).cast(dtype),
        )
    }

    /// The one row of a decode step, computed on the host and uploaded: on GPUs the dozen
    /// tensor operations cost more host time than the upload, and a decode step's first
    /// launches are what its GPU waits for (RoCo 0.25 on the H200: 171.9 vs 166.3 tok/s).
    /// Prefill chunks keep the device operations (a long chunk is many sines for one host
    /// thread; RoCo's strided prefill measured the same either way, 0.94 s).
    fn rows_on_host(&self, position: usize, scale: f64, dtype: DType) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let device = self.inv_freq.device();
        let inv_freq = inverse_frequencies(self.head_dim, self.theta);
        let scale = scale as f32;
        // f32 throughout, as the device operations compute them.
        let (c, s): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|f| position as f32 * f)
            .map(|a| (a.cos() * scale, a.sin() * scale))
            .unzip();
        let cos = [c.clone(), c].concat();
        let sin = [s.iter().map(|v| -v).collect(), s].concat();
        let upload = |v: Vec<f32>| {
            let d = v.len();
            let options = TensorCreationOptions::new(device.clone()).with_dtype(dtype);
            Tensor::<B, 2>::from_data(TensorData::new(v, [1, d]), options)
        };
        (upload(cos), upload(sin))
    }

    /// Rotates `x` by `angles` (rotate-half pairs along the last axis).
    ///
    /// # Shapes
    /// - `x`: the angles' shape, `[batch, s, heads, head_dim]` or `[batch, heads, s, head_dim]`
    pub fn apply(x: Tensor<B, 4>, angles: &RopeAngles<B>) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        if let (Some(r), 1, 1) = (angles.rotation(), b, s) {
            return x.reshape([1, h, d]).matmul(r.clone()).reshape([b, s, h, d]);
        }
        let x1 = x.clone().slice_dim(3, 0..d / 2);
        let x2 = x.clone().slice_dim(3, d / 2..d);
        // x·cos + rotate_half(x)·sin with rotate_half(x) = [−x2, x1]: the sign lives in `sin`.
        let swapped = Tensor::cat(vec![x2, x1], 3);
        let (cos, sin) = angles.expanded();
        x * cos.clone() + swapped * sin.clone()
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }
}

/// The rotation `x ↦ x·cos + [x2, x1]·sin` (sign folded into `sin`) of one position as a
/// matrix `R` with `x·R` the rotated row: `R[i][i] = cos[i]`, `R[(i + d/2) mod d][i] = sin[i]`.
///
/// # Shapes
/// - `cos`, `sin`: `[1, d]` → `[1, d, d]`
fn rotation_matrix<B: Backend>(cos: Tensor<B, 2>, sin: Tensor<B, 2>) -> Tensor<B, 3> {
    let d = cos.dims()[1];
    let device = cos.device();
    let dtype = cos.dtype();
    let unit = |f: &dyn Fn(usize, usize) -> bool| {
        let v: Vec<f32> = (0..d * d).map(|k| if f(k / d, k % d) { 1.0 } else { 0.0 }).collect();
        Tensor::<B, 2>::from_data(TensorData::new(v, [d, d]), &device).cast(dtype)
    };
    let identity = unit(&|j, i| j == i);
    let swap = unit(&|j, i| j == (i + d / 2) % d);
    (identity * cos + swap * sin).reshape([1, d, d])
}

/// The rotations one forward pass needs: for the chunk's queries (attention scale folded in)
/// and keys, and (StreamingLLM) for every slot of the cache.
struct ChunkAngles<B: Backend> {
    queries: RopeAngles<B>,
    keys: RopeAngles<B>,
    slots: Option<RopeAngles<B>>,
}

impl<B: Backend> Llama<B> {
    /// Angles for `len` tokens from position `start` (and, for StreamingLLM caches, for
    /// `slots` cached slots by slot index).
    fn chunk_angles(&self, batch: usize, start: usize, len: usize, slots: Option<usize>) -> ChunkAngles<B> {
        let (hq, hkv, d) = self
            .layers
            .first()
            .map_or((1, 1, 2), |l| (l.attn.n_heads, l.attn.n_kv_heads, l.attn.head_dim));
        let first = RopeLayoutAxes::PositionsFirst;
        let dt = self.activation_dtype();
        ChunkAngles {
            queries: self
                .rope
                .angles(start, len, batch, hq, (d as f64).powf(-0.5), first, dt),
            keys: self.rope.angles(start, len, batch, hkv, 1.0, first, dt),
            // StreamingLLM rotates cached keys in f32 (see `attend`).
            slots: slots.map(|n| {
                self.rope
                    .angles(0, n, batch, hkv, 1.0, RopeLayoutAxes::HeadsFirst, DType::F32)
            }),
        }
    }
}

/// Grouped-query self-attention with an explicit softmax.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Queries, keys and values stacked into one product (one pass over `x`, one kernel
    /// instead of three): `[(n_heads + 2·n_kv_heads)·head_dim, hidden]`.
    pub qkv: Linear<B>,
    pub o: Linear<B>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// Positions attention reaches back (the query's own included); 0: the whole context.
    window: usize,
    /// Whether the backend multiplies half-precision matrices natively (GPUs). Elsewhere a
    /// half-precision cache is widened to f32 for multi-token chunks (flex's f16 products made
    /// CPU prefill 30 % slower) but not for single decode steps (widening the whole cache every
    /// step cost more than the f16 products: 20 → 15 tok/s).
    half_products: bool,
}

impl<B: Backend> Attention<B> {
    /// Queries (rotated, attention scale folded in), keys (rotated unless `angles.slots` says
    /// StreamingLLM rotates them by slot after caching) and values of the stacked projection
    /// `qkv`.
    ///
    /// # Shapes
    /// - `qkv`: `[batch, s, (n_heads + 2·n_kv_heads)·head_dim]`; `angles`: for the `s` positions
    /// - returns `[batch, heads, s, head_dim]` with `n_heads`, `n_kv_heads`, `n_kv_heads` heads
    fn project(&self, qkv: Tensor<B, 3>, angles: &ChunkAngles<B>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let heads = HeadShape {
            q_heads: self.n_heads,
            kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        };
        let (q_rows, k_rows) = (&angles.queries.rows, &angles.keys.rows);
        let keys = angles.slots.is_none().then_some((&k_rows.0, &k_rows.1));
        // One kernel where there is one (CUDA), instead of copies, rotations and transposes.
        match gpu_kernels::split_rope(qkv, heads, (&q_rows.0, &q_rows.1), keys) {
            Ok(qkv) => qkv,
            Err(qkv) => {
                let (q, k, v) = self.split_positions_first(qkv, angles);
                (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2))
            }
        }
    }

    /// [`project`](Self::project) in the projections' own layout, `[batch, s, heads, head_dim]`.
    fn project_positions_first(
        &self,
        x: Tensor<B, 3>,
        angles: &ChunkAngles<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        self.split_positions_first(self.qkv.forward(x), angles)
    }

    /// The stacked projection `qkv` (`[batch, s, (hq + 2·hkv)·d]`) as q, k, v in the
    /// projections' layout, rotated as [`project`](Self::project) says.
    fn split_positions_first(
        &self,
        qkv: Tensor<B, 3>,
        angles: &ChunkAngles<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s, _] = qkv.dims();
        let (d, hq, hkv) = (self.head_dim, self.n_heads, self.n_kv_heads);
        // `h` heads from head `first` of the stacked projection, rotated (where asked) in the
        // projection's own layout.
        let heads = |first: usize, h: usize| {
            qkv.clone()
                .slice_dim(2, first * d..(first + h) * d)
                .reshape([b, s, h, d])
        };
        let q = Rope::apply(heads(0, hq), &angles.queries);
        let k = match angles.slots {
            None => Rope::apply(heads(hq, hkv), &angles.keys),
            Some(_) => heads(hq, hkv),
        };
        let v = heads(hq + hkv, hkv);
        (q, k, v)
    }

    /// Appends `k`, `v` to the cache and attends `q` over everything it holds, handing the
    /// probabilities to the cache when it wants them.
    ///
    /// # Shapes
    /// - `q`: `[batch, n_heads, s, head_dim]`; `k`, `v`: `[batch, n_kv_heads, s, head_dim]`
    /// - `mask`: `[batch, kv_heads, group·s, slots]` additive (0 or −∞), `None` when it
    ///   hides nothing
    /// - returns `[batch, n_heads, s, head_dim]`
    #[allow(clippy::too_many_arguments)]
    fn attend<C: KvCache<B> + ?Sized>(
        &self,
        layer: usize,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        slot_angles: Option<&RopeAngles<B>>,
        mask: Option<&Tensor<B, 4>>,
        cache: &mut C,
    ) -> Result<Tensor<B, 4>> {
        // Keys and values are cached in the weights' precision (f16 halves the cache).
        let kv_dtype = self.qkv.weight.val().dtype();
        let cached = cache.append_in_place(layer, k.cast(kv_dtype), v.cast(kv_dtype))?;
        self.attend_cached(layer, q, &cached, slot_angles, mask, cache)
    }

    /// [`attend`](Self::attend) once the chunk's keys and values are in the cache (`cached`).
    fn attend_cached<C: KvCache<B> + ?Sized>(
        &self,
        layer: usize,
        q: Tensor<B, 4>,
        cached: &CachedKv<B>,
        slot_angles: Option<&RopeAngles<B>>,
        mask: Option<&Tensor<B, 4>>,
        cache: &mut C,
    ) -> Result<Tensor<B, 4>> {
        let [b, _, s, d] = q.dims();
        let activation = q.dtype();
        let (hq, hkv) = (self.n_heads, self.n_kv_heads);
        let g = hq / hkv;
        // The products run in the cache's precision where the backend is fast at it, the
        // softmax and what the cache observes stay in f32.
        let kv_dtype = self.qkv.weight.val().dtype();
        let product = if self.half_products || s == 1 {
            kv_dtype
        } else {
            DType::F32
        };
        let n = cached.len;
        // The decode kernels read the cache's buffers in place; burn's products need the slots
        // in use cut out (StreamingLLM: keys are stored unrotated and rotated by their slot
        // index here).
        let in_place = slot_angles.is_none() && product == kv_dtype;
        let used_keys = || {
            let keys = cached.used().0;
            match slot_angles {
                Some(a) => Rope::apply(keys.cast(DType::F32), a).cast(product),
                None => keys.cast(product),
            }
        };
        // Query heads h·g..h·g+g share KV head h: fold them into the row axis instead of
        // repeating K and V.
        let q = q.reshape([b, hkv, g * s, d]).cast(product);
        // Nothing to mask and nobody observing: one pass that never writes the scores out.
        let q = match in_place && mask.is_none() && !cache.wants_attention(layer) && cache.slot_bias(layer).is_none() {
            true => match gpu_kernels::decode_attention(q, &cached.keys, &cached.values, n) {
                Ok(out) => return Ok(out.cast(activation).reshape([b, hq, s, d])),
                Err(q) => q,
            },
            false => q,
        };
        // The scale 1/√d is already in the queries.
        let scores = match in_place {
            true => gpu_kernels::attention_scores(q, &cached.keys, n)
                .or_else(|q| gpu_kernels::matmul_f32(q, &cached.keys, true, n)),
            false => Err(q),
        }
        .unwrap_or_else(|q| q.matmul(used_keys().swap_dims(2, 3)));
        // Slots the cache evicted but has not compacted away yet.
        let bias = cache.slot_bias(layer);
        let (probs, product_probs) = match gpu_kernels::softmax_rows(scores, mask, bias.as_ref(), product) {
            Ok(probs) => probs,
            Err(scores) => {
                let scores = scores.cast(DType::F32);
                // The mask has the scores' full shape: flex adds equal shapes far faster than it
                // broadcasts.
                let scores = match mask {
                    Some(m) => scores + m.clone(),
                    None => scores,
                };
                let scores = match bias {
                    // Repeated to the scores' shape: flex adds equal shapes ~30× faster than it
                    // broadcasts.
                    Some(bias) => scores + bias.repeat_dim(2, g * s),
                    None => scores,
                };
                let probs = crate::host_kernels::softmax_last(scores);
                (probs.clone(), probs.cast(product))
            }
        };
        if cache.wants_attention(layer) {
            let grouped = match g {
                1 => probs,
                _ => probs.reshape([b, hkv, g, s, n]).mean_dim(2).reshape([b, hkv, s, n]),
            };
            cache.observe(layer, grouped)?;
        }
        let out = match in_place {
            true => gpu_kernels::attention_values(product_probs, &cached.values, n)
                .or_else(|p| gpu_kernels::matmul_f32(p, &cached.values, false, d)),
            false => Err(product_probs),
        }
        .unwrap_or_else(|p| p.matmul(cached.used().1.cast(product)))
        .cast(activation);
        Ok(out.reshape([b, hq, s, d]))
    }

    /// `[batch, n_heads, s, head_dim]` → the heads side by side, `[batch, s, n_heads·head_dim]`
    /// (the output projection's input). A whole one-position output (a decode step) is that
    /// already; `view`: `out` is a cut of a larger tensor (the last position of a prefill
    /// chunk), which is copied instead — reshaping such a strided view directly gave wrong
    /// products on cubecl backends.
    fn merge_heads(out: Tensor<B, 4>, view: bool) -> Tensor<B, 3> {
        let [b, h, s, d] = out.dims();
        match s == 1 && !view {
            true => out.reshape([b, s, h * d]),
            false => out.swap_dims(1, 2).reshape([b, s, h * d]),
        }
    }

    /// Attention of `norm(x)` before the output projection (see [`merge`](Self::merge)).
    ///
    /// # Shapes
    /// - `x`: `[batch, s, hidden]`; `mask`: `[batch, kv_heads, group·s, slots]` additive (0 or −∞),
    ///   `None` when it hides nothing; `scaled`: `x·γ` of `norm` (`x`'s shape) where the product
    ///   that wrote `x` wrote it too
    /// - returns `[batch, n_heads, s, head_dim]`
    #[allow(clippy::too_many_arguments)]
    fn forward<C: KvCache<B> + ?Sized>(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
        scaled: Option<Tensor<B, 3>>,
        norm: &RmsNorm<B>,
        angles: &ChunkAngles<B>,
        mask: Option<&Tensor<B, 4>>,
        cache: &mut C,
    ) -> Result<Tensor<B, 4>> {
        let qkv = self.qkv.forward_normed(x, scaled, norm);
        // Where a kernel can, keys and values go straight into the cache's buffers.
        let qkv = match self.project_into_cache(layer, qkv, angles, cache)? {
            Ok((q, cached)) => return self.attend_cached(layer, q, &cached, None, mask, cache),
            Err(qkv) => qkv,
        };
        let (q, k, v) = self.project(qkv, angles);
        self.attend(layer, q, k, v, angles.slots.as_ref(), mask, cache)
    }

    /// Rotated queries of the stacked projection `qkv`, its keys and values written into
    /// `layer`'s cache buffers by one kernel, and the cache after the append; `qkv` back where
    /// there is no such kernel (or the cache offers no room, or keys are rotated after caching).
    #[allow(clippy::type_complexity)]
    fn project_into_cache<C: KvCache<B> + ?Sized>(
        &self,
        layer: usize,
        qkv: Tensor<B, 3>,
        angles: &ChunkAngles<B>,
        cache: &mut C,
    ) -> Result<std::result::Result<(Tensor<B, 4>, CachedKv<B>), Tensor<B, 3>>> {
        let [b, s, _] = qkv.dims();
        if angles.slots.is_some() || !gpu_kernels::is_cube_backend::<B>() {
            return Ok(Err(qkv));
        }
        let (hkv, d) = (self.n_kv_heads, self.head_dim);
        // The cache keeps the weights' precision (the kernel declines if the projection's differs).
        let kv_dtype = self.qkv.weight.val().dtype();
        let Some(room) = cache.reserve_slots(layer, [b, hkv, s, d], kv_dtype, &qkv.device())? else {
            return Ok(Err(qkv));
        };
        let heads = HeadShape {
            q_heads: self.n_heads,
            kv_heads: hkv,
            head_dim: d,
        };
        let (q_rows, k_rows) = (&angles.queries.rows, &angles.keys.rows);
        let buffers = (&room.keys, &room.values);
        let at = room.len;
        match gpu_kernels::split_rope_into(qkv, heads, (&q_rows.0, &q_rows.1), (&k_rows.0, &k_rows.1), buffers, at) {
            Ok(q) => Ok(Ok((q, cache.commit_slots(layer, s)?))),
            Err(qkv) => Ok(Err(qkv)),
        }
    }
}

/// Which positions' hidden states leave the last layer. Every position's keys and values
/// (and, for evicting caches, attention) are needed in every layer, but after the last
/// layer's attention only the positions someone reads need the output projection and the
/// feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needed {
    All,
    /// The last position (generation: its logits).
    Last,
    /// None (prefill chunks before the last fill the cache only).
    Nothing,
}

impl From<Logits> for Needed {
    fn from(logits: Logits) -> Self {
        match logits {
            Logits::All => Needed::All,
            Logits::Last => Needed::Last,
        }
    }
}

impl<B: Backend> DecoderLayer<B> {
    /// The residual stream after this layer, given its attention output `attn`
    /// (`[batch, n_heads, s, head_dim]`), for the positions `needed` says: `[batch, s, hidden]`,
    /// `[batch, 1, hidden]` (last), or `x` untouched (nothing). With it, for a decode step
    /// where a kernel can, the stream times the `γ` of `next` (the norm that reads it next).
    fn finish(
        &self,
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
                let x = self.finish_merged(x.slice_dim(1, s - 1..s), Attention::merge_heads(attn, true));
                (x, None)
            }
            _ => self.finish_scaling(x, Attention::merge_heads(attn, false), next),
        }
    }

    /// [`finish`](Self::finish) for an attention output with its heads merged
    /// (`[batch, s, n_heads·head_dim]`).
    fn finish_merged(&self, x: Tensor<B, 3>, heads: Tensor<B, 3>) -> Tensor<B, 3> {
        self.finish_scaling(x, heads, None).0
    }

    /// [`finish_merged`](Self::finish_merged), and the stream times `next`'s `γ` where a
    /// kernel wrote it.
    fn finish_scaling(
        &self,
        x: Tensor<B, 3>,
        heads: Tensor<B, 3>,
        next: Option<&RmsNorm<B>>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
        let (x, scaled) = self.attn.o.forward_residual_scaling(heads, x, Some(&self.ffn_norm));
        let hidden = self
            .ffn
            .gate_up
            .forward_swiglu_normed(x.clone(), scaled, &self.ffn_norm);
        self.ffn.down.forward_residual_scaling(hidden, x, next)
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
    /// The precision of the residual stream: the weights' on backends that multiply half
    /// precision natively (GPUs; as Hugging Face runs f16 models), f32 elsewhere. Keeping it
    /// in half precision there drops the casts around every matrix product.
    pub fn activation_dtype(&self) -> DType {
        match self.layers.first() {
            Some(l) if l.attn.half_products => self.embed.weight.val().dtype(),
            _ => DType::F32,
        }
    }

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
        let x = self.run_layers(tokens, cache, logits.into())?;
        self.project_logits(x, logits)
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
        self.run_layers(tokens, cache, Needed::All)
    }

    /// [`forward_hidden`](Self::forward_hidden) returning the last layer's output for the
    /// positions `needed` says (for [`Needed::Nothing`], whatever is at hand: nobody reads it).
    fn run_layers<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut C,
        needed: Needed,
    ) -> Result<Tensor<B, 3>> {
        let [b, s] = tokens.dims();
        let start = self.first_position(cache, s)?;
        // Evicting caches rank slots and record prefill chunks on the device where kernels can.
        gpu_kernels::install_cache_kernels::<B>();
        let device = tokens.device();
        let mut x = self.embed.embed(tokens).cast(self.activation_dtype());
        // Angles once per chunk, shared by every layer.
        let slots = cache.compact_positions().then(|| cache.slots(0) + s);
        let angles = self.chunk_angles(b, start, s, slots);
        // Every layer holds the same number of slots before this chunk, so one mask serves all.
        let mask = self.attention_mask(b, s, cache.slots(0) + s, &device);
        let last = self.layers.len().saturating_sub(1);
        let trace = ChunkTrace::<B>::start(&device);
        // A decode step's residual stream times the next norm's γ, where the product that
        // wrote the stream wrote that too (the next product then normalizes without a wait).
        let mut scaled = None;
        for (l, layer) in self.layers.iter().enumerate() {
            let attn = layer.attn.forward(
                l,
                x.clone(),
                scaled.take(),
                &layer.attn_norm,
                &angles,
                mask.as_ref(),
                cache,
            )?;
            let next = self.layers.get(l + 1).map(|n| &n.attn_norm);
            (x, scaled) = layer.finish(x, attn, if l == last { needed } else { Needed::All }, next);
        }
        let layers_done = trace.as_ref().map(|t| t.lap());
        cache.end_chunk()?;
        if let (Some(t), Some(layers)) = (trace, layers_done) {
            eprintln!(
                "chunk of {s} tokens over {} slots: layers {layers:.2} ms, cache {:.2} ms",
                cache.slots(0),
                t.lap()
            );
        }
        Ok(x)
    }

    /// The position of the first of `len` new tokens, if all of them fit in the context.
    fn first_position<C: KvCache<B> + ?Sized>(&self, cache: &C, len: usize) -> Result<usize> {
        let start = cache.next_position();
        let windowed = self.layers.first().is_some_and(|l| l.attn.window > 0);
        if windowed && (cache.evicted() > 0 || cache.compact_positions()) {
            return Err(Error::Unsupported(
                "a sliding-window model needs the full cache (slots must be positions)".into(),
            ));
        }
        if start + len > self.rope.max_positions() {
            return Err(Error::InvalidInput(format!(
                "position {} is past the model's context of {} tokens",
                start + len,
                self.rope.max_positions()
            )));
        }
        Ok(start)
    }

    /// The additive mask of `s` new queries over `slots` slots, in the scores' shape
    /// `[batch, kv_heads, group·s, slots]`: causal, plus the sliding window of windowed models;
    /// `None` when it hides nothing.
    fn attention_mask(&self, b: usize, s: usize, slots: usize, device: &B::Device) -> Option<Tensor<B, 4>> {
        let rows = self.layers.first().map_or(1, |l| l.attn.n_heads);
        let heads = self.layers.first().map_or(1, |l| l.attn.n_kv_heads);
        let window = self.layers.first().map_or(0, |l| l.attn.window);
        // One query hides nothing unless the window has slid past the first slots.
        if s == 1 && (window == 0 || slots <= window) {
            return None;
        }
        let mask = causal_mask::<B>(s, slots, window, device)
            .reshape([1, 1, s, slots])
            .repeat(&[b, rows, 1, 1])
            .reshape([b, heads, rows / heads * s, slots]);
        Some(mask)
    }

    /// Runs consecutive chunks of tokens through the model, evicting between chunks exactly as
    /// one [`forward_hidden`](Self::forward_hidden) per chunk would, but **layer by layer**:
    /// each layer projects all the chunks' tokens at once (a few large matrix products instead
    /// of many thin ones), then attends and lets the cache evict chunk by chunk. A layer's cache
    /// depends only on its own attention, so the result is the same.
    ///
    /// StreamingLLM caches (positions that depend on the slot count) run chunk by chunk, and so
    /// does everything on GPU backends, where the per-layer evictions would cost more than
    /// the thin products save.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, Σ chunks]` → hidden states `[batch, Σ chunks, hidden]` before the
    ///   final norm
    pub fn forward_hidden_chunks<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        chunks: &[usize],
        cache: &mut C,
    ) -> Result<Tensor<B, 3>> {
        self.run_layers_chunked(tokens, chunks, cache, Needed::All)
    }

    /// Runs consecutive chunks through the model only to fill `cache` (as
    /// [`forward_hidden_chunks`](Self::forward_hidden_chunks), without the last layer's output
    /// projection and feed-forward block, whose results nobody would read).
    pub fn fill_cache_chunks<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        chunks: &[usize],
        cache: &mut C,
    ) -> Result<()> {
        self.run_layers_chunked(tokens, chunks, cache, Needed::Nothing)
            .map(|_| ())
    }

    /// [`forward_hidden_chunks`](Self::forward_hidden_chunks) returning the last layer's output
    /// for the positions `needed` says.
    fn run_layers_chunked<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        chunks: &[usize],
        cache: &mut C,
        needed: Needed,
    ) -> Result<Tensor<B, 3>> {
        let [b, total] = tokens.dims();
        if chunks.iter().sum::<usize>() != total || chunks.contains(&0) {
            return Err(Error::InvalidInput(format!(
                "chunks {chunks:?} do not split {total} tokens"
            )));
        }
        // On GPUs chunk by chunk: one eviction per chunk for all layers at once (a few dozen
        // kernels) instead of one per layer and chunk, and thin products cost little there.
        let chunk_major = !easykv_core::host_resident::<B>(&tokens.device());
        if chunks.len() <= 1 || cache.compact_positions() || chunk_major {
            let mut outs = Vec::with_capacity(chunks.len());
            let mut start = 0;
            for (i, &s) in chunks.iter().enumerate() {
                // Only the last chunk holds the last position.
                let here = match needed {
                    Needed::Last if i + 1 < chunks.len() => Needed::Nothing,
                    other => other,
                };
                let out = self.run_layers(tokens.clone().slice([0..b, start..start + s]), cache, here)?;
                // Unread outputs are dropped, unless nothing is read at all (something must be
                // returned).
                if here != Needed::Nothing || needed == Needed::Nothing {
                    outs.push(out);
                }
                start += s;
            }
            return Ok(Tensor::cat(outs, 1));
        }
        let start = self.first_position(cache, total)?;
        let device = tokens.device();
        let angles = self.chunk_angles(b, start, total, None);
        let mut x = self.embed.embed(tokens).cast(self.activation_dtype());
        // The mask of the last (chunk length, slot count) seen.
        let (mut mask_for, mut mask) = (None, None);
        let last = self.layers.len().saturating_sub(1);
        for (l, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = layer
                .attn
                .project_positions_first(normalize(&layer.attn_norm, x.clone()), &angles);
            let (q, k, v) = (
                HeadsFirstChunks::new(q),
                HeadsFirstChunks::new(k),
                HeadsFirstChunks::new(v),
            );
            let mut outs = Vec::with_capacity(chunks.len());
            let mut off = 0;
            for &s in chunks {
                let part = |t: &HeadsFirstChunks<B>| t.chunk(off, s);
                let slots = cache.slots(l) + s;
                // Chunks of one stride meet the same slot count again and again: reuse the mask.
                if mask_for != Some((s, slots)) {
                    mask = self.attention_mask(b, s, slots, &device);
                    mask_for = Some((s, slots));
                }
                let m = mask.as_ref();
                outs.push(layer.attn.attend(l, part(&q), part(&k), part(&v), None, m, cache)?);
                cache.end_layer_chunk(l)?;
                off += s;
            }
            x = match (l == last, needed) {
                (true, Needed::Nothing) => x,
                // The last chunk holds the last position.
                (true, Needed::Last) => match outs.pop() {
                    Some(out) => layer.finish(x, out, Needed::Last, None).0,
                    None => x,
                },
                _ => layer.finish_merged(x, join_positions_first(outs)),
            };
        }
        Ok(x)
    }

    /// [`forward_hidden_chunks`](Self::forward_hidden_chunks) followed by the output projection.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, Σ chunks]`
    /// - returns `[batch, Σ chunks, vocab]` for [`Logits::All`], `[batch, 1, vocab]` for
    ///   [`Logits::Last`]
    pub fn forward_chunks<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        chunks: &[usize],
        cache: &mut C,
        logits: Logits,
    ) -> Result<Tensor<B, 3>> {
        let x = self.run_layers_chunked(tokens, chunks, cache, logits.into())?;
        self.project_logits(x, logits)
    }

    fn project_logits(&self, x: Tensor<B, 3>, logits: Logits) -> Result<Tensor<B, 3>> {
        let [b, s, _] = x.dims();
        let x = match logits {
            Logits::All => x,
            Logits::Last => x.slice([0..b, s - 1..s]),
        };
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(head.logits(normalize(&self.norm, x)))
    }

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
        let embed = params.table("token_embd.weight", cfg.vocab_size, h)?;
        let lm_head = if params.has("output.weight") {
            Some(params.table("output.weight", cfg.vocab_size, h)?)
        } else {
            None
        };
        let norm = params.norm("output_norm.weight", h)?;
        let half_products = B::name(device).contains("cubecl");
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let name = |t: &str| format!("blk.{i}.{t}");
            let attn = Attention {
                qkv: Linear::stacked(vec![
                    params.linear(&name("attn_q"), cfg.n_heads * d, h, Some(cfg.n_heads))?,
                    params.linear(&name("attn_k"), cfg.n_kv_heads * d, h, Some(cfg.n_kv_heads))?,
                    params.linear(&name("attn_v"), cfg.n_kv_heads * d, h, None)?,
                ]),
                o: params.linear(&name("attn_output"), h, cfg.n_heads * d, None)?,
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: d,
                window: cfg.sliding_window.unwrap_or(0),
                half_products,
            };
            let ffn = FeedForward {
                gate_up: Linear::stacked(vec![
                    params.linear(&name("ffn_gate"), cfg.intermediate_size, h, None)?,
                    params.linear(&name("ffn_up"), cfg.intermediate_size, h, None)?,
                ]),
                down: params.linear(&name("ffn_down"), h, cfg.intermediate_size, None)?,
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
        let mut w = matrix(source, &format!("{name}.weight"), out, inp)?;
        let bias_name = format!("{name}.bias");
        let mut bias = if self.cfg.qkv_bias && source.has(&bias_name) {
            Some(vector(source, &bias_name, out)?)
        } else {
            None
        };
        if let (Some(heads), RopeLayout::Interleaved) = (rope_heads, self.cfg.rope_layout) {
            // Reorder each head's rows from interleaved pairs to rotate-half pairs; the same
            // permutation on Q and K leaves every QKᵀ score unchanged.
            w = deinterleave_rows(&w, heads, d, inp);
            bias = bias.map(|b| deinterleave_rows(&b, heads, d, 1));
        }
        Ok(Linear::new(w, out, inp, bias, self.dtype, self.device))
    }

    fn table(&self, name: &str, rows: usize, cols: usize) -> Result<EmbeddingTable<B>> {
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

/// Additive causal mask for `s` new queries over `n` slots whose last `s` are the new tokens;
/// with a sliding `window` (> 0) it also hides slots `window` or more positions behind each
/// query (slot j holds position j).
fn causal_mask<B: Backend>(s: usize, n: usize, window: usize, device: &B::Device) -> Tensor<B, 2> {
    let mut m = vec![0f32; s * n];
    for t in 0..s {
        let query = n - s + t;
        let first_visible = if window == 0 {
            0
        } else {
            (query + 1).saturating_sub(window)
        };
        let (behind, rest) = m[t * n..(t + 1) * n].split_at_mut(first_visible);
        let future = &mut rest[query + 1 - first_visible..];
        for v in behind.iter_mut().chain(future) {
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
pub(crate) fn deinterleave_rows(w: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
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

/// `EASYKV_TRACE_CHUNKS=1`: how long each chunk's layers and its cache step take, the device
/// synchronized around each (slower; for finding where a prefill's time goes).
struct ChunkTrace<'a, B: Backend> {
    device: &'a B::Device,
    since: std::cell::Cell<std::time::Instant>,
}

impl<'a, B: Backend> ChunkTrace<'a, B> {
    fn start(device: &'a B::Device) -> Option<Self> {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if !*ON.get_or_init(|| std::env::var_os("EASYKV_TRACE_CHUNKS").is_some_and(|v| v != "0")) {
            return None;
        }
        let _ = B::sync(device);
        Some(ChunkTrace {
            device,
            since: std::cell::Cell::new(std::time::Instant::now()),
        })
    }

    /// Milliseconds since the last lap, once the device has caught up.
    fn lap(&self) -> f64 {
        let _ = B::sync(self.device);
        let now = std::time::Instant::now();
        now.duration_since(self.since.replace(now)).as_secs_f64() * 1e3
    }
}
