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
    build_cache, generate, CausalLm, Engine, EngineConfig, EngineHandle, Event, GenerateConfig, LoadedModel, Rejection,
    Request, SamplingConfig, Update, WeightDType,
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
    let settings: [(&str, EvictionConfig, usize, usize); 7] = [
        ("full", EvictionConfig::default(), 40, 12),
        ("roco", eviction(Budget::Ratio(0.5), Mode::Encoding, 8), 150, 10),
        ("h2o", eviction(Budget::Ratio(0.25), Mode::Encoding, 4), 96, 14),
        ("tova", eviction(Budget::Tokens(40), Mode::Auto, 8), 70, 16),
        ("recency", eviction(Budget::Tokens(24), Mode::Decoding, 8), 30, 9),
        ("roco", eviction(Budget::Ratio(0.5), Mode::Encoding, 2), 33, 1),
        // Per-head budgets: heads of a layer then hold different slot counts.
        ("ada-snapkv", eviction(Budget::Ratio(0.5), Mode::Once, 8), 120, 10),
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
            logprobs: None,
        })
        .collect()
}

fn alone(m: &LoadedModel<Flex>, r: &Request, chunk: usize) -> Vec<u32> {
    alone_with_logprobs(m, r, chunk, 0).0
}

/// Per step, the most likely `(id, log-probability)` pairs.
type Alternatives = Vec<Vec<(u32, f32)>>;

/// The ids `r` generates alone, with each step's `top` most likely alternatives.
fn alone_with_logprobs(
    m: &LoadedModel<Flex>,
    r: &Request,
    chunk: usize,
    top: usize,
) -> (Vec<u32>, Vec<Vec<(u32, f32)>>) {
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
        top_logprobs: top,
    };
    let g = generate(&m.model, cache.as_mut(), &r.prompt, &cfg, |_| ControlFlow::Continue(())).unwrap();
    (g.ids, g.top_logprobs)
}

/// Both ways of running prompts beside decode steps: passes of their own (chunk groups layer by
/// layer, the CPU's default) and one chunk per prompt riding in the decode step's pass (the
/// GPU's default).
#[test]
fn a_batch_decodes_what_each_sequence_decodes_alone() {
    let chunk = 64;
    let m = load_model("smollm2", WeightDType::F32);
    let reqs = requests(&m);
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&m, r, chunk)).collect();
    let config = m.config.clone();
    let per_token = config.kv_bytes_per_token(4);
    let mut model: Option<Box<dyn CausalLm<Flex>>> = Some(m.model);
    for mixed in [false, true] {
        let model = model
            .take()
            .unwrap_or_else(|| load_model("smollm2", WeightDType::F32).model);
        // A pool for about three sequences at a time: admission waits, memory is reused.
        let pool = 220 * per_token;
        let mut engine = Engine::new(
            model,
            config.clone(),
            WeightDType::F32,
            EngineConfig {
                pool_bytes: pool,
                max_running: 8,
                chunk_size: chunk,
                max_queued: None,
                mixed_passes: Some(mixed),
            },
        )
        .unwrap();
        let ids: Vec<u64> = reqs.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
        let mut got: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        let (mut finished, mut steps, mut max_running) = (0, 0, 0);
        while !engine.is_idle() {
            for e in engine.step().unwrap() {
                match e {
                    Event::Token { id, token, .. } => got.entry(id).or_default().push(token),
                    Event::Finished { .. } => finished += 1,
                }
            }
            let stats = engine.stats();
            assert!(stats.reserved_bytes <= pool, "{stats:?}");
            for (id, bytes, footprint) in engine.running() {
                assert!(
                    bytes <= footprint,
                    "mixed {mixed}, request {id}: {bytes} bytes held, {footprint} set aside"
                );
            }
            max_running = max_running.max(stats.running);
            steps += 1;
            assert!(steps < 1000, "mixed {mixed}: the engine does not finish");
        }
        assert_eq!(finished, reqs.len());
        assert!(max_running >= 2, "sequences ran together");
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                got.get(id).cloned().unwrap_or_default(),
                want[i],
                "mixed {mixed}, request {i} ({})",
                reqs[i].policy
            );
        }
        assert_eq!(engine.stats().reserved_bytes, 0);
    }
}

