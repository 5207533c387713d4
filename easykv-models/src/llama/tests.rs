use super::*;
use crate::config::{Architecture, ModelConfig, RopeLayout};
use crate::linear::WeightDType;
use crate::weights::WeightSource;
use burn::backend::Flex;
use easykv_core::{CacheKernels, FullCache, KvCache};
use std::collections::HashMap;

/// Random weights of a tiny Llama, named as in GGUF.
struct RandomWeights(HashMap<String, (Vec<f32>, Vec<usize>)>);

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| Error::MissingTensor(name.into()))
    }
    fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

fn tiny_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 50,
        hidden_size: 32,
        intermediate_size: 48,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rope_layout: RopeLayout::Interleaved,
        rms_eps: 1e-5,
        context_length: 64,
        qkv_bias: false,
        sliding_window: None,
    }
}

fn tiny_weights(cfg: &ModelConfig, seed: u64) -> RandomWeights {
    let mut state = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let mut rand = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    };
    let (h, kv) = (cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim);
    let mut m = HashMap::new();
    let mut put = |name: String, rows: usize, cols: usize, scale: f32, rand: &mut dyn FnMut(usize, f32) -> Vec<f32>| {
        let dims = if rows == 1 { vec![cols] } else { vec![rows, cols] };
        m.insert(name, (rand(rows * cols, scale), dims));
    };
    put("token_embd.weight".into(), cfg.vocab_size, h, 2.0, &mut rand);
    put("output_norm.weight".into(), 1, h, 1.0, &mut |n, _| vec![1.0; n]);
    for i in 0..cfg.n_layers {
        put(format!("blk.{i}.attn_norm.weight"), 1, h, 1.0, &mut |n, _| vec![1.0; n]);
        put(format!("blk.{i}.ffn_norm.weight"), 1, h, 1.0, &mut |n, _| vec![1.0; n]);
        put(format!("blk.{i}.attn_q.weight"), h, h, 0.8, &mut rand);
        put(format!("blk.{i}.attn_k.weight"), kv, h, 0.8, &mut rand);
        put(format!("blk.{i}.attn_v.weight"), kv, h, 0.8, &mut rand);
        put(format!("blk.{i}.attn_output.weight"), h, h, 0.5, &mut rand);
        put(
            format!("blk.{i}.ffn_gate.weight"),
            cfg.intermediate_size,
            h,
            0.5,
            &mut rand,
        );
        put(
            format!("blk.{i}.ffn_up.weight"),
            cfg.intermediate_size,
            h,
            0.5,
            &mut rand,
        );
        put(
            format!("blk.{i}.ffn_down.weight"),
            h,
            cfg.intermediate_size,
            0.5,
            &mut rand,
        );
    }
    RandomWeights(m)
}

fn tokens(ids: &[i32]) -> Tensor<Flex, 2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &Default::default())
}

