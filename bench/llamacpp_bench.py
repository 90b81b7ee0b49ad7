#!/usr/bin/env python3
"""The llama.cpp side of `cargo xtask bench-inference`.

Runs llama.cpp (through llama-cpp-python, in bench/venv) on the same GGUF
file, the same prompt token ids and the same thread count as our engine, and
prints one JSON object with the same fields as `edge-agent bench-inference`:

  prefill_tokens_per_s   the 200-token prompt, evaluated at once
  ttft_ms                prompt evaluated and the first token sampled (cold)
  cached_ttft_ms         the same prompt again, llama.cpp reusing the prefix
  decode_tokens_per_s    single stream, greedy
  aggregate_4_tokens_per_s  four sequences decoded together in one batch per
                         step (llama.cpp's parallel decoding, as llama-server
                         -np 4 does it)
  peak_rss_mb            VmHWM of this process

Usage: llamacpp_bench.py MODEL PROMPTS_JSON THREADS DECODE_TOKENS
"""

import ctypes
import json
import sys
import time

import numpy as np
import llama_cpp


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return None


def greedy_from(ctx, idx, n_vocab):
    ptr = llama_cpp.llama_get_logits_ith(ctx, idx)
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))


def main():
    model_path, prompts_path, threads, decode_tokens = sys.argv[1:5]
    threads, decode_tokens = int(threads), int(decode_tokens)
    with open(prompts_path) as f:
        prompts = json.load(f)
    long_prompt = prompts["long"]
    streams = prompts["streams"]

    llm = llama_cpp.Llama(
        model_path=model_path,
        n_ctx=2048,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    eos = set(prompts.get("stop_ids", []))
    out = {"engine": "llama.cpp", "version": llama_cpp.__version__, "threads": threads}

    # Warm-up (first-use allocations), as our side does; then prefill: the
    # whole prompt in one evaluation, from an empty cache.
    llm.eval(long_prompt[:16])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(long_prompt)
    dt = time.perf_counter() - t0
    out["prompt_tokens"] = len(long_prompt)
    out["prefill_tokens_per_s"] = len(long_prompt) / dt

    # Cold time to first token and single-stream decode, greedy.
    llm.reset()
    t0 = time.perf_counter()
    first = None
    n = 0
    for tok in llm.generate(long_prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
        now = time.perf_counter()
        if first is None:
            first = now
            out["ttft_ms"] = (now - t0) * 1000.0
        n += 1
        if tok in eos or n >= decode_tokens:
            break
    last = time.perf_counter()
    out["completion_tokens"] = n
    out["decode_tokens_per_s"] = (n - 1) / (last - first) if n > 1 else 0.0

    # The same prompt again: llama-cpp-python keeps the previous tokens' KV
    # and evaluates only what differs (here, the last prompt token).
    t0 = time.perf_counter()
    for _ in llm.generate(long_prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
        out["cached_ttft_ms"] = (time.perf_counter() - t0) * 1000.0
        break

    out["aggregate_4_tokens_per_s"] = batched_decode(llm, streams, threads, decode_tokens)
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


def batched_decode(llm, streams, threads, decode_tokens):
    """Prefills each stream as its own sequence, then decodes all of them
    together, one token per sequence per llama_decode; returns tokens/s over
    the decode phase."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 4096
    params.n_batch = 512
    params.n_ubatch = 512
    params.n_seq_max = len(streams)
    params.n_threads = threads
    params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    batch = llama_cpp.llama_batch_init(512, 0, len(streams))
    try:
        def submit(entries):
            # entries: (token, pos, seq, wants_logits)
            batch.n_tokens = len(entries)
            for i, (tok, pos, seq, logits) in enumerate(entries):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if logits else 0
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")

        nexts = []
        for s, ids in enumerate(streams):
            submit([(t, p, s, p == len(ids) - 1) for p, t in enumerate(ids)])
            nexts.append(greedy_from(ctx, len(ids) - 1, n_vocab))
        pos = [len(ids) for ids in streams]
        t0 = time.perf_counter()
        produced = 0
        for _ in range(decode_tokens):
            submit([(nexts[s], pos[s], s, True) for s in range(len(streams))])
            for s in range(len(streams)):
                nexts[s] = greedy_from(ctx, s, n_vocab)
                pos[s] += 1
            produced += len(streams)
        return produced / (time.perf_counter() - t0)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


if __name__ == "__main__":
    main()
