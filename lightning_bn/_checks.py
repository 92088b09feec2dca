"""Argument checks shared by the whole package: each error names the argument, what is allowed and what was given."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["check_positive_int", "check_choice"]

T = TypeVar("T")


def check_positive_int(
    name: str, value: Any, *, allow_none: bool = False, none_means: str = "", error: type[Exception] = ValueError
) -> Any:
    """Return ``value`` if it is an ``int`` >= 1 (``bool`` is not), or ``None`` where ``allow_none``.

    ``none_means`` is said after "or None" in the message, e.g. ``"the whole loader"``. ``error`` is the exception
    type (callbacks raise Lightning's ``MisconfigurationException``).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int"
        if allow_none:
            allowed += f" or None ({none_means})" if none_means else " or None"
        raise error(f"`{name}` must be {allowed}, got {value!r}")
    return value


def check_choice(name: str, value: T, choices: Iterable[T], *, error: type[Exception] = ValueError) -> T:
    """Return ``value`` if it is one of ``choices``; the message lists them all."""
    choices = tuple(choices)
    if value not in choices:
        raise error(f"`{name}` must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value
