//! `--mode once` cells of one sample share a prefill (`eval::shared`): every cell's output and
//! metrics must be what the cell gives when it runs alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use easykv_models::eval::matrix::{build_samples, cell_cache, run_cell};
use easykv_models::eval::shared::run_shared;
use easykv_models::eval::{run_matrix, EvalSettings, Results};
use easykv_models::WeightDType;

#[test]
fn shared_prefills_give_each_cell_its_own_result() {
    let loaded = common::load_model("smollm2", WeightDType::F32);
    let settings = EvalSettings {
        tasks: vec!["niah_single".into(), "fidelity".into()],
        model: "smollm2".into(),
        dtype: "f32".into(),
        policies: vec!["snapkv".into(), "ada-snapkv".into(), "expected-attention".into()],
        budgets: vec!["0.25".into(), "0.5".into()],
        mode: "once".into(),
        stride: 8,
        samples: 1,
        lengths: vec![400],
        depths: vec![0.5],
        ppl_tokens: 64,
        new_tokens: 8,
        text_file: Some(common::shared("data/last_of_the_mohicans.txt").display().to_string()),
        seed: 3,
    };
    let samples = build_samples(&loaded, &settings, &mut |_| {}).unwrap();
    let mut results = Results {
        easykv_version: String::new(),
        model_sha256: String::new(),
        settings: settings.clone(),
        cells: Vec::new(),
    };
    run_matrix(&loaded, &samples, &mut results, &mut |_, _| Ok(())).unwrap();
    let cells_per_sample = 1 + settings.policies.len() * settings.budgets.len();
    assert_eq!(results.cells.len(), samples.len() * cells_per_sample);
    for cell in &results.cells {
        let (_, _, sample) = samples
            .iter()
            .find(|(t, n, _)| *t == cell.task && *n == cell.sample)
            .unwrap();
        let reference = results
            .cells
            .iter()
            .find(|c| c.task == cell.task && c.sample == cell.sample && c.policy == "full");
        let alone = run_cell(&loaded, &settings, sample, &cell.policy, &cell.budget, reference).unwrap();
        let what = format!("{} {} {} {}", cell.task, cell.sample, cell.policy, cell.budget);
        assert_eq!(cell.output, alone.output, "{what}");
        assert_eq!(cell.metrics, alone.metrics, "{what}");
    }
    // The policies' cells of a sample do share its prefill (the path above must not have run
    // every cell alone), with the same results.
    let (task, name, sample) = &samples[0];
    let cells: Vec<(String, String)> = results
        .cells
        .iter()
        .filter(|c| c.task == *task && c.sample == *name && c.policy != "full")
        .map(|c| (c.policy.clone(), c.budget.clone()))
        .collect();
    let caches = cells
        .iter()
        .map(|(p, b)| cell_cache(&loaded, &settings, sample, p, b).unwrap())
        .collect();
    let shared = run_shared(&loaded, &settings, sample, &cells, caches, None)
        .unwrap()
        .expect("the cells share the prefill");
    for (got, (policy, budget)) in shared.iter().zip(&cells) {
        let want = results
            .cells
            .iter()
            .find(|c| c.task == *task && c.sample == *name && c.policy == *policy && c.budget == *budget)
            .unwrap();
        assert_eq!(
            (&got.output, &got.metrics),
            (&want.output, &want.metrics),
            "{policy} {budget}"
        );
    }
}
