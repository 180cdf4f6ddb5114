"""Pointwise MLP activations by a Hugging Face config's `activation_function` name."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# NOTE: transformers' gelu_new and gelu_fast write the tanh approximation out in several ops;
# torch's fused one computes the same function (as vLLM maps them), up to rounding.
_ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_fast": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
}


def get_act_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation `name` names; an unknown one is a ValueError listing the known."""
    act_fn = _ACT_FNS.get(name)
    if act_fn is None:
        raise ValueError(f"activation_function {name!r} is not supported; "
                         f"supported: {', '.join(sorted(_ACT_FNS))}")
    return act_fn
