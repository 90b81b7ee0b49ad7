"""llama.cpp's figures for the agreement text (inference/src/agreement/).

Run by `cargo xtask agreement-reference` with llama-cpp-python in bench/venv:
tokenizes the text with llama.cpp's own tokenizer (no BOS, as ours), runs
it teacher-forced in one batch with the logits of every position kept, and
writes JSON: the tokens, the token ranked first after each, and the
perplexity of the text (exp of the mean negative log-likelihood of each
token given those before it, log-softmax in float64).

usage: agreement_reference.py MODEL.gguf TEXT.txt OUT.json THREADS
"""
import hashlib
import json
import math
import sys

import llama_cpp
import numpy as np


def main():
    model, text_path, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    with open(model, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=1024,
        n_batch=1024,
        n_ubatch=1024,
        logits_all=True,
        n_threads=threads,
        verbose=False,
    )
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    llm.eval(tokens)
    scores = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    top1 = scores.argmax(axis=1)
    m = scores.max(axis=1)
    lse = m + np.log(np.exp(scores - m[:, None]).sum(axis=1))
    idx = np.arange(len(tokens) - 1)
    nll = -(scores[idx, np.array(tokens[1:])] - lse[:-1])
    result = {
        "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__}), CPU, {threads} threads",
        "model_sha256": sha,
        "tokens": [int(t) for t in tokens],
        "top1": [int(t) for t in top1],
        "perplexity": math.exp(float(nll.mean())),
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)
        f.write("\n")
    print(f"{len(tokens)} tokens, perplexity {result['perplexity']:.4f} -> {out}")


if __name__ == "__main__":
    main()
