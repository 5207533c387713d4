//! Chat prompts rendered with the model's own Jinja template (minijinja).

use minijinja::{context, Environment};
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

/// Instructions a template may run per rendering: far above what any chat template needs
/// (thousands), far below what makes a hang (nested `range` loops).
const TEMPLATE_FUEL: u64 = 2_000_000;

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
}

impl ChatTemplate {
    pub fn new(source: impl Into<String>, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        }
    }

    /// Renders `messages`, ending with the assistant's turn opened when `add_generation_prompt`.
    ///
    /// Fuel bounds the template's instructions and a byte limit its output, but one instruction
    /// can still iterate without end (printing `(0,) * 10**13`, found by fuzzing): the
    /// rendering runs on a thread of its own and is abandoned after [`TEMPLATE_DEADLINE`].
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let (template, messages) = (self.clone(), messages.to_vec());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("easykv-chat-template".into())
            .spawn(move || {
                let _ = tx.send(template.render_here(&messages, add_generation_prompt));
            })
            .map_err(|e| Error::ChatTemplate(format!("starting the renderer: {e}")))?;
        rx.recv_timeout(TEMPLATE_DEADLINE).unwrap_or_else(|_| {
            Err(Error::ChatTemplate(format!(
                "the template did not finish within {} s",
                TEMPLATE_DEADLINE.as_secs()
            )))
        })
    }

    fn render_here(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        // The template comes from a model file: bound its work and its output.
        env.set_fuel(Some(TEMPLATE_FUEL));
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
                "the template runs more than {TEMPLATE_FUEL} instructions (a runaway loop?)"
            )),
            _ => Error::ChatTemplate(e.to_string()),
        })?;
        String::from_utf8(out.out).map_err(|e| Error::ChatTemplate(e.to_string()))
    }
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
        // One instruction that iterates ~10^13 times (found by fuzzing): abandoned at the deadline.
        let endless = ChatTemplate::new("Z{{(0555555555556*55+55552777.)*(0,)*5-}}", "", "");
        let started = std::time::Instant::now();
        let err = endless
            .render(&[ChatMessage::new("user", "Hi")], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not finish"), "{err}");
        assert!(started.elapsed() < TEMPLATE_DEADLINE * 2);
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
