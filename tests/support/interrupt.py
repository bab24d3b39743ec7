"""A run that dies midway: batches stop with an exception after some were committed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Killed(Exception):
    """Stands for the process dying after some batches were committed."""


def killed_after(batches: Iterable[T], n: int) -> Iterator[T]:
    """Yield the first ``n`` batches, then raise :class:`Killed` (closing the source's iterator)."""
    it = iter(batches)
    try:
        for i, b in enumerate(it):
            if i == n:
                raise Killed(f"killed after {i} batches")
            yield b
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
