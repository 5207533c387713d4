//! One request's generation as the server sees it: submitted to the engine, its tokens turned
//! into text as they arrive, cut at a stop string, cancelled if the client goes away.

use std::sync::Arc;

use easykv_models::{Event, Rejection, Request, StopReason, TextStream, TextTokenizer, TokenLogprobs, Update};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::openai::ApiError;
use super::AppState;

/// Why an answer ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A token's log-probability with its text, and its step's alternatives.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// Text (and the tokens that made it) ready to send.
#[derive(Debug, Default)]
pub struct Piece {
    pub text: String,
    pub tokens: Vec<TokenInfo>,
}

/// Holds back the end of the text that could still become a stop string, and finds the first
/// stop string once it is complete.
struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Adds `text`; returns what can be sent now and whether a stop string was reached (the
    /// text from it on is dropped).
    fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // The longest tail of the held text that begins some stop string stays held.
        let keep = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&k| {
                        self.held.is_char_boundary(self.held.len() - k)
                            && s.starts_with(&self.held[self.held.len() - k..])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// A running request; dropping it before the end cancels the request in the engine.
pub struct Generation {
    state: Arc<AppState>,
    ticket: u64,
    updates: UnboundedReceiver<Update>,
    text: TextStream<Arc<TextTokenizer>>,
    stops: StopMatcher,
    /// Log-probabilities of tokens whose text is still held back.
    pending: Vec<TokenInfo>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    finished: Option<FinishReason>,
}

impl Generation {
    /// Submits `request` and waits until the engine takes or refuses it.
    pub async fn start(state: Arc<AppState>, request: Request, stops: Vec<String>) -> Result<Self, ApiError> {
        let (tx, mut updates) = unbounded_channel();
        let prompt_tokens = request.prompt.len();
        let ticket = state.engine.submit(request, Box::new(move |u| tx.send(u).is_ok()));
        match updates.recv().await {
            Some(Update::Accepted) => {}
            Some(Update::Rejected(r)) => return Err(rejection(r)),
            Some(Update::Event(_)) | None => return Err(ApiError::server("the engine stopped")),
        }
        state.metrics.add_prompt_tokens(prompt_tokens);
        state.metrics.started();
        Ok(Self {
            text: TextStream::new(state.tokenizer.clone(), true),
            state,
            ticket,
            updates,
            stops: StopMatcher {
                stops,
                held: String::new(),
            },
            pending: Vec::new(),
            prompt_tokens,
            completion_tokens: 0,
            finished: None,
        })
    }

    /// The next text to send, or `None` once the answer has ended (then see
    /// [`finish_reason`](Self::finish_reason)).
    pub async fn next(&mut self) -> Result<Option<Piece>, ApiError> {
        while self.finished.is_none() {
            let update = self.updates.recv().await;
            let (text, stopped) = match update {
                Some(Update::Event(Event::Token { token, logprobs, .. })) => {
                    self.completion_tokens += 1;
                    self.state.metrics.add_generated_tokens(1);
                    if let Some(lp) = logprobs {
                        self.pending.push(self.token_info(token, &lp));
                    }
                    let new = self.text.push(token).map_err(|e| ApiError::server(e.to_string()))?;
                    match new {
                        Some(new) => self.stops.push(&new),
                        None => continue,
                    }
                }
                Some(Update::Event(Event::Finished { stop, .. })) => {
                    self.finished = Some(match stop {
                        StopReason::StopToken | StopReason::Cancelled => FinishReason::Stop,
                        StopReason::MaxTokens | StopReason::ContextFull => FinishReason::Length,
                    });
                    (self.stops.flush(), false)
                }
                Some(Update::Rejected(r)) => return Err(rejection(r)),
                Some(Update::Accepted) => continue,
                None => return Err(ApiError::server("the engine stopped")),
            };
            if stopped {
                self.finished = Some(FinishReason::Stop);
                self.state.engine.cancel(self.ticket);
            }
            if !text.is_empty() || self.finished.is_some() {
                let tokens = std::mem::take(&mut self.pending);
                return Ok(Some(Piece { text, tokens }));
            }
        }
        Ok(None)
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    fn token_info(&self, token: u32, lp: &TokenLogprobs) -> TokenInfo {
        let text = |id: u32| self.state.tokenizer.decode(&[id], false).unwrap_or_default();
        TokenInfo {
            text: text(token),
            logprob: lp.logprob,
            top: lp.top.iter().map(|&(id, p)| (text(id), p)).collect(),
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.state.metrics.ended();
        if self.finished.is_none() {
            self.state.engine.cancel(self.ticket);
        }
    }
}

fn rejection(r: Rejection) -> ApiError {
    use axum::http::StatusCode;
    match r {
        Rejection::Invalid(m) => ApiError::invalid(m, None),
        Rejection::Busy(m) => ApiError::invalid(format!("the server is busy: {m}; retry later"), None)
            .with_status(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"),
        Rejection::ShuttingDown => {
            ApiError::server(r.to_string()).with_status(StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
        }
        Rejection::Failed(m) => ApiError::server(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().map(|s| s.to_string()).collect(),
            held: String::new(),
        }
    }

    #[test]
    fn a_stop_string_split_over_pieces_is_found_and_never_sent() {
        let mut m = matcher(&["END", "\n\n"]);
        assert_eq!(m.push("Hello E"), ("Hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("D and more"), (String::new(), true));
        let mut m = matcher(&["END"]);
        assert_eq!(m.push("ENx"), ("ENx".to_string(), false));
        assert_eq!(m.push("yE"), ("y".to_string(), false));
        assert_eq!(m.flush(), "E");
    }

    #[test]
    fn without_stop_strings_everything_passes_and_multibyte_text_is_not_split() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("héllo"), ("héllo".to_string(), false));
        let mut m = matcher(&["é!"]);
        assert_eq!(m.push("café"), ("caf".to_string(), false));
        assert_eq!(m.push("!"), (String::new(), true));
    }
}
