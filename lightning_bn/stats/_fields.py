"""The monitor's buffer as named fields, and the per-tensor statistics as one table.

A :class:`Layout` declares the fields of one flat buffer by name, each with its shape and its reduction across
processes, the way torchmetrics declares state with ``add_state(name, default, dist_reduce_fx="sum")``:

* ``"sum"``: counts and sums, added up across processes (and across micro-batches and repeated calls);
* ``"max"``: maxima, the largest across processes;
* ``"local"``: this process's own value, not reduced (parameter figures: the same on every process under DDP, with
  gradients already averaged). A sharded parameter (a DTensor, from ``fully_shard``) fills the reduced counterpart
  of each parameter field instead (:data:`SHARDED_PARAM_FIELDS`): its shard's share, added up (or maximized) over
  the processes into the figure of the full tensor.

Reduced fields are laid out first, so one collective over the buffer's leading part reduces everything that crosses
processes; the whole buffer then reaches the host in one transfer. Code reads and writes fields by name
(:meth:`Layout.views`), never by offset.

:data:`TENSOR_FIELDS` are the sufficient statistics kept of every watched tensor (an output, a normalization
layer's input, an output gradient) and :data:`TENSOR_STATS` the figures computed from them. Adding a per-tensor
statistic is one entry in :data:`TENSOR_STATS` (its figure, from the fields it names), plus one in
:data:`TENSOR_FIELDS` when it needs a sufficient statistic the six fused summaries do not hold (a ``measure`` of
the tensor and its reduction). Metric keys (``act/<stat>/<module>``, ``act_in/...``, ``act_grad/...``), the
buffer layout, the reduction across processes and micro-batches and the charts follow from the tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import numpy as np
import torch
from torch import Tensor

from lightning_bn.moments import SUMMARY_FIELDS

__all__ = [
    "ACTIVATION_GRAD_STATS",
    "ACTIVATION_STATS",
    "Field",
    "FieldViews",
    "Layout",
    "REDUCTIONS",
    "SHARDED_PARAM_FIELDS",
    "TENSOR_FIELDS",
    "TENSOR_STATS",
    "TensorField",
    "TensorStat",
    "accumulate",
]

Reduction = Literal["sum", "max", "local"]
REDUCTIONS: tuple[Reduction, ...] = ("sum", "max", "local")
Array = TypeVar("Array", Tensor, np.ndarray)


@dataclass(frozen=True)
class Field:
    """One named part of a :class:`Layout`'s buffer: ``buffer[slice]`` viewed as ``shape``."""

    name: str
    shape: tuple[int, ...]
    reduce: Reduction
    slice: slice

    @property
    def size(self) -> int:
        return self.slice.stop - self.slice.start


class Layout:
    """The fields of one flat buffer, declared once by name with their shapes and reductions.

    Args:
        fields: ``(name, shape, reduction)`` triples (``shape`` an int or a tuple; ``reduction`` one of
            :data:`REDUCTIONS`). Reduced fields are placed first in declaration order, then the local ones.

    Raises:
        ValueError: a name declared twice, an unknown reduction or a negative size.
    """

    def __init__(self, fields: Iterable[tuple[str, int | tuple[int, ...], Reduction]]) -> None:
        declared = []
        for name, shape, reduce in fields:
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            if reduce not in REDUCTIONS:
                allowed = ", ".join(REDUCTIONS)
                raise ValueError(f"field {name!r}: the reduction must be one of {allowed}, got {reduce!r}")
            if any(s < 0 for s in shape):
                raise ValueError(f"field {name!r}: sizes must be >= 0, got shape {shape}")
            declared.append((name, shape, reduce))
        self.fields: dict[str, Field] = {}
        start = 0
        for name, shape, reduce in sorted(declared, key=lambda f: f[2] == "local"):  # stable: reduced ones first
            if name in self.fields:
                raise ValueError(f"field {name!r} is declared twice")
            size = math.prod(shape)
            self.fields[name] = Field(name, shape, reduce, slice(start, start + size))
            start += size
        self.size = start
        self.reduced_size = sum(f.size for f in self.fields.values() if f.reduce != "local")

    def __contains__(self, name: object) -> bool:
        return name in self.fields

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}{list(f.shape)}:{f.reduce}" for f in self.fields.values())
        return f"Layout({inner})"

    def views(self, buffer: Array) -> FieldViews[Array]:
        """The fields of ``buffer`` (a tensor or an array of ``size`` entries) by name, each a view of its shape."""
        if tuple(buffer.shape) != (self.size,):
            raise ValueError(f"the buffer must have shape ({self.size},) for {self!r}, got {tuple(buffer.shape)}")
        return FieldViews(self, buffer)

    def max_mask(self, device: torch.device | str = "cpu") -> Tensor:
        """A boolean mask over the reduced part: true where the field is reduced by max."""
        mask = torch.zeros(self.reduced_size, dtype=torch.bool, device=device)
        for f in self.fields.values():
            if f.reduce == "max":
                mask[f.slice] = True
        return mask


