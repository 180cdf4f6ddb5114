"""SpeculativeConfig: vLLM's `speculative_config` dict, checked once at start (no torch).

The draft model's own checks (its vocabulary against the target's, the parallel setup) need
its config file and run where the engine starts (spec_decode/draft_model.check_draft_model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedllm.validation import is_int

# Methods the engine knows, and vLLM's others (refused as not built).
SPEC_METHODS = ("ngram", "draft_model")
_NOT_BUILT = ("eagle", "eagle3", "medusa", "mlp_speculator")
_NGRAM_ONLY = ("prompt_lookup_max", "prompt_lookup_min")
# Above this many running sequences a step does not speculate (vLLM's disable_by_batch_size).
# NOTE: on a CPU a decode step is bound by reading the weights only while its batch is small;
# from about 8 rows on, every extra verified token costs compute, so proposals that may be
# rejected stop paying for themselves.
DEFAULT_DISABLE_BY_BATCH_SIZE = 8


@dataclass(frozen=True)
class SpeculativeConfig:
    """The speculation settings, with vLLM's names."""

    # "ngram": proposals looked up in the sequence's own tokens (prompt lookup);
    # "draft_model": proposals decoded by a second, smaller model of the same vocabulary.
    method: str
    # Most tokens proposed per sequence and step (k).
    num_speculative_tokens: int
    # draft_model: the draft's path (a Hugging Face directory or a .gguf file).
    model: str | None = None
    # Longest and shortest n-gram matched against the sequence's earlier tokens.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # A step speculates only while the running sequences are at most this many.
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE
    # A sequence whose recent acceptance rate (moving average) falls below this stops
    # proposing for `cooldown_steps` steps, then tries again.
    min_acceptance_rate: float = 0.1
    cooldown_steps: int = 16

    @classmethod
    def from_dict(cls, value: dict[str, Any] | SpeculativeConfig | None
                  ) -> SpeculativeConfig | None:
        """Checks a `speculative_config` dict; ValueError names the bad key."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(  # noqa: TRY004 (a bad setting is a ValueError here)
                f"speculative_config must be a dict (JSON object), got {value!r}")
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                 "disable_by_batch_size", "model", "min_acceptance_rate", "cooldown_steps"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown}; known: "
                             f"{sorted(known)}")
        method = value.get("method", "ngram" if "model" not in value else "draft_model")
        if method in _NOT_BUILT:
            raise ValueError(f"speculative_config method {method!r} is not built yet in "
                             f"pagedllm: use one of {', '.join(SPEC_METHODS)}")
        if method not in SPEC_METHODS:
            raise ValueError(f"speculative_config method must be one of "
                             f"{', '.join(SPEC_METHODS)}, got {method!r}")
        if method == "ngram" and "model" in value:
            raise ValueError("speculative_config 'model' is for method 'draft_model'; "
                             "'ngram' takes no model")
        if method == "draft_model":
            model = value.get("model")
            if not isinstance(model, str) or not model:
                raise ValueError(f"speculative_config method 'draft_model' needs a 'model' "
                                 f"(the draft's path), got {model!r}")
            ngram_keys = sorted(set(value) & set(_NGRAM_ONLY))
            if ngram_keys:
                raise ValueError(f"speculative_config {ngram_keys} are for method 'ngram', "
                                 f"not 'draft_model'")
        k = value.get("num_speculative_tokens")
        if not is_int(k) or k < 1:
            raise ValueError(f"speculative_config num_speculative_tokens must be an integer "
                             f">= 1, got {k!r}")
        config = cls(method=method, num_speculative_tokens=k,
                     **{name: value[name] for name in value
                        if name not in ("method", "num_speculative_tokens")})
        for name in ("prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size",
                     "cooldown_steps"):
            v = getattr(config, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"speculative_config {name} must be an integer >= 1, got {v!r}")
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError(f"speculative_config prompt_lookup_min "
                             f"({config.prompt_lookup_min}) must be <= prompt_lookup_max "
                             f"({config.prompt_lookup_max})")
        rate = config.min_acceptance_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"speculative_config min_acceptance_rate must be in [0, 1], "
                             f"got {rate!r}")
        return config
