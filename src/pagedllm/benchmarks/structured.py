"""What structured outputs cost: the fixed workload with every request under a JSON schema against
the same requests unconstrained, and one request alone (time per output token), in one engine.

Both arms generate the same number of tokens: the schema asks for an object holding an array of
at least --min-items readings (a sensor name and a number each), which no request can finish in
--output-len tokens, so every constrained request runs to its max_tokens as the unconstrained
ones do with ignore_eos. Greedy, compact JSON (no free whitespace). Each arm of each round
draws fresh prompt ids (a prefix cache cannot serve one arm from the other's blocks), and the
arm that runs first alternates; each row is the median round. The grammar's share of a step is timed in the
same run: the bitmask's fill (llguidance fills the constrained rows on the scheduler's mask
thread, beside the forward pass), the model runner's wait for it (the part the forward did not
hide) and its masking of the logits. --sync-mask-fill waits for each fill in the scheduler
instead (no overlap, as the mp and ray executors, which send the bitmask with the step).

    pagedllm bench structured                      # 64 x (128 + 128), 3 rounds; 1 x 128, 5 rounds
    pagedllm bench structured --rounds 1 --num-requests 16 --dtype float32

(or `python -m pagedllm.benchmarks.structured ...`). Prints a table and writes JSON to
--output-json (default benchmarks/results/structured.json under the working directory).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pagedllm.benchmarks.cli import run_standalone
from pagedllm.benchmarks.workloads import fixed_workload, with_fresh_prompts
from pagedllm.config import EngineConfig

RESULTS = Path("benchmarks", "results")  # under the working directory, not the package


def readings_schema(min_items: int) -> dict:
    """An object with an array of at least `min_items` {"sensor": str, "value": number}."""
    reading = {"type": "object", "properties": {
        "sensor": {"type": "string", "maxLength": 16}, "value": {"type": "number"}},
        "required": ["sensor", "value"], "additionalProperties": False}
    return {"type": "object", "properties": {
        "readings": {"type": "array", "items": reading, "minItems": min_items}},
        "required": ["readings"], "additionalProperties": False}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `pagedllm bench structured`: the workload's, then every engine setting's."""
    parser.add_argument("--num-requests", type=int, default=64, help="requests of the batch run")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128,
                        help="generated tokens per request")
    parser.add_argument("--min-items", type=int, default=64,
                        help="readings the schema asks for: enough that no request ends early")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the batch run")
    parser.add_argument("--sync-mask-fill", action="store_true",
                        help="the scheduler waits for each step's bitmask (no overlap with "
                             "the forward pass, as across processes)")
    parser.add_argument("--single-rounds", type=int, default=5,
                        help="rounds of the single request (0: skip it)")
    parser.add_argument("--output-json", default=str(RESULTS / "structured.json"),
                        help="where the results go (default: %(default)s)")
    EngineConfig.add_cli_args(parser)


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming a flag out of range."""
    for name in ("num_requests", "input_len", "output_len", "min_items", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.single_rounds < 0:
        raise ValueError("--single-rounds must be at least 0")


class GrammarTimer:
    """Wall time in the bitmask's fill (on the scheduler's mask thread), the model runner's wait
    for it (what the forward pass did not hide) and its masking of the logits, while installed
    (it wraps the functions where their callers look them up).

    With `sync_fill`, the scheduler waits for each fill itself (no overlap), as the mp and ray
    executors do when they send the step.
    """

    def __init__(self, sync_fill: bool = False) -> None:
        self.sync_fill = sync_fill
        self.build_s = self.wait_s = self.apply_s = 0.0
        self.num_builds = self.num_applies = 0

    @contextmanager
    def installed(self):
        from pagedllm.core import grammar_mask
        from pagedllm.core.interface import SchedulerOutput
        from pagedllm.worker import model_runner

        fill, apply = grammar_mask.fill_grammar_bitmask, model_runner.apply_grammar_bitmask
        start_fill, bitmask_property = (grammar_mask.GrammarMaskBuilder.start,
                                        SchedulerOutput.grammar_bitmask)

        def timed_fill(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fill(*args, **kwargs)
            finally:
                self.build_s += time.perf_counter() - start
                self.num_builds += 1

        def timed_apply(*args, **kwargs):
            start = time.perf_counter()
            try:
                return apply(*args, **kwargs)
            finally:
                self.apply_s += time.perf_counter() - start
                self.num_applies += 1

        def timed_get(out):
            pending = isinstance(out._grammar_bitmask, grammar_mask.PendingGrammarBitmask)
            start = time.perf_counter()
            try:
                return bitmask_property.fget(out)
            finally:
                if pending:
                    self.wait_s += time.perf_counter() - start

        def sync_start(builder, *args, **kwargs):
            pending = start_fill(builder, *args, **kwargs)
            return (pending.result() if isinstance(pending, grammar_mask.PendingGrammarBitmask)
                    else pending)

        grammar_mask.fill_grammar_bitmask = timed_fill
        model_runner.apply_grammar_bitmask = timed_apply
        SchedulerOutput.grammar_bitmask = property(timed_get, bitmask_property.fset)
        if self.sync_fill:
            grammar_mask.GrammarMaskBuilder.start = sync_start
        try:
            yield self
        finally:
            grammar_mask.fill_grammar_bitmask = fill
            model_runner.apply_grammar_bitmask = apply
            SchedulerOutput.grammar_bitmask = bitmask_property
            grammar_mask.GrammarMaskBuilder.start = start_fill


def run_arm(llm, requests, constrained: bool, schema: dict, timer: GrammarTimer) -> dict:
    """One generate over `requests`, every one under `schema` or none."""
    from pagedllm import SamplingParams
    from pagedllm.sampling_params import StructuredOutputsParams

    def params(output_len: int) -> SamplingParams:
        if constrained:
            return SamplingParams(temperature=0.0, max_tokens=output_len,
                                  structured_outputs=StructuredOutputsParams(
                                      json=schema, disable_any_whitespace=True))
        return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    sampling = [params(r.output_len) for r in requests]
    build_s, wait_s, apply_s = timer.build_s, timer.wait_s, timer.apply_s
    steps = timer.num_applies
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling, use_tqdm=False)
    elapsed = time.perf_counter() - start
    completions = [o.outputs[0] for o in outputs]
    return {
        "elapsed_s": elapsed,
        "output_tokens": sum(len(c.token_ids) for c in completions),
        "num_cut_short": sum(c.finish_reason != "length" for c in completions),
        "grammar_build_s": timer.build_s - build_s,
        "grammar_wait_s": timer.wait_s - wait_s,
        "grammar_apply_s": timer.apply_s - apply_s,
        "num_masked_steps": timer.num_applies - steps,
        "sample_text": completions[0].text[:120],
    }


def summarize(rounds: list[dict]) -> dict:
    """The median round by elapsed time, with every round's tokens per second."""
    median = sorted(rounds, key=lambda r: r["elapsed_s"])[(len(rounds) - 1) // 2]
    return {**median, "output_tokens_per_s": median["output_tokens"] / median["elapsed_s"],
            "ms_per_output_token": 1e3 * median["elapsed_s"] / max(median["output_tokens"], 1),
            "rounds_output_tokens_per_s": [r["output_tokens"] / r["elapsed_s"] for r in rounds]}


def run_pair(llm, args, name: str, num_requests: int, num_rounds: int, schema: dict,
             timer: GrammarTimer) -> dict:
    """`num_rounds` rounds of both arms on fresh prompts, the first arm alternating."""
    vocab_size = llm.llm_engine.hf_config.vocab_size
    base = fixed_workload(num_requests=num_requests, input_len=args.input_len,
                          output_len=args.output_len, vocab_size=vocab_size)
    arms: dict[str, list[dict]] = {"unconstrained": [], "json_schema": []}
    for index in range(num_rounds):
        order = ("unconstrained", "json_schema") if index % 2 == 0 else (
            "json_schema", "unconstrained")
        for arm in order:
            # NOTE: each arm its own prompts: with the round's prompts shared, the second arm
            # found the first's prompt blocks in the prefix cache and ran ~1.3x faster.
            requests = with_fresh_prompts(base, vocab_size=vocab_size,
                                          seed=(index, arm == "json_schema", num_requests))
            arms[arm].append(run_arm(llm, requests, arm == "json_schema", schema, timer))
            r = arms[arm][-1]
            print(f"{name} round {index} {arm}: {r['output_tokens']} tokens in "
                  f"{r['elapsed_s']:.2f} s", file=sys.stderr)
    rows = {arm: summarize(rounds) for arm, rounds in arms.items()}
    # Per round: the constrained arm's rate against the unconstrained one of the same round.
    rows["ratio_per_round"] = [c / u for c, u in zip(
        rows["json_schema"]["rounds_output_tokens_per_s"],
        rows["unconstrained"]["rounds_output_tokens_per_s"])]
    return rows


def print_table(result: dict) -> None:
    header = (f"{'workload':<28} {'arm':<14} {'out tokens':>10} {'seconds':>8} {'out tok/s':>10} "
              f"{'ms/token':>9} {'ratio':>7} {'mask fill ms/step':>18} {'mask wait ms/step':>18} "
              f"{'mask apply ms/step':>19}")
    print(header)
    print("-" * len(header))
    for name, rows in result["runs"].items():
        base = rows["unconstrained"]["output_tokens_per_s"]
        for arm in ("unconstrained", "json_schema"):
            r = rows[arm]
            steps = max(r["num_masked_steps"], 1)
            build, wait, apply = (
                f"{1e3 * r[key] / steps:.2f}" if r["num_masked_steps"] else "-"
                for key in ("grammar_build_s", "grammar_wait_s", "grammar_apply_s"))
            print(f"{name:<28} {arm:<14} {r['output_tokens']:>10} {r['elapsed_s']:>8.2f} "
                  f"{r['output_tokens_per_s']:>10.1f} {r['ms_per_output_token']:>9.2f} "
                  f"{r['output_tokens_per_s'] / base:>6.3f}x {build:>18} {wait:>18} {apply:>19}")
        print(f"{'':<28} per round json/unconstrained: "
              + ", ".join(f"{x:.3f}x" for x in rows["ratio_per_round"]))


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark of parsed flags (add_cli_args); prints the table, writes the JSON."""
    check_args(args)
    from pagedllm import LLM

    start = time.perf_counter()
    llm = LLM(**EngineConfig.kwargs_from_cli_args(args))
    print(f"engine ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    schema = readings_schema(args.min_items)
    timer = GrammarTimer(sync_fill=args.sync_mask_fill)
    runs = {}
    with timer.installed():
        # Warm-up, untimed, at the batch's size: the grammar compiles (and llguidance builds its
        # token tables) once, and the first pass over the batch's shapes and KV pages is paid
        # (a round 0 without it ran 3.5x slower in one arm).
        warm = fixed_workload(num_requests=args.num_requests, input_len=args.input_len,
                              output_len=8, vocab_size=llm.llm_engine.hf_config.vocab_size,
                              seed=99)
        run_arm(llm, warm, True, schema, timer)
        run_arm(llm, warm, False, schema, timer)
        name = f"fixed {args.num_requests} x {args.input_len}/{args.output_len}"
        runs[name] = run_pair(llm, args, name, args.num_requests, args.rounds, schema, timer)
        if args.single_rounds:
            name = f"single 1 x {args.input_len}/{args.output_len}"
            runs[name] = run_pair(llm, args, name, 1, args.single_rounds, schema, timer)
    result = {"config": {k: v for k, v in vars(args).items() if k != "func"},
              "schema": schema, "runs": runs}
    print(f"\nJSON schema (compact, at least {args.min_items} readings) against unconstrained "
          f"(ignore_eos), greedy; median round; mask times per step that masked"
          f"{' (fill not overlapped)' if args.sync_mask_fill else ''}")
    print_table(result)
    cut = sum(rows[arm]["num_cut_short"] for rows in runs.values() for arm in rows
              if arm != "ratio_per_round")
    if cut:
        print(f"NOTE: {cut} constrained requests ended before max_tokens: raise --min-items")
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
