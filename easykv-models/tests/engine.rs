//! The batched engine on the real model (SmolLM2, CPU, f32): a sequence's greedy output inside
//! a batch is the output it gets alone, whatever its policy and whoever runs beside it; the
//! pool is never over its size and each cache stays within what was set aside for it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use burn::backend::Flex;
use easykv_core::{Budget, EvictionConfig, Mode};
use easykv_models::{
    build_cache, generate, CausalLm, Engine, EngineConfig, Event, GenerateConfig, LoadedModel, Request, SamplingConfig,
    WeightDType,
};

use common::{load_model, shared};

fn prompt_ids(m: &LoadedModel<Flex>, start: usize, len: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(shared("data/last_of_the_mohicans.txt")).unwrap();
    let ids = m.tokenizer.encode(&text[..20_000]).unwrap();
    ids[start..start + len].to_vec()
}

/// Requests of different lengths, policies, budgets and modes.
fn requests(m: &LoadedModel<Flex>) -> Vec<Request> {
    let eviction = |budget: Budget, mode: Mode, stride: usize| EvictionConfig {
        budget,
        mode,
        stride,
        ..Default::default()
    };
    let settings: [(&str, EvictionConfig, usize, usize); 6] = [
        ("full", EvictionConfig::default(), 40, 12),
        ("roco", eviction(Budget::Ratio(0.5), Mode::Encoding, 8), 150, 10),
        ("h2o", eviction(Budget::Ratio(0.25), Mode::Encoding, 4), 96, 14),
        ("tova", eviction(Budget::Tokens(40), Mode::Auto, 8), 70, 16),
        ("recency", eviction(Budget::Tokens(24), Mode::Decoding, 8), 30, 9),
        ("roco", eviction(Budget::Ratio(0.5), Mode::Encoding, 2), 33, 1),
    ];
    settings
        .into_iter()
        .enumerate()
        .map(|(i, (policy, eviction, len, new))| Request {
            prompt: prompt_ids(m, 100 * i, len),
            max_new_tokens: new,
            policy: policy.into(),
            eviction,
            sampling: SamplingConfig::default(),
            stop_ids: Vec::new(),
        })
        .collect()
}

fn alone(m: &LoadedModel<Flex>, r: &Request, chunk: usize) -> Vec<u32> {
    let mut cache = build_cache::<Flex>(
        &r.policy,
        &r.eviction,
        &m.config,
        m.model.profile(),
        m.dtype,
        r.prompt.len(),
        chunk,
    )
    .unwrap();
    let cfg = GenerateConfig {
        max_new_tokens: r.max_new_tokens,
        chunk_size: chunk,
        sampling: r.sampling.clone(),
        stop_ids: r.stop_ids.clone(),
        top_logprobs: 0,
    };
    generate(&m.model, cache.as_mut(), &r.prompt, &cfg, |_| ControlFlow::Continue(()))
        .unwrap()
        .ids
}

#[test]
fn a_batch_decodes_what_each_sequence_decodes_alone() {
    let chunk = 64;
    let m = load_model("smollm2", WeightDType::F32);
    let reqs = requests(&m);
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&m, r, chunk)).collect();
    let config = m.config.clone();
    let per_token = config.kv_bytes_per_token(4);
    let model: Box<dyn CausalLm<Flex>> = m.model;
    // A pool for about three sequences at a time: admission waits, memory is reused.
    let pool = 220 * per_token;
    let mut engine = Engine::new(
        model,
        config,
        WeightDType::F32,
        EngineConfig {
            pool_bytes: pool,
            max_running: 8,
            chunk_size: chunk,
        },
    )
    .unwrap();
    let ids: Vec<u64> = reqs.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
    let mut got: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let (mut finished, mut steps, mut max_running) = (0, 0, 0);
    while !engine.is_idle() {
        for e in engine.step().unwrap() {
            match e {
                Event::Token { id, token } => got.entry(id).or_default().push(token),
                Event::Finished { .. } => finished += 1,
            }
        }
        let stats = engine.stats();
        assert!(stats.reserved_bytes <= pool, "{stats:?}");
        for (id, bytes, footprint) in engine.running() {
            assert!(
                bytes <= footprint,
                "request {id}: {bytes} bytes held, {footprint} set aside"
            );
        }
        max_running = max_running.max(stats.running);
        steps += 1;
        assert!(steps < 1000, "the engine does not finish");
    }
    assert_eq!(finished, reqs.len());
    assert!(max_running >= 2, "sequences ran together");
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            got.get(id).cloned().unwrap_or_default(),
            want[i],
            "request {i} ({})",
            reqs[i].policy
        );
    }
    assert_eq!(engine.stats().reserved_bytes, 0);
}
