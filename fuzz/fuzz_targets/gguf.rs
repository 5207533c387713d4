//! The GGUF reader on arbitrary bytes: parsing, then what loading reads from a parsed file —
//! the model's shape, the tokenizer built from its metadata, and every tensor's
//! dequantization (small ones; the reader already bounds sizes by the file's length).
#![no_main]

use easykv_models::gguf::GgufFile;
use easykv_models::{ModelConfig, TextTokenizer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::parse(data.to_vec()) else {
        return;
    };
    let _ = ModelConfig::from_gguf(&file);
    if let Ok(tokenizer) = TextTokenizer::from_gguf(&file) {
        if let Ok(ids) = tokenizer.encode("Hello, world! 123 <|im_start|>") {
            let _ = tokenizer.decode(&ids, true);
        }
    }
    for info in &file.tensors {
        if info.n_elements() <= 1 << 16 {
            let _ = file.dequantize(&info.name);
        }
    }
});
