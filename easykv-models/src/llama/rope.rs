//! Rotary position embedding (rotate-half layout) and the angles one forward pass needs.

use burn::prelude::*;
use burn::tensor::{DType, TensorCreationOptions, TensorData};

use super::Llama;

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
pub(crate) fn inverse_frequencies(head_dim: usize, theta: f32) -> Vec<f32> {
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
    pub(crate) rows: (Tensor<B, 2>, Tensor<B, 2>),
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

    pub(crate) fn rotation(&self) -> Option<&Tensor<B, 3>> {
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

    /// [`angles`](Self::angles) for one token at each of `positions`, laid out as `len =
    /// positions.len()` positions of one batch (a batched decode step's rows).
    pub fn angles_at(&self, positions: &[usize], heads: usize, scale: f64, dtype: DType) -> RopeAngles<B> {
        RopeAngles {
            rows: self.rows_at(positions, scale, dtype),
            batch: 1,
            heads,
            axes: RopeLayoutAxes::PositionsFirst,
            expanded: Default::default(),
            rotation: Default::default(),
        }
    }

    /// `cos` and `sin` rows (`[len, head_dim]`) by tensor operations on the device.
    pub(crate) fn rows_on_device(
        &self,
        start: usize,
        len: usize,
        scale: f64,
        dtype: DType,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
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
    pub(crate) fn rows_on_host(&self, position: usize, scale: f64, dtype: DType) -> (Tensor<B, 2>, Tensor<B, 2>) {
        self.rows_at(&[position], scale, dtype)
    }

    /// [`rows_on_host`](Self::rows_on_host) for any positions, one row each (`[n, head_dim]`):
    /// the rows of a batched decode step, whose sequences stand at different positions.
    pub(crate) fn rows_at(&self, positions: &[usize], scale: f64, dtype: DType) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let device = self.inv_freq.device();
        let inv_freq = inverse_frequencies(self.head_dim, self.theta);
        let scale = scale as f32;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &position in positions {
            // f32 throughout, as the device operations compute them.
            let (c, s): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|f| position as f32 * f)
                .map(|a| (a.cos() * scale, a.sin() * scale))
                .unzip();
            cos.extend_from_slice(&c);
            cos.extend_from_slice(&c);
            sin.extend(s.iter().map(|v| -v));
            sin.extend_from_slice(&s);
        }
        let upload = |v: Vec<f32>| {
            let n = positions.len();
            let options = TensorCreationOptions::new(device.clone()).with_dtype(dtype);
            Tensor::<B, 2>::from_data(TensorData::new(v, [n, self.head_dim]), options)
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
pub(super) struct ChunkAngles<B: Backend> {
    pub(super) queries: RopeAngles<B>,
    pub(super) keys: RopeAngles<B>,
    pub(super) slots: Option<RopeAngles<B>>,
}

impl<B: Backend> Llama<B> {
    /// Angles for `len` tokens from position `start` (and, for StreamingLLM caches, for
    /// `slots` cached slots by slot index).
    /// Angles for one token at each of `positions`, the sequences of a batched decode step laid
    /// out as positions of one batch.
    pub(super) fn decode_angles(&self, positions: &[usize]) -> ChunkAngles<B> {
        let (hq, hkv, d) = self
            .layers
            .first()
            .map_or((1, 1, 2), |l| (l.attn.n_heads, l.attn.n_kv_heads, l.attn.head_dim));
        let dt = self.activation_dtype();
        ChunkAngles {
            queries: self.rope.angles_at(positions, hq, (d as f64).powf(-0.5), dt),
            keys: self.rope.angles_at(positions, hkv, 1.0, dt),
            slots: None,
        }
    }

    pub(super) fn chunk_angles(&self, batch: usize, start: usize, len: usize, slots: Option<usize>) -> ChunkAngles<B> {
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
