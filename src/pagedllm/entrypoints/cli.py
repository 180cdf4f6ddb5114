"""The `pagedllm` command: `pagedllm generate "PROMPT"` prints a completion; `pagedllm serve`
runs the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


class _OneLineParser(argparse.ArgumentParser):
    """Reports a bad argument as one line (no usage dump) and exits with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"pagedllm: error: {message} (see --help)\n")


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF model directory or .gguf file (default: shipped SmolLM2-135M)")
    _add_engine_options(parser)


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"])
    parser.add_argument("--swap-space", type=float, default=0.0,
                        help="GiB of host memory for swapped-out KV blocks")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True)
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")


def _engine_kwargs(args: argparse.Namespace, model: str | None) -> dict:
    """The engine arguments of `generate` and `serve`, from their shared flags."""
    return dict(
        model=model,
        dtype=args.dtype,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        seed=args.seed,
        preemption_mode=args.preemption_mode,
        swap_space=args.swap_space,
        enable_prefix_caching=args.enable_prefix_caching,
        attention_backend=args.attention_backend,
        device=args.device,
    )


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
    gen.add_argument("--profile", action="store_true",
                     help="print a per-step time breakdown to stderr")
    _add_engine_args(gen)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="HF model directory or .gguf file (default: shipped SmolLM2-135M)")
    serve.add_argument("--model", default=None, help="the same as MODEL")
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
    _add_engine_options(serve)
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
    llm = LLM(**_engine_kwargs(args, args.model), profile=args.profile)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    print(outputs[0].outputs[0].text)
    if args.profile:
        print(llm.llm_engine.profiler.report(), file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.openai.api_server import run_server

    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two models named: {args.model_tag!r} and --model {args.model!r}")
    model = args.model_tag or args.model
    chat_template = args.chat_template
    if chat_template is not None and Path(chat_template).is_file():
        chat_template = Path(chat_template).read_text()
    elif chat_template is not None and "{" not in chat_template:
        # NOTE: as vLLM: text without a Jinja tag was meant as a file's path.
        raise ValueError(f"--chat-template {chat_template!r} is not a file (and not a template: "
                         "it has no Jinja tag)")
    run_server(
        _engine_kwargs(args, model),
        host=args.host,
        port=args.port,
        served_model_names=args.served_model_name,
        api_key=args.api_key or None,
        chat_template=chat_template,
        uvicorn_log_level=args.uvicorn_log_level,
        log_stats_interval_s=args.log_stats_interval,
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
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return _serve(args)
    except (ValueError, OSError) as exc:
        print(f"pagedllm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
