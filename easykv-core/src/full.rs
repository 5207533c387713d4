use burn::tensor::{backend::Backend, Tensor};

use crate::layer_kv::LayerKv;
use crate::{CachedKv, KvCache, Result};

/// A cache that never evicts: the reference every policy is measured against.
#[derive(Debug, Clone)]
pub struct FullCache<B: Backend> {
    kv: LayerKv<B>,
    tokens_seen: usize,
}

impl<B: Backend> FullCache<B> {
    pub fn new(n_layers: usize) -> Self {
        Self {
            kv: LayerKv::new(n_layers),
            tokens_seen: 0,
        }
    }
}

impl<B: Backend> KvCache<B> for FullCache<B> {
    fn append(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        Ok(self.append_in_place(layer, keys, values)?.used())
    }

    fn append_in_place(&mut self, layer: usize, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<CachedKv<B>> {
        let s = keys.dims()[2];
        let out = self.kv.append_in_place(layer, keys, values)?;
        if layer == 0 {
            self.tokens_seen += s;
        }
        Ok(out)
    }

    fn reserve(&mut self, tokens: usize) {
        self.kv.reserve(tokens);
    }

    fn tokens_seen(&self) -> usize {
        self.tokens_seen
    }

    fn slots(&self, layer: usize) -> usize {
        self.kv.physical_slots(layer)
    }

    fn bytes(&self) -> u64 {
        self.kv.bytes()
    }

    fn clear(&mut self) {
        self.kv.clear();
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
        // Buffers grow with room to spare; a reservation allocates exactly.
        assert!(cache.bytes() >= 2 * 2 * (2 * 12 * 8 * 4));
        let mut reserved = FullCache::<Flex>::new(2);
        reserved.reserve(12);
        for layer in 0..2 {
            for _ in 0..3 {
                let k = Tensor::<Flex, 4>::ones([1, 2, 4, 8], &dev);
                reserved.append(layer, k.clone(), k).unwrap();
            }
        }
        assert_eq!(reserved.bytes(), 2 * 2 * (2 * 12 * 8 * 4));
        assert!(cache
            .append(2, Tensor::zeros([1, 2, 1, 8], &dev), Tensor::zeros([1, 2, 1, 8], &dev))
            .is_err());
        cache.clear();
        assert_eq!((cache.tokens_seen(), cache.slots(0), cache.bytes()), (0, 0, 0));
    }
}
