"""Type checks shared by the settings users pass (engine, sampling, beam search): a bool is
not a number, though Python's int subclass says it is (`block_size=True` is always a mistake)."""

from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    # numbers.Integral: numpy's integers too.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
