use burn::tensor::{backend::Backend, Tensor};

use crate::{Error, KvCache, Result};

/// A cache that never evicts: the reference every policy is measured against.
#[derive(Debug, Clone)]
pub struct FullCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    tokens_seen: usize,
}

impl<B: Backend> FullCache<B> {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            tokens_seen: 0,
        }
    }
}

/// Bytes of a key or value tensor.
fn tensor_bytes<B: Backend>(t: &Tensor<B, 4>) -> u64 {
    t.shape().num_elements() as u64 * t.dtype().size() as u64
}

/// Bytes of per-layer (keys, values) pairs.
pub(crate) fn kv_bytes<'a, B: Backend>(layers: impl Iterator<Item = &'a (Tensor<B, 4>, Tensor<B, 4>)>) -> u64 {
    layers.map(|(k, v)| tensor_bytes(k) + tensor_bytes(v)).sum()
}

impl<B: Backend> KvCache<B> for FullCache<B> {
    fn append(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        let n_layers = self.layers.len();
        let entry = self.layers.get_mut(layer).ok_or(Error::LayerOutOfRange {
            layer,
            layers: n_layers,
        })?;
        if layer == 0 {
            self.tokens_seen += keys.dims()[2];
        }
        let (k, v) = match entry.take() {
            None => (keys, values),
            Some((k, v)) => (Tensor::cat(vec![k, keys], 2), Tensor::cat(vec![v, values], 2)),
        };
        *entry = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    fn tokens_seen(&self) -> usize {
        self.tokens_seen
    }

    fn slots(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .and_then(|e| e.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    fn bytes(&self) -> u64 {
        kv_bytes(self.layers.iter().flatten())
    }

    fn clear(&mut self) {
        self.layers.iter_mut().for_each(|e| *e = None);
        self.tokens_seen = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn appends_along_the_sequence_and_counts_bytes() {
        let dev = Default::default();
        let mut cache = FullCache::<Flex>::new(2);
        for step in 0..3 {
            for layer in 0..2 {
                let k = Tensor::<Flex, 4>::ones([1, 2, 4, 8], &dev).mul_scalar(step as f32);
                let (keys, values) = cache.append(layer, k.clone(), k).unwrap();
                assert_eq!(keys.dims(), [1, 2, 4 * (step + 1), 8]);
                assert_eq!(values.dims(), keys.dims());
            }
        }
        assert_eq!(cache.tokens_seen(), 12);
        assert_eq!(cache.slots(1), 12);
        assert_eq!(cache.bytes(), 2 * 2 * (2 * 12 * 8 * 4));
        assert!(cache
            .append(2, Tensor::zeros([1, 2, 1, 8], &dev), Tensor::zeros([1, 2, 1, 8], &dev))
            .is_err());
        cache.clear();
        assert_eq!((cache.tokens_seen(), cache.slots(0), cache.bytes()), (0, 0, 0));
    }
}
