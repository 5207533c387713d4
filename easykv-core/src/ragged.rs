//! A layer whose KV heads hold different numbers of slots (per-head budgets, AdaKV): each
//! (batch, head) has buffers of its own, sized to what it keeps plus the generation to come,
//! so a head that keeps fewer slots holds fewer bytes.
//!
//! Attention reads the heads side by side, `[batch, heads, widest, head_dim]`, each head's
//! slots at the end of its row (left-padded) and the padding masked by
//! [`RaggedLayer::padding_bias`]: a chunk's new tokens stay the last slots of every head, as
//! [`crate::KvCache::append`] promises. That view is made for the step and dropped after it.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::layer_kv::write_slots;
use crate::CachedKv;

/// One (batch, head)'s slots: `[1, 1, capacity, head_dim]`, the first `len` in use.
#[derive(Debug, Clone)]
struct HeadSlots<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    len: usize,
}

/// The heads of one layer, each with its own slot count.
#[derive(Debug, Clone)]
pub(crate) struct RaggedLayer<B: Backend> {
    /// `batch × heads` entries, batch-major.
    heads: Vec<HeadSlots<B>>,
    batch: usize,
    n_heads: usize,
}

impl<B: Backend> RaggedLayer<B> {
    /// The slots `keep[r]` lists (ascending, below `len`) of every (batch, head) row `r` of
    /// `k`, `v` (`[batch, heads, capacity, head_dim]`), each head in buffers with room for
    /// `room` more slots.
    pub(crate) fn split(k: &Tensor<B, 4>, v: &Tensor<B, 4>, keep: &[Vec<usize>], room: usize) -> Self {
        let [batch, n_heads, _, d] = k.dims();
        let device = k.device();
        let heads = keep
            .iter()
            .enumerate()
            .take(batch * n_heads)
            .map(|(r, slots)| {
                let (bi, hi) = (r / n_heads, r % n_heads);
                let len = slots.len();
                let index: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
                let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [len]), &device);
                let pick = |t: &Tensor<B, 4>| {
                    let row = t.clone().slice([bi..bi + 1, hi..hi + 1]);
                    let kept = row.select(2, index.clone());
                    let fresh = Tensor::<B, 4>::zeros([1, 1, len + room, d], &device).cast(t.dtype());
                    match len {
                        0 => fresh,
                        _ => fresh.slice_assign([0..1, 0..1, 0..len, 0..d], kept),
                    }
                };
                HeadSlots {
                    k: pick(k),
                    v: pick(v),
                    len,
                }
            })
            .collect();
        Self { heads, batch, n_heads }
    }

    pub(crate) fn batch_heads(&self) -> (usize, usize) {
        (self.batch, self.n_heads)
    }

    pub(crate) fn device(&self) -> Option<B::Device> {
        self.heads.first().map(|h| h.k.device())
    }

    /// Slots each head holds, batch-major.
    #[cfg(test)]
    fn lens(&self) -> Vec<usize> {
        self.heads.iter().map(|h| h.len).collect()
    }

    /// The most slots a head holds: the width of [`padded`](Self::padded).
    pub(crate) fn widest(&self) -> usize {
        self.heads.iter().map(|h| h.len).max().unwrap_or(0)
    }

    /// Appends `keys`, `values` (`[batch, heads, s, head_dim]`) to every head, growing a
    /// head's buffers where they are full. `false` (nothing appended) on another batch or
    /// head count. `host`: the buffers are host memory (written in their own bytes).
    pub(crate) fn append(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>, host: bool) -> bool {
        let [b, h, s, d] = keys.dims();
        if (b, h) != (self.batch, self.n_heads) {
            return false;
        }
        for (r, head) in self.heads.iter_mut().enumerate() {
            let (bi, hi) = (r / h, r % h);
            let row = |t: &Tensor<B, 4>| t.clone().slice([bi..bi + 1, hi..hi + 1]);
            let needed = head.len + s;
            if head.k.dims()[2] < needed {
                let room = needed.max(head.len + head.len / 2);
                let grow = |t: &Tensor<B, 4>| {
                    let fresh = Tensor::<B, 4>::zeros([1, 1, room, d], &t.device()).cast(t.dtype());
                    match head.len {
                        0 => fresh,
                        n => fresh.slice_assign([0..1, 0..1, 0..n, 0..d], t.clone().slice_dim(2, 0..n)),
                    }
                };
                head.k = grow(&head.k);
                head.v = grow(&head.v);
            }
            let dtype = head.k.dtype();
            head.k = write_slots(head.k.clone(), row(&keys).cast(dtype), head.len, host);
            head.v = write_slots(head.v.clone(), row(&values).cast(dtype), head.len, host);
            head.len = needed;
        }
        true
    }

    /// Every (batch, head)'s own buffers, batch-major, `[1, 1, capacity, head_dim]` each with
    /// its slots in use: what a kernel attending head by head reads, without the padded view.
    pub(crate) fn per_head(&self) -> Vec<CachedKv<B>> {
        self.heads
            .iter()
            .map(|h| CachedKv {
                keys: h.k.clone(),
                values: h.v.clone(),
                len: h.len,
            })
            .collect()
    }

    /// Every head's keys and values side by side, `[batch, heads, widest, head_dim]` each,
    /// each head's slots last (zeros before them).
    pub(crate) fn padded(&self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let widest = self.widest();
        let side_by_side = |pick: fn(&HeadSlots<B>) -> &Tensor<B, 4>| {
            let rows: Vec<Tensor<B, 4>> = self
                .heads
                .iter()
                .map(|head| {
                    let t = pick(head);
                    let used = t.clone().slice_dim(2, 0..head.len);
                    match widest - head.len {
                        0 => used,
                        pad => {
                            let [_, _, _, d] = t.dims();
                            let zeros = Tensor::<B, 4>::zeros([1, 1, pad, d], &t.device()).cast(t.dtype());
                            Tensor::cat(vec![zeros, used], 2)
                        }
                    }
                })
                .collect();
            let batches: Vec<Tensor<B, 4>> = rows.chunks(self.n_heads).map(|r| Tensor::cat(r.to_vec(), 1)).collect();
            Tensor::cat(batches, 0)
        };
        (side_by_side(|h| &h.k), side_by_side(|h| &h.v))
    }

    /// The additive bias that masks [`padded`](Self::padded)'s padding: `[batch, heads, 1,
    /// widest]`, −∞ before each head's slots, 0 on them.
    pub(crate) fn padding_bias(&self) -> Option<Tensor<B, 4>> {
        let widest = self.widest();
        let device = self.device()?;
        let bias: Vec<f32> = self
            .heads
            .iter()
            .flat_map(|h| (0..widest).map(move |j| if j + h.len < widest { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Some(Tensor::from_data(
            TensorData::new(bias, [self.batch, self.n_heads, 1, widest]),
            &device,
        ))
    }

    /// Bytes allocated for keys and values, spare room included.
    pub(crate) fn bytes(&self) -> u64 {
        let bytes = |t: &Tensor<B, 4>| t.shape().num_elements() as u64 * t.dtype().size() as u64;
        self.heads.iter().map(|h| bytes(&h.k) + bytes(&h.v)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// Heads keep their own slots, grow on their own, and read back side by side with the
    /// padding in front and masked; bytes follow the slots each head holds.
    #[test]
    fn heads_keep_their_own_slots() {
        let dev = Default::default();
        // 1 batch, 2 heads, 4 slots of width 1: slot j of head h holds 10·h + j.
        let k =
            Tensor::<Flex, 1>::from_floats([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0], &dev).reshape([1, 2, 4, 1]);
        let v = k.clone().neg();
        let mut layer = RaggedLayer::split(&k, &v, &[vec![1, 3], vec![0, 1, 2]], 1);
        assert_eq!(layer.lens(), vec![2, 3]);
        assert_eq!(layer.bytes(), ((2 + 1) + (3 + 1)) as u64 * 2 * 4);
        let new = Tensor::<Flex, 1>::from_floats([5.0, 15.0], &dev).reshape([1, 2, 1, 1]);
        assert!(layer.append(new.clone(), new.clone().neg(), true));
        // Head 1 is full: it grows.
        assert!(layer.append(new.clone(), new.neg(), false));
        assert_eq!(layer.lens(), vec![4, 5]);
        let (pk, pv) = layer.padded();
        assert_eq!(pk.dims(), [1, 2, 5, 1]);
        let keys = pk.into_data().to_vec::<f32>().unwrap();
        assert_eq!(keys, vec![0.0, 1.0, 3.0, 5.0, 5.0, 10.0, 11.0, 12.0, 15.0, 15.0]);
        assert_eq!(pv.into_data().to_vec::<f32>().unwrap()[1..5], [-1.0, -3.0, -5.0, -5.0]);
        let bias = layer.padding_bias().unwrap().into_data().to_vec::<f32>().unwrap();
        assert_eq!(bias[0], f32::NEG_INFINITY);
        assert!(bias[1..].iter().all(|&b| b == 0.0));
        let wrong = Tensor::<Flex, 4>::zeros([1, 3, 1, 1], &dev);
        assert!(
            !layer.append(wrong.clone(), wrong, true),
            "another head count is refused"
        );
    }
}
