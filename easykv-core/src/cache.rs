use burn::tensor::{backend::Backend, DType, Tensor};

use crate::Result;

/// The key/value cache a model writes to and attends over.
///
/// One forward pass over a chunk of `s` new tokens calls, for every layer in order,
/// [`append`](Self::append) and then (when [`wants_attention`](Self::wants_attention))
/// [`observe`](Self::observe); after the last layer it calls [`end_chunk`](Self::end_chunk),
/// where an evicting cache may drop slots. The new tokens are always the last `s` slots of
/// what `append` returns, so a model builds its causal mask from the lengths alone.
///
/// A model may also run a prefill *layer by layer*: layer ℓ takes several chunks in a row —
/// `append`, `observe`, then [`end_layer_chunk`](Self::end_layer_chunk) for each — before
/// layer ℓ+1 takes the first. Every layer's cache evolves only with its own attention, so
/// the result is the same as chunk by chunk, while the model's projections run over many
/// chunks at once. Caches must accept layers that are out of step this way.
pub trait KvCache<B: Backend> {
    /// Stores this chunk's keys and values of `layer`; returns every cached key and value of it.
    ///
    /// # Shapes
    /// - `keys`, `values`: `[batch, kv_heads, s, head_dim]`
    /// - returned: `[batch, kv_heads, slots, head_dim]`, the new entries last
    fn append(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>)>;

