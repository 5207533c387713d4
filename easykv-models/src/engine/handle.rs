//! The engine on a thread of its own, driven through a handle: what a server holds.
//!
//! [`EngineHandle::submit`] hands a request and a sink to the engine's thread and returns at
//! once; the sink then receives [`Update`]s — accepted or rejected, each token as it is chosen,
//! the end. A sink that reports its receiver gone (a client that disconnected) cancels its
//! request, whose memory returns to the pool at the next step. The handle never blocks on a
//! step, so an async server can call it from its tasks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use burn::prelude::Backend;

use super::{Engine, EngineConfig, EngineStats, Event, Request, RequestId};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::linear::WeightDType;
use crate::model::CausalLm;

/// Why the engine refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The request can never run as asked (the message says why).
    Invalid(String),
    /// The queue is full; the same request may succeed later.
    Busy(String),
    /// The engine is stopping and takes nothing new.
    ShuttingDown,
    /// The model failed while running the request.
    Failed(String),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Invalid(m) | Rejection::Busy(m) | Rejection::Failed(m) => f.write_str(m),
            Rejection::ShuttingDown => f.write_str("the server is shutting down"),
        }
    }
}

/// What a request's sink receives, in this order: `Accepted` or `Rejected` (then nothing
/// more), then its events, the last a [`Event::Finished`] — or `Rejected(Failed)` if the
/// model failed on the way.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Accepted,
    Rejected(Rejection),
    Event(Event),
}

/// Where a request's updates go; returns `false` once nobody listens, which cancels it.
pub type EventSink = Box<dyn FnMut(Update) -> bool + Send>;

enum Command {
    Submit {
        ticket: u64,
        request: Box<Request>,
        sink: EventSink,
    },
    Cancel(u64),
    /// Take nothing new; finish what runs, then stop.
    Drain,
}

