"""Sufficient statistics and the one reduction across processes.

Every statistic in the package that crosses processes is built from sums (counts, sums, sums of
squares, counts of zeros and of non-finite values) and maxima, reduced here and only here. A mean
or a variance is computed after the reduction, never as a mean of per-process means.

Two reductions:

* :func:`all_reduce_sum` -- a differentiable sum over the process group (one ``all_reduce``), used by
  synchronized batch norm so that gradients are exact (with :func:`shifted_channel_moments`, float64 moments that
  keep the variance of channels whose mean is far larger than their spread).
* :func:`reduce_across_processes` -- one collective over a flat buffer whose entries are reduced by
  sum or by max (an ``all_gather``, then a local sum/max), used by recalibration and the monitor.

Outside an initialized process group (or with one process) both return their input unchanged.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "COUNT",
    "SUM",
    "SUM_SQ",
    "all_reduce_sum",
    "channel_moments",
    "masked_channel_moments",
    "masked_shifted_channel_moments",
    "shifted_channel_moments",
    "accumulation_dtype",
    "distributed_world_size",
    "mean_var",
    "reduce_across_processes",
    "tensor_summary",
    "summary_to_figures",
    "SUMMARY_FIELDS",
    "shard_copies",
    "shard_sums_of_squares",
    "dtensor_norms",
]

# mean_var and summary_to_figures take torch tensors or numpy arrays (the monitor finishes its figures on the host)
Array = TypeVar("Array", Tensor, np.ndarray)


def _clamp_min(x: Array, low: float) -> Array:
    return np.maximum(x, low) if isinstance(x, np.ndarray) else x.clamp_min(low)


def _sqrt(x: Array) -> Array:
    return np.sqrt(x) if isinstance(x, np.ndarray) else x.sqrt()


# Row indices of a (3, C) channel-moments tensor.
COUNT, SUM, SUM_SQ = 0, 1, 2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half and bfloat16 inputs accumulate in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def distributed_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (1 when no process group is initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def channel_moments(x: Tensor, channel_dim: int = 1, dtype: torch.dtype | None = None) -> Tensor:
    """Per-channel count, sum and sum of squares of ``x`` as a ``(3, C)`` tensor.

    Reduces over every dimension but ``channel_dim``, on a ``(lead, C, trail)`` view of ``x`` (no dimension is
    moved, so no copy is made for a contiguous input). Differentiable. An empty ``x`` gives zeros.

    Args:
        x: any tensor with a channel dimension.
        channel_dim: the channel dimension (1 for ``(N, C, *)``, -1 for ``(N, *, C)``).
        dtype: accumulation dtype; by default float32 (float64 for float64 inputs).
    """
    dtype = dtype or accumulation_dtype(x.dtype)
    cdim = channel_dim % x.dim()
    num_channels = x.shape[cdim]
    lead, trail = math.prod(x.shape[:cdim]), math.prod(x.shape[cdim + 1:])
    count = torch.full((num_channels,), float(lead * trail), dtype=dtype, device=x.device)
    if trail == 1:  # channels last: (M, C)
        flat = x.reshape(lead, num_channels).to(dtype)
        return torch.stack([count, flat.sum(0), (flat * flat).sum(0)])
    # Reducing the trailing positions first, then the leading ones, is 2-3x faster on CPU than one reduction over
    # both or a moved channel dimension.
    view = x.reshape(lead, num_channels, trail)
    if not (torch.is_grad_enabled() and x.requires_grad) and torch.promote_types(x.dtype, dtype) == dtype:
        # No gradient needed: accumulate in `dtype` inside the kernels instead of reducing a converted copy (a
        # float64 copy of a float32 activation reduced this way measured ~10x slower on CPU); the sum of squares as
        # a squared norm (relative rounding ~1e-16 in float64). Not for autograd: a norm's gradient is NaN at 0.
        sums = view.sum(2, dtype=dtype).sum(0)
        squares = torch.linalg.vector_norm(view, 2, dim=2, dtype=dtype).square().sum(0)
        return torch.stack([count, sums, squares])
    view = view.to(dtype)
    return torch.stack([count, view.sum(2).sum(0), (view * view).sum(2).sum(0)])


def _masked_values(x: Tensor, mask: Tensor, cdim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, list[int]]:
    """``x`` in ``dtype`` with zeros at padding (``torch.where``, so a non-finite padded value neither leaks into the
    sums nor into the gradient), the mask broadcast over the channel dimension, and the dimensions to reduce."""
    keep = mask.unsqueeze(cdim)
    values = torch.where(keep, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))
    return values, keep, [d for d in range(x.dim()) if d != cdim]


def masked_channel_moments(x: Tensor, mask: Tensor, channel_dim: int = 1, dtype: torch.dtype | None = None) -> Tensor:
    """Per-channel count, sum and sum of squares of the real values of ``x`` (``mask`` True) as a ``(3, C)`` tensor.

    ``mask`` is boolean with ``x``'s shape without ``channel_dim`` (``(N, T)`` for tokens ``(N, T, C)``); the count
    is the number of real positions, the same for every channel. Differentiable; padded values get a zero gradient.

    Args:
        x: any tensor with a channel dimension.
        mask: boolean, True at a real position.
        channel_dim: the channel dimension (1 for ``(N, C, *)``, -1 for ``(N, *, C)``).
        dtype: accumulation dtype; by default float32 (float64 for float64 inputs).
    """
    dtype = dtype or accumulation_dtype(x.dtype)
    cdim = channel_dim % x.dim()
    values, _, dims = _masked_values(x, mask, cdim, dtype)
    count = mask.sum(dtype=dtype).expand(x.shape[cdim])
    return torch.stack([count, values.sum(dims), (values * values).sum(dims)])


def masked_shifted_channel_moments(x: Tensor, mask: Tensor, channel_dim: int = 1) -> Tensor:
    """:func:`shifted_channel_moments` of the real values of ``x`` (``mask`` True): ``(3, C)`` float64 moments that
    add across processes (synchronized batch norm under :func:`lightning_bn.padding_mask`).

    The shift is this process's mean of its real values (0 when it has none), so nothing cancels. Differentiable;
    padded values get a zero gradient.
    """
    acc = accumulation_dtype(x.dtype)
    cdim = channel_dim % x.dim()
    values, keep, dims = _masked_values(x, mask, cdim, acc)
    count = mask.sum(dtype=torch.float64)
    with torch.no_grad():
        shift = values.sum(dims) / count.clamp_min(1.0).to(acc)
    shape = [1] * x.dim()
    shape[cdim] = -1
    centred = torch.where(keep, values - shift.view(shape), torch.zeros((), dtype=acc, device=x.device))
    return _unshifted(count.expand(x.shape[cdim]), shift, centred.sum(dims), (centred * centred).sum(dims))


def shifted_channel_moments(x: Tensor, channel_dim: int = 1) -> Tensor:
    """Per-channel count, sum and sum of squares of ``x`` as a ``(3, C)`` float64 tensor, without the cancellation
    of a one-pass sum of squares.

    :func:`channel_moments` sums ``x`` and ``x**2`` in float32 for float32 input: for a channel with ``|mean|/std``
    of 1e3-1e4 each ``x**2`` is already rounded by more than the variance it should carry. Here each process sums
    its values shifted by its own per-channel mean ``k`` (detached, so the gradient is that of the plain sums):
    ``s1 = sum(x - k)`` and ``s2 = sum((x - k)**2)`` in the accumulation dtype (float32 for float32, half and
    bfloat16 input; float64 for float64), values of the size of the spread, so nothing cancels. They are turned back
    into plain sums in float64, ``sum = n k + s1`` and ``sum_sq = s2 + k (2 s1 + n k)``, which add across processes:
    one all-reduce (:func:`all_reduce_sum`) of the float64 tensor gives the union batch's moments, and
    :func:`mean_var` in float64 then keeps about ``1e-16 (|mean|/std)**2`` relative precision in the variance
    (1e-8 at a ratio of 1e4, where the float32 one-pass form is off by more than the variance itself).

    Differentiable; one more pass over ``x`` than :func:`channel_moments` (the local mean). An empty ``x`` gives
    zeros.

    Args:
        x: any tensor with a channel dimension.
        channel_dim: the channel dimension (1 for ``(N, C, *)``, -1 for ``(N, *, C)``).
    """
    acc = accumulation_dtype(x.dtype)
    cdim = channel_dim % x.dim()
    num_channels = x.shape[cdim]
    lead, trail = math.prod(x.shape[:cdim]), math.prod(x.shape[cdim + 1:])
    count = lead * trail
    dims: tuple[int, ...]
    shape: tuple[int, ...]
    if trail == 1:  # channels last: (M, C), reduced over dimension 0
        values, dims, shape = x.reshape(lead, num_channels).to(acc), (0,), (1, num_channels)
    else:  # trailing positions first, then leading ones (faster on CPU than one reduction over both)
        values, dims, shape = x.reshape(lead, num_channels, trail).to(acc), (2, 0), (1, num_channels, 1)

    def channel_sum(t: Tensor) -> Tensor:
        for dim in dims:
            t = t.sum(dim)
        return t

    with torch.no_grad():
        shift = channel_sum(values) / count if count else values.new_zeros(num_channels)
    centred = values - shift.view(shape)
    n = torch.full((num_channels,), float(count), dtype=torch.float64, device=x.device)
    return _unshifted(n, shift, channel_sum(centred), channel_sum(centred * centred))


def _unshifted(n: Tensor, shift: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
    """``(3, C)`` float64 count, sum and sum of squares from sums shifted by ``k``: ``sum = n k + s1`` and
    ``sum_sq = s2 + k (2 s1 + n k)``."""
    k, s1, s2 = shift.double(), s1.double(), s2.double()
    return torch.stack([n, n * k + s1, s2 + k * (2.0 * s1 + n * k)])


def mean_var(moments: Array, unbiased: bool = False, eps_count: float = 0.0) -> tuple[Array, Array]:
    """Mean and variance from ``(3, ...)`` moments (count, sum, sum of squares): a tensor or a numpy array.

    The variance is the pooled one: ``(sum_sq - sum**2 / n) / n`` (``n - 1`` when ``unbiased``), which by the
    law of total variance includes the spread of the batch means. Channels with no data give 0 mean and 0
    variance (never NaN).
    """
    count, total, total_sq = moments[COUNT], moments[SUM], moments[SUM_SQ]
    safe = _clamp_min(count, 1.0)
    mean = total / safe
    sq_dev = _clamp_min(total_sq - total * mean, 0.0)
    denom = _clamp_min(count - 1.0, 1.0) if unbiased else safe
    return mean, sq_dev / denom


def _sum_over_group(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """A new tensor: ``tensor`` summed over ``group``.

    Under ``torch.compile`` the functional all-reduce, which dynamo and AOTAutograd trace into the graph (no graph
    break, also with ``fullgraph=True``); eagerly the in-place ``dist.all_reduce`` on a copy.
    """
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        world = group if group is not None else dist.group.WORLD
        assert world is not None
        return funcol.all_reduce(tensor.contiguous(), "sum", world)
    out = tensor.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group in forward; the gradient of a sum over processes is the sum of the gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _sum_over_group(tensor, group)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _sum_over_group(grad_output, ctx.group), None


def all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable sum of ``tensor`` over the processes of ``group``: one ``all_reduce``.

    Every process must call it (a collective), also one whose batch is empty.
    """
    if distributed_world_size(group) == 1:
        return tensor
    return _AllReduceSum.apply(tensor, group)


