//! Per-layer keys and values, shared by every cache.

use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorCreationOptions};

use crate::ragged::RaggedLayer;
use crate::{CacheKernels, CachedKv, Error, PoolRegion, RegionSlots, Result};

/// Growth step of a buffer that outgrows its capacity, at least.
const MIN_GROWTH: usize = 64;

/// One layer's keys and values in buffers with room to grow: `[batch, kv_heads, capacity,
/// head_dim]`, of which the first `len` slots are in use.
#[derive(Debug, Clone)]
struct Buffers<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    len: usize,
    /// Whether `k` and `v` are still the views of a pool region ([`LayerKv::place_in`]).
    in_region: bool,
}

impl<B: Backend> Buffers<B> {
    fn capacity(&self) -> usize {
        self.k.dims()[2]
    }
}

/// Writes `new` (`[batch, heads, s, head_dim]`) into slots `at..at + s` of `buffer`
/// (`[batch, heads, capacity, head_dim]`, with room for them).
///
/// flex's `slice_assign` copies the whole destination first (its contiguity check keeps a
/// second reference to the buffer, so the copy-on-write always copies): on host-resident
/// backends the slots are written into the buffer's own bytes instead.
pub(crate) fn write_slots<B: Backend>(buffer: Tensor<B, 4>, new: Tensor<B, 4>, at: usize, host: bool) -> Tensor<B, 4> {
    let [b, h, capacity, d] = buffer.dims();
    let s = new.dims()[2];
    let device = buffer.device();
    if !host {
        return buffer.slice_assign([0..b, 0..h, at..at + s, 0..d], new);
    }
    let dtype = buffer.dtype();
    let mut dst = buffer.into_data();
    let src = new.cast(dtype).into_data();
    let row = d * dtype.size();
    for bh in 0..b * h {
        let (to, from) = ((bh * capacity + at) * row, bh * s * row);
        dst.bytes[to..to + s * row].copy_from_slice(&src.bytes[from..from + s * row]);
    }
    Tensor::from_data(dst, TensorCreationOptions::new(device).with_dtype(dtype))
}

/// A new buffer like `t` (`[batch, heads, capacity, head_dim]`) with room for `room` slots, its
/// first `len` slots `t`'s (zeros beyond): growing a buffer, or cutting one so the rest is freed.
fn with_room<B: Backend>(t: &Tensor<B, 4>, room: usize, len: usize) -> Tensor<B, 4> {
    let [b, h, _, d] = t.dims();
    let fresh = Tensor::<B, 4>::zeros([b, h, room, d], &t.device()).cast(t.dtype());
    match len {
        0 => fresh,
        _ => fresh.slice_assign([0..b, 0..h, 0..len, 0..d], t.clone().slice_dim(2, 0..len)),
    }
}

/// The rows of `keep` (`[batch, heads, kept]`) as host indices, if every row is strictly
/// ascending (what compaction asks for); `None` otherwise.
pub(crate) fn ascending_rows<B: Backend>(keep: Tensor<B, 3, Int>) -> Option<Vec<usize>> {
    let kept = keep.dims()[2];
    let idx: Vec<i64> = keep.into_data().convert::<i64>().into_vec().ok()?;
    let ascending = idx
        .chunks(kept.max(1))
        .all(|row| row.first().is_none_or(|&f| f >= 0) && row.windows(2).all(|w| w[0] < w[1]));
    ascending.then(|| idx.into_iter().map(|i| i as usize).collect())
}

/// Moves slot `order[j]` to slot `j` in every (batch, head) of `buffer`
/// (`[batch, heads, capacity, head_dim]`) within its own bytes: with ascending indices a slot
/// is never overwritten before it is read. `order` holds `kept` ascending indices below the
/// capacity per (batch, head).
fn compact_in_place<B: Backend>(buffer: Tensor<B, 4>, order: &[usize], kept: usize) -> Tensor<B, 4> {
    let [_, _, capacity, d] = buffer.dims();
    let device = buffer.device();
    let dtype = buffer.dtype();
    let mut data = buffer.into_data();
    let row = d * dtype.size();
    for (bh, slots) in order.chunks(kept.max(1)).enumerate() {
        let base = bh * capacity * row;
        for (j, &slot) in slots.iter().enumerate().filter(|&(j, &slot)| slot != j) {
            let from = base + slot * row;
            data.bytes.copy_within(from..from + row, base + j * row);
        }
    }
    Tensor::from_data(data, TensorCreationOptions::new(device).with_dtype(dtype))
}

