"""The draft model: a second, smaller model of the target's vocabulary that proposes k tokens for
every proposing sequence, in batched steps, on its own KV cache.

KV cache (vLLM V0's design): the draft's per-layer pools have the target's block count and take
the target's block tables and slot mapping, so the block manager reserves a slot once for both,
and its copy-on-write copies and swaps apply to both pools. Start-up sizes the pool by both
models' bytes per block (`PairedKVCacheSpec`).

Catching up: the draft runs only for the sequences that propose in a step (a step that does not
speculate costs it nothing). Before proposing, it computes the committed tokens it has not seen:
the prompt the first time, the bonus token and the last accepted proposal of the step before,
the tokens decoded while the sequence did not propose. What it has seen is kept per physical
block, not per sequence, because blocks change hands (prefix-cache hits, forks, swaps, reuse
after a preemption): `valid[b]` is how many leading slots of block b hold the draft's K/V of the
tokens the target holds there. A target write at offset o of block b lowers it to at most o; the
draft's write of the same tokens at the same slots raises it again; copies and swaps move it with
the block. A sequence's draft starts at its first slot that is not valid. A wrong entry could
only cost acceptance, never output: the target verifies every proposal.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedllm.attention import DEFAULT_ATTENTION_BACKEND, get_attention_backend
from pagedllm.config import EngineConfig
from pagedllm.core.interface import ScheduledRequest
from pagedllm.models.default_model import resolve_model_path
from pagedllm.models.loader import build_model, gguf_source, load_config
from pagedllm.models.registry import kv_cache_sliding_window
from pagedllm.sample.sampler import Sampler, SamplingBatch
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.rejection import DRAFT_STREAM, race, row_generator, sampling_probs
from pagedllm.worker.cache_engine import CacheEngine, KVCacheSpec
from pagedllm.worker.host_memory import HugePageArena

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


def check_draft_model(config: EngineConfig, hf_config: PretrainedConfig,
                      tokenizer: PreTrainedTokenizerBase, max_model_len: int) -> None:
    """Refuses, before any weight is read, a draft the target cannot verify (ValueError)."""
    spec = SpeculativeConfig.from_dict(config.speculative_config)
    if spec is None or spec.method != "draft_model":
        return
    if config.tensor_parallel_size > 1 or config.distributed_executor_backend not in (None,
                                                                                       "uni"):
        raise ValueError("speculative_config method 'draft_model' runs in the engine's process "
                         "only: use tensor_parallel_size=1 and no distributed executor")
    if kv_cache_sliding_window(hf_config) is not None:
        raise ValueError("speculative_config method 'draft_model' does not support a target "
                         "whose every layer has a sliding window (its blocks are freed out of "
                         "the window); use method 'ngram'")
    draft_dir = resolve_model_path(spec.model)
    draft_config = load_config(draft_dir)
    if draft_config.vocab_size != hf_config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft_config.vocab_size} tokens, "
                         f"{spec.model}) differs from the target's ({hf_config.vocab_size}): "
                         f"a draft must share the target's tokenizer")
    draft_tokenizer = _tokenizer_vocab(draft_dir)
    if draft_tokenizer is not None and draft_tokenizer != tokenizer.get_vocab():
        raise ValueError(f"the draft model's tokenizer ({spec.model}) maps tokens to other ids "
                         f"than the target's: a draft must share the target's tokenizer")
    draft_max = getattr(draft_config, "max_position_embeddings", None) or 2048
    if draft_max < max_model_len:
        raise ValueError(f"the draft model's max_position_embeddings ({draft_max}) is below "
                         f"max_model_len ({max_model_len}): lower max_model_len")


def _tokenizer_vocab(model_dir: Path) -> dict[str, int] | None:
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "vocab.json",
                                                         "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True).get_vocab()


@dataclass(frozen=True)
class PairedKVCacheSpec(KVCacheSpec):
    """The target's cache shape, with a block's bytes counting the draft's block of the same id
    too: what start-up sizes the pool (and the swap space) by."""

    draft: KVCacheSpec | None = None

    @property
    def bytes_per_block(self) -> int:
        draft = self.draft.bytes_per_block if self.draft is not None else 0
        return super().bytes_per_block + draft


@dataclass
class DraftProposal:
    """One sequence's proposals of this step, and what the draft wrote to get them."""

    # The k proposed tokens.
    token_ids: list[int]
    # [k, vocab] the distributions they were drawn from; None for a greedy row (q one-hot).
    probs: torch.Tensor | None
    # The draft wrote K/V for positions [first_position, end_position) through block_table.
    block_table: list[int]
    first_position: int
    end_position: int


