//! `easykv serve` over real HTTP on loopback (SmolLM2 on the CPU): every endpoint, every error
//! path, streamed answers, 32 concurrent clients against the same requests one by one, a client
//! that leaves, a full queue, the API key, shutdown on SIGTERM, and the official `openai`
//! Python client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::shared;

/// A server on a free loopback port, killed when dropped.
struct Server {
    child: Child,
    base: String,
    log: std::sync::Mutex<mpsc::Receiver<String>>,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_easykv"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--quiet"])
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start easykv serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let Ok(line) = log.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
                let _ = child.kill();
                let status = child.wait();
                panic!("the server never said where it listens ({status:?})");
            };
            if let Some(rest) = line.split("listening on ").nth(1) {
                let base = rest.split_whitespace().next().unwrap().to_string();
                return Server {
                    child,
                    base,
                    log: std::sync::Mutex::new(log),
                };
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Status and body of a request (`body` None: GET).
    fn call(&self, path: &str, body: Option<&str>, key: Option<&str>) -> (u16, String) {
        let mut req = match body {
            Some(_) => ureq::post(&self.url(path)),
            None => ureq::get(&self.url(path)),
        }
        .timeout(Duration::from_secs(300));
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        match result {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.call(path, Some(&body.to_string()), None);
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
        )
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.call("/metrics", None, None);
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    /// Waits for `name` to read `value` (the engine updates its counters between steps).
    fn wait_metric(&self, name: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.metric(name) != value {
            assert!(Instant::now() < deadline, "{name} never reached {value}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An error answer: its status, and `error.param` / `error.message`.
fn assert_error(got: (u16, Value), status: u16, param: Option<&str>, needle: &str) {
    let (code, body) = got;
    assert_eq!(code, status, "{body}");
    let e = &body["error"];
    assert!(e["message"].as_str().unwrap().contains(needle), "{body}");
    assert!(e["type"].is_string(), "{body}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
    }
}

/// The `data:` payloads of a server-sent event stream, up to `[DONE]`.
fn sse_events(server: &Server, body: &Value) -> Vec<Value> {
    let r = ureq::post(&server.url("/v1/chat/completions"))
        .timeout(Duration::from_secs(300))
        .send_string(&body.to_string())
        .unwrap();
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let mut events = Vec::new();
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return events;
        }
        events.push(serde_json::from_str(data).unwrap());
    }
    panic!("the stream ended without [DONE]");
}

fn completion(prompt: &str, max_tokens: u64) -> Value {
    json!({"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// The shared reference's chat cases: the user's message and HF transformers' greedy answer.
fn reference_chats() -> Vec<(String, String, usize)> {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(shared("reference/smollm2-135m-q4_1.json")).unwrap()).unwrap();
    let path = easykv_models::fetch::resolve_model("smollm2", &mut |_| {}).unwrap();
    let tokenizer =
        easykv_models::TextTokenizer::from_gguf(&easykv_models::gguf::GgufFile::open(&path).unwrap()).unwrap();
    reference["chat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids: Vec<u32> = serde_json::from_value(c["greedy_ids_full_cache"].clone()).unwrap();
            let text = tokenizer.decode(&ids, true).unwrap();
            (c["user"].as_str().unwrap().to_string(), text, ids.len())
        })
        .collect()
}

#[test]
fn endpoints_answers_streams_and_errors() {
    let server = Server::start(&["--max-prompt-tokens", "512", "--max-body-bytes", "65536"]);
    let (status, text) = server.call("/health", None, None);
    assert_eq!((status, text.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, text) = server.call("/v1/models", None, None);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2");

    // Chat answers equal HF transformers' greedy answers, whole and streamed.
    for (user, want, n) in reference_chats() {
        let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": user}],
                          "temperature": 0, "max_tokens": n});
        let (status, answer) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["choices"][0]["message"]["content"], want.as_str(), "{user}");
        assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
        let usage = &answer["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap())
        );
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let events = sse_events(&server, &streamed);
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, want, "{user} (streamed)");
        assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk"));
        let finish: Vec<&Value> = events
            .iter()
            .map(|e| &e["choices"][0]["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish.len(), 1, "one chunk ends the answer");
        let last = events.last().unwrap();
        assert_eq!(last["choices"], json!([]), "the usage chunk comes last");
        assert_eq!(last["usage"], answer["usage"]);
    }

    // Extension fields: the settings that ran are echoed; a budget changes nothing that fits.
    let long = "Paris is the capital and largest city of France. It is known for its museums, its \
                cafes, the river Seine and the tower built by Gustave Eiffel for a world fair. The capital of Italy is";
    let mut body = completion(long, 6);
    body["kv_policy"] = json!("roco");
    body["kv_budget"] = json!(0.5);
    body["kv_stride"] = json!(2);
    let (status, answer) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["kv"],
        json!({"policy": "roco", "budget": "0.5", "mode": "encoding", "stride": 2})
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    // Log-probabilities: the greedy token is the most likely one.
    let mut body = completion("The capital of France is", 3);
    body["logprobs"] = json!(2);
    let (_, answer) = server.post("/v1/completions", &body);
    let lp = &answer["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3, "{answer}");
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let best = top
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(lp["token_logprobs"][i].as_f64().unwrap(), best);
    }
    // A stop string ends the answer before it.
    let mut body = completion("1, 2, 3, 4, 5,", 20);
    body["stop"] = json!([" 8"]);
    let (_, answer) = server.post("/v1/completions", &body);
    assert_eq!(answer["choices"][0]["text"], " 6, 7,", "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");

    // Bad requests: 4xx with an OpenAI-style body, and the server carries on.
    let post = |body: &str| {
        let (status, text) = server.call("/v1/completions", Some(body), None);
        (
            status,
            serde_json::from_str::<Value>(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
        )
    };
    assert_error(post("{\"model\": "), 400, None, "malformed JSON");
    assert_error(post("[1, 2]"), 400, None, "invalid");
    assert_error(
        post(r#"{"model": "smollm2", "prompt": "hi", "max_tokens": "ten"}"#),
        400,
        Some("max_tokens"),
        "invalid",
    );
    assert_error(
        post(r#"{"model": "smollm2", "prompt": 7}"#),
        400,
        Some("prompt"),
        "invalid",
    );
    assert_error(post(r#"{"model": "smollm2"}"#), 400, None, "prompt");
    assert_error(post(r#"{"prompt": "hi"}"#), 400, Some("model"), "model");
    let with = |k: &str, v: Value| {
        let mut b = completion("hi", 4);
        b[k] = v;
        server.post("/v1/completions", &b)
    };
    assert_error(with("model", json!("gpt-4")), 404, Some("model"), "does not exist");
    assert_error(with("max_tokens", json!(100_000)), 400, Some("max_tokens"), "context");
    assert_error(with("max_tokens", json!(0)), 400, Some("max_tokens"), "≥ 1");
    assert_error(
        with("prompt", json!("word ".repeat(600))),
        400,
        Some("prompt"),
        "more than 512 tokens",
    );
    assert_error(with("prompt", json!("")), 400, Some("prompt"), "empty");
    assert_error(with("prompt", json!([1, 99_999_999])), 400, None, "vocabulary");
    assert_error(with("prompt", json!(["a", "b"])), 400, Some("prompt"), "one prompt");
    assert_error(with("n", json!(2)), 400, Some("n"), "n > 1");
    assert_error(with("temperature", json!(3.5)), 400, Some("temperature"), "temperature");
    assert_error(with("top_p", json!(0)), 400, Some("top_p"), "top_p");
    assert_error(with("logprobs", json!(9)), 400, Some("logprobs"), "logprobs");
    assert_error(
        with("stop", json!(["a", "b", "c", "d", "e"])),
        400,
        Some("stop"),
        "stop",
    );
    assert_error(with("kv_budget", json!("lots")), 400, Some("kv_budget"), "ratio");
    assert_error(with("kv_budget", json!(1.5)), 400, Some("kv_budget"), "(0, 1]");
    assert_error(
        with("kv_policy", json!("nope")),
        400,
        Some("kv_policy"),
        "unknown policy",
    );
    assert_error(with("kv_mode", json!("sideways")), 400, Some("kv_mode"), "mode");
    assert_error(with("kv_stride", json!(0)), 400, None, "stride");
    assert_error(with("echo", json!(true)), 400, Some("echo"), "echo");
    let chat = |extra: Value| {
        let mut b = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        server.post("/v1/chat/completions", &b)
    };
    assert_error(chat(json!({"messages": []})), 400, Some("messages"), "empty");
    assert_error(chat(json!({"messages": "Hi"})), 400, Some("messages"), "invalid");
    assert_error(chat(json!({"top_logprobs": 3})), 400, Some("top_logprobs"), "logprobs");
    assert_error(
        chat(json!({"logprobs": true, "top_logprobs": 21})),
        400,
        Some("top_logprobs"),
        "0 to 20",
    );
    assert_error(chat(json!({"tools": []})), 400, Some("tools"), "tools");
    assert_error(
        chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
        400,
        Some("messages[0].content"),
        "text",
    );
    let big = format!(r#"{{"model": "smollm2", "prompt": "{}"}}"#, "x".repeat(70_000));
    let (status, text) = server.call("/v1/completions", Some(&big), None);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("\"error\""), "{text}");
    let (status, text) = server.call("/v1/nothing", None, None);
    assert_eq!(status, 404, "{text}");
    let (status, text) = server.call("/v1/completions", None, None);
    assert_eq!(status, 405, "{text}");
    // Part-text content is read.
    let (status, answer) = chat(json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}));
    assert_eq!(status, 200, "{answer}");

    // Metrics count what happened.
    assert!(server.metric("easykv_requests_total{status=\"400\"}") >= 20.0);
    assert!(server.metric("easykv_requests_total{status=\"404\"}") >= 2.0);
    assert!(server.metric("easykv_generation_tokens_total") > 0.0);
    assert_eq!(server.metric("easykv_requests_in_flight"), 0.0);
    assert!(server.metric("easykv_kv_pool_bytes") > 0.0);

    // The load test against it: bounded (2 clients, 2 seconds), no errors, memory sampled.
    let out = Command::new(env!("CARGO_BIN_EXE_easykv"))
        .args([
            "bench",
            "serve",
            "--url",
            &server.base,
            "--clients",
            "2",
            "--duration",
            "2",
        ])
        .args(["--max-tokens", "4", "--prompt-words", "20", "--warmup", "0", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let load: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(load["errors"], 0, "{load}");
    assert!(load["requests"].as_u64().unwrap() >= 2, "{load}");
    assert!(load["output_tokens"].as_u64().unwrap() > 0, "{load}");
    assert!(load["rss_mib_max"].as_f64().unwrap() > 10.0, "{load}");
}

/// 32 clients at once get, each, the answer the same request gets alone; a client that leaves
/// mid-answer frees its sequence.
#[test]
fn concurrent_clients_get_their_own_answers_and_leaving_cancels() {
    let server = Server::start(&["--max-concurrent", "32"]);
    let prompts: Vec<String> = (0..32)
        .map(|i| format!("Story {i}: once upon a time, in a land of {i} rivers,"))
        .collect();
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| server.post("/v1/completions", &completion(p, 8)).1["choices"][0]["text"].clone())
        .collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let threads: Vec<_> = prompts
            .iter()
            .map(|p| {
                let server = &server;
                s.spawn(move || server.post("/v1/completions", &completion(p, 8)))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap().1["choices"][0]["text"].clone())
            .collect()
    });
    assert_eq!(together, alone);
    assert_eq!(server.metric("easykv_requests_total{status=\"200\"}"), 64.0);

    // A streaming client that reads one chunk and hangs up.
    let address = server.base.trim_start_matches("http://").to_string();
    let mut socket = std::net::TcpStream::connect(&address).unwrap();
    let body =
        json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 4000, "stream": true}).to_string();
    write!(
        socket,
        "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 512];
    let n = socket.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(socket);
    server.wait_metric("easykv_sequences_running", 0.0);
    server.wait_metric("easykv_kv_bytes_reserved", 0.0);
    server.wait_metric("easykv_requests_in_flight", 0.0);
    assert!(server.metric("easykv_generation_tokens_total") < 64.0 * 8.0 + 4000.0);
}

/// With an API key, a queue of one and one sequence at a time: 401 without the key, 429 when
/// the queue is full; SIGTERM lets the request in flight finish, then the server exits 0.
#[test]
fn api_key_full_queue_and_graceful_shutdown() {
    let mut server = Server::start(&["--api-key", "sekret", "--max-concurrent", "1", "--max-queue", "1"]);
    let body = completion("Hello", 2).to_string();
    let (status, text) = server.call("/v1/completions", Some(&body), None);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("invalid_api_key"));
    let (status, _) = server.call("/v1/completions", Some(&body), Some("wrong"));
    assert_eq!(status, 401);
    let (status, _) = server.call("/v1/models", None, Some("sekret"));
    assert_eq!(status, 200);
    let (status, _) = server.call("/health", None, None);
    assert_eq!(status, 200, "health needs no key");
    // One running, one queued, the rest refused with 429.
    let long = completion("Once upon a time", 300).to_string();
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (server, long) = (&server, &long);
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(150 * i));
                    server.call("/v1/completions", Some(long), Some("sekret")).0
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    // SIGTERM with a request in flight: it is answered, then the process exits 0.
    let pid = server.child.id().to_string();
    let answer = std::thread::scope(|s| {
        let t = s.spawn(|| {
            server.call(
                "/v1/completions",
                Some(&completion("Once upon a time", 40).to_string()),
                Some("sekret"),
            )
        });
        std::thread::sleep(Duration::from_millis(400));
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        t.join().unwrap()
    });
    assert_eq!(answer.0, 200, "{}", answer.1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    let log: Vec<String> = server.log.lock().unwrap().try_iter().collect();
    assert!(log.iter().any(|l| l.contains("shutting down")), "{log:?}");
}

/// The official `openai` Python client, with and without streaming, with `extra_body` carrying
/// the eviction settings. Skipped (with a message) where Python has no `openai` package;
/// `.ci/run` installs it.
#[test]
fn the_openai_python_client_works() {
    let python = std::env::var("EASYKV_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_client = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_client {
        eprintln!("SKIPPED: {python} cannot import openai (pip install openai, or set EASYKV_PYTHON)");
        return;
    }
    let server = Server::start(&[]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(format!("{}/v1", server.base))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok: chat") && stdout.contains("ok: stream"), "{stdout}");
}