def reduce_across_processes(
    buffer: Tensor, max_mask: Tensor | None = None, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Reduce a flat buffer over processes in one collective: sum, or max where ``max_mask`` is true.

    Not differentiable. Every process must call it with a buffer of the same shape.

    Args:
        buffer: a 1-d tensor (any float dtype) of sufficient statistics.
        max_mask: a boolean tensor like ``buffer``; entries where it is true are reduced by max.
        group: the process group (default: the world).
    """
    world = distributed_world_size(group)
    if world == 1:
        return buffer
    if max_mask is None or not bool(max_mask.any()):
        out = buffer.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out
    # One collective for sums and maxima together: gather every process's buffer, reduce locally.
    gathered = [torch.empty_like(buffer) for _ in range(world)]
    dist.all_gather(gathered, buffer.detach().contiguous(), group=group)
    stacked = torch.stack(gathered)
    return torch.where(max_mask, stacked.amax(0), stacked.sum(0))


# A tensor summary: what the monitor keeps of one activation or gradient tensor, as sums and maxima.
SUMMARY_FIELDS = ("count", "sum", "sum_sq", "abs_max", "zeros", "nonfinite")


def tensor_summary(x: Tensor, zero_tol: float = 0.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sufficient statistics of a whole tensor as a length-6 vector (see ``SUMMARY_FIELDS``).

    Non-finite values are counted and left out of the sums and the maximum, so one NaN does not hide the
    rest of the figures. ``zeros`` counts ``|x| <= zero_tol``.
    """
    x = x.detach()
    finite = torch.isfinite(x)
    xf = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)).to(dtype)
    count = finite.sum(dtype=dtype)
    absx = xf.abs()
    abs_max = absx.amax() if absx.numel() else torch.zeros((), dtype=dtype, device=x.device)
    return torch.stack(
        [
            count,
            xf.sum(),
            (xf * xf).sum(),
            abs_max,
            ((absx <= zero_tol) & finite).sum(dtype=dtype),
            (x.numel() - count).to(dtype),
        ]
    )