def _token_slice(s: ScheduledRequest, start: int, end: int) -> list[int]:
    """The sequence's committed tokens [start, end) (prompt, then generated)."""
    prompt, outputs = s.prompt_token_ids, s.output_token_ids
    num_prompt = len(prompt)
    return [*prompt[start:min(end, num_prompt)], *outputs[max(start - num_prompt, 0):
                                                          max(end - num_prompt, 0)]]


class DraftModel:
    """The draft model, its KV pools and its per-block record of what they hold."""

    def __init__(self, spec: SpeculativeConfig, config: EngineConfig, max_model_len: int,
                 device: torch.device, seed: int) -> None:
        model_dir = resolve_model_path(spec.model)
        hf_config = load_config(model_dir)
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        head_size = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        backend_cls = get_attention_backend(config.attention_backend or DEFAULT_ATTENTION_BACKEND)
        self.backend = backend_cls(num_heads, num_kv_heads, head_size, head_size**-0.5,
                                   config.block_size)
        # The target's quantization, except GGUF's own types for a draft that is no GGUF.
        quantization = config.quantization
        if quantization == "gguf" and gguf_source(spec.model) is None:
            quantization = "none"
        self.model = build_model(hf_config, model_dir, self.backend, max_model_len,
                                 config.torch_dtype, device, quantization, spec.model)
        if device.type == "cpu":
            self.model.pack_weights(allocate=HugePageArena().empty)
        self.cache_spec = KVCacheSpec(num_layers=hf_config.num_hidden_layers,
                                      num_kv_heads=num_kv_heads, head_size=head_size,
                                      block_size=config.block_size,
                                      dtype=config.kv_cache_torch_dtype)
        self.block_size = config.block_size
        self.device = device
        # Unseeded draws of the draft and of rejection sampling.
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed + 1)
        self.cache_engine: CacheEngine | None = None

    def allocate_cache(self, num_blocks: int, num_cpu_blocks: int) -> None:
        """The draft's pools: as many blocks as the target's, the same ids."""
        self.cache_engine = CacheEngine(self.cache_spec, num_blocks, self.backend, self.device,
                                        num_cpu_blocks)
        self._valid = np.zeros(num_blocks, dtype=np.int64)
        self._cpu_valid = np.zeros(num_cpu_blocks, dtype=np.int64)

    # ---- block moves: the same as the target's, with the record of what each block holds ----

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        self.cache_engine.swap_out(pairs)
        for device_block, host_block in pairs:
            self._cpu_valid[host_block] = self._valid[device_block]

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        self.cache_engine.swap_in(pairs)
        for host_block, device_block in pairs:
            self._valid[device_block] = self._cpu_valid[host_block]

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        self.cache_engine.copy(pairs)
        for src, dst in pairs:
            self._valid[dst] = self._valid[src]

    # ---- one step --------------------------------------------------------------------------

    def first_unseen(self, block_table: list[int], limit: int) -> int:
        """The sequence's first position (at most `limit`) whose draft K/V is not in the pool."""
        bs = self.block_size
        num_blocks = -(-limit // bs)
        valid = self._valid[np.asarray(block_table[:num_blocks], dtype=np.int64)]
        short = np.flatnonzero(valid < bs)
        first = int(short[0]) * bs + int(valid[short[0]]) if short.size else num_blocks * bs
        return min(first, limit)

    @torch.inference_mode()
    def propose(self, scheduled: list[ScheduledRequest], sampler: Sampler, prepare_inputs
                ) -> tuple[list[ScheduledRequest], dict[str, DraftProposal]]:
        """Decodes every proposing item's k tokens, all items at once, one token per pass after
        a first pass that also catches up on the tokens the draft has not seen.

        Args:
            scheduled: the step's items; those with spec_token_ids hold k placeholders.
            sampler: the target's sampler (its logits processing is the draft's too).
            prepare_inputs: model_runner.prepare_inputs.
        Returns:
            The items with the draft's tokens in place of the placeholders, and the proposals
            by seq_id.
        """
        items = [s for s in scheduled if s.spec_token_ids]
        ends = [s.start_position + s.num_tokens - len(s.spec_token_ids) for s in items]
        firsts = [self.first_unseen(s.block_table, s.start_position) for s in items]
        queries = [_token_slice(s, first, end) for s, first, end in zip(items, firsts, ends)]
        starts = list(firsts)
        drafted: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        active = list(range(len(items)))
        for j in range(max(len(s.spec_token_ids) for s in items)):
            active = [i for i in active if len(items[i].spec_token_ids) > j]
            input_ids, positions, metadata, query_ends = prepare_inputs(
                [queries[i] for i in active], [starts[i] for i in active],
                [items[i].block_table for i in active], self.block_size, self.device)
            hidden = self.model(input_ids, positions, self.cache_engine.kv_caches, metadata)
            rows = torch.from_numpy(query_ends - 1).to(self.device)
            logits = self.model.compute_logits(hidden[rows])  # [active, vocab] float32
            tokens, row_probs = self._sample([items[i] for i in active], j, logits, sampler,
                                             [drafted[i] for i in active])
            for n, i in enumerate(active):
                drafted[i].append(tokens[n])
                if row_probs[n] is not None:
                    probs[i].append(row_probs[n])
                starts[i] += len(queries[i])
                queries[i] = [tokens[n]]
        proposals, out = {}, []
        index = {id(s): i for i, s in enumerate(items)}
        for s in scheduled:
            if not s.spec_token_ids:
                out.append(s)
                continue
            i = index[id(s)]
            k = len(s.spec_token_ids)
            proposals[s.seq_id] = DraftProposal(
                token_ids=drafted[i], probs=torch.stack(probs[i]) if probs[i] else None,
                block_table=s.block_table, first_position=firsts[i],
                end_position=ends[i] + k - 1)
            out.append(dataclasses.replace(s, token_ids=[*s.token_ids[:-k], *drafted[i]],
                                           spec_token_ids=drafted[i]))
        return out, proposals

    def _sample(self, items: list[ScheduledRequest], j: int, logits: torch.Tensor,
                sampler: Sampler, drafted: list[list[int]]
                ) -> tuple[list[int], list[torch.Tensor | None]]:
        """Proposal j + 1 of each item: the argmax of a greedy row, else a draw from q (the
        row's distribution under the request's settings, with the proposals so far as generated
        tokens), returned with q."""
        batch = SamplingBatch(
            params=[s.sampling_params for s in items],
            prompt_token_ids=[s.prompt_token_ids for s in items],
            output_token_ids=[[*s.output_token_ids, *d] for s, d in zip(items, drafted)],
            min_tokens_stop_ids=[s.min_tokens_stop_ids if j == 0
                                 else s.spec_min_tokens_stop_ids[j - 1] for s in items],
            sample_indices=[s.seq_index for s in items],
        )
        tokens = sampler.process_logits(logits, batch).argmax(dim=-1).tolist()
        row_probs: list[torch.Tensor | None] = [None] * len(items)
        rows = [n for n, s in enumerate(items) if not s.sampling_params.is_greedy]
        if rows:
            sub = SamplingBatch(*(None if values is None else [values[n] for n in rows]
                                  for values in (batch.params, batch.prompt_token_ids,
                                                 batch.output_token_ids,
                                                 batch.min_tokens_stop_ids,
                                                 batch.sample_indices)))
            q = sampling_probs(sampler, logits[torch.tensor(rows, device=logits.device)], sub)
            for r, n in enumerate(rows):
                s = items[n]
                gen = row_generator(s.sampling_params, s.seq_index,
                                    len(s.output_token_ids) + j, DRAFT_STREAM, self.device,
                                    self.generator)
                tokens[n] = race(q[r], gen)
                row_probs[n] = q[r]
        return tokens, row_probs

    def note_writes(self, target_slot_mapping: torch.Tensor,
                    proposals: dict[str, DraftProposal]) -> None:
        """After the target's forward: its writes (every slot it wrote no longer holds the
        draft's K/V of its token), then the draft's writes of the same tokens."""
        slots = target_slot_mapping.cpu().numpy()
        np.minimum.at(self._valid, slots // self.block_size, slots % self.block_size)
        bs = self.block_size
        for p in proposals.values():
            position = p.first_position
            while position < p.end_position:
                block, offset = p.block_table[position // bs], position % bs
                if self._valid[block] < offset:
                    break  # a gap before it: the slots after it do not count
                block_end = min(p.end_position - (position - offset), bs)
                self._valid[block] = max(self._valid[block], block_end)
                position += bs - offset
