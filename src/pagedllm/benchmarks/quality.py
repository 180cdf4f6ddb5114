"""Quality of the quantized paths against their dense references, by teacher forcing.

A fixed text is split into windows of --window tokens (the first --max-tokens of it), and each
engine scores every window through `prompt_logprobs` (SamplingParams, vLLM's name): the
log-probability of each actual next token and the model's top-1 token at every position. Each
quantized path is compared with its dense reference on the same positions:

    gguf   the shipped Q4_1 GGUF on its quantized kernels, against the same file dequantized
           to fp32 (quantization="none"): only activation quantization differs
    int8   the dense SmolLM2 quantized at load to int8 (layers/quantization/int8.py), against
           it in bf16; --int8-schemes scores several schemes against one reference run, each
           ACTIVATION_BITS:GROUP_SIZE:SMOOTHING[:SENSITIVE] (e.g. 8:32:0.5/0.75, 8:64:off,
           16:64:default, 8:32:default:g16=0.5; alphas split by /), as
           PAGEDLLM_INT8_ACTIVATION_BITS, _GROUP_SIZE, _SMOOTHING and _SENSITIVE set them
    kv-int8, kv-fp8
           the dense SmolLM2 in bf16 with an 8-bit KV cache (kv_cache_dtype="int8", "fp8"),
           against it with its bf16 cache

It prints perplexity (exp of the mean negative log-likelihood), the relative change, and the
top-1 agreement (the share of positions where both pick the same token), and writes them as
JSON to --output-json.

    python -m pagedllm.benchmarks.quality --text FILE
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

DATA = Path(__file__).parent / "data"
DEFAULT_TEXT = DATA / "alice_in_wonderland.txt"  # public domain; see data/README.md
RESULTS = Path("benchmarks", "results")
# name -> (reference engine kwargs, quantized engine kwargs); model None: the shipped GGUF.
PAIRS = {
    "gguf": ({"model": None, "quantization": "none", "dtype": "float32"},
             {"model": None, "quantization": "auto", "dtype": "float32"}),
    "int8": ({"model": "dense", "quantization": "none", "dtype": "bfloat16"},
             {"model": "dense", "quantization": "int8", "dtype": "bfloat16"}),
    "kv-int8": ({"model": "dense", "quantization": "none", "dtype": "bfloat16"},
                {"model": "dense", "quantization": "none", "dtype": "bfloat16",
                 "kv_cache_dtype": "int8"}),
    "kv-fp8": ({"model": "dense", "quantization": "none", "dtype": "bfloat16"},
               {"model": "dense", "quantization": "none", "dtype": "bfloat16",
                "kv_cache_dtype": "fp8"}),
}


INT8_ENV = ("PAGEDLLM_INT8_ACTIVATION_BITS", "PAGEDLLM_INT8_GROUP_SIZE",
            "PAGEDLLM_INT8_SMOOTHING", "PAGEDLLM_INT8_SENSITIVE")


def int8_scheme_env(scheme: str) -> dict[str, str]:
    """ACTIVATION_BITS:GROUP_SIZE:SMOOTHING -> the environment that selects it ("default" or
    an empty field: the setting's default)."""
    fields = scheme.split(":")
    if len(fields) not in (3, 4):
        raise SystemExit(f"--int8-schemes takes ACTIVATION_BITS:GROUP_SIZE:SMOOTHING"
                         f"[:SENSITIVE], got {scheme!r}")
    return {name: value.replace("/", ",") for name, value in zip(INT8_ENV, fields)
            if value not in ("", "default")}


def score(engine_kwargs: dict, windows: list[list[int]], env: dict[str, str] | None = None
          ) -> tuple[list[float], list[int], float, float]:
    """Per-position logprobs of the actual tokens, the top-1 tokens, the seconds scoring took
    and the seconds the engine took to load. `env` (an int8 scheme's settings) replaces the
    int8 settings of the environment while the engine loads."""
    from pagedllm import LLM, SamplingParams

    saved = {name: os.environ.get(name) for name in INT8_ENV}
    if env is not None:
        for name in INT8_ENV:
            os.environ.pop(name, None)
        os.environ.update(env)
    start = time.perf_counter()
    try:
        llm = LLM(**engine_kwargs)
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
    load_seconds = time.perf_counter() - start
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    logprobs, top1 = [], []
    for window, output in zip(windows, outputs):
        for token, entry in zip(window[1:], output.prompt_logprobs[1:]):
            logprobs.append(entry[token].logprob)
            top1.append(next(t for t, lp in entry.items() if lp.rank == 1))
    del llm
    return logprobs, top1, seconds, load_seconds


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="the text scored")
    parser.add_argument("--max-tokens", type=int, default=24576, help="tokens of it scored")
    parser.add_argument("--window", type=int, default=512, help="tokens per teacher-forced "
                        "window (each window starts without context)")
    parser.add_argument("--paths", default="gguf,int8", help="comma-separated: gguf, int8, kv-int8, "
                        "kv-fp8")
    parser.add_argument("--int8-schemes", default="",
                        help="comma-separated ACTIVATION_BITS:GROUP_SIZE:SMOOTHING[:SENSITIVE] "
                        "schemes "
                        "scored against one bf16 run (default: the environment's one)")
    parser.add_argument("--output-json", default=str(RESULTS / "quality.json"))
    args = parser.parse_args(argv)
    text_path = Path(args.text)
    if not text_path.is_file():
        raise SystemExit(f"no text at {text_path}: pass --text FILE (a long English text)")
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        if p not in PAIRS:
            raise SystemExit(f"--paths takes {', '.join(PAIRS)}, got {p!r}")
    from transformers import AutoTokenizer

    from pagedllm.models.default_model import resolve_model_path

    dense_dir = str(resolve_model_path(None))
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    ids = tokenizer.encode(text_path.read_text())[: args.max_tokens]
    windows = [ids[i:i + args.window] for i in range(0, len(ids), args.window)]
    windows = [w for w in windows if len(w) > 1]
    schemes = [s for s in args.int8_schemes.split(",") if s]
    envs = {scheme: int8_scheme_env(scheme) for scheme in schemes}
    rows = {}
    for name in paths:
        ref_kwargs, quant_kwargs = ({**kw, "model": dense_dir if kw["model"] == "dense"
                                     else kw["model"]} for kw in PAIRS[name])
        ref_lp, ref_top, ref_s, ref_load = score(ref_kwargs, windows)
        variants = {f"int8 {s}": envs[s] for s in schemes} if name == "int8" and schemes \
            else {name: None}
        for label, env in variants.items():
            q_lp, q_top, q_s, q_load = score(quant_kwargs, windows, env)
            ppl_ref, ppl_q = perplexity(ref_lp), perplexity(q_lp)
            rows[label] = {
                "positions": len(ref_lp),
                "ppl_reference": ppl_ref,
                "ppl_quantized": ppl_q,
                "ppl_change": ppl_q / ppl_ref - 1,
                "top1_agreement": sum(a == b for a, b in zip(ref_top, q_top)) / len(ref_top),
                "seconds_reference": ref_s,
                "seconds_quantized": q_s,
                "load_seconds_reference": ref_load,
                "load_seconds_quantized": q_load,
            }
            print(f"{label}: top-1 {100 * rows[label]['top1_agreement']:.2f}%, perplexity "
                  f"{100 * rows[label]['ppl_change']:+.2f}%", flush=True)
    width = max(6, *map(len, rows))
    print(f"text: {text_path.name}, {len(ids)} tokens in windows of {args.window}")
    print(f"{'path':<{width}} {'positions':>9} {'ppl ref':>9} {'ppl quant':>9} {'change':>8} "
          f"{'top-1 agree':>11}")
    for name, r in rows.items():
        print(f"{name:<{width}} {r['positions']:>9} {r['ppl_reference']:>9.3f} "
              f"{r['ppl_quantized']:>9.3f} {100 * r['ppl_change']:>+7.2f}% "
              f"{100 * r['top1_agreement']:>10.2f}%")
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"text": str(text_path), "tokens": len(ids),
                               "window": args.window, "paths": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
