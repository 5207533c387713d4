//! A Hugging Face model on arbitrary bytes: `config.json` and a safetensors shard (the input
//! split by its first two bytes, the config's length), then every tensor a Llama model reads.
#![no_main]

use easykv_models::hf::HfModelDir;
use easykv_models::WeightSource;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (config, shard) = data[2..].split_at(split);
    let Ok(model) = HfModelDir::from_bytes(config, shard.to_vec()) else {
        return;
    };
    for name in ["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight"] {
        let _ = model.tensor(name);
    }
});