class FieldViews(Mapping[str, Array], Generic[Array]):
    """A buffer's fields by name; each lookup is a view (writes go to the buffer), made when asked for."""

    def __init__(self, layout: Layout, buffer: Array) -> None:
        self.layout: Layout = layout
        self.buffer: Array = buffer

    def __getitem__(self, name: str) -> Array:
        f = self.layout.fields[name]
        return self.buffer[f.slice].reshape(f.shape)

    def __contains__(self, name: object) -> bool:
        return name in self.layout.fields

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.fields)

    def __len__(self) -> int:
        return len(self.layout.fields)


def accumulate(view: Array, reduce: Reduction, index: Array, values: Array) -> None:
    """Fold ``values[k]`` into ``view[index[k]]`` in place by the field's reduction (sum; max for ``"max"``).

    The same reduction combines micro-batches and repeated calls of a module as combines processes. ``view`` and
    ``values`` are both tensors or both numpy arrays; maxima are of non-negative values (the view starts at 0).
    """
    if isinstance(view, np.ndarray):
        (np.maximum if reduce == "max" else np.add).at(view, index, values)
    elif reduce == "max":
        view.scatter_reduce_(0, index, values.to(view.dtype), "amax", include_self=True)
    else:
        view.index_add_(0, index, values.to(view.dtype))


# A sharded parameter's counterpart of each local parameter field, and its reduction. Each process holds a shard: its
# share of a sum (the sum over its shard divided by the processes holding the same elements) adds up to the full
# tensor's; the norm is the root of the reduced sum of squares.
SHARDED_PARAM_FIELDS: dict[str, tuple[str, Reduction]] = {
    "param.norm": ("param.norm_sq", "sum"),
    "grad.norm": ("grad.norm_sq", "sum"),
    "update.norm": ("update.norm_sq", "sum"),
    "param.abs_max": ("param.abs_max_shard", "max"),
    "grad.abs_max": ("grad.abs_max_shard", "max"),
    "param.hist": ("param.hist_shard", "sum"),
    "bn.gamma_abs": ("bn.gamma_small_shard", "sum"),  # per layer: the share of channels with a small |gamma|
}


# ---------------------------------------------------------------------------------------------- per-tensor tables
@dataclass(frozen=True)
class TensorField:
    """A sufficient statistic of one watched tensor.

    ``measure`` is None for the six that :func:`lightning_bn.stats.summarize` computes together in few passes; an
    added field gives a function of the (detached) tensor returning a 0-d tensor, e.g.
    ``lambda x: (x < 0).sum()``. Non-finite values are its own business (the six leave them out). ``degree``: the
    field of ``c * x`` is ``c**degree`` times that of ``x`` (how activation gradients are unscaled: the loss scale
    and the number of processes are divided out of the fields, not out of the tensors).
    """

    name: str
    reduce: Reduction
    degree: int = 0
    measure: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class TensorStat:
    """A figure of one watched tensor, logged as ``act/<name>/<module>`` (``act_in/...`` for a normalization
    layer's input; also ``act_grad/<name>/<module>`` when ``gradients``), computed from the named fields ``needs``
    of :data:`TENSOR_FIELDS` (numpy arrays, one entry per module) after the reduction."""

    name: str
    needs: tuple[str, ...]
    figure: Callable[[Mapping[str, np.ndarray]], np.ndarray]
    gradients: bool = False


def _at_least_one(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 1.0)


def _mean(f: Mapping[str, np.ndarray]) -> np.ndarray:
    return f["sum"] / _at_least_one(f["count"])


def _values(f: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every value seen, finite or not (the denominator of the fractions)."""
    return _at_least_one(f["count"] + f["nonfinite"])


# Non-finite values are counted apart and left out of the sums and the maximum (moments.tensor_summary).
TENSOR_FIELDS: tuple[TensorField, ...] = (
    TensorField("count", "sum"),  # finite values
    TensorField("sum", "sum", degree=1),
    TensorField("sum_sq", "sum", degree=2),
    TensorField("abs_max", "max", degree=1),
    TensorField("zeros", "sum"),  # |x| <= zero_tol
    TensorField("nonfinite", "sum"),
)
assert tuple(f.name for f in TENSOR_FIELDS[: len(SUMMARY_FIELDS)]) == SUMMARY_FIELDS  # summarize's row order

# The figures of moments.summary_to_figures, by name: std from E[x^2] - E[x]^2, clamped at 0.
TENSOR_STATS: tuple[TensorStat, ...] = (
    TensorStat("mean", ("count", "sum"), _mean),
    TensorStat("std", ("count", "sum", "sum_sq"),
               lambda f: np.sqrt(np.maximum(f["sum_sq"] / _at_least_one(f["count"]) - _mean(f) ** 2, 0.0))),
    TensorStat("rms", ("count", "sum_sq"), lambda f: np.sqrt(f["sum_sq"] / _at_least_one(f["count"])),
               gradients=True),
    TensorStat("abs_max", ("abs_max",), lambda f: f["abs_max"], gradients=True),
    TensorStat("frac_zero", ("count", "zeros", "nonfinite"), lambda f: f["zeros"] / _values(f)),
    TensorStat("frac_nonfinite", ("count", "nonfinite"), lambda f: f["nonfinite"] / _values(f), gradients=True),
)

ACTIVATION_STATS = tuple(s.name for s in TENSOR_STATS)
ACTIVATION_GRAD_STATS = tuple(s.name for s in TENSOR_STATS if s.gradients)
