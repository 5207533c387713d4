use burn::tensor::{backend::Backend, DType, Tensor};

use crate::layer_kv::LayerKv;
use crate::{CacheKernels, CachedKv, KvCache, PoolRegion, RegionSlots, Result};

/// A cache that never evicts: the reference every policy is measured against.
#[derive(Debug, Clone)]
pub struct FullCache<B: Backend> {
    kv: LayerKv<B>,
    tokens_seen: usize,
}

impl<B: Backend> FullCache<B> {
    /// A cache of `n_layers` layers on a backend that offers `kernels`.
    pub fn new(n_layers: usize, kernels: CacheKernels<B>) -> Self {
        Self {
            kv: LayerKv::new(n_layers, kernels),
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

    fn reserve_slots(
        &mut self,
        layer: usize,
        shape: [usize; 4],
        dtype: DType,
        device: &B::Device,
    ) -> Result<Option<CachedKv<B>>> {
        self.kv.reserve_slots(layer, shape, dtype, device).map(Some)
    }

    fn commit_slots(&mut self, layer: usize, s: usize) -> Result<CachedKv<B>> {
        let out = self.kv.commit_slots(layer, s)?;
        if layer == 0 {
            self.tokens_seen += s;
        }
        Ok(out)
    }

    fn place_in(&mut self, region: PoolRegion<B>) -> bool {
        self.kv.place_in(region)
    }

    fn region_slots(&self, layer: usize) -> Option<RegionSlots<B>> {
        self.kv.region_slots(layer)
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
        let mut cache = FullCache::<Flex>::new(2, CacheKernels::host());
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
        let mut reserved = FullCache::<Flex>::new(2, CacheKernels::host());
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

    /// The in-place form hands out the whole buffers and the slots in use; `used` cuts out
    /// exactly what `append` returns.
    #[test]
    fn append_in_place_returns_the_buffers_and_the_slots_in_use() {
        let dev = Default::default();
        let mut cache = FullCache::<Flex>::new(1, CacheKernels::host());
        cache.reserve(8);
        let t = |v: f32| Tensor::<Flex, 4>::full([1, 2, 3, 4], v, &dev);
        let first = cache.append_in_place(0, t(1.0), t(2.0)).unwrap();
        assert_eq!((first.len, first.keys.dims()), (3, [1, 2, 8, 4]));
        let second = cache.append_in_place(0, t(3.0), t(4.0)).unwrap();
        assert_eq!(second.len, 6);
        let (keys, values) = second.used();
        assert_eq!(keys.dims(), [1, 2, 6, 4]);
        let slot_values = |x: Tensor<Flex, 4>| {
            let v: Vec<f32> = x.into_data().to_vec().unwrap();
            v.chunks(4).map(|slot| slot[0]).collect::<Vec<f32>>()
        };
        assert_eq!(slot_values(keys), [1.0, 1.0, 1.0, 3.0, 3.0, 3.0].repeat(2));
        assert_eq!(slot_values(values), [2.0, 2.0, 2.0, 4.0, 4.0, 4.0].repeat(2));
        let (keys, _) = cache.append(0, t(5.0), t(6.0)).unwrap();
        assert_eq!((keys.dims()[2], cache.tokens_seen()), (9, 9));
    }

    /// Room reserved for slots a kernel writes: the buffers grow as an append would grow them,
    /// nothing counts until committed, and a commit without room is an error.
    #[test]
    fn reserved_slots_count_once_committed() {
        let dev = Default::default();
        let mut cache = FullCache::<Flex>::new(2, CacheKernels::host());
        let t = |v: f32| Tensor::<Flex, 4>::full([1, 2, 3, 4], v, &dev);
        cache.append_in_place(0, t(1.0), t(2.0)).unwrap();
        let room = cache
            .reserve_slots(0, [1, 2, 70, 4], DType::F32, &dev)
            .unwrap()
            .expect("full caches offer room");
        assert_eq!(room.len, 3);
        assert!(room.keys.dims()[2] >= 73 && room.values.dims() == room.keys.dims());
        assert_eq!((cache.slots(0), cache.tokens_seen()), (3, 3));
        let committed = cache.commit_slots(0, 70).unwrap();
        assert_eq!((committed.len, cache.slots(0), cache.tokens_seen()), (73, 73, 73));
        // The slots written before the reservation survived its growth.
        let first: Vec<f32> = committed.used().0.slice_dim(2, 0..3).into_data().to_vec().unwrap();
        assert!(first.iter().all(|&x| x == 1.0));
        assert!(matches!(
            cache.commit_slots(0, 1000),
            Err(crate::Error::SlotsNotReserved { layer: 0, slots: 1000 })
        ));
        assert!(matches!(
            cache.commit_slots(1, 1),
            Err(crate::Error::LayerOutOfRange { .. })
        ));
    }
}
