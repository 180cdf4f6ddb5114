"""LLMEngine: add requests, then `step()` = schedule -> execute -> update, until none are left."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagedllm.config import EngineConfig
from pagedllm.core.beam_search import BeamSearchParams
from pagedllm.core.block_manager import BlockManager
from pagedllm.core.block_pool import DEFAULT_CACHE_FLOOR_BLOCKS
from pagedllm.core.kv_cache_snapshot import KVCacheSnapshot, snapshot_kv_cache
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler, SchedulerConfig
from pagedllm.engine.input_processor import InputProcessor, ProcessedRequest, PromptType
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.executor import Executor, build_executor
from pagedllm.models import hf_fast
from pagedllm.models.default_model import auto_dtype, resolve_model_path
from pagedllm.models.loader import load_config
from pagedllm.models.registry import kv_cache_sliding_window
from pagedllm.outputs import RequestOutput
from pagedllm.profiler import StepProfiler
from pagedllm.sampling_params import SamplingParams
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.draft_model import check_draft_model
from pagedllm.startup_profile import mark
from pagedllm.structured_output.manager import grammar_mask_overlap
from pagedllm.tokenizer import wait_loaded
from pagedllm.worker.cache_engine import kv_pool_commit_mode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Files any Hugging Face tokenizer loads from (fast, SentencePiece, BPE vocabularies).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class EngineStats:
    """A snapshot of the engine, read by tests, benchmarks and the server's metrics."""

    # Physical KV blocks in the pool, and how many are free.
    num_blocks: int
    num_free_blocks: int
    # Requests being computed, queued (new or preempted by recompute), and swapped out.
    num_running: int
    num_waiting: int
    num_swapped: int
    # Preemptions since start, and how many of them swapped the request out.
    num_preemptions: int
    num_swap_outs: int
    # Tokens whose keys/values are in the cache now.
    num_tokens_stored: int
    # Token slots of all allocated blocks (num_used_blocks x block_size); the gap to
    # num_tokens_stored is the unfilled tails of last blocks.
    num_slots_reserved: int
    # Blocks summed over all block tables; above the used blocks when blocks are shared.
    num_logical_blocks: int
    # Blocks holding a prefix-cache entry (in use or free but not yet evicted).
    num_cached_blocks: int
    # Host blocks for swapping, and how many are free.
    num_cpu_blocks: int
    num_free_cpu_blocks: int
    # Prompt tokens looked up in the prefix cache and found there; evicted cache entries.
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_prefix_cache_evictions: int
    # Tokens run through the model (prefill chunks, recomputation and decodes) since start.
    num_tokens_computed: int
    # Tokens generated since start.
    num_generation_tokens: int
    # Speculative decoding since start (zeros without it): sequence-steps that verified
    # proposals, tokens proposed, tokens accepted, and accepted by position in the proposal.
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: list[int] = dataclasses.field(default_factory=list)


