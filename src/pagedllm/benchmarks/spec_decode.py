"""Speculative decoding (ngram prompt lookup, a draft model) against plain decoding, side by side
in one run.

Workloads:
  - grounded: input-grounded prompts built from text shipped in the repo (docs/structure.md,
    README.md): repeat a passage with a small edit, or extract its lines on a topic. Run as a
    single stream (one request at a time) and as a batch of --batch requests.
  - fixed: the fixed workload (random 128-token prompts, 128 tokens out), at --batch at once:
    speculation finds little to propose and must not cost.
Each is run with and without speculation on the same engine settings (one engine per method,
loaded once each); greedy output must be identical, and the table says whether it is.

The draft model is --draft-model, by default the shipped SmolLM2 drafting for itself: every
proposal is accepted, and a step of k + 1 tokens costs k draft passes plus one target pass of
the same model, so its rows show what the mechanism itself costs (a real draft is many times
smaller than its target). --draft-layers N adds a draft of the target's first N layers (with its
embedding, final norm and head: an untrained early exit, written to a temporary folder).

    flock /tmp/pagedllm-bench.lock python -m pagedllm.benchmarks.spec_decode

Prints a table and writes JSON to --output-json (default benchmarks/results/spec_decode.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.workloads import fixed_workload
from pagedllm.models.default_model import resolve_model_path

RESULTS = Path("benchmarks", "results")


def passages(max_chars: int = 700) -> list[str]:
    """Paragraph-sized passages of the repo's own docs (blank-line separated, long enough)."""
    root = Path(__file__).resolve().parents[3]  # the repository (src/pagedllm/benchmarks/..)
    texts = []
    for name in ("docs/structure.md", "README.md"):
        path = root / name
        if path.is_file():
            texts.append(path.read_text())
    chunks = []
    for text in texts:
        current = ""
        for para in text.split("\n\n"):
            current = f"{current}\n\n{para}" if current else para
            if len(current) >= max_chars // 2:
                chunks.append(current[:max_chars])
                current = ""
    if not chunks:
        raise ValueError("no docs/structure.md or README.md found beside the package")
    return chunks


def grounded_prompts(num: int) -> list[str]:
    """Prompts whose answers quote their passage: repeat-with-edits and extraction."""
    chunks = passages()
    prompts = []
    for i in range(num):
        passage = chunks[i % len(chunks)]
        if i % 2 == 0:
            prompts.append(f"Here is a text:\n\n{passage}\n\nRepeat the text above exactly, "
                           f"but write 'pagedllm' in capitals.\n\n{passage[:40]}")
        else:
            prompts.append(f"Here is a text:\n\n{passage}\n\nCopy every line of the text above "
                           f"that names a file:\n\n")
    return prompts


