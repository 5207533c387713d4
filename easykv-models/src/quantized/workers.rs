//! Worker threads that wait for a decode product's share by spinning, not sleeping.
//!
//! A decode step makes ~120 products of tens of microseconds each, with the rest of the step
//! (norms, attention) in between. rayon's workers fall asleep in those gaps and are woken by a
//! system call for the next product: on a 2-core virtual machine measured here the futex
//! wait and wake held about a fifth of a SmolLM2 decode's samples (`perf`). These workers
//! spin (yielding now and then) for a while after each task, so the next one starts without a
//! system call, and park only after [`SPIN`] without work.
//!
//! Tasks own what they read (`'static`: weights behind `Arc`s, activations in an `Arc`): the
//! workspace allows no `unsafe` here, so a task cannot borrow the caller's stack. One caller at
//! a time uses the pool; another finds it busy and takes rayon instead.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// A task: computes one share of a product's outputs.
pub type Task = Box<dyn FnOnce() -> Vec<f32> + Send>;

/// How long a worker spins without work before it parks.
const SPIN: Duration = Duration::from_millis(2);

const IDLE: u8 = 0;
const READY: u8 = 1;
const DONE: u8 = 2;

struct Worker {
    state: AtomicU8,
    task: Mutex<Option<Task>>,
    result: Mutex<Vec<f32>>,
    parked: AtomicBool,
    thread: OnceLock<Thread>,
}

/// The pool (see the module's documentation).
pub struct Workers {
    workers: Vec<Arc<Worker>>,
    busy: Mutex<()>,
}

impl Workers {
    /// The process's pool: one worker fewer than rayon's threads (the caller is the other).
    pub fn global() -> &'static Workers {
        static POOL: OnceLock<Workers> = OnceLock::new();
        POOL.get_or_init(|| Workers::new(rayon::current_num_threads().saturating_sub(1)))
    }

    fn new(n: usize) -> Self {
        let workers: Vec<Arc<Worker>> = (0..n)
            .map(|_| {
                Arc::new(Worker {
                    state: AtomicU8::new(IDLE),
                    task: Mutex::new(None),
                    result: Mutex::new(Vec::new()),
                    parked: AtomicBool::new(false),
                    thread: OnceLock::new(),
                })
            })
            .collect();
        // A worker that cannot be started leaves the pool without it (the caller then runs
        // more of the work itself).
        let workers = workers
            .into_iter()
            .filter(|w| {
                let w2 = Arc::clone(w);
                std::thread::Builder::new()
                    .name("easykv-product".into())
                    .spawn(move || work(&w2))
                    .map(|h| w.thread.set(h.thread().clone()).is_ok())
                    .unwrap_or(false)
            })
            .collect();
        Self {
            workers,
            busy: Mutex::new(()),
        }
    }

    /// Tasks this pool runs at once (its workers and the caller).
    pub fn width(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `tasks` — the first on the calling thread, the others on the workers — and returns
    /// their results in order; `None`, with nothing run, where the pool is in use or has fewer
    /// workers than tasks to hand out.
    pub fn run(&self, tasks: Vec<Task>) -> Option<Vec<Vec<f32>>> {
        let _guard = self.busy.try_lock().ok()?;
        if tasks.len() > self.width() || tasks.is_empty() {
            return None;
        }
        let mut tasks = tasks.into_iter();
        let own = tasks.next()?;
        let handed: Vec<&Arc<Worker>> = self.workers.iter().zip(tasks).map(|(w, t)| hand(w, t)).collect();
        let mut results = vec![own()];
        for w in handed {
            // Its share is as large as the caller's, so it is done or nearly done: spin.
            let mut spins = 0u32;
            while w.state.load(Ordering::Acquire) != DONE {
                spins = spins.wrapping_add(1);
                match spins % 1024 {
                    0 => std::thread::yield_now(),
                    _ => std::hint::spin_loop(),
                }
            }
            results.push(std::mem::take(&mut *w.result.lock().unwrap_or_else(|e| e.into_inner())));
            w.state.store(IDLE, Ordering::Release);
        }
        Some(results)
    }
}

/// Gives `w` the task `t` and wakes it if it parked.
fn hand(w: &Arc<Worker>, t: Task) -> &Arc<Worker> {
    *w.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    w.state.store(READY, Ordering::SeqCst);
    if w.parked.load(Ordering::SeqCst) {
        if let Some(thread) = w.thread.get() {
            thread.unpark();
        }
    }
    w
}

/// A worker's loop: wait for a task (spinning, then parked), run it, publish the result.
fn work(w: &Worker) {
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        while w.state.load(Ordering::Acquire) != READY {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            if since.elapsed() < SPIN {
                // Lets another thread that wants this core (rayon's, say) run.
                std::thread::yield_now();
                continue;
            }
            // Parked only after announcing it, and only if no task came meanwhile: `hand`
            // stores the task before it reads `parked`.
            w.parked.store(true, Ordering::SeqCst);
            if w.state.load(Ordering::SeqCst) != READY {
                std::thread::park_timeout(Duration::from_millis(100));
            }
            w.parked.store(false, Ordering::SeqCst);
            since = Instant::now();
        }
        let task = w.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        // A task that panics hands back nothing (the caller sees a share of the wrong size)
        // rather than leave the caller spinning.
        let out = task
            .and_then(|t| std::panic::catch_unwind(std::panic::AssertUnwindSafe(t)).ok())
            .unwrap_or_default();
        *w.result.lock().unwrap_or_else(|e| e.into_inner()) = out;
        w.state.store(DONE, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_once_each_and_come_back_in_order() {
        let pool = Workers::new(3);
        for round in 0..200 {
            let tasks: Vec<Task> = (0..pool.width())
                .map(|i| Box::new(move || vec![(round * 10 + i) as f32; i + 1]) as Task)
                .collect();
            let results = pool.run(tasks).unwrap();
            for (i, r) in results.iter().enumerate() {
                assert_eq!(r, &vec![(round * 10 + i) as f32; i + 1]);
            }
            // Long enough between rounds, now and then, for the workers to park.
            if round % 50 == 0 {
                std::thread::sleep(SPIN * 2);
            }
        }
        // More tasks than it runs at once: refused, nothing run.
        let tasks: Vec<Task> = (0..pool.width() + 1).map(|_| Box::new(Vec::new) as Task).collect();
        assert!(pool.run(tasks).is_none());
    }
}
