"""OpenAIServing, the base of the generating handlers: their engine, model names, tokenizers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pagedllm.engine.async_engine import AsyncLLMEngine
    from pagedllm.entrypoints.openai.prompt_tokenizer import PromptTokenizer
    from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels


class OpenAIServing:
    """Base of the endpoint handlers that run requests on the engine."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        models: OpenAIServingModels,
        tokenizer: PreTrainedTokenizerBase,
        prompt_tokenizer: PromptTokenizer,
    ) -> None:
        self.engine = engine
        self.models = models
        # NOTE: the frontend has its own tokenizer: the engine thread detokenizes with the
        # engine's, and a fast tokenizer used from two threads can fail with "Already borrowed".
        self.tokenizer = tokenizer
        self.prompt_tokenizer = prompt_tokenizer