/// Random arrivals, prompt lengths, token limits, policies and budgets on a tiny random model,
/// some requests cancelled: the pool is never over its size, no cache holds more than was set
/// aside for it, every request that was not cancelled finishes with its tokens, and a finished
/// or cancelled request's memory is back in the pool at once.
#[test]
fn random_traffic_keeps_every_bound_and_finishes() {
    use easykv_models::RandomModel;
    use rand::{Rng, SeedableRng};

    let shape = RandomModel::by_name("tiny").unwrap();
    let config = shape.config();
    let per_token = config.kv_bytes_per_token(4);
    let policies = ["full", "roco", "h2o", "tova", "recency", "random", "ada-snapkv"];
    for seed in 0..8u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let model: Box<dyn CausalLm<Flex>> = Box::new(
            shape
                .build::<Flex>(WeightDType::F32, seed, &Default::default())
                .unwrap(),
        );
        let pool = rng.random_range(300..900) as u64 * per_token;
        let mut engine = Engine::new(
            model,
            config.clone(),
            WeightDType::F32,
            EngineConfig {
                pool_bytes: pool,
                max_running: rng.random_range(1..6),
                chunk_size: rng.random_range(8..64),
                max_queued: None,
                mixed_passes: Some(seed % 2 == 1),
            },
        )
        .unwrap();
        let mut expected: BTreeMap<u64, usize> = BTreeMap::new();
        let mut tokens: BTreeMap<u64, usize> = BTreeMap::new();
        let mut done: BTreeMap<u64, bool> = BTreeMap::new();
        let mut cancelled = Vec::new();
        let (mut submitted, mut steps) = (0, 0);
        while submitted < 12 || !engine.is_idle() {
            if submitted < 12 && rng.random_bool(0.4) {
                let policy = policies[rng.random_range(0..policies.len())];
                let len = rng.random_range(20..200);
                // Some evict while decoding too (a budget in tokens for prompt and generation),
                // a slot per step or in strides, below and above the compaction threshold.
                let auto = policy != "ada-snapkv" && policy != "full" && rng.random_bool(0.4);
                let eviction = EvictionConfig {
                    budget: match auto {
                        true => Budget::Tokens(rng.random_range(16..64)),
                        false => Budget::Ratio(rng.random_range(0.3..0.9)),
                    },
                    stride: rng.random_range(1..8),
                    decode_stride: [1, 4, 32, 40][rng.random_range(0..4)],
                    // Per-head budgets apply to the one cut: heads of different sizes after it.
                    mode: match (policy, auto) {
                        ("ada-snapkv", _) => Mode::Once,
                        (_, true) => Mode::Auto,
                        _ => Mode::Encoding,
                    },
                    ..Default::default()
                };
                let max_new = rng.random_range(0..if auto { 90 } else { 20 });
                let prompt = (0..len).map(|_| rng.random_range(0..256u32)).collect();
                let request = Request {
                    prompt,
                    max_new_tokens: max_new,
                    policy: policy.into(),
                    eviction,
                    sampling: SamplingConfig::default(),
                    stop_ids: Vec::new(),
                    logprobs: None,
                };
                if let Ok(id) = engine.submit(request) {
                    expected.insert(id, max_new);
                }
                submitted += 1;
            }
            if rng.random_bool(0.05) {
                if let Some(&id) = expected
                    .keys()
                    .find(|id| !done.contains_key(*id) && !cancelled.contains(*id))
                {
                    let before = engine.stats().reserved_bytes;
                    let was_running = engine.running().iter().find(|r| r.0 == id).map(|r| r.2);
                    assert!(engine.cancel(id));
                    cancelled.push(id);
                    if let Some(footprint) = was_running {
                        assert_eq!(
                            engine.stats().reserved_bytes,
                            before - footprint,
                            "memory back at cancel"
                        );
                    }
                }
            }
            for e in engine.step().unwrap() {
                match e {
                    Event::Token { id, .. } => *tokens.entry(id).or_default() += 1,
                    Event::Finished { id, .. } => {
                        assert!(done.insert(id, true).is_none(), "request {id} finished twice");
                    }
                }
            }
            let stats = engine.stats();
            assert!(stats.reserved_bytes <= pool, "seed {seed}: {stats:?}");
            let running = engine.running();
            assert_eq!(running.iter().map(|r| r.2).sum::<u64>(), stats.reserved_bytes);
            for (id, bytes, footprint) in running {
                assert!(bytes <= footprint, "seed {seed}, request {id}: {bytes} > {footprint}");
            }
            steps += 1;
            assert!(steps < 5000, "seed {seed}: the engine does not finish");
        }
        for (id, max_new) in &expected {
            if cancelled.contains(id) {
                continue;
            }
            assert!(done.contains_key(id), "seed {seed}: request {id} never finished");
            // Random weights and no stop ids: every request runs to its limit or the context.
            assert_eq!(
                tokens.get(id).copied().unwrap_or(0),
                *max_new,
                "seed {seed}: request {id}"
            );
        }
        assert_eq!(engine.stats().reserved_bytes, 0);
        let generated: usize = tokens.values().sum();
        eprintln!(
            "seed {seed}: {} requests, {} cancelled, {generated} tokens, {steps} steps",
            expected.len(),
            cancelled.len()
        );
        assert!(
            expected.len() >= 8 && generated > 0,
            "seed {seed}: too few requests ran"
        );
    }
}

