//! Chat templates and messages from arbitrary text: the template is the input up to its first
//! NUL, the user's message the rest. Rendering must end (fuel, item limits, deadline) with
//! bounded output, or fail.
#![no_main]

use easykv_models::{ChatMessage, ChatTemplate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // The renderer catches minijinja's own panics on malformed templates and reports them as
        // errors; libFuzzer's hook would abort on those caught panics. A panic that escapes
        // still aborts: the harness turns any unwinding out of the target into an abort.
        std::panic::set_hook(Box::new(|_| {}));
    },
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let (source, message) = text.split_once('\0').unwrap_or((text, "Hi"));
        let template = ChatTemplate::new(source, "<s>", "</s>");
        let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", message)];
        let _ = template.render(&messages, true);
    }
);
