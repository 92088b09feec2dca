"""Checks shared by every sink: bad input fails the same way whichever logger is attached."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np


def check_tag(tag: Any, name: str = "tag") -> str:
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"`{name}` must be a non-empty str, got {tag!r}")
    return tag


def check_tags(tags: Any, name: str) -> tuple[str, ...]:
    """``tags`` (a list of non-empty str, possibly empty) as a tuple."""
    if isinstance(tags, str) or not isinstance(tags, Collection):
        raise TypeError(f"`{name}` must be a list of str, got {tags!r}")
    return tuple(check_tag(tag, name=f"{name} entry") for tag in tags)


def check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"`step` must be an int >= 0, got {step!r}")
    return int(step)


def check_scalars(metrics: Any) -> dict[str, float]:
    """``metrics`` as a plain ``{str: float}`` dict (0-d tensors and numpy scalars become floats)."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"`metrics` must be a mapping of str to float, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        check_tag(key, name="metrics key")
        try:
            out[key] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"`metrics[{key!r}]` must be a number, got {value!r}") from None
    return out


def check_charts(charts: Any) -> dict[str, list[str]]:
    """``charts`` as ``{title: [tag regex, ...]}``, every regex compiled once to prove it is valid."""
    if not isinstance(charts, Mapping):
        raise TypeError(f"`charts` must be a mapping of chart title to a list of tag regexes, got {charts!r}")
    out: dict[str, list[str]] = {}
    for title, regexes in charts.items():
        check_tag(title, name="charts title")
        if isinstance(regexes, str) or not isinstance(regexes, Sequence) or not regexes:
            raise TypeError(f"`charts[{title!r}]` must be a non-empty list of tag regexes, got {regexes!r}")
        for regex in regexes:
            if not isinstance(regex, str) or not regex:
                raise ValueError(f"`charts[{title!r}]` must hold non-empty str regexes, got {regex!r}")
            try:
                re.compile(regex)
            except re.error as err:
                raise ValueError(f"`charts[{title!r}]` holds an invalid regex {regex!r}: {err}") from None
        out[title] = list(regexes)
    return out


def check_histogram(edges: Any, counts: Any) -> tuple[np.ndarray, np.ndarray]:
    """``edges`` (K+1,) strictly increasing and finite, ``counts`` (K,) finite and >= 0, both as float64."""
    edges_arr = np.asarray(edges, dtype=np.float64)
    counts_arr = np.asarray(counts, dtype=np.float64)
    if edges_arr.ndim != 1 or edges_arr.size < 2:
        raise ValueError(f"`edges` must be a 1-D array of K+1 >= 2 bin edges, got shape {edges_arr.shape}")
    if not np.all(np.isfinite(edges_arr)) or not np.all(np.diff(edges_arr) > 0):
        raise ValueError(f"`edges` must be finite and strictly increasing, got {edges_arr.tolist()}")
    if counts_arr.shape != (edges_arr.size - 1,):
        raise ValueError(
            f"`counts` must have shape (K,) = ({edges_arr.size - 1},) for {edges_arr.size} edges, "
            f"got shape {counts_arr.shape}"
        )
    if not np.all(np.isfinite(counts_arr)) or np.any(counts_arr < 0):
        raise ValueError(f"`counts` must be finite and >= 0, got {counts_arr.tolist()}")
    return edges_arr, counts_arr


def check_exact(exact: Any) -> dict[str, float]:
    allowed = ("min", "max", "sum", "sum_squares")
    if exact is None:
        return {}
    if not isinstance(exact, Mapping):
        raise TypeError(f"`exact` must be None or a mapping with keys among {', '.join(allowed)}, got {exact!r}")
    unknown = sorted(set(exact) - set(allowed))
    if unknown:
        raise ValueError(f"`exact` keys must be among {', '.join(allowed)}, got {', '.join(map(str, unknown))}")
    out = {key: float(value) for key, value in exact.items() if value is not None}
    for key, value in out.items():
        if not math.isfinite(value):
            raise ValueError(f"`exact[{key!r}]` must be finite, got {value}")
    return out


def check_heatmap(values: Any, row_labels: Any, col_labels: Any) -> tuple[np.ndarray, list[str], list[int]]:
    """``values`` (rows x cols) as float64 (NaN and inf allowed: drawn as missing), labels as plain lists."""
    values_arr = np.asarray(values, dtype=np.float64)
    if values_arr.ndim != 2 or values_arr.size == 0:
        raise ValueError(f"`values` must be a non-empty 2-D array (layers x steps), got shape {values_arr.shape}")
    if isinstance(row_labels, str) or not isinstance(row_labels, Sequence):
        raise TypeError(f"`row_labels` must be a list of str, got {row_labels!r}")
    if isinstance(col_labels, str) or not isinstance(col_labels, Sequence | np.ndarray):
        raise TypeError(f"`col_labels` must be a list of int, got {col_labels!r}")
    rows, cols = values_arr.shape
    if len(row_labels) != rows:
        raise ValueError(f"`row_labels` must have one label per row of `values` ({rows}), got {len(row_labels)}")
    if len(col_labels) != cols:
        raise ValueError(f"`col_labels` must have one label per column of `values` ({cols}), got {len(col_labels)}")
    try:
        steps = [int(label) for label in col_labels]
    except (TypeError, ValueError):
        raise TypeError(f"`col_labels` must be a list of int steps, got {list(col_labels)!r}") from None
    return values_arr, [str(label) for label in row_labels], steps
