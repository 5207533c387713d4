//! Chat prompts rendered with the model's own Jinja template (minijinja).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use minijinja::value::{Kwargs, StringInput};
use minijinja::{context, filters, Environment, ErrorKind, State, Value};
use serde::Serialize;

use crate::error::{Error, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Instructions a template may run per rendering, plus [`TEMPLATE_FUEL_PER_MESSAGE`] per
/// message: far above what any chat template needs (a few dozen per message), far below what
/// makes a hang (nested `range` loops). The work a template may do grows with the conversation
/// it renders, not with what the template asks for.
const TEMPLATE_FUEL: u64 = 100_000;
const TEMPLATE_FUEL_PER_MESSAGE: u64 = 5_000;

/// Items a template may print, join, sort or list at once. A sequence repeated by `*` is a lazy
/// object whose length minijinja knows without iterating: a template can build one of 10^13
/// items in one instruction, which fuel (counted per instruction) does not bound.
const MAX_TEMPLATE_ITEMS: usize = 1 << 20;

/// How long a rendering may take (real templates take microseconds).
const TEMPLATE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Bytes a rendering may write beyond the messages' own text.
const TEMPLATE_OVERHEAD_BYTES: usize = 1 << 20;

/// A writer that refuses to grow past its limit.
struct Capped {
    out: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            return Err(std::io::Error::other("output too large"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A model's chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    /// Set once a rendering missed the deadline: its thread may still be running, and the
    /// template is refused from then on, so at most one such thread exists per template.
    hung: Arc<AtomicBool>,
}

impl ChatTemplate {
    pub fn new(source: impl Into<String>, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            hung: Arc::default(),
        }
    }

    /// Renders `messages`, ending with the assistant's turn opened when `add_generation_prompt`.
    ///
    /// Fuel bounds the template's instructions and a byte limit its output, but one instruction
    /// can still iterate without end (printing `(0,) * 10**13`, found by fuzzing): the
    /// rendering runs on a thread of its own and is abandoned after [`TEMPLATE_DEADLINE`]; the
    /// template is refused after that (the abandoned thread may still be spinning).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if self.hung.load(Ordering::Relaxed) {
            return Err(Error::ChatTemplate(format!(
                "the template is disabled: a rendering did not finish within {} s",
                TEMPLATE_DEADLINE.as_secs()
            )));
        }
        let (template, messages) = (self.clone(), messages.to_vec());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("easykv-chat-template".into())
            .spawn(move || {
                // minijinja panics on some malformed templates (found by fuzzing: an `import`
                // whose target is a keyword reaches an `unreachable!` in its code generator).
                let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    template.render_here(&messages, add_generation_prompt)
                }))
                .unwrap_or_else(|_| {
                    Err(Error::ChatTemplate(
                        "the template engine failed on this template".into(),
                    ))
                });
                let _ = tx.send(rendered);
            })
            .map_err(|e| Error::ChatTemplate(format!("starting the renderer: {e}")))?;
        match rx.recv_timeout(TEMPLATE_DEADLINE) {
            Ok(rendered) => rendered,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(Error::ChatTemplate("the renderer stopped without an answer".into()))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                self.hung.store(true, Ordering::Relaxed);
                Err(Error::ChatTemplate(format!(
                    "the template did not finish within {} s",
                    TEMPLATE_DEADLINE.as_secs()
                )))
            }
        }
    }

    fn render_here(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        // The template comes from a model file: bound its work and its output.
        let fuel = TEMPLATE_FUEL.saturating_add(TEMPLATE_FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64));
        env.set_fuel(Some(fuel));
        bound_sequences(&mut env);
        // Templates written for Python's Jinja call str methods (.strip(), .startswith(), ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let text: usize = messages.iter().map(|m| m.content.len() + m.role.len()).sum();
        let mut out = Capped {
            out: Vec::new(),
            limit: text.saturating_mul(4).saturating_add(TEMPLATE_OVERHEAD_BYTES),
        };
        let limit = out.limit;
        tmpl.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            },
            &mut out,
        )
        .map_err(|e| match e.kind() {
            minijinja::ErrorKind::WriteFailure => Error::ChatTemplate(format!(
                "the template writes more than {limit} bytes for these messages"
            )),
            minijinja::ErrorKind::OutOfFuel => Error::ChatTemplate(format!(
                "the template runs more than {fuel} instructions (a runaway loop?)"
            )),
            _ => Error::ChatTemplate(e.to_string()),
        })?;
        String::from_utf8(out.out).map_err(|e| Error::ChatTemplate(e.to_string()))
    }
}

