"""Type checks shared by the settings users pass (engine, beam search): a bool is not a number,
though Python's int subclass says it is (`block_size=True` is always a mistake)."""

from __future__ import annotations


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