    /// [`append`](Self::append) without cutting the slots in use out of the cache's buffers:
    /// kernels that read the buffers in place take them whole with the count of slots in use
    /// (on cubecl backends a cut is a copy of the whole cache whenever its byte offsets are
    /// not aligned, i.e. at most decode steps).
    fn append_in_place(&mut self, layer: usize, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<CachedKv<B>> {
        let (keys, values) = self.append(layer, keys, values)?;
        let len = keys.dims()[2];
        Ok(CachedKv { keys, values, len })
    }

    /// [`append_in_place`](Self::append_in_place) for a layer whose heads keep different slot
    /// counts ([`head_slots`](Self::head_slots)): every (batch, head)'s own buffers after the
    /// append, batch-major (`[1, 1, capacity, head_dim]`, `len` in use), for a caller that
    /// attends head by head instead of over the heads padded side by side. `None`, with
    /// nothing appended, where the layer's heads are uniform.
    fn append_per_head(
        &mut self,
        _layer: usize,
        _keys: Tensor<B, 4>,
        _values: Tensor<B, 4>,
    ) -> Result<Option<Vec<CachedKv<B>>>> {
        Ok(None)
    }

    /// Room for `shape[2]` new slots of `layer`, for a caller that writes their keys and
    /// values straight into the cache's buffers (a kernel that produces them there, saving the
    /// copy `append` makes): `layer`'s whole buffers, grown where needed, with `len` the first
    /// new slot. [`commit_slots`](Self::commit_slots) then appends them. `None`: this cache
    /// cannot; the caller appends.
    ///
    /// # Shapes
    /// - `shape`: the new slots', `[batch, kv_heads, s, head_dim]`
    fn reserve_slots(
        &mut self,
        _layer: usize,
        _shape: [usize; 4],
        _dtype: DType,
        _device: &B::Device,
    ) -> Result<Option<CachedKv<B>>> {
        Ok(None)
    }

    /// Appends the `s` slots [`reserve_slots`](Self::reserve_slots) made room for, once the
    /// caller has written them: what [`append_in_place`](Self::append_in_place) returns.
    fn commit_slots(&mut self, layer: usize, s: usize) -> Result<CachedKv<B>> {
        Err(crate::Error::SlotsNotReserved { layer, slots: s })
    }

    /// Whether this cache uses attention probabilities of `layer` (computing them has a cost).
    fn wants_attention(&self, _layer: usize) -> bool {
        false
    }

    /// Whether this cache uses `layer`'s queries before RoPE ([`observe_queries`](Self::observe_queries)).
    fn wants_queries(&self, _layer: usize) -> bool {
        false
    }

    /// This chunk's queries of `layer` before RoPE (bias added, unscaled), handed over before
    /// its keys and values are appended.
    ///
    /// # Shapes
    /// - `queries`: `[batch, q_heads, s, head_dim]`
    fn observe_queries(&mut self, _layer: usize, _queries: Tensor<B, 4>) -> Result<()> {
        Ok(())
    }

    /// Attention of this chunk's queries over the slots `append` returned, averaged over the
    /// query heads that share each KV head.
    ///
    /// # Shapes
    /// - `probs`: `[batch, kv_heads, s, slots]`
    fn observe(&mut self, _layer: usize, _probs: Tensor<B, 4>) -> Result<()> {
        Ok(())
    }

    /// A one-token step's attention of every layer at once, as a step that attends many
    /// sequences of a memory pool together observes it: row `l` of `probs` is layer `l`'s
    /// [`observe`](Self::observe) for this cache's slots (its first columns), given where
    /// `layers[l]` says the step observed that layer. By default handed on layer by layer.
    ///
    /// # Shapes
    /// - `probs`: `[layers, kv_heads, columns]` (f32), `columns` ≥ any layer's slots
    fn observe_pooled(&mut self, probs: Tensor<B, 3>, layers: &[bool]) -> Result<()> {
        observe_rows(self, probs, layers)
    }

    /// An additive bias over the slots `append` just returned for `layer`, `[batch, kv_heads,
    /// 1, slots]` (0 or −∞), that the model adds to every query's scores: −∞ masks slots that
    /// were evicted but are not yet compacted away. `None`: attend everything.
    fn slot_bias(&self, _layer: usize) -> Option<Tensor<B, 4>> {
        None
    }

    /// Called once after a chunk went through every layer; an evicting cache evicts here.
    fn end_chunk(&mut self) -> Result<()> {
        Ok(())
    }

    /// Called after a chunk went through `layer` alone (layer-by-layer prefill); an evicting
    /// cache evicts in that layer here.
    fn end_layer_chunk(&mut self, _layer: usize) -> Result<()> {
        Ok(())
    }

    /// How to split a prompt of `prompt_len` tokens into prefill chunks. Evicting caches
    /// dictate their own strides; the default is chunks of `chunk_size`.
    fn prefill_chunks(&self, prompt_len: usize, chunk_size: usize) -> Vec<usize> {
        uniform_chunks(prompt_len, chunk_size)
    }

    /// The position given to the next token (RoPE). Absolute by default: the tokens seen so far.
    fn next_position(&self) -> usize {
        self.tokens_seen()
    }

    /// StreamingLLM-style positions: keys are cached before RoPE and rotated by their slot
    /// index on every use, so positions never exceed the cache size. The model then appends
    /// unrotated keys and rotates what `append` returns.
    fn compact_positions(&self) -> bool {
        false
    }

    /// A hint that the cache will be asked to hold up to `tokens` tokens (prompt and
    /// generation): caches that keep buffers with spare room allocate once instead of growing.
    fn reserve(&mut self, _tokens: usize) {}

    /// The most slots per (layer, KV head) this cache holds at once over `tokens` tokens (prompt
    /// and generation): what [`reserve`](Self::reserve) allocates, and so what a memory pool
    /// must set aside for it. A cache that never evicts holds them all.
    fn peak_slots(&self, tokens: usize) -> usize {
        tokens
    }

    /// Takes `region`'s slots of a memory pool as its buffers, from the first token on (the
    /// views it holds are written in place, never replaced, while they fit): `false` when this
    /// cache keeps its own (it does not support regions, or it already holds tokens).
    fn place_in(&mut self, _region: PoolRegion<B>) -> bool {
        false
    }

    /// Where `layer`'s slots lie in a pool, while they still lie in the region given to
    /// [`place_in`](Self::place_in): slot `j` is the pool's slot `start + j`.
    fn region_slots(&self, _layer: usize) -> Option<RegionSlots<B>> {
        None
    }

    /// Slots evicted per (layer, KV head) so far.
    fn evicted(&self) -> usize {
        0
    }

    /// Tokens appended since the cache was created or cleared.
    fn tokens_seen(&self) -> usize;

    /// Slots currently held per (layer, KV head) in `layer` (where heads hold different
    /// counts, [`head_slots`](Self::head_slots), the most a head holds: the width
    /// [`append`](Self::append) returns).
    fn slots(&self, layer: usize) -> usize;

    /// Slots each (batch, head) of `layer` holds, batch-major, where heads hold different
    /// counts (per-head budgets); `None` where every head holds [`slots`](Self::slots).
    fn head_slots(&self, _layer: usize) -> Option<Vec<usize>> {
        None
    }

    /// Bytes of keys and values held over all layers.
    fn bytes(&self) -> u64;

    /// Forgets everything, keeping the configuration.
    fn clear(&mut self);
}

/// One layer's cached keys and values as [`KvCache::append_in_place`] returns them.
///
/// # Shapes
/// - `keys`, `values`: `[batch, kv_heads, capacity, head_dim]`, of which the first `len` slots
///   are in use
#[derive(Debug, Clone)]
pub struct CachedKv<B: Backend> {
    pub keys: Tensor<B, 4>,
    pub values: Tensor<B, 4>,
    pub len: usize,
}

impl<B: Backend> CachedKv<B> {
    /// The slots in use, `[batch, kv_heads, len, head_dim]` each.
    pub fn used(&self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let cut = |t: &Tensor<B, 4>| match t.dims()[2] == self.len {
            true => t.clone(),
            false => t.clone().slice_dim(2, 0..self.len),
        };
        (cut(&self.keys), cut(&self.values))
    }
}

/// One layer of a [`PoolRegion`].
///
/// # Shapes
/// - `pool_keys`, `pool_values`: `[1, kv_heads, pool_slots, head_dim]`, the whole pool's layer
/// - `keys`, `values`: `[1, kv_heads, capacity, head_dim]` views of the region's slots of them,
///   sharing their memory
#[derive(Debug, Clone)]
pub struct RegionLayer<B: Backend> {
    pub pool_keys: Tensor<B, 4>,
    pub pool_values: Tensor<B, 4>,
    pub keys: Tensor<B, 4>,
    pub values: Tensor<B, 4>,
}

/// A sequence's share of a memory pool: the slots from `start` of the pool's per-layer key
/// and value tensors that each layer's views cover. A kernel that attends many sequences at
/// once reads the pool's tensors with each sequence's `start` and slot count, one launch for
/// all of them.
#[derive(Debug, Clone)]
pub struct PoolRegion<B: Backend> {
    /// Which pool: regions of different pools are never read together.
    pub pool: u64,
    pub start: usize,
    pub layers: Vec<RegionLayer<B>>,
}

/// Where one layer's slots lie in a pool ([`KvCache::region_slots`]): `len` slots in use
/// (any marked evicted included) from the pool's slot `start`, room for `capacity`.
#[derive(Debug, Clone)]
pub struct RegionSlots<B: Backend> {
    pub pool: u64,
    pub pool_keys: Tensor<B, 4>,
    pub pool_values: Tensor<B, 4>,
    pub start: usize,
    pub len: usize,
    pub capacity: usize,
}

/// [`KvCache::observe_pooled`]'s rows handed to [`KvCache::observe`] one layer at a time.
pub(crate) fn observe_rows<B: Backend, C: KvCache<B> + ?Sized>(
    cache: &mut C,
    probs: Tensor<B, 3>,
    layers: &[bool],
) -> Result<()> {
    let [rows, heads, columns] = probs.dims();
    for (l, _) in layers.iter().enumerate().filter(|(l, o)| **o && *l < rows) {
        // The slots the step attended: a region's slots in use (any marked evicted included).
        let n = cache.region_slots(l).map_or_else(|| cache.slots(l), |r| r.len);
        if !cache.wants_attention(l) || n > columns {
            continue;
        }
        let row = probs.clone().slice_dim(0, l..l + 1).slice_dim(2, 0..n);
        cache.observe(l, row.reshape([1, heads, 1, n]))?;
    }
    Ok(())
}

/// `len` split into chunks of `chunk` (the last one shorter).
pub fn uniform_chunks(len: usize, chunk: usize) -> Vec<usize> {
    let chunk = chunk.max(1);
    let mut v = vec![chunk; len / chunk];
    if !len.is_multiple_of(chunk) {
        v.push(len % chunk);
    }
    v
}
