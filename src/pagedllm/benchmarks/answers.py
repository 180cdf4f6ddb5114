"""The quickstart's answers on the GGUF path: greedy chat answers of the shipped GGUF on its
quantized kernels, per activation scheme, against the same file dequantized (quantization=
"none") in the same dtype.

Each prompt (the CLI test's "What is the capital of France?" first, then short chat questions)
is answered greedily for --max-tokens tokens by the dequantized file and by the quantized path
under each scheme of --schemes (BITS/GROUP, as PAGEDLLM_GGUF_ACTIVATIONS takes them; set
process-wide with set_gguf_activations between runs, the LM head keeping HEAD_ACTIVATIONS).
It prints, per scheme, how many answers equal the reference's token for token, the index of
each answer's first differing token (= where none differs), the first prompt's answer and the
log-probabilities of its first token's top two candidates (how near a tie it is), and writes
them as JSON to --output-json. Prefix caching is off, so no scheme reuses another's cache.

    python -m pagedllm.benchmarks.answers --dtypes float32,bfloat16 --schemes 16/32,8/16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path("benchmarks", "results")
PROMPTS = (
    "What is the capital of France?",  # tests/entrypoints/test_cli.py's
    "What is 2 + 2?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Who wrote Romeo and Juliet?",
    "Explain what a CPU does in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is the largest planet in the solar system?",
    "Give me a synonym for happy.",
    "How many days are in a week?",
    "What color is the sky?",
    "What is the boiling point of water?",
    "Who painted the Mona Lisa?",
    "What is the capital of Japan?",
    "Name a fruit that is yellow.",
    "What is photosynthesis?",
    "How many legs does a spider have?",
    "What language is spoken in Brazil?",
    "Tell me a fun fact about cats.",
    "What is the square root of 16?",
)


def first_difference(answer: list[int], reference: list[int]) -> int | None:
    """The index of the first token where two answers differ (one ending early counts as a
    difference there); None where they are equal."""
    if answer == reference:
        return None
    for index, (a, b) in enumerate(zip(answer, reference)):
        if a != b:
            return index
    return min(len(answer), len(reference))


def answer(llm: Any, prompts: list[str], max_tokens: int) -> list[dict]:
    """Each prompt's greedy chat answer: its tokens, text and first token's top-2 logprobs."""
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=2)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                       use_tqdm=False)
    rows = []
    for output in outputs:
        completion = output.outputs[0]
        first = completion.logprobs[0] if completion.logprobs else {}
        rows.append({"tokens": list(completion.token_ids), "text": completion.text,
                     "first_top2": {int(t): lp.logprob for t, lp in first.items()}})
    return rows


def compare(rows: list[dict], reference: list[dict]) -> dict:
    diffs = [first_difference(r["tokens"], ref["tokens"]) for r, ref in zip(rows, reference)]
    return {"equal": sum(d is None for d in diffs), "prompts": len(diffs),
            "first_difference": diffs, "first_answer": rows[0]["text"],
            "first_top2": rows[0]["first_top2"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default="16/32,8/16",
                        help="comma-separated GGUF activation schemes (BITS/GROUP)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated dtypes, each with its own reference")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--output-json", default=str(RESULTS / "answers.json"))
    args = parser.parse_args(argv)
    from pagedllm import LLM
    from pagedllm.layers.quantization.gguf import activation_scheme
    from pagedllm.ops import cpu_ops

    schemes = {s: activation_scheme(s) for s in args.schemes.split(",") if s}
    prompts = list(PROMPTS[:args.num_prompts])
    kwargs = {"num_kv_blocks": 256, "enable_prefix_caching": False}
    results: dict[str, dict] = {}
    for dtype in [d for d in args.dtypes.split(",") if d]:
        reference = answer(LLM(quantization="none", dtype=dtype, **kwargs), prompts,
                           args.max_tokens)
        results[dtype] = {"reference": compare(reference, reference)}
        llm = LLM(quantization="auto", dtype=dtype, **kwargs)
        ops = cpu_ops()
        default = tuple(ops.gguf_activations())
        try:
            for name, (bits, group) in schemes.items():
                ops.set_gguf_activations(bits, group)
                results[dtype][name] = compare(answer(llm, prompts, args.max_tokens), reference)
        finally:
            ops.set_gguf_activations(*default)
        del llm
        for name, r in results[dtype].items():
            diffs = " ".join("=" if d is None else str(d) for d in r["first_difference"])
            top2 = ", ".join(f"{t}: {lp:.3f}" for t, lp in r["first_top2"].items())
            print(f"{dtype} {name:>9}: {r['equal']:>2}/{r['prompts']} equal | first "
                  f"differences {diffs} | first answer {r['first_answer'][:40]!r} "
                  f"(its first token's top 2: {top2})", flush=True)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompts": prompts, "max_tokens": args.max_tokens,
                               "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
