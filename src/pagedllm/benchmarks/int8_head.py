"""int8's tied LM head per call against the dense one, on SmolLM2's real decode states.

The shipped SmolLM2 runs the fixed workload's first decode steps in bf16 (64 requests), and
the final hidden states the LM head sees at 64 rows are kept. On those, taking turns
(--rounds, best of each; CPU time of the calling process, so a shared machine distorts it
less), it times one head call per state:
- dense: the bf16 table on the dense panels (`dot_panel_linear`, fp32 logits), as the tied
  head of a bf16 model;
- for each --groups G: the W8A8 GEMM on an int8 copy of the table in groups of G
  (`int8_linear`), alone and followed by the native rescoring (`int8_rescore_logits`: the
  logits within --margin of each row's largest recomputed exactly, as
  PAGEDLLM_INT8_LM_HEAD=G does),
and prints milliseconds per call, the W8A8 logits' largest error against the dense ones, the
logits rescored per row, and how many rows' top token is the dense head's after rescoring.

    python -m pagedllm.benchmarks.int8_head [--groups 32 64] [--rounds 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pagedllm.ops import cpu_ops, cpu_ops_error

RESULTS = Path("benchmarks", "results")  # under the working directory, not the package


def decode_states(steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The LM head's inputs at `steps` decode steps of the fixed workload (64 rows each) on
    the shipped SmolLM2 in bf16, and its embedding table."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.benchmarks.workloads import fixed_workload
    from pagedllm.models.default_model import resolve_model_path

    llm = LLM(str(resolve_model_path(None)), dtype="bfloat16", quantization="none")
    model = llm.llm_engine.model_executor.driver_worker.model
    captured: list[torch.Tensor] = []
    compute_logits = model.compute_logits

    def capture(hidden: torch.Tensor) -> torch.Tensor | None:
        captured.append(hidden.clone())
        return compute_logits(hidden)

    model.compute_logits = capture
    requests = fixed_workload(num_requests=64, output_len=steps + 1, seed=0)
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests],
                 SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True),
                 use_tqdm=False)
    model.compute_logits = compute_logits
    table = model.get_input_embeddings().weight.detach().clone()
    llm.shutdown()
    return [h for h in captured if h.shape[0] == 64][-steps:], table


def cpu_ms(fn, states: list[torch.Tensor]) -> float:
    start = time.process_time()
    for hidden in states:
        fn(hidden)
    return 1000 * (time.process_time() - start) / len(states)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--margin", type=float, default=4.0,
                        help="nats below a row's largest rescored (int8_lm_head.RESCORE_MARGIN)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps' states timed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "int8_head.json"))
    args = parser.parse_args()
    ops = cpu_ops()
    if ops is None:
        raise SystemExit(f"CPU ops unavailable: {cpu_ops_error()}")
    states, table = decode_states(args.steps)
    vocab, empty = table.shape[0], torch.empty(0)
    dense_panels = ops.pack_dot_panels(table)

    def dense(hidden: torch.Tensor) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], vocab)
        ops.dot_panel_linear(out, hidden, dense_panels, empty)
        return out

    arms = {"dense bf16": dense}
    for group in args.groups:
        weight, scales = ops.pack_int8_panels(table, group)

        def w8a8(hidden: torch.Tensor, weight=weight, scales=scales) -> torch.Tensor:
            out = torch.empty(hidden.shape[0], vocab)
            ops.int8_linear(out, hidden, weight, scales, empty)
            return out

        def rescored(hidden: torch.Tensor, w8a8=w8a8) -> torch.Tensor:
            out = w8a8(hidden)
            ops.int8_rescore_logits(out, hidden, table, args.margin)
            return out

        arms[f"W8A8 g{group}"] = w8a8
        arms[f"W8A8 g{group} + rescoring"] = rescored
    times: dict[str, list[float]] = {name: [] for name in arms}
    for round_index in range(args.rounds):
        order = list(arms) if round_index % 2 == 0 else list(arms)[::-1]
        for name in order:
            times[name].append(cpu_ms(arms[name], states))
    reference = [dense(h) for h in states]
    print(f"{len(states)} decode steps x 64 rows, vocabulary {vocab}, hidden {table.shape[1]}; "
          f"{torch.get_num_threads()} threads, CPU ms per call (best of {args.rounds})")
    header = (f"{'head':<26} {'ms':>7} {'vs dense':>9} {'max |err|':>10} {'rescored/row':>13} "
              f"{'top-1 = dense':>14}")
    print(header)
    print("-" * len(header))
    rows = []
    for name, fn in arms.items():
        best = min(times[name])
        outs = [fn(h) for h in states]
        err = max((o - r).abs().max().item() for o, r in zip(outs, reference))
        agree = sum((o.argmax(-1) == r.argmax(-1)).sum().item() for o, r in zip(outs, reference))
        rescored_per_row = None
        if name.endswith("rescoring"):
            raw = arms[name.removesuffix(" + rescoring")]
            near = [(x >= x.amax(-1, keepdim=True) - args.margin).sum().item()
                    for x in (raw(h) for h in states)]
            rescored_per_row = sum(near) / (64 * len(states))
        rows.append({"head": name, "cpu_ms": best, "rounds_ms": times[name], "max_abs_err": err,
                     "rescored_per_row": rescored_per_row, "top1_agree": agree,
                     "rows": 64 * len(states)})
        print(f"{name:<26} {best:7.2f} {best / min(times['dense bf16']):8.2f}x {err:10.3f} "
              f"{'-' if rescored_per_row is None else f'{rescored_per_row:.1f}':>13} "
              f"{agree:>7}/{64 * len(states)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows},
                                         indent=1))


if __name__ == "__main__":
    main()