/// Where a [`LayerKv`]'s buffers were placed: the pool, its first slot and every layer's pool
/// keys and values.
#[derive(Debug, Clone)]
struct Placement<B: Backend> {
    pool: u64,
    start: usize,
    pools: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
}

/// One `(keys, values)` pair per layer, each `[batch, kv_heads, slots, head_dim]`.
///
/// New entries are written into spare capacity instead of concatenated: a decode step writes
/// one slot rather than building a new tensor of every slot.
#[derive(Debug, Clone)]
pub(crate) struct LayerKv<B: Backend> {
    layers: Vec<Option<Buffers<B>>>,
    /// Layers whose heads keep different numbers of slots ([`split_heads`](Self::split_heads)):
    /// `layers` holds `None` for them.
    ragged: Vec<Option<RaggedLayer<B>>>,
    /// Slots to allocate at least when a buffer is created or grows (a cache that knows its
    /// bound allocates once).
    reserve: usize,
    kernels: CacheKernels<B>,
    /// The pool region the buffers were placed in, if any.
    region: Option<Placement<B>>,
}

impl<B: Backend> LayerKv<B> {
    pub(crate) fn new(n_layers: usize, kernels: CacheKernels<B>) -> Self {
        Self {
            layers: vec![None; n_layers],
            ragged: vec![None; n_layers],
            reserve: 0,
            kernels,
            region: None,
        }
    }

    /// Takes `region`'s views as every layer's buffers; `false` (nothing changed) when a layer
    /// already holds slots or the region has another number of layers.
    pub(crate) fn place_in(&mut self, region: PoolRegion<B>) -> bool {
        if region.layers.len() != self.layers.len()
            || self.layers.iter().any(Option::is_some)
            || self.ragged.iter().any(Option::is_some)
        {
            return false;
        }
        let mut pools = Vec::with_capacity(region.layers.len());
        for (entry, l) in self.layers.iter_mut().zip(region.layers) {
            *entry = Some(Buffers {
                k: l.keys,
                v: l.values,
                len: 0,
                in_region: true,
            });
            pools.push((l.pool_keys, l.pool_values));
        }
        self.region = Some(Placement {
            pool: region.pool,
            start: region.start,
            pools,
        });
        true
    }

    /// Where `layer`'s slots lie in the pool, while its buffers are the region's views.
    pub(crate) fn region_slots(&self, layer: usize) -> Option<RegionSlots<B>> {
        let placed = self.region.as_ref()?;
        let e = self.layers.get(layer)?.as_ref().filter(|e| e.in_region)?;
        let (pool_keys, pool_values) = placed.pools.get(layer)?.clone();
        Some(RegionSlots {
            pool: placed.pool,
            pool_keys,
            pool_values,
            start: placed.start,
            len: e.len,
            capacity: e.capacity(),
        })
    }

    /// Writes `new` into slots `at..` of region buffer `dst` in place; `new` back if the
    /// backend has no writer or it declined.
    fn write_in_region(
        &self,
        dst: &Tensor<B, 4>,
        new: Tensor<B, 4>,
        at: usize,
    ) -> std::result::Result<(), Tensor<B, 4>> {
        match self.kernels.slot_writer {
            Some(write) => write(dst, new, at),
            None => Err(new),
        }
    }

    pub(crate) fn kernels(&self) -> &CacheKernels<B> {
        &self.kernels
    }

    /// Allocate room for at least `slots` slots per layer when buffers are created or grow.
    pub(crate) fn reserve(&mut self, slots: usize) {
        self.reserve = slots;
    }