/// A handle on an engine running on its own thread (see the module's documentation).
pub struct EngineHandle {
    commands: Sender<Command>,
    stats: Arc<Mutex<EngineStats>>,
    next_ticket: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl EngineHandle {
    /// Starts an engine over `model` on a new thread (see [`Engine::new`]).
    pub fn spawn<B: Backend>(
        model: Box<dyn CausalLm<B>>,
        model_config: ModelConfig,
        kv_dtype: WeightDType,
        config: EngineConfig,
    ) -> Result<Self> {
        let (commands, inbox) = mpsc::channel();
        let stats = Arc::new(Mutex::new(EngineStats {
            pool_bytes: config.pool_bytes,
            ..EngineStats::default()
        }));
        let (started, start) = mpsc::channel();
        let shared = stats.clone();
        let thread = std::thread::Builder::new()
            .name("easykv-engine".into())
            .spawn(move || match Engine::new(model, model_config, kv_dtype, config) {
                Ok(engine) => {
                    let _ = started.send(Ok(()));
                    Worker::new(engine, shared).run(inbox);
                }
                Err(e) => {
                    let _ = started.send(Err(e));
                }
            })
            .map_err(|e| Error::InvalidInput(format!("starting the engine's thread: {e}")))?;
        start
            .recv()
            .map_err(|_| Error::InvalidInput("the engine's thread stopped while starting".into()))??;
        Ok(Self {
            commands,
            stats,
            next_ticket: AtomicU64::new(0),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues `request`; `sink` hears whether it was accepted, then its tokens. Returns the
    /// ticket that [`cancel`](Self::cancel) takes.
    pub fn submit(&self, request: Request, mut sink: EventSink) -> u64 {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let command = Command::Submit {
            ticket,
            request: Box::new(request),
            sink,
        };
        if let Err(mpsc::SendError(Command::Submit { sink: s, .. })) = self.commands.send(command) {
            sink = s;
            sink(Update::Rejected(Rejection::ShuttingDown));
        }
        ticket
    }

    /// Cancels the request of `ticket` (queued or running); nothing if it has finished.
    pub fn cancel(&self, ticket: u64) {
        let _ = self.commands.send(Command::Cancel(ticket));
    }

    /// The engine's counters as of its last step.
    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses new requests from now on, lets the running and queued ones finish, and waits
    /// for the engine's thread to end.
    pub fn drain(&self) {
        let _ = self.commands.send(Command::Drain);
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        // The thread ends once the channel closes and its work is done.
        let _ = self.commands.send(Command::Drain);
    }
}

/// The engine's thread: the engine and the sinks of its requests.
struct Worker<B: Backend> {
    engine: Engine<B>,
    stats: Arc<Mutex<EngineStats>>,
    /// Engine id → (ticket, sink); ticket → engine id.
    sinks: HashMap<RequestId, (u64, EventSink)>,
    tickets: HashMap<u64, RequestId>,
    draining: bool,
}

impl<B: Backend> Worker<B> {
    fn new(engine: Engine<B>, stats: Arc<Mutex<EngineStats>>) -> Self {
        Self {
            engine,
            stats,
            sinks: HashMap::new(),
            tickets: HashMap::new(),
            draining: false,
        }
    }

    fn run(mut self, inbox: Receiver<Command>) {
        loop {
            // Idle: wait for work. Busy: take what has arrived, then step.
            if self.engine.is_idle() {
                if self.draining {
                    return;
                }
                match inbox.recv() {
                    Ok(c) => self.command(c),
                    Err(_) => return,
                }
            }
            while let Ok(c) = inbox.try_recv() {
                self.command(c);
            }
            if !self.engine.is_idle() {
                self.step();
            }
            self.publish();
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Submit {
                ticket,
                request,
                mut sink,
            } => {
                if self.draining {
                    sink(Update::Rejected(Rejection::ShuttingDown));
                    return;
                }
                match self.engine.submit(*request) {
                    Ok(id) => {
                        if sink(Update::Accepted) {
                            self.sinks.insert(id, (ticket, sink));
                            self.tickets.insert(ticket, id);
                        } else {
                            self.engine.cancel(id);
                        }
                    }
                    Err(Error::Busy(m)) => {
                        sink(Update::Rejected(Rejection::Busy(m)));
                    }
                    Err(e) => {
                        sink(Update::Rejected(Rejection::Invalid(e.to_string())));
                    }
                }
            }
            Command::Cancel(ticket) => {
                if let Some(id) = self.tickets.remove(&ticket) {
                    self.sinks.remove(&id);
                    self.engine.cancel(id);
                }
            }
            Command::Drain => self.draining = true,
        }
    }

    fn step(&mut self) {
        match self.engine.step() {
            Ok(events) => {
                for event in events {
                    let (id, last) = match &event {
                        Event::Token { id, .. } => (*id, false),
                        Event::Finished { id, .. } => (*id, true),
                    };
                    let Some((ticket, sink)) = self.sinks.get_mut(&id) else {
                        continue;
                    };
                    let ticket = *ticket;
                    let listening = sink(Update::Event(event));
                    if last || !listening {
                        self.sinks.remove(&id);
                        self.tickets.remove(&ticket);
                        if !last {
                            self.engine.cancel(id);
                        }
                    }
                }
            }
            Err(e) => {
                // Which sequence failed is unknown: every request ends, and the engine starts
                // empty.
                tracing::error!("engine step failed: {e}");
                for (id, (_, mut sink)) in self.sinks.drain() {
                    sink(Update::Rejected(Rejection::Failed(format!("the model failed: {e}"))));
                    self.engine.cancel(id);
                }
                self.tickets.clear();
            }
        }
    }

    fn publish(&self) {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = self.engine.stats();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_read_as_their_message() {
        assert_eq!(Rejection::Invalid("bad budget".into()).to_string(), "bad budget");
        assert_eq!(Rejection::ShuttingDown.to_string(), "the server is shutting down");
    }
}
