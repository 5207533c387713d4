#!/usr/bin/env python3
"""Checks an easykv build on a device against the reference outputs in ../shared/reference.

usage: verify_device.py EASYKV_BINARY DEVICE [--dtype f32|f16] [--tolerance 2e-3] [--checks chat,summarize]

Runs the three SmolLM2 chat prompts (greedy ids and the top-10 log-probabilities at the last
prompt position) and EasyKV's summarization case for roco and h2o (encoding mode, budget 0.5,
stride 8), and prints one line per check and a closing 'N passed, N failed' line.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(HERE, "..", "..", "shared", "reference", "smollm2-135m-q4_1.json")


MODEL = ["--model", "smollm2"]


def run(binary, device, dtype, ids, extra):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    cmd = [binary, "generate"] + MODEL + ["--device", device, "--dtype", dtype, "--prompt-ids-file", f.name, "--json", "-q"] + extra
    out = subprocess.run(cmd, capture_output=True, text=True)
    os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("device")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--tolerance", type=float, default=2e-3)
    ap.add_argument("--reference", default=REF)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--checks", default="chat,summarize",
                    help="which checks to run: chat (greedy ids, top-10), summarize (EasyKV), or both")
    args = ap.parse_args()
    MODEL[1] = args.model
    ref = json.load(open(args.reference))
    passed = failed = 0

    def check(name, ok, detail=""):
        nonlocal passed, failed
        # Flushed: a run cut short by a time limit still shows the checks it finished.
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
        passed += ok
        failed += not ok

    checks = set(args.checks.split(","))
    for case in ref["chat"] if "chat" in checks else []:
        want = [i for i in case["greedy_ids_full_cache"] if i != 2]
        got = run(args.binary, args.device, args.dtype, case["prompt_ids"],
                  ["--max-new-tokens", str(len(case["greedy_ids_full_cache"])), "--logprobs", "10"])
        check(f"greedy ids: {case['user']!r}", got["ids"] == want, f"{got['ids']} vs {want}" if got["ids"] != want else "")
        ours = dict((i, lp) for i, lp in got["top_logprobs"][0])
        worst = max(abs(ours.get(i, -99.0) - lp) for i, lp in case["top10_last"])
        check(f"top-10 log-probs: {case['user']!r}", worst <= args.tolerance, f"max deviation {worst:.2e}")
    summ = ref.get("summarize", {"easykv": []})
    for case in summ["easykv"] if "summarize" in checks else []:
        if case["policy"] not in ("roco", "h2o_head"):
            continue
        got = run(args.binary, args.device, args.dtype, summ["prompt_ids"],
                  ["--max-new-tokens", "32", "--policy", case["policy"], "--budget", "0.5", "--stride", "8"])
        text = got["text"].strip()
        check(f"EasyKV summarize {case['policy']}", text == case["text"], "" if text == case["text"] else repr(text))
        print(f"  prefill {got['prefill_seconds']:.2f} s, decode {got['decode_tokens_per_second']:.1f} tok/s", flush=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
