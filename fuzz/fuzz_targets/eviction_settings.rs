//! Budget, mode and eviction settings as flags and request fields give them: parsed from text,
//! validated, then resolved into a schedule for a prompt length — never a panic, an overflow
//! or an allocation sized by the numbers.
#![no_main]

use easykv_core::{Budget, EvictionConfig, Mode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut fields = text.split(',');
    let budget = fields.next().and_then(|b| b.parse::<Budget>().ok());
    let mode = fields.next().and_then(|m| m.parse::<Mode>().ok());
    let mut number = || fields.next().and_then(|n| n.trim().parse::<usize>().ok());
    let (stride, decode_stride, sinks, prompt, chunk) = (number(), number(), number(), number(), number());
    let config = EvictionConfig {
        budget: budget.unwrap_or(Budget::Ratio(0.5)),
        mode: mode.unwrap_or(Mode::Encoding),
        stride: stride.unwrap_or(8),
        decode_stride: decode_stride.unwrap_or(1),
        sinks: sinks.unwrap_or(4),
        ..Default::default()
    };
    if config.validate().is_ok() {
        // Prompt and chunk lengths as a request could give them (a model's context at most).
        let prompt = prompt.unwrap_or(1000) % (1 << 20);
        let chunk = chunk.unwrap_or(512).clamp(1, 1 << 20);
        let _ = config.schedule(prompt, chunk, 1);
    }
});