/// Through the handle (the engine on its own thread, as a server drives it): requests sent
/// from several threads get the tokens they get alone, with the log-probabilities `generate`
/// reports; a sink that stops listening cancels its request and frees its memory; a full
/// queue and a bad request are refused with their reasons.
#[test]
fn the_handle_streams_each_request_its_own_tokens() {
    let chunk = 64;
    let m = load_model("smollm2", WeightDType::F32);
    let mut reqs = requests(&m);
    reqs.truncate(4);
    reqs[1].logprobs = Some(3);
    let want: Vec<(Vec<u32>, Alternatives)> = reqs
        .iter()
        .map(|r| alone_with_logprobs(&m, r, chunk, r.logprobs.unwrap_or(0)))
        .collect();
    let config = m.config.clone();
    let handle = std::sync::Arc::new(
        EngineHandle::spawn::<Flex>(
            m.model,
            config,
            WeightDType::F32,
            EngineConfig {
                pool_bytes: 1 << 30,
                max_running: 8,
                chunk_size: chunk,
                max_queued: Some(6),
                mixed_passes: Some(true),
            },
        )
        .unwrap(),
    );
    let threads: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|r| {
            let handle = handle.clone();
            std::thread::spawn(move || {
                let (tx, rx) = std::sync::mpsc::channel();
                handle.submit(r, Box::new(move |u| tx.send(u).is_ok()));
                let mut updates = Vec::new();
                while let Ok(u) = rx.recv() {
                    let end = matches!(u, Update::Event(Event::Finished { .. }) | Update::Rejected(_));
                    updates.push(u);
                    if end {
                        break;
                    }
                }
                updates
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let updates = t.join().unwrap();
        assert_eq!(updates.first(), Some(&Update::Accepted), "request {i}");
        let mut ids = Vec::new();
        let mut tops = Vec::new();
        for u in &updates[1..] {
            if let Update::Event(Event::Token { token, logprobs, .. }) = u {
                ids.push(*token);
                if let Some(lp) = logprobs {
                    assert_eq!(lp.top.first().map(|t| t.0), Some(*token), "greedy picks the top token");
                    assert_eq!(lp.top.first().map(|t| t.1), Some(lp.logprob));
                    tops.push(lp.top.clone());
                }
            }
        }
        assert!(matches!(updates.last(), Some(Update::Event(Event::Finished { .. }))));
        assert_eq!(ids, want[i].0, "request {i}");
        assert_eq!(tops, want[i].1, "request {i}'s log-probabilities");
    }
    // A listener that leaves after two tokens: the request is cancelled and its memory freed.
    let mut long = reqs[0].clone();
    long.max_new_tokens = 500;
    let (tx, rx) = std::sync::mpsc::channel();
    let mut heard = 0;
    handle.submit(
        long,
        Box::new(move |u| {
            heard += 1;
            heard <= 3 && tx.send(u).is_ok()
        }),
    );
    assert_eq!(rx.recv().unwrap(), Update::Accepted);
    while rx.recv().is_ok() {}
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while handle.stats().running > 0 || handle.stats().reserved_bytes > 0 {
        assert!(std::time::Instant::now() < deadline, "{:?}", handle.stats());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(handle.stats().generated_tokens < 500 + want.iter().map(|w| w.0.len() as u64).sum::<u64>());
    // A bad request is refused with its reason.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut bad = reqs[0].clone();
    bad.prompt = Vec::new();
    handle.submit(bad, Box::new(move |u| tx.send(u).is_ok()));
    match rx.recv().unwrap() {
        Update::Rejected(Rejection::Invalid(m)) => assert!(m.contains("empty"), "{m}"),
        other => panic!("{other:?}"),
    }
    handle.drain();
    let (tx, rx) = std::sync::mpsc::channel();
    handle.submit(reqs[0].clone(), Box::new(move |u| tx.send(u).is_ok()));
    assert_eq!(rx.recv().unwrap(), Update::Rejected(Rejection::ShuttingDown));
}