/// Refuses values holding more than [`MAX_TEMPLATE_ITEMS`] items in all (nested ones
/// included) before anything iterates them: printing, and the filters that walk a whole
/// sequence, check first.
fn check_items(value: &Value) -> std::result::Result<(), minijinja::Error> {
    fn walk(value: &Value, left: &mut usize, depth: usize) -> std::result::Result<(), minijinja::Error> {
        let too_large = || minijinja::Error::new(ErrorKind::InvalidOperation, "sequence too large for a chat template");
        if value.as_object().is_none() || depth > 64 {
            return Ok(());
        }
        // A known length is refused before a single item is drawn; an unknown one counts down.
        if value.len().is_some_and(|n| n > *left) {
            return Err(too_large());
        }
        let Ok(items) = value.try_iter() else {
            return Ok(());
        };
        // A map iterates its keys; its values are walked too.
        let map = value.kind() == minijinja::value::ValueKind::Map;
        for item in items {
            *left = left.checked_sub(1).ok_or_else(too_large)?;
            walk(&item, left, depth + 1)?;
            if let Some(v) = map.then(|| value.get_item(&item).ok()).flatten() {
                walk(&v, left, depth + 1)?;
            }
        }
        Ok(())
    }
    let mut left = MAX_TEMPLATE_ITEMS;
    walk(value, &mut left, 0)
}

/// Printing and the whole-sequence filters, each checking [`check_items`] first.
fn bound_sequences(env: &mut Environment<'_>) {
    env.set_formatter(|out, state, value| {
        check_items(value)?;
        minijinja::escape_formatter(out, state, value)
    });
    env.add_filter(
        "join",
        |state: &State, value: &Value, joiner: Option<StringInput<'_>>| {
            check_items(value)?;
            filters::join(state, value, joiner)
        },
    );
    env.add_filter("list", |state: &State, value: Value| {
        check_items(&value)?;
        filters::list(state, value)
    });
    env.add_filter("string", |state: &State, value: &Value| {
        check_items(value)?;
        filters::string(state, value)
    });
    env.add_filter("tojson", |value: &Value, indent: Option<Value>, args: Kwargs| {
        check_items(value)?;
        filters::tojson(value, indent, args)
    });
    env.add_filter("sort", |state: &State, value: Value, args: Kwargs| {
        check_items(&value)?;
        filters::sort(state, value, args)
    });
    env.add_filter("unique", |state: &State, value: Value, args: Kwargs| {
        check_items(&value)?;
        filters::unique(state, value, args)
    });
    env.add_filter("sum", |state: &State, value: Value| {
        check_items(&value)?;
        filters::sum(state, value)
    });
    env.add_filter("min", |state: &State, value: Value| {
        check_items(&value)?;
        filters::min(state, value)
    });
    env.add_filter("max", |state: &State, value: Value| {
        check_items(&value)?;
        filters::max(state, value)
    });
    env.add_filter("last", |value: Value| {
        check_items(&value)?;
        filters::last(value)
    });
    env.add_filter("reverse", |value: &Value| {
        check_items(value)?;
        filters::reverse(value)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn runaway_templates_stop_with_an_error() {
        let loops = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "",
            "",
        );
        let err = loops
            .render(&[ChatMessage::new("user", "Hi")], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("instructions"), "{err}");
        let big = ChatTemplate::new("{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}", "", "");
        let err = big
            .render(&[ChatMessage::new("user", "Hi")], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("writes more than"), "{err}");
        // Sequences of ~10^13 items built in one instruction (the first found by fuzzing):
        // printed, joined, listed or nested, refused before they are walked.
        for source in [
            "Z{{(0555555555556*55+55552777.)*(0,)*5-}}",
            "{{ ((0,) * 10**13) | join }}",
            "{{ ((0,) * 10**13) | list | length }}",
            "{{ [1, ((0,) * 10**13)] }}",
            "{{ {'a': (0,) * 10**13} }}",
            "{{ ((0,) * 10**13) | tojson }}",
        ] {
            let err = ChatTemplate::new(source, "", "")
                .render(&[ChatMessage::new("user", "Hi")], true)
                .unwrap_err()
                .to_string();
            assert!(err.contains("too large"), "{source}: {err}");
        }
        // minijinja's code generator panics on this one (found by fuzzing): an error instead.
        let source = "{% import if as ge(05) %}";
        let err = ChatTemplate::new(source, "", "")
            .render(&[ChatMessage::new("user", "Hi")], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("engine failed"), "{err}");
        // What still iterates without end (a membership test) is abandoned at the deadline, and
        // the template refused from then on: one abandoned thread at most.
        let endless = ChatTemplate::new("{{ 1 in ((0,) * 10**13) }}", "", "");
        let started = std::time::Instant::now();
        let err = endless
            .render(&[ChatMessage::new("user", "Hi")], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not finish"), "{err}");
        assert!(started.elapsed() < TEMPLATE_DEADLINE * 2);
        let again = std::time::Instant::now();
        let err = endless
            .clone()
            .render(&[ChatMessage::new("user", "Hi")], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("disabled"), "{err}");
        assert!(again.elapsed() < std::time::Duration::from_millis(100));
    }

    #[test]
    fn renders_default_system_prompt_and_generation_prompt() {
        let t = ChatTemplate::new(SMOL, "", "");
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_string_methods_and_bad_templates() {
        let t = ChatTemplate::new("{{ messages[0].content.strip() }}", "", "");
        assert_eq!(t.render(&[ChatMessage::new("user", "  x  ")], false).unwrap(), "x");
        assert!(ChatTemplate::new("{% for %}", "", "").render(&[], false).is_err());
    }
}
