"""The `pagedllm` command: `pagedllm generate "PROMPT"` prints a completion, `pagedllm serve`
runs the OpenAI-compatible server, `pagedllm bench` measures. Engine flags come from
EngineConfig's fields."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pagedllm.benchmarks.cli import add_bench_parser, run_bench
from pagedllm.config import EngineConfig
from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS


class _OneLineParser(argparse.ArgumentParser):
    """Reports a bad argument as one line (no usage dump) and exits with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"pagedllm: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="pagedllm", description="High-throughput LLM serving engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    EngineConfig.add_cli_args(gen)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="HF model directory or .gguf file (default: shipped SmolLM2-135M)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="names clients use for the model (default: MODEL as given)")
    serve.add_argument("--api-key", default=os.environ.get("PAGEDLLM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 (env PAGEDLLM_API_KEY)")
    serve.add_argument("--chat-template", default=None,
                       help="Jinja chat template, or a file holding one (default: the model's)")
    serve.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
    serve.add_argument("--log-stats-interval", type=float, default=5.0,
                       help="seconds between throughput log lines while busy")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='parse the model\'s own tool calls (chat tool_choice "auto"); needs '
                            "--tool-call-parser")
    serve.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                       help="the format the model writes tool calls in (hermes: "
                            "<tool_call>{...}</tool_call>)")
    EngineConfig.add_cli_args(serve)
    add_bench_parser(sub)
    return parser


def _generate(args: argparse.Namespace) -> int:
    from pagedllm import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed if args.temperature > 0 else None,
    )
    llm = LLM(**EngineConfig.kwargs_from_cli_args(args))
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    print(outputs[0].outputs[0].text)
    if args.profile:
        print(llm.llm_engine.profiler.report(), file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pagedllm import gc_freeze

    # No automatic collection while the server starts: it collects once when ready
    # (api_server.run_server, pagedllm/gc_freeze.py).
    gc_freeze.pause()
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two models named: {args.model_tag!r} and --model {args.model!r}")
    model = args.model_tag or args.model
    settings = {**EngineConfig.kwargs_from_cli_args(args), "model": model}
    if "torch" not in sys.modules:  # the weights read on a thread while torch is imported
        from pagedllm.models import weight_prefetch

        weight_prefetch.start(**settings)
    from pagedllm.entrypoints.openai.api_server import run_server

    chat_template = args.chat_template
    if chat_template is not None and Path(chat_template).is_file():
        chat_template = Path(chat_template).read_text()
    elif chat_template is not None and "{" not in chat_template:
        # NOTE: as vLLM: text without a Jinja tag was meant as a file's path.
        raise ValueError(f"--chat-template {chat_template!r} is not a file (and not a template: "
                         "it has no Jinja tag)")
    run_server(
        settings,
        host=args.host,
        port=args.port,
        served_model_names=args.served_model_name,
        api_key=args.api_key or None,
        chat_template=chat_template,
        uvicorn_log_level=args.uvicorn_log_level,
        log_stats_interval_s=args.log_stats_interval,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
    )
    # NOTE: the server has stopped cleanly (streams ended, engine thread joined, socket
    # closed). Tearing down torch at interpreter exit takes seconds on small machines, and a
    # supervisor waiting on SIGTERM should not, so exit now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # NOTE: the server logs its throughput line at INFO, so `serve` logs at INFO by default.
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # transformers logs errors only (its import, about 0.4 s, is left to what needs it).
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    else:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            return run_bench(args)
    except (ValueError, OSError) as exc:
        print(f"pagedllm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