def summary_to_figures(summary: Array) -> dict[str, Array]:
    """Turn reduced summaries ``(..., 6)`` (a tensor or a numpy array) into mean, std, RMS, absolute max and the
    two fractions."""
    count, total, total_sq, abs_max, zeros, nonfinite = (summary[..., k] for k in range(len(SUMMARY_FIELDS)))
    safe = _clamp_min(count, 1.0)
    mean = total / safe
    var = _clamp_min(total_sq / safe - mean * mean, 0.0)
    numel = _clamp_min(count + nonfinite, 1.0)
    return {
        "mean": mean,
        "std": _sqrt(var),
        "rms": _sqrt(total_sq / safe),
        "abs_max": abs_max,
        "frac_zero": zeros / numel,
        "frac_nonfinite": nonfinite / numel,
    }


# Sharded parameters (``torch.distributed.tensor.DTensor``, as ``fully_shard`` makes them): the norm of the full
# tensor from each process's shard, never gathering the tensor.
def shard_copies(tensor: Tensor) -> tuple[Tensor, int] | None:
    """``(local shard, copies)`` of a DTensor, or None for a plain tensor.

    ``copies`` is how many processes of the tensor's mesh hold each of its elements: the product of the mesh
    dimensions it is replicated over (1 when it is sharded over every dimension). A sum over the mesh's processes
    of ``f(local) / copies``, for ``f`` a sum over elements, is ``f`` of the full tensor.

    Raises:
        ValueError: a placement that is neither ``Shard`` nor ``Replicate`` (a ``Partial`` tensor holds summands,
            not elements: its norm is not a sum over shards).
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    if not isinstance(tensor, DTensor):
        return None
    copies = 1
    for dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            copies *= tensor.device_mesh.size(dim)
        elif not placement.is_shard():
            raise ValueError(
                f"a DTensor with placement {placement} on mesh dimension {dim} ({tensor.device_mesh}) has no norm "
                "computable from its shards; only Shard and Replicate placements are, got placements "
                f"{tuple(tensor.placements)}"
            )
    return tensor.to_local(), copies


def shard_sums_of_squares(tensors: list[Tensor], dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """Each DTensor's share of its full tensor's sum of squares: summed over the processes of its mesh, the sum
    of squares of the full (unsharded) tensor, for the norm ``sqrt`` of that sum. In ``dtype``, one foreach kernel.

    An empty shard (a first dimension that does not divide by the mesh size leaves the last processes less or
    nothing) shares 0.

    Raises:
        TypeError: a tensor that is no DTensor (a plain tensor is whole on every process: its norm needs no sum).
        ValueError: a placement other than ``Shard`` or ``Replicate`` (see :func:`shard_copies`).
    """
    shards: list[tuple[Tensor, int]] = []
    for k, t in enumerate(tensors):
        shard = shard_copies(t)
        if shard is None:
            raise TypeError(f"`tensors[{k}]` must be a DTensor, got a {type(t).__name__}")
        shards.append(shard)
    if not shards:
        return []
    norms = torch._foreach_norm([local.detach() for local, _ in shards], 2, dtype=dtype)
    return [n * n / copies for n, (_, copies) in zip(norms, shards)]


def dtensor_norms(tensors: list[Tensor], group: dist.ProcessGroup | None = None) -> Tensor:
    """The L2 norms (float64) of the full tensors of DTensors, from their shards in one all-reduce.

    Every process of ``group`` must call it with the same tensors' shards. ``group`` (default: the world) must
    hold exactly the processes of every tensor's mesh.

    Raises:
        ValueError: a tensor whose mesh has a different number of processes than ``group``, or a placement other
            than ``Shard`` or ``Replicate``.
        TypeError: a tensor that is no DTensor.
    """
    world = distributed_world_size(group)
    for k, t in enumerate(tensors):
        mesh = getattr(t, "device_mesh", None)
        if mesh is not None and mesh.size() != world:
            raise ValueError(
                f"`tensors[{k}]` lives on a mesh of {mesh.size()} processes ({mesh}), but `group` has {world}: the "
                "norm is a sum over the processes of the tensor's mesh; pass that mesh's group"
            )
    shares = shard_sums_of_squares(tensors)
    if not shares:
        return torch.zeros(0, dtype=torch.float64)
    return reduce_across_processes(torch.stack(shares), group=group).sqrt()
