"""Warn once per process per message: for fallbacks that every layer, step or micro-batch would repeat."""

import warnings

_warned = set()  # the messages already shown


def warn_once(message: str, stacklevel: int = 2) -> None:
    """`warnings.warn(message)` the first time this message comes; `stacklevel` as warnings.warn's
    at the caller (2: the caller's caller, where the fallback was asked for)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=stacklevel + 1)