fn to_vec(t: Tensor<Flex, 3>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

#[test]
fn chunked_prefill_and_decode_match_one_full_pass() {
    let cfg = tiny_config();
    let model = Llama::<Flex>::load(&cfg, &tiny_weights(&cfg, 1), WeightDType::F32, &Default::default()).unwrap();
    let ids = [3, 17, 42, 5, 9, 33, 0, 12, 49, 21];
    let mut full = FullCache::new(cfg.n_layers, CacheKernels::host());
    let all = to_vec(model.forward(tokens(&ids), &mut full, Logits::All).unwrap());
    assert_eq!(all.len(), ids.len() * cfg.vocab_size);

    // Chunks of 3, then one token at a time: each position's logits must agree.
    let mut cache = FullCache::new(cfg.n_layers, CacheKernels::host());
    let mut got = Vec::new();
    for chunk in ids[..6].chunks(3) {
        got.extend(to_vec(model.forward(tokens(chunk), &mut cache, Logits::All).unwrap()));
    }
    for id in &ids[6..] {
        got.extend(to_vec(model.forward(tokens(&[*id]), &mut cache, Logits::Last).unwrap()));
    }
    assert_eq!(cache.tokens_seen(), ids.len());
    for (i, (a, b)) in all.iter().zip(&got).enumerate() {
        assert!(
            (a - b).abs() < 1e-4,
            "position {} logit {}: {a} vs {b}",
            i / cfg.vocab_size,
            i % cfg.vocab_size
        );
    }
}

/// What GPU backends run (half-precision activations, decode steps rotated by one matrix
/// product) forced on flex: the same logits as f32 within half precision's rounding.
#[test]
fn half_precision_activations_track_the_f32_model() {
    let cfg = ModelConfig {
        qkv_bias: true,
        ..tiny_config()
    };
    let mut weights = tiny_weights(&cfg, 4);
    for i in 0..cfg.n_layers {
        for (t, n) in [("attn_q", cfg.hidden_size), ("attn_k", 16), ("attn_v", 16)] {
            let bias: Vec<f32> = (0..n).map(|j| (j as f32 * 0.37).sin() * 0.3).collect();
            weights.0.insert(format!("blk.{i}.{t}.bias"), (bias, vec![n]));
        }
    }
    let dev = Default::default();
    let exact = Llama::<Flex>::load(&cfg, &weights, WeightDType::F32, &dev).unwrap();
    let mut half = Llama::<Flex>::load(&cfg, &weights, WeightDType::F16, &dev).unwrap();
    // As on GPUs: half-precision products, the residual stream in the weights' precision.
    half.set_profile(BackendProfile {
        half_products: true,
        ..half.profile
    });
    assert_eq!(half.activation_dtype(), DType::F16);
    assert_eq!(exact.activation_dtype(), DType::F32);
    let ids = [3, 17, 42, 5, 9, 33, 0, 12];
    let run = |model: &Llama<Flex>| {
        let mut cache = FullCache::new(cfg.n_layers, CacheKernels::host());
        let mut out = to_vec(model.forward(tokens(&ids[..5]), &mut cache, Logits::All).unwrap());
        for id in &ids[5..] {
            out.extend(to_vec(model.forward(tokens(&[*id]), &mut cache, Logits::Last).unwrap()));
        }
        out
    };
    let (a, b) = (run(&exact), run(&half));
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst < 2e-2 * scale, "worst {worst} of {scale}");
    assert!(worst > 0.0, "half precision changed nothing: the f16 path did not run");
}

/// The last layer skips the output projection and feed-forward block for positions nobody
/// reads: the last position's logits, and the cache a prefill leaves, are unchanged.
#[test]
fn skipping_unread_positions_changes_neither_logits_nor_cache() {
    let cfg = tiny_config();
    let model = Llama::<Flex>::load(&cfg, &tiny_weights(&cfg, 7), WeightDType::F32, &Default::default()).unwrap();
    let ids = [3, 17, 42, 5, 9, 33, 0, 12, 49, 21];
    let v = cfg.vocab_size;
    let all = to_vec(
        model
            .forward(
                tokens(&ids),
                &mut FullCache::new(cfg.n_layers, CacheKernels::host()),
                Logits::All,
            )
            .unwrap(),
    );
    let want = &all[all.len() - v..];
    let close = |got: &[f32]| {
        assert_eq!(got.len(), v);
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    };
    close(&to_vec(
        model
            .forward(
                tokens(&ids),
                &mut FullCache::new(cfg.n_layers, CacheKernels::host()),
                Logits::Last,
            )
            .unwrap(),
    ));
    // Layer by layer over chunks, and chunk by chunk (a single chunk).
    for chunks in [vec![4, 3, 3], vec![10]] {
        let mut cache = FullCache::new(cfg.n_layers, CacheKernels::host());
        close(&to_vec(
            model
                .forward_chunks(tokens(&ids), &chunks, &mut cache, Logits::Last)
                .unwrap(),
        ));
    }
    // A cache filled without the unread outputs continues exactly as one filled with them.
    let mut filled = FullCache::new(cfg.n_layers, CacheKernels::host());
    model
        .fill_cache_chunks(tokens(&ids[..9]), &[4, 3, 2], &mut filled)
        .unwrap();
    let mut cache = FullCache::new(cfg.n_layers, CacheKernels::host());
    model
        .forward_hidden_chunks(tokens(&ids[..9]), &[4, 3, 2], &mut cache)
        .unwrap();
    let a = to_vec(model.forward(tokens(&ids[9..]), &mut filled, Logits::Last).unwrap());
    let b = to_vec(model.forward(tokens(&ids[9..]), &mut cache, Logits::Last).unwrap());
    assert_eq!(a, b);
    close(&a);
}

