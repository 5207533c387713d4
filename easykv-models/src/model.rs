//! The model trait that generation, evaluation and benchmarks drive, and the loader's table of
//! architectures.

use burn::prelude::*;
use easykv_core::{FullCache, KvCache};

use crate::backend::BackendProfile;
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;
use crate::linear::WeightDType;
use crate::llama::{BatchPart, Llama, Logits};
use crate::weights::WeightSource;

/// A causal language model: chunks of token ids in, logits out, each layer's keys and values
/// handed to the cache it is given (which may evict as the chunks go by).
///
/// One implementation per block structure (`llama` serves Llama, Qwen2 and Mistral); the
/// loader picks it by [`Architecture`] in [`load_model`].
pub trait CausalLm<B: Backend>: Send + Sync {
    /// Runs one chunk of tokens through the model, appending it to `cache`.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, s]`
    /// - returns `[batch, s, vocab]` for [`Logits::All`], `[batch, 1, vocab]` for [`Logits::Last`]
    fn forward(&self, tokens: Tensor<B, 2, Int>, cache: &mut dyn KvCache<B>, logits: Logits) -> Result<Tensor<B, 3>>;

    /// Runs consecutive chunks (lengths `chunks`, summing to the tokens' length), evicting
    /// between them exactly as one [`forward`](Self::forward) per chunk would.
    fn forward_chunks(
        &self,
        tokens: Tensor<B, 2, Int>,
        chunks: &[usize],
        cache: &mut dyn KvCache<B>,
        logits: Logits,
    ) -> Result<Tensor<B, 3>>;

    /// [`forward_chunks`](Self::forward_chunks) only to fill `cache` (no logits).
    fn fill_cache_chunks(&self, tokens: Tensor<B, 2, Int>, chunks: &[usize], cache: &mut dyn KvCache<B>) -> Result<()>;

    /// One decode step of several sequences, each appending its token to its own cache:
    /// logits `[sequences, vocab]`. A sequence's logits equal those of
    /// [`forward`](Self::forward) of its token alone where the backend's products are the same
    /// sums whatever the number of rows (the CPU in f32).
    fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut dyn KvCache<B>]) -> Result<Tensor<B, 2>>;

    /// One pass of several sequences, each with its own cache and its own part (a decode
    /// step's token or a prompt chunk): every product runs once over all the rows, and each
    /// cache ends its chunk as after a pass of its part alone. Returns the logits of the parts
    /// that want them, in order (`[wanted, vocab]`), `None` when none does.
    fn forward_batch(
        &self,
        parts: &[BatchPart<'_>],
        caches: &mut [&mut dyn KvCache<B>],
    ) -> Result<Option<Tensor<B, 2>>>;

    fn vocab_size(&self) -> usize;

    /// Positions the model can take (its context length).
    fn context_length(&self) -> usize;

    fn n_layers(&self) -> usize;

    fn device(&self) -> B::Device;

    /// What the backend offers (the ops layer reads it).
    fn profile(&self) -> &BackendProfile;

    fn set_profile(&mut self, profile: BackendProfile);

    /// An empty full cache for this model, with the device kernels its backend offers.
    fn full_cache(&self) -> FullCache<B> {
        FullCache::new(self.n_layers(), self.profile().cache_kernels())
    }
}

impl<B: Backend> CausalLm<B> for Llama<B> {
    fn forward(&self, tokens: Tensor<B, 2, Int>, cache: &mut dyn KvCache<B>, logits: Logits) -> Result<Tensor<B, 3>> {
        Llama::forward(self, tokens, cache, logits)
    }

    fn forward_chunks(
        &self,
        tokens: Tensor<B, 2, Int>,
        chunks: &[usize],
        cache: &mut dyn KvCache<B>,
        logits: Logits,
    ) -> Result<Tensor<B, 3>> {
        Llama::forward_chunks(self, tokens, chunks, cache, logits)
    }

    fn fill_cache_chunks(&self, tokens: Tensor<B, 2, Int>, chunks: &[usize], cache: &mut dyn KvCache<B>) -> Result<()> {
        Llama::fill_cache_chunks(self, tokens, chunks, cache)
    }

    fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut dyn KvCache<B>]) -> Result<Tensor<B, 2>> {
        Llama::decode_batch(self, tokens, caches)
    }

    fn forward_batch(
        &self,
        parts: &[BatchPart<'_>],
        caches: &mut [&mut dyn KvCache<B>],
    ) -> Result<Option<Tensor<B, 2>>> {
        Llama::forward_batch(self, parts, caches)
    }

    fn vocab_size(&self) -> usize {
        self.embed.vocab_size()
    }

    fn context_length(&self) -> usize {
        self.rope.max_positions()
    }

    fn n_layers(&self) -> usize {
        self.layers.len()
    }

    fn device(&self) -> B::Device {
        self.embed.weight.device()
    }

    fn profile(&self) -> &BackendProfile {
        &self.profile
    }

    fn set_profile(&mut self, profile: BackendProfile) {
        Llama::set_profile(self, profile);
    }

    fn full_cache(&self) -> FullCache<B> {
        Llama::full_cache(self)
    }
}

/// A boxed model is a model (what the loader hands out).
impl<B: Backend, M: CausalLm<B> + ?Sized> CausalLm<B> for Box<M> {
    fn forward(&self, tokens: Tensor<B, 2, Int>, cache: &mut dyn KvCache<B>, logits: Logits) -> Result<Tensor<B, 3>> {
        (**self).forward(tokens, cache, logits)
    }

    fn forward_chunks(
        &self,
        tokens: Tensor<B, 2, Int>,
        chunks: &[usize],
        cache: &mut dyn KvCache<B>,
        logits: Logits,
    ) -> Result<Tensor<B, 3>> {
        (**self).forward_chunks(tokens, chunks, cache, logits)
    }

    fn fill_cache_chunks(&self, tokens: Tensor<B, 2, Int>, chunks: &[usize], cache: &mut dyn KvCache<B>) -> Result<()> {
        (**self).fill_cache_chunks(tokens, chunks, cache)
    }

    fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut dyn KvCache<B>]) -> Result<Tensor<B, 2>> {
        (**self).decode_batch(tokens, caches)
    }

    fn forward_batch(
        &self,
        parts: &[BatchPart<'_>],
        caches: &mut [&mut dyn KvCache<B>],
    ) -> Result<Option<Tensor<B, 2>>> {
        (**self).forward_batch(parts, caches)
    }

    fn vocab_size(&self) -> usize {
        (**self).vocab_size()
    }

    fn context_length(&self) -> usize {
        (**self).context_length()
    }

    fn n_layers(&self) -> usize {
        (**self).n_layers()
    }

    fn device(&self) -> B::Device {
        (**self).device()
    }

    fn profile(&self) -> &BackendProfile {
        (**self).profile()
    }

    fn set_profile(&mut self, profile: BackendProfile) {
        (**self).set_profile(profile)
    }

    fn full_cache(&self) -> FullCache<B> {
        (**self).full_cache()
    }
}

/// The model for `cfg`'s architecture, its weights from `source` stored in `dtype`: the
/// loader's one table of block structures.
pub fn load_model<B: Backend>(
    cfg: &ModelConfig,
    source: &impl WeightSource,
    dtype: WeightDType,
    device: &B::Device,
) -> Result<Box<dyn CausalLm<B>>> {
    Ok(match cfg.architecture {
        Architecture::Llama | Architecture::Qwen2 => Box::new(Llama::load(cfg, source, dtype, device)?),
    })
}