class LLMEngine:
    """The synchronous engine under `LLM` and the server.

    The request travels one way: InputProcessor (checks, tokens) -> Scheduler (blocks, budget)
    -> Executor (forward and sampling, on its ranks) -> Scheduler.update_from_output (tokens,
    token stops) -> OutputProcessor (text, stop strings) -> RequestOutput.
    """

    def __init__(self, config: EngineConfig | None = None, **kwargs) -> None:
        mark("imports")
        config = config or EngineConfig(**kwargs)
        self.config = config
        start = time.perf_counter()
        model_dir = resolve_model_path(config.model)
        self.model_dir = model_dir
        hf_config = load_config(model_dir)
        self.hf_config = hf_config
        if config.dtype == "auto":  # the checkpoint's (models/default_model.auto_dtype)
            config = dataclasses.replace(
                config, dtype=auto_dtype(config.model, hf_config, config.device))
            self.config = config
        mark("config")
        if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
            raise ValueError(f"no tokenizer in {str(model_dir)!r}: it needs one of "
                             f"{', '.join(_TOKENIZER_FILES)} beside the weights")
        # NOTE: a recorded tokenizer's Rust half loads on a thread beside the model; the engine
        # waits for it before it is ready. Its build (tokenizers' from_str, ~0.1 s) holds the GIL
        # most of the time, so it overlaps only the load's GIL-free work (reads, torch ops).
        self.tokenizer: PreTrainedTokenizerBase = hf_fast.load_tokenizer(model_dir,
                                                                         background=True)
        mark("tokenizer")
        # NOTE: structured outputs' token tables (llguidance, about a second with the GIL held,
        # and transformers' tokenizer under them) are built on the first constrained request,
        # not here: on a thread beside the model's load they held its Python back by 0.3-0.4 s
        # of a start on two cores (InputProcessor.structured_output).
        model_max = getattr(hf_config, "max_position_embeddings", None) or 2048
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's "
                f"max_position_embeddings ({model_max}): lower it"
            )
        self.max_model_len = config.max_model_len or model_max
        check_draft_model(config, hf_config, self.tokenizer, self.max_model_len)
        self.profiler = StepProfiler(enabled=config.profile)
        self.model_executor: Executor = build_executor(
            config, hf_config, model_dir, self.max_model_len, self.profiler)
        num_blocks = self.model_executor.num_kv_blocks
        self.block_manager = BlockManager(
            num_blocks,
            config.block_size,
            num_cpu_blocks=self.model_executor.num_cpu_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            sliding_window=kv_cache_sliding_window(hf_config),
            # NOTE: a pool written in full at start is resident anyway: the prefix cache may
            # then grow into every block (vLLM's LRU over the whole pool) at no memory cost.
            cache_floor_blocks=(num_blocks if kv_pool_commit_mode() == "start"
                                else DEFAULT_CACHE_FLOOR_BLOCKS),
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                preemption_mode=config.preemption_mode,
                # NOTE: beam search runs without speculation (its requests never propose).
                speculative_config=SpeculativeConfig.from_dict(config.speculative_config),
                grammar_mask_overlap=grammar_mask_overlap(),
            ),
            self.block_manager,
        )
        self.input_processor = InputProcessor(
            self.tokenizer,
            vocab_size=hf_config.vocab_size,
            max_model_len=self.max_model_len,
            kv_capacity_tokens=num_blocks * config.block_size,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
        )
        if num_blocks * config.block_size < self.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, fewer than max_model_len (%d): no request can "
                "use more (without max_tokens, one stops there); raise num_kv_blocks or "
                "kv_cache_memory_bytes, or lower max_model_len",
                num_blocks * config.block_size, self.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer)
        wait_loaded(self.tokenizer)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = hf_config.eos_token_id
            eos = eos[0] if isinstance(eos, list) else eos
        self.eos_token_id: int | None = eos
        self._arrival_counter = itertools.count()
        self._num_tokens_computed = 0
        self._num_generation_tokens = 0
        mark("engine rest")
        logger.info(
            "engine ready in %.1f s: model %s, dtype %s, max_model_len %d",
            time.perf_counter() - start,
            model_dir,
            config.torch_dtype,
            self.max_model_len,
        )

    @property
    def worker(self):
        """The in-process Worker of the `uni` backend (tests and tools inspect its model and
        cache); the `mp` backend's workers live in other processes."""
        worker = getattr(self.model_executor, "driver_worker", None)
        if worker is None:
            raise AttributeError(f"{type(self.model_executor).__name__} runs its workers in "
                                 f"other processes: use model_executor.collective_rpc")
        return worker

    def shutdown(self) -> None:
        """Stops the executor's worker processes, if any; the engine cannot step afterwards."""
        self.model_executor.shutdown()

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.tokenizer

    def add_request(
        self,
        request_id: str,
        prompt: PromptType | ProcessedRequest,
        params: SamplingParams | BeamSearchParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queues a request; a bad one raises ValueError and leaves the engine untouched.

        `prompt` is a user prompt, checked and tokenized here with `params` (SamplingParams,
        by default `SamplingParams()`; or BeamSearchParams), or a ProcessedRequest that
        `process_inputs` already made, queued as it is (then `params` must be None). A beam
        search yields one output, with every beam, when it finishes.
        """
        self._check_request_id(request_id)
        if isinstance(prompt, ProcessedRequest):
            if params is not None:
                raise ValueError("a ProcessedRequest carries its own params: pass None")
            processed = prompt
        else:
            processed = self.process_inputs(prompt, params)
        self.scheduler.add_request(
            Request(
                request_id=request_id,
                prompt_token_ids=processed.prompt_token_ids,
                sampling_params=processed.sampling_params,
                arrival_index=next(self._arrival_counter),
                max_tokens=processed.max_tokens,
                eos_token_id=self.eos_token_id,
                block_size=self.config.block_size,
                beam_search=processed.beam_search,
            )
        )
        self.output_processor.add_request(
            request_id,
            processed.prompt,
            processed.prompt_token_ids,
            processed.sampling_params,
            arrival_time if arrival_time is not None else time.time(),
        )

    def process_inputs(self, prompt: PromptType,
                       params: SamplingParams | BeamSearchParams | None = None,
                       **options) -> ProcessedRequest:
        """Checks and tokenizes a request without queueing it (see InputProcessor.process for
        `options`); `add_request` takes the result as it is."""
        return self.input_processor.process(
            prompt, params if params is not None else SamplingParams(), **options)

    def add_beam_search_request(
        self, request_id: str, prompt: PromptType, params: BeamSearchParams
    ) -> None:
        """Queues a beam search (`add_request` with BeamSearchParams)."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        self.add_request(request_id, prompt, params)

    def _check_request_id(self, request_id: str) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")

    def abort_request(self, request_id: str | Iterable[str]) -> list[RequestOutput]:
        """Ends requests at once and frees their blocks; returns their final outputs."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        outputs = []
        for rid in ids:
            self.scheduler.finish_request(rid, RequestStatus.FINISHED_ABORTED)
            output = self.output_processor.abort_request(rid)
            if output is not None:
                outputs.append(output)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Runs one iteration and returns the outputs of the requests that changed (with
        `finished_only`, of those that finished in it)."""
        profiler = self.profiler
        with profiler.section("step"):
            with profiler.section("schedule"):
                scheduler_output = self.scheduler.schedule()
            if scheduler_output.is_empty:
                return []
            runner_output = self.model_executor.execute_model(
                scheduler_output, self.scheduler.requests)
            with profiler.section("update"):
                updates = self.scheduler.update_from_output(scheduler_output, runner_output)
            with profiler.section("output processing"):
                # NOTE: counted on the output side, which drops the tokens after a stop string
                # (an accepted run of proposals may go past one).
                states = self.output_processor.states
                counted = [(seq, len(seq.token_ids)) for seq in (
                    states[u.request_id].seqs[u.seq_index] for u in updates
                    if u.new_tokens and u.request_id in states)]
                outputs, stopped = self.output_processor.process_updates(updates, finished_only)
                for request_id, seq_index in stopped:
                    self.scheduler.finish_sequence(
                        request_id, seq_index, RequestStatus.FINISHED_STOPPED
                    )
        profiler.num_steps += 1
        self._num_generation_tokens += sum(len(seq.token_ids) - n for seq, n in counted)
        self._num_tokens_computed += scheduler_output.num_batched_tokens
        return outputs

    def get_stats(self) -> EngineStats:
        cpu_pool = self.block_manager.cpu_pool
        speculator = self.scheduler.speculator
        spec = dataclasses.asdict(speculator.stats) if speculator is not None else {}
        return EngineStats(
            **{f"spec_decode_{name}": value for name, value in spec.items()},
            num_blocks=self.block_manager.num_blocks,
            num_free_blocks=self.block_manager.num_free_blocks,
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_swapped=self.scheduler.num_swapped,
            num_preemptions=self.scheduler.num_preemptions,
            num_swap_outs=self.scheduler.num_swap_outs,
            num_tokens_stored=self.scheduler.num_tokens_stored(),
            num_slots_reserved=self.block_manager.num_slots_reserved(),
            num_logical_blocks=self.block_manager.num_logical_blocks(),
            num_cached_blocks=self.block_manager.pool.num_cached_blocks,
            num_cpu_blocks=cpu_pool.num_blocks if cpu_pool else 0,
            num_free_cpu_blocks=cpu_pool.num_free_blocks if cpu_pool else 0,
            prefix_cache_queries=self.block_manager.prefix_cache_queries,
            prefix_cache_hits=self.block_manager.prefix_cache_hits,
            num_prefix_cache_evictions=self.block_manager.pool.num_evictions,
            num_tokens_computed=self._num_tokens_computed,
            num_generation_tokens=self._num_generation_tokens,
        )

    def get_kv_cache_snapshot(self) -> tuple[KVCacheSnapshot, EngineStats]:
        """Every KV block and its holders, with the stats of the same moment (between steps)."""
        snapshot = snapshot_kv_cache(self.scheduler, self.block_manager, self.profiler.num_steps)
        return snapshot, self.get_stats()
