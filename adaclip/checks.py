"""Checks of plain values the user gives (seeds, counts, class names), shared by the API, the CLI and
the file readers, so each is refused the same way, with exit 2, before any work starts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from .errors import UsageError

# Seeds feed Python's, torch's and numpy-style generators and are mixed into per-epoch seeds; 32 bits
# keep every derived seed inside a 64-bit integer.
MAX_SEED = 2**32 - 1


def check_seed(seed: Any, option: str = "--seed") -> int:
    if type(seed) is not int or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{option} must be an integer from 0 to {MAX_SEED:,}, got {seed!r}")
    return seed


def check_count(value: Any, option: str, *, minimum: int = 1, optional: bool = False) -> Any:
    """An integer option of at least `minimum` (None passes when `optional`)."""
    if value is None and optional:
        return value
    if type(value) is not int or value < minimum:
        raise UsageError(f"{option} must be an integer of at least {minimum}, got {value!r}")
    return value


def class_name_problem(names: Sequence[Any]) -> str | None:
    """Why a list of class names cannot be used (None when it can): empty, not text, blank or repeated
    names would make predicted labels ambiguous or meaningless."""
    if not names:
        return "no class names"
    odd = [n for n in names if not isinstance(n, str)]
    if odd:
        return f"class names must be strings, got {', '.join(repr(n) for n in odd[:3])}"
    if any(not n.strip() for n in names):
        return "a class name is empty"
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        return f"class names appear more than once: {', '.join(repr(n) for n in repeated[:5])}"
    return None