    pub(crate) fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Appends along the slot axis; returns `layer`'s whole buffers and the slots in use.
    pub(crate) fn append_in_place(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<CachedKv<B>> {
        if let Some(Some(ragged)) = self.ragged.get_mut(layer) {
            if !ragged.append(keys, values, self.kernels.host_resident()) {
                return Err(Error::RaggedShape { layer });
            }
            let (keys, values) = ragged.padded();
            let len = keys.dims()[2];
            return Ok(CachedKv { keys, values, len });
        }
        self.append_uniform(layer, keys, values)
    }

    /// Appends to a ragged `layer` (see [`KvCache::append_per_head`](crate::KvCache::append_per_head));
    /// `None`, with nothing appended, for a uniform one.
    pub(crate) fn append_per_head(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<Option<Vec<CachedKv<B>>>> {
        let host = self.kernels.host_resident();
        let Some(Some(ragged)) = self.ragged.get_mut(layer) else {
            return Ok(None);
        };
        if !ragged.append(keys, values, host) {
            return Err(Error::RaggedShape { layer });
        }
        Ok(Some(ragged.per_head()))
    }

    /// [`append_in_place`](Self::append_in_place) for a layer whose heads hold the same count.
    fn append_uniform(&mut self, layer: usize, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<CachedKv<B>> {
        // Only the index is kept: a second reference to the buffers would make flex copy them.
        let at = self
            .reserve_slots(layer, keys.dims(), keys.dtype(), &keys.device())?
            .len;
        let s = keys.dims()[2];
        let layers = self.layers.len();
        let Some(Some(Buffers { k, v, len, in_region })) = self.layers.get_mut(layer).map(Option::take) else {
            return Err(Error::LayerOutOfRange { layer, layers });
        };
        let host = self.kernels.host_resident();
        // A region's views stay the region's: written in place, or (no writer) the layer
        // leaves the region for buffers of its own.
        let (k, v, in_region) = match in_region {
            true => match self.write_in_region(&k, keys, at) {
                Ok(()) => match self.write_in_region(&v, values, at) {
                    Ok(()) => (k, v, true),
                    Err(values) => (k, write_slots(v, values, at, host), false),
                },
                Err(keys) => (write_slots(k, keys, at, host), write_slots(v, values, at, host), false),
            },
            false => (write_slots(k, keys, at, host), write_slots(v, values, at, host), false),
        };
        self.layers[layer] = Some(Buffers { k, v, len, in_region });
        self.commit_slots(layer, s)
    }

    /// Room for `shape[2]` more slots in `layer`'s buffers (`shape`: the new slots'
    /// `[batch, kv_heads, s, head_dim]`), growing them if needed: the whole buffers, with `len`
    /// the first new slot. Nothing counts as appended until [`commit_slots`](Self::commit_slots).
    pub(crate) fn reserve_slots(
        &mut self,
        layer: usize,
        shape: [usize; 4],
        dtype: DType,
        device: &B::Device,
    ) -> Result<CachedKv<B>> {
        let layers = self.layers.len();
        let reserve = self.reserve;
        let entry = self
            .layers
            .get_mut(layer)
            .ok_or(Error::LayerOutOfRange { layer, layers })?;
        if self.ragged.get(layer).is_some_and(Option::is_some) {
            return Err(Error::RaggedShape { layer });
        }
        let [b, h, s, d] = shape;
        let len = entry.as_ref().map_or(0, |e| e.len);
        let needed = len + s;
        if entry.as_ref().is_none_or(|e| e.capacity() < needed) {
            let old = entry.as_ref().map_or(0, |e| e.capacity());
            let capacity = if reserve >= needed {
                reserve
            } else {
                needed.max(old + (old / 2).max(MIN_GROWTH))
            };
            let grow = |t: Option<Tensor<B, 4>>| match t {
                Some(t) => with_room(&t, capacity, len),
                None => Tensor::<B, 4>::zeros([b, h, capacity, d], device).cast(dtype),
            };
            let (k, v) = match entry.take() {
                Some(e) => (grow(Some(e.k)), grow(Some(e.v))),
                None => (grow(None), grow(None)),
            };
            *entry = Some(Buffers {
                k,
                v,
                len,
                in_region: false,
            });
        }
        match entry {
            Some(e) => Ok(CachedKv {
                keys: e.k.clone(),
                values: e.v.clone(),
                len,
            }),
            None => Err(Error::LayerOutOfRange { layer, layers }),
        }
    }

    /// Counts the `s` slots [`reserve_slots`](Self::reserve_slots) made room for (and the
    /// caller wrote) as appended: `layer`'s whole buffers and the slots now in use.
    pub(crate) fn commit_slots(&mut self, layer: usize, s: usize) -> Result<CachedKv<B>> {
        let layers = self.layers.len();
        match self.layers.get_mut(layer) {
            Some(Some(e)) if e.len + s <= e.capacity() => {
                e.len += s;
                Ok(CachedKv {
                    keys: e.k.clone(),
                    values: e.v.clone(),
                    len: e.len,
                })
            }
            Some(Some(_)) => Err(Error::SlotsNotReserved { layer, slots: s }),
            _ => Err(Error::LayerOutOfRange { layer, layers }),
        }
    }

    /// Whether `layer`'s heads keep slot counts of their own.
    pub(crate) fn is_ragged(&self, layer: usize) -> bool {
        self.ragged.get(layer).is_some_and(Option::is_some)
    }

    /// Gives each (batch, head) of `layer` the slots `keep[r]` lists (row `r` batch-major,
    /// ascending indices below the slots in use), in buffers of its own with room for `room`
    /// more: the layer's heads then hold different numbers of slots, and the bytes of those
    /// alone. `false` (nothing changed) for a layer that holds nothing or rows that do not
    /// match its heads.
    pub(crate) fn split_heads(&mut self, layer: usize, keep: &[Vec<usize>], room: usize) -> bool {
        let Some(Some(e)) = self.layers.get(layer) else {
            return false;
        };
        let [b, h, _, _] = e.k.dims();
        if keep.len() != b * h || keep.iter().flatten().any(|&s| s >= e.len) {
            return false;
        }
        let split = RaggedLayer::split(&e.k, &e.v, keep, room);
        self.layers[layer] = None;
        self.ragged[layer] = Some(split);
        true
    }

    /// The bias that masks a ragged `layer`'s padding in what `append` returned.
    pub(crate) fn padding_bias(&self, layer: usize) -> Option<Tensor<B, 4>> {
        self.ragged.get(layer)?.as_ref()?.padding_bias()
    }

    /// Keeps, in every (batch, head) of `layer`, the slots `keep` lists, in that order.
    ///
    /// # Shapes
    /// - `keep`: `[batch, kv_heads, kept]`, slot indices below the current slot count
    pub(crate) fn retain(&mut self, layer: usize, keep: Tensor<B, 3, Int>) {
        let Some(Some(e)) = self.layers.get_mut(layer) else {
            return;
        };
        let kept = keep.dims()[2];
        let capacity = e.capacity();
        if self.kernels.host_resident() {
            // Ascending indices below the slot count: compacted in place.
            let valid = |order: &Vec<usize>| order.iter().all(|&i| i < e.len);
            if let Some(order) = ascending_rows(keep.clone()).filter(valid) {
                // Taken out so nothing else holds the buffers: compacted without a copy.
                if let Some(Buffers { k, v, .. }) = self.layers[layer].take() {
                    self.layers[layer] = Some(Buffers {
                        k: compact_in_place(k, &order, kept),
                        v: compact_in_place(v, &order, kept),
                        len: kept,
                        in_region: false,
                    });
                }
                return;
            }
        }
        self.retain_layers_by_rows(layer..layer + 1, keep, capacity);
    }

    /// [`retain`](Self::retain) for consecutive `layers` at once, `keep` holding their rows
    /// stacked (`[layers·batch, kv_heads, kept]`). On device backends the row numbers are
    /// built once for every layer (buffers of equal capacity), leaving two row selections per
    /// layer: a compaction after an eviction of all layers is ~100 kernels instead of ~220.
    pub(crate) fn retain_layers(&mut self, layers: std::ops::Range<usize>, keep: Tensor<B, 3, Int>) {
        let [rows, h, _] = keep.dims();
        let n = layers.len();
        let b = rows / n.max(1);
        let shapes: Vec<Option<[usize; 4]>> = layers
            .clone()
            .map(|l| self.layers.get(l).and_then(|e| e.as_ref()).map(|e| e.k.dims()))
            .collect();
        let first = shapes.first().copied().flatten();
        let uniform = first.is_some_and(|f| f[..2] == [b, h]) && shapes.iter().all(|s| *s == first);
        let (Some([_, _, capacity, _]), true, false) = (first, uniform, self.kernels.host_resident()) else {
            for (i, layer) in layers.enumerate() {
                self.retain(layer, keep.clone().slice_dim(0, i * b..(i + 1) * b));
            }
            return;
        };
        self.retain_layers_by_rows(layers, keep, capacity);
    }

    /// [`retain_layers`](Self::retain_layers)' device path: `layers` hold `capacity` slots each.
    /// By the backend's [`SlotGatherer`](crate::SlotGatherer) where there is one (one launch per layer), else
    /// rows of each flattened `[b·h·capacity, d]` buffer are selected: whole rows are copied,
    /// far cheaper than an element-wise gather; the spare capacity is refilled with row 0.
    fn retain_layers_by_rows(&mut self, layers: std::ops::Range<usize>, keep: Tensor<B, 3, Int>, capacity: usize) {
        let [rows, _, kept] = keep.dims();
        let b = rows / layers.len().max(1);
        if let Some(gather) = self.kernels.slot_gatherer {
            for (i, layer) in layers.clone().enumerate() {
                let Some(Some(e)) = self.layers.get_mut(layer) else {
                    continue;
                };
                match gather(&e.k, &e.v, keep.clone().slice_dim(0, i * b..(i + 1) * b)) {
                    Some((k, v)) => {
                        // A region's views get the kept slots written back into them.
                        let written = e.in_region
                            && self.kernels.slot_writer.is_some_and(|write| {
                                write(&e.k, k.clone().slice_dim(2, 0..kept), 0).is_ok()
                                    && write(&e.v, v.clone().slice_dim(2, 0..kept), 0).is_ok()
                            });
                        if !written {
                            e.k = k;
                            e.v = v;
                            e.in_region = false;
                        }
                        e.len = kept;
                    }
                    // The layers not compacted yet go by row selection.
                    None => {
                        let rest = keep.slice_dim(0, i * b..rows);
                        return self.select_rows(layer..layers.end, rest, capacity);
                    }
                }
            }
            return;
        }
        self.select_rows(layers, keep, capacity);
    }

    /// [`retain_layers_by_rows`](Self::retain_layers_by_rows) by row selection.
    fn select_rows(&mut self, layers: std::ops::Range<usize>, keep: Tensor<B, 3, Int>, capacity: usize) {
        let [rows, h, kept] = keep.dims();
        let n = layers.len();
        let b = rows / n.max(1);
        let device = keep.device();
        let keep = match kept < capacity {
            true => Tensor::cat(
                vec![
                    keep.clone(),
                    Tensor::<B, 3, Int>::zeros([rows, h, capacity - kept], &device).cast(keep.dtype()),
                ],
                2,
            ),
            false => keep,
        };
        let offsets = Tensor::<B, 1, Int>::arange_step(0..(b * h * capacity) as i64, capacity, &device)
            .reshape([1, b * h, 1])
            .cast(keep.dtype());
        let all_rows = (keep.reshape([n, b * h, capacity]) + offsets).reshape([n, b * h * capacity]);
        for (i, layer) in layers.enumerate() {
            let Some(Some(e)) = self.layers.get_mut(layer) else {
                continue;
            };
            let rows = all_rows.clone().slice_dim(0, i..i + 1).reshape([b * h * capacity]);
            let d = e.k.dims()[3];
            let pick = |t: Tensor<B, 4>| {
                t.reshape([b * h * capacity, d])
                    .select(0, rows.clone())
                    .reshape([b, h, capacity, d])
            };
            e.k = pick(e.k.clone());
            e.v = pick(e.v.clone());
            e.len = kept;
            e.in_region = false;
        }
    }

    /// The L2 norms of `layer`'s keys (or with `values` its values) in slots `slots`,
    /// `[batch, kv_heads, slots.len()]` in f32.
    pub(crate) fn norms(&self, layer: usize, slots: std::ops::Range<usize>, values: bool) -> Option<Tensor<B, 3>> {
        let e = self.layers.get(layer)?.as_ref()?;
        let [b, h, _, _] = e.k.dims();
        let n = slots.len();
        let t = if values { &e.v } else { &e.k };
        (slots.end <= e.len).then(|| {
            t.clone()
                .slice_dim(2, slots)
                .cast(DType::F32)
                .powi_scalar(2)
                .sum_dim(3)
                .sqrt()
                .reshape([b, h, n])
        })
    }

    /// `layer`'s keys in the slots in use, `[batch, kv_heads, slots, head_dim]`.
    pub(crate) fn live_keys(&self, layer: usize) -> Option<Tensor<B, 4>> {
        let e = self.layers.get(layer)?.as_ref()?;
        Some(e.k.clone().slice_dim(2, 0..e.len))
    }

    /// Cuts `layer`'s buffers to room for `capacity` slots (at least the slots in use) in new,
    /// smaller buffers, so the memory beyond is freed; a pool region's views stay as they are.
    pub(crate) fn shrink(&mut self, layer: usize, capacity: usize) {
        let Some(Some(e)) = self.layers.get_mut(layer) else {
            return;
        };
        let room = capacity.max(e.len);
        if e.in_region || room >= e.capacity() {
            return;
        }
        let (k, v) = (with_room(&e.k, room, e.len), with_room(&e.v, room, e.len));
        e.k = k;
        e.v = v;
    }

    /// The batch size and KV heads of the first layer that holds anything.
    pub(crate) fn batch_heads(&self) -> Option<(usize, usize)> {
        let uniform = self.layers.iter().flatten().next().map(|e| {
            let [b, h, _, _] = e.k.dims();
            (b, h)
        });
        uniform.or_else(|| self.ragged.iter().flatten().next().map(RaggedLayer::batch_heads))
    }

    pub(crate) fn device(&self) -> Option<B::Device> {
        let uniform = self.layers.iter().flatten().next().map(|e| e.k.device());
        uniform.or_else(|| self.ragged.iter().flatten().find_map(RaggedLayer::device))
    }

    /// Slots in use in `layer`, including any its owner has marked evicted.
    /// (A ragged layer: its widest head, the width attention reads.)
    pub(crate) fn physical_slots(&self, layer: usize) -> usize {
        match self.ragged.get(layer).and_then(|e| e.as_ref()) {
            Some(r) => r.widest(),
            None => self.layers.get(layer).and_then(|e| e.as_ref()).map_or(0, |e| e.len),
        }
    }

    /// Bytes allocated for keys and values over all layers, spare capacity included.
    pub(crate) fn bytes(&self) -> u64 {
        let bytes = |t: &Tensor<B, 4>| t.shape().num_elements() as u64 * t.dtype().size() as u64;
        let uniform: u64 = self.layers.iter().flatten().map(|e| bytes(&e.k) + bytes(&e.v)).sum();
        uniform + self.ragged.iter().flatten().map(RaggedLayer::bytes).sum::<u64>()
    }

    pub(crate) fn clear(&mut self) {
        self.layers.iter_mut().for_each(|e| *e = None);
        self.ragged.iter_mut().for_each(|e| *e = None);
        self.region = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    /// The device path of a many-layer compaction keeps what one compaction per layer keeps.
    #[test]
    fn retaining_layers_by_rows_equals_retaining_each_layer() {
        let dev = Default::default();
        let (layers, b, h, s, d) = (3, 2, 2, 7, 4);
        let mut each = LayerKv::<Flex>::new(layers, CacheKernels::host());
        each.reserve(10);
        for l in 0..layers {
            let t = || Tensor::<Flex, 4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), &dev);
            each.append_in_place(l, t(), t()).unwrap();
        }
        let mut by_rows = each.clone();
        // Every (layer, batch, head) row keeps 4 ascending slots of its 7.
        let keep: Vec<i64> = (0..layers * b * h)
            .flat_map(|r| {
                let mut slots: Vec<i64> = (0..s as i64).filter(|j| (j + r as i64) % 3 != 0).collect();
                slots.truncate(4);
                slots
            })
            .collect();
        let keep = Tensor::<Flex, 3, Int>::from_data(TensorData::new(keep, [layers * b, h, 4]), &dev);
        for l in 0..layers {
            each.retain(l, keep.clone().slice_dim(0, l * b..(l + 1) * b));
        }
        by_rows.retain_layers_by_rows(0..layers, keep, 10);
        for l in 0..layers {
            let (a, z) = (each.layers[l].clone().unwrap(), by_rows.layers[l].clone().unwrap());
            assert_eq!((a.len, z.len), (4, 4));
            for (x, y) in [(a.k, z.k), (a.v, z.v)] {
                let used = |t: Tensor<Flex, 4>| t.slice_dim(2, 0..4).into_data().to_vec::<f32>().unwrap();
                assert_eq!(used(x), used(y), "layer {l}");
            }
        }
    }

    /// A region of `capacity` slots from slot `start` of a 10-slot pool, for `layers` layers
    /// of one head of width 2 (views stood in for by tensors of their own: flex has none).
    fn region(layers: usize, start: usize, capacity: usize) -> PoolRegion<Flex> {
        let dev = Default::default();
        let t = |slots| Tensor::<Flex, 4>::zeros([1, 1, slots, 2], &dev);
        PoolRegion {
            pool: 7,
            start,
            layers: (0..layers)
                .map(|_| crate::RegionLayer {
                    pool_keys: t(10),
                    pool_values: t(10),
                    keys: t(capacity),
                    values: t(capacity),
                })
                .collect(),
        }
    }

    static REGION_WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// A stand-in for a device writer: counts the writes it is asked for and accepts them.
    #[allow(clippy::result_large_err)] // the writer's signature
    fn counting_writer(_: &Tensor<Flex, 4>, _: Tensor<Flex, 4>, _: usize) -> std::result::Result<(), Tensor<Flex, 4>> {
        REGION_WRITES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// A placed cache appends into its region in place and reports where its slots lie, until
    /// a layer outgrows the region; an occupied cache refuses a region.
    #[test]
    fn a_region_is_written_in_place_until_outgrown() {
        let kernels = CacheKernels {
            slot_writer: Some(counting_writer),
            ..CacheKernels::plain(crate::Memory::Gpu)
        };
        let dev = Default::default();
        let mut kv = LayerKv::<Flex>::new(2, kernels);
        assert!(kv.place_in(region(2, 4, 3)));
        assert!(!kv.place_in(region(2, 0, 3)), "a placed cache takes no second region");
        let slots = |s: usize| Tensor::<Flex, 4>::ones([1, 1, s, 2], &dev);
        let before = REGION_WRITES.load(std::sync::atomic::Ordering::SeqCst);
        kv.append_in_place(0, slots(2), slots(2)).unwrap();
        assert_eq!(REGION_WRITES.load(std::sync::atomic::Ordering::SeqCst), before + 2);
        let r = kv.region_slots(0).unwrap();
        assert_eq!((r.pool, r.start, r.len, r.capacity), (7, 4, 2, 3));
        assert_eq!(kv.region_slots(1).map(|r| r.len), Some(0));
        // Two more slots do not fit three: the layer grows into buffers of its own.
        kv.append_in_place(0, slots(2), slots(2)).unwrap();
        assert!(kv.region_slots(0).is_none());
        assert_eq!(kv.physical_slots(0), 4);
        assert!(kv.region_slots(1).is_some());
        kv.clear();
        assert!(kv.region_slots(1).is_none());
        assert!(kv.place_in(region(2, 0, 3)), "a cleared cache takes a region again");
    }

    /// Without a writer, a layer leaves its region at its first append, keeping the slots.
    #[test]
    fn without_a_writer_a_layer_leaves_its_region() {
        let dev = Default::default();
        let mut kv = LayerKv::<Flex>::new(1, CacheKernels::plain(crate::Memory::Gpu));
        assert!(kv.place_in(region(1, 2, 4)));
        assert!(
            !LayerKv::<Flex>::new(2, CacheKernels::host()).place_in(region(1, 2, 4)),
            "layers must match"
        );
        let new = Tensor::<Flex, 1>::from_floats([1.0, 2.0, 3.0, 4.0], &dev).reshape([1, 1, 2, 2]);
        let cached = kv.append_in_place(0, new.clone(), new.clone().neg()).unwrap();
        assert!(kv.region_slots(0).is_none());
        let (k, v) = cached.used();
        assert_eq!(k.into_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(v.into_data().to_vec::<f32>().unwrap(), vec![-1.0, -2.0, -3.0, -4.0]);
    }

    static GATHER_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// A stand-in for a device kernel: the kept slots copied on the host, counted; it declines
    /// buffers whose first key is 10 or more (the second layer below).
    fn counting_gatherer(
        k: &Tensor<Flex, 4>,
        v: &Tensor<Flex, 4>,
        keep: Tensor<Flex, 3, Int>,
    ) -> Option<(Tensor<Flex, 4>, Tensor<Flex, 4>)> {
        GATHER_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let first: Vec<f32> = k.clone().slice_dim(2, 0..1).into_data().to_vec().ok()?;
        if first.first().is_some_and(|&f| f >= 10.0) {
            return None;
        }
        let kept = keep.dims()[2];
        let order = ascending_rows(keep)?;
        Some((
            compact_in_place(k.clone(), &order, kept),
            compact_in_place(v.clone(), &order, kept),
        ))
    }

    /// A slot gatherer compacts each layer's keys and values in the device path; the layers
    /// it declines are compacted by row selection, the others not twice.
    #[test]
    fn a_slot_gatherer_compacts_every_layer() {
        let kernels = CacheKernels {
            slot_gatherer: Some(counting_gatherer),
            ..CacheKernels::plain(crate::Memory::Gpu)
        };
        let dev = Default::default();
        let mut kv = LayerKv::<Flex>::new(2, kernels);
        kv.reserve(6);
        let slots = |l: f32| {
            Tensor::<Flex, 1, Int>::arange(0..4, &dev)
                .float()
                .add_scalar(10.0 * l)
                .reshape([1, 1, 4, 1])
        };
        for l in 0..2 {
            kv.append_in_place(l, slots(l as f32), slots(l as f32).neg()).unwrap();
        }
        let before = GATHER_CALLS.load(std::sync::atomic::Ordering::SeqCst);
        let keep = Tensor::<Flex, 3, Int>::from_data(TensorData::new(vec![1i64, 3, 0, 2], [2, 1, 2]), &dev);
        kv.retain_layers_by_rows(0..2, keep, 6);
        assert_eq!(GATHER_CALLS.load(std::sync::atomic::Ordering::SeqCst), before + 2);
        let used = |t: &Tensor<Flex, 4>| t.clone().slice_dim(2, 0..2).into_data().to_vec::<f32>().unwrap();
        let (l0, l1) = (kv.layers[0].clone().unwrap(), kv.layers[1].clone().unwrap());
        assert_eq!((l0.len, l1.len), (2, 2));
        assert_eq!((used(&l0.k), used(&l0.v)), (vec![1.0, 3.0], vec![-1.0, -3.0]));
        assert_eq!((used(&l1.k), used(&l1.v)), (vec![10.0, 12.0], vec![-10.0, -12.0]));
    }
}
