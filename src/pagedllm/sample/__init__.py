"""Sampling: logits transforms and the batched sampler that picks each row's next token."""

from pagedllm.sample.sampler import Sampler, SamplerOutput, SamplingBatch, seed_for_position

__all__ = ["Sampler", "SamplerOutput", "SamplingBatch", "seed_for_position"]
