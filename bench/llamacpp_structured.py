#!/usr/bin/env python3
"""The llama.cpp side of `cargo xtask bench-structured`.

Runs llama.cpp (llama-cpp-python in bench/venv; its JSON Schema support is
a GBNF grammar made from the schema, which its sampler enforces) on the
same GGUF file, prompt token ids, schemas and thread count as
`edge-agent bench-constraint`, and prints one JSON object with the same
fields:

  decode_tokens_per_s_free         greedy, end-of-turn banned, N tokens
  decode_tokens_per_s_constrained  greedy under the decode schema, N tokens
  ttft_ms_free                     prompt evaluated, first token (no cache)
  ttft_ms_large_schema             the 50-property schema's grammar built,
                                   prompt evaluated, first token
  large_schema_compile_ms          the grammar alone

Usage: llamacpp_structured.py MODEL INPUTS_JSON THREADS DECODE_TOKENS ROUNDS
"""

import json
import statistics
import sys
import time

import llama_cpp
from llama_cpp import Llama, LlamaGrammar

model, inputs_path, threads, decode_tokens, rounds = sys.argv[1:6]
threads, decode_tokens, rounds = int(threads), int(decode_tokens), int(rounds)
inputs = json.load(open(inputs_path))
prompt = inputs["prompt"]
ban = {int(i): -100.0 for i in inputs["stop_ids"]}

llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)


def run(grammar, max_tokens, started=None):
    """(ttft seconds, decode tokens/s, tokens) of one greedy run."""
    llm.reset()  # no prefix reuse: every run evaluates its prompt
    started = started or time.perf_counter()
    first = None
    n = 0
    kwargs = {"grammar": grammar} if grammar is not None else {"logit_bias": ban}
    for _ in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True, **kwargs):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    rate = (n - 1) / (end - first) if n > 1 and end > first else 0.0
    return first - started, rate, n


decode_grammar = LlamaGrammar.from_json_schema(json.dumps(inputs["decode_schema"]), verbose=False)
run(None, 4)
run(decode_grammar, 4)
free, constrained, ttft_free, ttft_large, compile_large, tokens = [], [], [], [], [], 0
for _ in range(rounds):
    free.append(run(None, decode_tokens)[1])
    _, rate, tokens = run(decode_grammar, decode_tokens)
    constrained.append(rate)
    ttft_free.append(run(None, 1)[0] * 1e3)
    t0 = time.perf_counter()
    large = LlamaGrammar.from_json_schema(json.dumps(inputs["large_schema"]), verbose=False)
    compile_large.append((time.perf_counter() - t0) * 1e3)
    ttft_large.append(run(large, 1, started=t0)[0] * 1e3)

free_m, con_m = statistics.median(free), statistics.median(constrained)
print(json.dumps({
    "engine": "llama.cpp (llama-cpp-python %s, GBNF from the schema)" % llama_cpp.__version__,
    "threads": threads,
    "prompt_tokens": len(prompt),
    "decode_tokens": tokens,
    "rounds": rounds,
    "decode_tokens_per_s_free": free_m,
    "decode_tokens_per_s_constrained": con_m,
    "constrained_over_free": con_m / free_m if free_m else None,
    "constraint_us_per_token": (1e6 / con_m - 1e6 / free_m) if con_m and free_m else None,
    "ttft_ms_free": statistics.median(ttft_free),
    "ttft_ms_large_schema": statistics.median(ttft_large),
    "large_schema_compile_ms": statistics.median(compile_large),
}))
