"""The `bench` sub-command: `pagedllm bench throughput|latency|serve|startup|structured`, as
`vllm bench` has.

The `pagedllm` command calls add_bench_parser(subparsers) while it builds its parser, and
run_bench(args) for `pagedllm bench ...`; `python -m pagedllm.benchmarks bench ...` does the
same without the rest of the CLI (__main__.py). Each benchmark module owns its flags
(`add_cli_args`), their checks (`check_args`, ValueError) and its run (`run(args) -> int`).
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

# sub-command -> (module, one-line help)
BENCHMARKS = {
    "throughput": ("pagedllm.benchmarks.throughput",
                   "offline throughput of pagedllm and its peers (vLLM, transformers)"),
    "latency": ("pagedllm.benchmarks.latency",
                "end-to-end latency of one batch through LLM.generate"),
    "serve": ("pagedllm.benchmarks.serving",
              "online serving: request rates against OpenAI-compatible servers"),
    "startup": ("pagedllm.benchmarks.startup",
                "start-up time by phase, LLM() and `pagedllm serve`, with peak RSS"),
    "startup-peers": ("pagedllm.benchmarks.startup_peers",
                      "start-up side by side: pagedllm, OpenVINO GenAI, llama.cpp's server"),
    "structured": ("pagedllm.benchmarks.structured",
                   "structured outputs: a JSON schema on every request against none"),
}


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds `bench` and its sub-commands (BENCHMARKS) to `subparsers`.

    The parsed namespace names the sub-command in `bench_command`.
    """
    bench = subparsers.add_parser(
        "bench", help="benchmark pagedllm: " + ", ".join(BENCHMARKS),
        description="Benchmarks that print a table and write JSON (--output-json).")
    commands = bench.add_subparsers(dest="bench_command", required=True,
                                    metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        parser = commands.add_parser(name, help=help_text, description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_cli_args(parser)


def run_bench(args: argparse.Namespace) -> int:
    """Runs the benchmark `args.bench_command` names and returns the exit status.

    Raises:
        ValueError: a flag out of range (the message names it).
    """
    module = importlib.import_module(BENCHMARKS[args.bench_command][0])
    module.check_args(args)
    return module.run(args)


def run_standalone(module: ModuleType, argv: list[str] | None) -> int:
    """`python -m pagedllm.benchmarks.NAME`: one benchmark module's flags, checks and run,
    without the `bench` sub-command around them."""
    parser = argparse.ArgumentParser(description=module.__doc__.splitlines()[0])
    module.add_cli_args(parser)
    args = parser.parse_args(argv)
    try:
        module.check_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return module.run(args)
