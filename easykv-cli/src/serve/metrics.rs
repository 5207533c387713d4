//! `GET /metrics`: the server's counters and the engine's state in Prometheus' text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use easykv_models::EngineStats;

/// Counters the HTTP side keeps (the engine keeps its own).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Responses by status code.
    responses: Mutex<BTreeMap<u16, u64>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    in_flight: AtomicU64,
}

impl Metrics {
    pub fn count_response(&self, status: u16) {
        *self
            .responses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(status)
            .or_default() += 1;
    }

    pub fn add_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn add_generated_tokens(&self, n: usize) {
        self.generated_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A generation started; [`ended`](Self::ended) when it is over (streams outlive their
    /// handlers).
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// The text `GET /metrics` answers.
    pub fn render(&self, engine: &EngineStats) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP easykv_{name} {help}\n# TYPE easykv_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "easykv_{name}{labels} {value}");
            }
        };
        let responses: Vec<(String, u64)> = self
            .responses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(status, n)| (format!("{{status=\"{status}\"}}"), *n))
            .collect();
        metric(
            "requests_total",
            "counter",
            "HTTP responses by status code.",
            &responses,
        );
        let one = |v: u64| [(String::new(), v)];
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric(
            "requests_in_flight",
            "gauge",
            "Generations in progress (queued or running).",
            &one(load(&self.in_flight)),
        );
        metric(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens of accepted requests.",
            &one(load(&self.prompt_tokens)),
        );
        metric(
            "generation_tokens_total",
            "counter",
            "Tokens generated for clients.",
            &one(load(&self.generated_tokens)),
        );
        metric(
            "queue_length",
            "gauge",
            "Requests waiting for room in the KV pool.",
            &one(engine.queued as u64),
        );
        metric(
            "sequences_running",
            "gauge",
            "Sequences being prefilled or decoded.",
            &one(engine.running as u64),
        );
        metric(
            "kv_bytes_in_use",
            "gauge",
            "Bytes of keys and values the running sequences hold.",
            &one(engine.kv_bytes),
        );
        metric(
            "kv_bytes_reserved",
            "gauge",
            "Bytes of the pool set aside for the running sequences.",
            &one(engine.reserved_bytes),
        );
        metric(
            "kv_pool_bytes",
            "gauge",
            "Size of the KV memory pool.",
            &one(engine.pool_bytes),
        );
        metric(
            "evicted_slots_total",
            "counter",
            "Cache slots evicted per (layer, KV head), over all sequences.",
            &one(engine.evicted_slots),
        );
        metric(
            "sequences_finished_total",
            "counter",
            "Sequences that ran to their end.",
            &one(engine.finished),
        );
        if let Some(rss) = resident_bytes() {
            metric(
                "process_resident_memory_bytes",
                "gauge",
                "The server's resident memory.",
                &one(rss),
            );
        }
        out
    }
}

/// This process's resident memory (Linux: `VmRSS` of /proc/self/status).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_by_status_and_the_engine_gauges() {
        let m = Metrics::default();
        m.count_response(200);
        m.count_response(200);
        m.count_response(429);
        m.add_generated_tokens(7);
        let text = m.render(&EngineStats {
            pool_bytes: 1024,
            running: 3,
            ..Default::default()
        });
        assert!(text.contains("easykv_requests_total{status=\"200\"} 2\n"), "{text}");
        assert!(text.contains("easykv_requests_total{status=\"429\"} 1\n"));
        assert!(text.contains("easykv_generation_tokens_total 7\n"));
        assert!(text.contains("easykv_sequences_running 3\n"));
        assert!(text.contains("# TYPE easykv_kv_pool_bytes gauge\neasykv_kv_pool_bytes 1024\n"));
    }
}