#[test]
fn causal_mask_hides_only_future_tokens() {
    let m: Vec<f32> = causal_mask::<Flex>(2, 5, 0, &Default::default())
        .into_data()
        .into_vec()
        .unwrap();
    let inf = f32::NEG_INFINITY;
    assert_eq!(m, vec![0.0, 0.0, 0.0, 0.0, inf, 0.0, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn deinterleave_keeps_scores_and_rope_matches_interleaved_rotation() {
    // A rotation of interleaved pairs, computed by hand, equals rotate-half on the
    // de-interleaved vector, re-ordered the same way.
    let d = 8;
    let x: Vec<f32> = (0..d).map(|i| i as f32 * 0.37 - 1.0).collect();
    let rope = Rope::<Flex>::new(d, 10_000.0, 16, &Default::default());
    let pos = 5;
    let mut expect = vec![0f32; d];
    for i in 0..d / 2 {
        let a = pos as f32 / 10_000f32.powf(2.0 * i as f32 / d as f32);
        expect[2 * i] = x[2 * i] * a.cos() - x[2 * i + 1] * a.sin();
        expect[2 * i + 1] = x[2 * i] * a.sin() + x[2 * i + 1] * a.cos();
    }
    let de = deinterleave_rows(&x, 1, d, 1);
    let t = Tensor::<Flex, 4>::from_data(TensorData::new(de, [1, 1, 1, d]), &Default::default());
    let angles = rope.angles(pos, 1, 1, 1, 1.0, RopeLayoutAxes::PositionsFirst, DType::F32);
    assert!(angles.rotation().is_none());
    // In half precision a single position is rotated by one matrix product: the same rotation.
    let half = rope.angles(pos, 1, 1, 1, 1.0, RopeLayoutAxes::PositionsFirst, DType::F16);
    assert!(half.rotation().is_some());
    let by_matrix: Vec<f32> = Rope::apply(t.clone().cast(DType::F16), &half)
        .cast(DType::F32)
        .into_data()
        .into_vec()
        .unwrap();
    let got: Vec<f32> = Rope::apply(t, &angles).into_data().into_vec().unwrap();
    for (a, b) in by_matrix.iter().zip(&got) {
        assert!((a - b).abs() < 1e-2, "{a} vs {b}");
    }
    assert_eq!(deinterleave_rows(&expect, 1, d, 1).len(), got.len());
    for (a, b) in deinterleave_rows(&expect, 1, d, 1).iter().zip(&got) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn wrong_shapes_and_missing_tensors_are_errors() {
    let cfg = tiny_config();
    let mut w = tiny_weights(&cfg, 2);
    w.0.insert("blk.1.attn_k.weight".into(), (vec![0.0; 10], vec![2, 5]));
    let err = Llama::<Flex>::load(&cfg, &w, WeightDType::F32, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("blk.1.attn_k.weight"), "{err}");
    w.0.remove("blk.0.ffn_up.weight");
    let err = Llama::<Flex>::load(&cfg, &w, WeightDType::F32, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("blk.0.ffn_up.weight"), "{err}");
}

#[test]
fn positions_past_the_context_are_an_error() {
    let cfg = tiny_config();
    let model = Llama::<Flex>::load(&cfg, &tiny_weights(&cfg, 3), WeightDType::F32, &Default::default()).unwrap();
    let mut cache = FullCache::new(cfg.n_layers, CacheKernels::host());
    let ids: Vec<i32> = (0..65).map(|i| i % 50).collect();
    assert!(model.forward(tokens(&ids), &mut cache, Logits::Last).is_err());
}

#[test]
fn streaming_positions_match_absolute_until_something_is_evicted() {
    use easykv_core::{Budget, EvictingCache, EvictionConfig};
    let cfg = tiny_config();
    let model = Llama::<Flex>::load(&cfg, &tiny_weights(&cfg, 4), WeightDType::F32, &Default::default()).unwrap();
    let ids = [7, 1, 19, 44, 2, 30, 11, 8, 25, 3, 16, 40];
    let run = |cache: &mut dyn KvCache<Flex>| -> Vec<f32> {
        let mut out = Vec::new();
        for chunk in ids.chunks(4) {
            out.extend(to_vec(model.forward(tokens(chunk), cache, Logits::All).unwrap()));
        }
        out
    };
    let absolute = run(&mut FullCache::new(cfg.n_layers, CacheKernels::host()));
    // A budget of the whole prompt evicts nothing: compact positions are the absolute ones.
    let streaming = EvictionConfig {
        budget: Budget::Ratio(1.0),
        streaming: true,
        ..Default::default()
    };
    // A recency cache under `eviction`, for this prompt in chunks of 4.
    let recency = |eviction: &EvictionConfig| {
        let policy = easykv_policies::PolicyTable::<Flex>::builtin()
            .build("recency")
            .unwrap()
            .unwrap();
        EvictingCache::new(
            cfg.n_layers,
            policy,
            eviction.schedule(ids.len(), 4, 1).unwrap(),
            CacheKernels::host(),
        )
    };
    let got = run(&mut recency(&streaming));
    for (a, b) in absolute.iter().zip(&got) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    // Under eviction the next position is the slot count, not the tokens seen.
    let tight = EvictionConfig {
        budget: Budget::Tokens(7),
        stride: 1,
        sinks: 2,
        streaming: true,
        ..Default::default()
    };
    let mut cache = recency(&tight);
    let mut logits = Vec::new();
    for len in cache.prefill_chunks(ids.len(), 4) {
        let start = cache.tokens_seen();
        logits = to_vec(
            model
                .forward(tokens(&ids[start..start + len]), &mut cache, Logits::Last)
                .unwrap(),
        );
    }
    assert!(cache.slots(0) < ids.len());
    assert_eq!(cache.next_position(), cache.slots(0));
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn a_sliding_window_of_one_sees_only_the_token_itself() {
    // With a window of one position every query attends only its own key, so each position's
    // logits equal those of that token run alone — in one pass, in chunks, and while decoding.
    let cfg = ModelConfig {
        sliding_window: Some(1),
        ..tiny_config()
    };
    let weights = tiny_weights(&cfg, 5);
    let model = Llama::<Flex>::load(&cfg, &weights, WeightDType::F32, &Default::default()).unwrap();
    let ids = [7, 19, 3, 44, 28, 11];
    let alone: Vec<f32> = ids
        .iter()
        .flat_map(|&id| {
            to_vec(
                model
                    .forward(
                        tokens(&[id]),
                        &mut FullCache::new(cfg.n_layers, CacheKernels::host()),
                        Logits::Last,
                    )
                    .unwrap(),
            )
        })
        .collect();
    let all = to_vec(
        model
            .forward(
                tokens(&ids),
                &mut FullCache::new(cfg.n_layers, CacheKernels::host()),
                Logits::All,
            )
            .unwrap(),
    );
    let mut cache = FullCache::new(cfg.n_layers, CacheKernels::host());
    let mut stepwise = to_vec(model.forward(tokens(&ids[..3]), &mut cache, Logits::All).unwrap());
    for &id in &ids[3..] {
        stepwise.extend(to_vec(model.forward(tokens(&[id]), &mut cache, Logits::Last).unwrap()));
    }
    for (name, got) in [("one pass", &all), ("decoding", &stepwise)] {
        let worst = alone.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{name}: {worst}");
    }
    // A window as wide as the sequence changes nothing; a window of two does.
    let plain = Llama::<Flex>::load(&tiny_config(), &weights, WeightDType::F32, &Default::default()).unwrap();
    let reference = to_vec(
        plain
            .forward(
                tokens(&ids),
                &mut FullCache::new(cfg.n_layers, CacheKernels::host()),
                Logits::All,
            )
            .unwrap(),
    );
    for (window, same) in [(ids.len(), true), (2, false)] {
        let cfg = ModelConfig {
            sliding_window: Some(window),
            ..tiny_config()
        };
        let m = Llama::<Flex>::load(&cfg, &weights, WeightDType::F32, &Default::default()).unwrap();
        let got = to_vec(
            m.forward(
                tokens(&ids),
                &mut FullCache::new(cfg.n_layers, CacheKernels::host()),
                Logits::All,
            )
            .unwrap(),
        );
        let worst = reference
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(worst < 1e-5, same, "window {window}: {worst}");
    }
}

#[test]
fn window_mask_hides_what_lies_behind_the_window() {
    let inf = f32::NEG_INFINITY;
    let m: Vec<f32> = causal_mask::<Flex>(2, 5, 2, &Default::default())
        .into_data()
        .into_vec()
        .unwrap();
    // Queries at positions 3 and 4 see 2–3 and 3–4.
    assert_eq!(m, vec![inf, inf, 0.0, 0.0, inf, inf, inf, inf, 0.0, 0.0]);
}

/// A decode step's RoPE row, made on the host, equals the device operations' (which prefill
/// chunks use) in f32 and rounds the same way in f16; `sin` carries rotate-half's sign.
#[test]
fn decode_angles_on_host_match_device_operations() {
    let dev = Default::default();
    let rope = Rope::<Flex>::new(64, 10_000.0, 8192, &dev);
    let values = |t: Tensor<Flex, 2>| t.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
    for (position, scale) in [(0usize, 1.0), (7, 0.125), (4095, 1.0), (8191, 0.088)] {
        for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::F16, 1e-3)] {
            let (host_cos, host_sin) = rope.rows_on_host(position, scale, dtype);
            let (dev_cos, dev_sin) = rope.rows_on_device(position, 1, scale, dtype);
            assert_eq!(host_cos.dims(), [1, 64]);
            assert_eq!(host_cos.dtype(), dtype);
            for (host, device) in [
                (values(host_cos), values(dev_cos)),
                (values(host_sin.clone()), values(dev_sin)),
            ] {
                let worst = host
                    .iter()
                    .zip(&device)
                    .map(|(h, d)| (h - d).abs())
                    .fold(0f32, f32::max);
                assert!(worst <= tolerance, "position {position}, {dtype:?}: {worst}");
            }
            // Rotate-half: the first half of `sin` is the negated second half.
            let sin = values(host_sin);
            assert!(sin[..32].iter().zip(&sin[32..]).all(|(a, b)| *a == -*b));
        }
    }
}

/// Expected attention gathers the prompt's queries on both prefill paths: strides run layer by
/// layer in one group (one projection for all of them) keep the slots that strides run one at a
/// time keep — and not recency's, which the policy falls back to when it saw no query.
#[test]
fn expected_attention_sees_the_queries_of_grouped_strides() {
    use easykv_core::{Budget, EvictingCache, EvictionConfig, Mode};
    let cfg = tiny_config();
    let model = Llama::<Flex>::load(&cfg, &tiny_weights(&cfg, 5), WeightDType::F32, &Default::default()).unwrap();
    let ids: Vec<i32> = (0..40).map(|i| (i * 7 + 3) % 50).collect();
    let eviction = EvictionConfig {
        budget: Budget::Tokens(16),
        mode: Mode::Encoding,
        stride: 4,
        sinks: 0,
        recent_ratio: 0.0,
        ..Default::default()
    };
    let kept = |policy: &str, grouped: bool| {
        let built = easykv_policies::PolicyTable::<Flex>::builtin()
            .build(policy)
            .unwrap()
            .unwrap();
        let schedule = eviction.schedule(ids.len(), 64, 1).unwrap();
        let mut cache = EvictingCache::new(cfg.n_layers, built, schedule, CacheKernels::host())
            .with_rope_frequencies(cfg.rope_frequencies());
        let chunks = cache.prefill_chunks(ids.len(), 64);
        assert!(chunks.len() > 2, "{chunks:?}");
        if grouped {
            model.fill_cache_chunks(tokens(&ids), &chunks, &mut cache).unwrap();
        } else {
            let mut at = 0;
            for &s in &chunks {
                model
                    .forward(tokens(&ids[at..at + s]), &mut cache, Logits::Last)
                    .unwrap();
                at += s;
            }
        }
        (0..cfg.n_layers).map(|l| cache.kept_positions(l)).collect::<Vec<_>>()
    };
    let grouped = kept("expected-attention", true);
    assert_eq!(grouped, kept("expected-attention", false));
    assert_ne!(grouped, kept("recency", true));
}

/// Expected attention ranks the slots it evicts while decoding too (decoding mode: the prompt
/// kept, generated slots evicted one per step by the prompt's query statistics) — not the
/// order of their positions, which every slot scoring alike would give, as recency does.
#[test]
fn expected_attention_chooses_decode_time_victims() {
    use easykv_core::{Budget, EvictingCache, EvictionConfig, Mode};
    let cfg = tiny_config();
    let model = Llama::<Flex>::load(&cfg, &tiny_weights(&cfg, 9), WeightDType::F32, &Default::default()).unwrap();
    let prompt: Vec<i32> = (0..20).map(|i| (i * 11 + 5) % 50).collect();
    let eviction = EvictionConfig {
        budget: Budget::Tokens(12),
        mode: Mode::Decoding,
        sinks: 0,
        ..Default::default()
    };
    let kept = |policy: &str| {
        let built = easykv_policies::PolicyTable::<Flex>::builtin()
            .build(policy)
            .unwrap()
            .unwrap();
        let schedule = eviction.schedule(prompt.len(), 64, 1).unwrap();
        let mut cache = EvictingCache::new(cfg.n_layers, built, schedule, CacheKernels::host())
            .with_rope_frequencies(cfg.rope_frequencies());
        model.forward(tokens(&prompt), &mut cache, Logits::Last).unwrap();
        for step in 0..30 {
            model
                .forward(tokens(&[(step * 7 + 1) % 50]), &mut cache, Logits::Last)
                .unwrap();
        }
        assert!(cache.evicted() > 0);
        (0..cfg.n_layers).map(|l| cache.kept_positions(l)).collect::<Vec<_>>()
    };
    assert_ne!(kept("expected-attention"), kept("recency"));
}
