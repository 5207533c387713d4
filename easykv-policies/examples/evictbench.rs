use burn::backend::Flex;
use burn::tensor::{Distribution, Tensor};
use easykv_core::{Budget, EvictingCache, EvictionConfig, KvCache, Mode};
use std::time::Instant;
type B = Flex;
fn main() {
    let policy = std::env::args().nth(1).unwrap_or("roco".into());
    let dev = Default::default();
    let cfg = EvictionConfig {
        budget: Budget::Tokens(512),
        mode: Mode::Auto,
        ..Default::default()
    };
    let sched = cfg.schedule(512, 512, 1).unwrap();
    let mut cache = EvictingCache::<B>::new(
        30,
        easykv_policies::policy_by_name::<B>(&policy).unwrap().unwrap(),
        sched.clone(),
    );
    for s in cache.prefill_chunks(512, 512) {
        for l in 0..30 {
            let k = Tensor::<B, 4>::random([1, 3, s, 64], Distribution::Default, &dev);
            cache.append(l, k.clone(), k).unwrap();
        }
        cache.end_chunk().unwrap();
    }
    let (mut t_app, mut t_obs, mut t_end) = (0.0, 0.0, 0.0);
    let steps = 50;
    for _ in 0..steps {
        for l in 0..30 {
            let k = Tensor::<B, 4>::random([1, 3, 1, 64], Distribution::Default, &dev);
            let t = Instant::now();
            let (kk, _) = cache.append(l, k.clone(), k).unwrap();
            let _ = kk.into_data();
            t_app += t.elapsed().as_secs_f64();
            let n = cache.slots(l);
            let p = Tensor::<B, 4>::random([1, 3, 1, n], Distribution::Default, &dev);
            let t = Instant::now();
            if cache.wants_attention(l) {
                cache.observe(l, p).unwrap();
            }
            t_obs += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        cache.end_chunk().unwrap();
        let _ = cache.kept_positions(29);
        t_end += t.elapsed().as_secs_f64();
    }
    println!(
        "{policy}: per step append {:.2} ms, observe {:.2} ms, evict {:.2} ms (slots {})",
        t_app * 1e3 / steps as f64,
        t_obs * 1e3 / steps as f64,
        t_end * 1e3 / steps as f64,
        cache.slots(0)
    );
}