def run(llm: LLM, prompts: list, params: list[SamplingParams], one_at_a_time: bool) -> dict:
    engine = llm.llm_engine
    before = engine.get_stats()
    start = time.perf_counter()
    if one_at_a_time:
        outputs = [llm.generate(p, s, use_tqdm=False)[0] for p, s in zip(prompts, params)]
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = engine.get_stats()
    tokens = [o.outputs[0].token_ids for o in outputs]
    drafted = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
    accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
    drafts = after.spec_decode_num_drafts - before.spec_decode_num_drafts
    num_tokens = sum(len(t) for t in tokens)
    return {"tokens": tokens, "elapsed_s": elapsed, "output_tokens": num_tokens,
            "tokens_per_s": num_tokens / elapsed, "drafts": drafts, "draft_tokens": drafted,
            "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None}


def first_layers_draft(model: str | None, num_layers: int, folder: Path) -> Path:
    """A copy of the model's Hugging Face directory keeping only its first `num_layers` decoder
    layers (with the embedding, the final norm and the head)."""
    from safetensors.torch import load_file, save_file

    source = resolve_model_path(model)
    config = json.loads((source / "config.json").read_text())
    if not 1 <= num_layers < config["num_hidden_layers"]:
        raise ValueError(f"--draft-layers must be in 1..{config['num_hidden_layers'] - 1}")
    shutil.copytree(source, folder, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    config["num_hidden_layers"] = num_layers
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for path in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(path))
    kept = {name: t for name, t in tensors.items()
            if not (name.startswith("model.layers.")
                    and int(name.split(".")[2]) >= num_layers)}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the shipped SmolLM2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--methods", default="ngram,draft_model",
                        help="comma-separated: ngram, draft_model")
    parser.add_argument("--draft-model", default=None,
                        help="the draft's path (default: the target drafting for itself)")
    parser.add_argument("--draft-layers", type=int, default=None,
                        help="also draft with the target's first N layers")
    parser.add_argument("--kv-cache-gib", type=float, default=1.5,
                        help="each engine's KV pool (a draft's blocks included)")
    parser.add_argument("--single", type=int, default=4, help="grounded requests run alone")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--output-json", type=Path, default=RESULTS / "spec_decode.json")
    args = parser.parse_args(argv)

    k = args.num_speculative_tokens
    common = {"dtype": args.dtype, "max_num_seqs": max(args.batch, 1), "seed": 0,
              "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)}
    engines = {"plain": LLM(args.model, **common)}
    specs = {}
    for method in (m.strip() for m in args.methods.split(",") if m.strip()):
        if method == "ngram":
            specs["ngram"] = {"method": "ngram", "num_speculative_tokens": k,
                              "prompt_lookup_max": 4, "prompt_lookup_min": 2}
        elif method == "draft_model":
            # By default the target itself (the shipped model when --model is not given).
            draft = args.draft_model or str(resolve_model_path(args.model))
            name = "draft_model (itself)" if args.draft_model is None else "draft_model"
            specs[name] = {"method": "draft_model", "model": draft, "num_speculative_tokens": k}
        else:
            raise ValueError(f"unknown method {method!r}: use ngram or draft_model")
    scratch = tempfile.TemporaryDirectory(prefix="pagedllm-draft-")
    if args.draft_layers is not None:
        draft = first_layers_draft(args.model, args.draft_layers, Path(scratch.name, "draft"))
        specs[f"draft_model (first {args.draft_layers} layers)"] = {
            "method": "draft_model", "model": str(draft), "num_speculative_tokens": k}
    for name, spec in specs.items():
        engines[name] = LLM(args.model, speculative_config=spec, **common)
    methods = list(specs)
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    fixed = fixed_workload(num_requests=args.batch, output_len=args.max_tokens)
    cases = {
        "grounded, single stream": (grounded_prompts(args.single), None, True),
        f"grounded, batch {args.batch}": (grounded_prompts(args.batch), None, False),
        f"fixed, batch {args.batch}": (
            [{"prompt_token_ids": r.prompt_token_ids} for r in fixed],
            [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
             for r in fixed], False),
    }
    results = {}
    for case, (prompts, params, alone) in cases.items():
        params = params or [greedy] * len(prompts)
        runs = {name: run(llm, prompts, params, alone) for name, llm in engines.items()}
        plain = runs["plain"]
        for method in methods:
            r = runs[method]
            results[f"{case}, {method}"] = {
                "workload": case, "method": method,
                "plain_tokens_per_s": plain["tokens_per_s"],
                "spec_tokens_per_s": r["tokens_per_s"],
                "speedup": r["tokens_per_s"] / plain["tokens_per_s"],
                "identical_greedy_output": plain["tokens"] == r["tokens"],
                **{key: r[key] for key in ("output_tokens", "drafts", "draft_tokens",
                                           "accepted_tokens", "acceptance_rate",
                                           "mean_acceptance_length")},
            }
    scratch.cleanup()
    print(f"| workload | method (k={k}) | plain tok/s | speculative tok/s | speedup | "
          f"acceptance | mean accepted length | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        rate = ("-" if r["acceptance_rate"] is None else
                f"{100 * r['acceptance_rate']:.0f}% ({r['accepted_tokens']}/{r['draft_tokens']})")
        length = ("-" if r["mean_acceptance_length"] is None
                  else f"{r['mean_acceptance_length']:.2f}")
        print(f"| {r['workload']} | {r['method']} | {r['plain_tokens_per_s']:.1f} | "
              f"{r['spec_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {rate} | {length} | "
              f"{r['identical_greedy_output']} |")
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    args.output_json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                            "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
