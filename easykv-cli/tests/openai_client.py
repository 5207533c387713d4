"""The official openai client against `easykv serve` (run by tests/serve.rs).

Usage: python3 openai_client.py BASE_URL   (e.g. http://127.0.0.1:8000/v1)
"""
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
model = client.models.list().data[0].id
messages = [{"role": "user", "content": "What is the capital of France?"}]

whole = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=24,
    temperature=0,
    extra_body={"kv_policy": "roco", "kv_budget": 0.5},
)
text = whole.choices[0].message.content
assert text, whole
assert whole.usage.completion_tokens > 0, whole.usage
assert whole.model_extra["kv"]["policy"] == "roco", whole.model_extra
print("ok: chat", repr(text))

stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=24,
    temperature=0,
    stream=True,
    extra_body={"kv_policy": "roco", "kv_budget": 0.5},
)
streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
assert streamed == text, (streamed, text)
print("ok: stream", repr(streamed))

completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
assert completion.choices[0].text, completion
print("ok: completion", repr(completion.choices[0].text))

try:
    client.chat.completions.create(model=model, messages=messages, extra_body={"kv_budget": "lots"})
    raise SystemExit("a bad budget was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "kv_budget", e.body
    print("ok: bad budget refused:", e.body["message"])
