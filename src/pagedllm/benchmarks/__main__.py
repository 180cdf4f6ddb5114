"""`python -m pagedllm.benchmarks bench {throughput,latency,serve} ...`: the `bench` sub-command
of the `pagedllm` command, alone."""

from __future__ import annotations

import argparse
import sys

from pagedllm.benchmarks.cli import add_bench_parser, run_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedllm.benchmarks")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run_bench(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
