//! Per-layer keys and values, shared by every cache.

use burn::tensor::{backend::Backend, Tensor};

use crate::{Error, Result};

/// One `(keys, values)` pair per layer, each `[batch, kv_heads, slots, head_dim]`.
#[derive(Debug, Clone)]
pub(crate) struct LayerKv<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
}

impl<B: Backend> LayerKv<B> {
    pub(crate) fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
        }
    }

    pub(crate) fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Appends along the slot axis; returns everything `layer` now holds.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        let layers = self.layers.len();
        let entry = self
            .layers
            .get_mut(layer)
            .ok_or(Error::LayerOutOfRange { layer, layers })?;
        let (k, v) = match entry.take() {
            None => (keys, values),
            Some((k, v)) => (Tensor::cat(vec![k, keys], 2), Tensor::cat(vec![v, values], 2)),
        };
        *entry = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// The first layer that holds anything.
    pub(crate) fn first(&self) -> Option<&(Tensor<B, 4>, Tensor<B, 4>)> {
        self.layers.iter().flatten().next()
    }

    /// One layer's pair, for in-place replacement (compaction).
    pub(crate) fn get_mut(&mut self, layer: usize) -> Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>> {
        self.layers.get_mut(layer)
    }

    pub(crate) fn slots(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .and_then(|e| e.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    /// Bytes of keys and values over all layers.
    pub(crate) fn bytes(&self) -> u64 {
        let bytes = |t: &Tensor<B, 4>| t.shape().num_elements() as u64 * t.dtype().size() as u64;
        self.layers.iter().flatten().map(|(k, v)| bytes(k) + bytes(v)).sum()
    }

    pub(crate) fn clear(&mut self) {
        self.layers.iter_mut().for_each(|e| *e = None);
    }
}
