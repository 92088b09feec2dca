"""Fast local summaries of one tensor, in the layout of :data:`lightning_bn.moments.SUMMARY_FIELDS`.

:func:`lightning_bn.moments.tensor_summary` defines the figures (non-finite values counted apart and left out of the
sums and the maximum); :func:`summarize` computes the same six numbers with fewer passes over the tensor and only
floating-point kernels, because it runs on every watched activation and gradient of a logging step. The
cross-process reduction is still :func:`lightning_bn.moments.reduce_across_processes`; per-channel sums of batch-norm
inputs come from :func:`lightning_bn.moments.channel_moments`.

Why the passes look as they do: on the CPU a boolean reduction (``(x == 0).sum()``, ``count_nonzero``) costs many
times a float reduction (``python -m benchmarks.summaries`` measures both). So zeros are counted as the non-zeros
of ``sign(x)`` (a dot product of ``sign(x)`` with itself) and non-finite values are detected from the sum of
squares, which is finite exactly when every value is finite (or falls back to the masked path when it overflows).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["summarize", "summary_row"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Sums of 0/1 indicators are exact in float32 below 2**24 terms, whatever the summation order.
_EXACT_FLOAT32_COUNT = 2**24


def summarize(x: Tensor, zero_tol: float = 0.0, sync_free: bool | None = None, full: bool = True) -> Tensor:
    """``(count, sum, sum_sq, abs_max, zeros, nonfinite)`` of ``x`` as in ``moments.tensor_summary``.

    Accumulates in float32 (float64 for float64 input); half and bfloat16 inputs are widened first.

    Args:
        x: any floating tensor.
        zero_tol: ``|x| <= zero_tol`` counts as zero.
        sync_free: never read a value back to the host (the branch-free masked path, for accelerators, where a
            read-back would stall the queue). Default: true on every device but the CPU, where reading one
            number back is free and lets an all-finite tensor (the usual case) skip the masking passes.
        full: also the sum and the zeros; false leaves both 0 (two passes fewer, for gradients, whose figures are
            the RMS, the maximum and the non-finite fraction).
    """
    row = summary_row(x, zero_tol, sync_free, full)
    return torch.tensor(row, dtype=torch.float64) if isinstance(row, list) else row


def summary_row(
    x: Tensor,
    zero_tol: float = 0.0,
    sync_free: bool | None = None,
    full: bool = True,
    scratch: Tensor | None = None,
    totals: Tensor | None = None,
) -> Tensor | list:
    """:func:`summarize`, but where it read the figures back to the host it returns them as a list of 6 floats.

    The collector stacks many rows into one tensor at once, which saves a tensor construction per watched tensor.
    ``scratch``: a 1-d tensor of ``x``'s (widened) dtype and device with at least ``x.numel()`` entries, overwritten
    by the zero count on the host-read path instead of a fresh allocation (the collector keeps one per dtype).
    ``totals``: ``[sum, sum of squares]`` of ``x`` already computed (e.g. from its channel sums), in the dtype the
    summary accumulates in; the host-read path then skips those two passes.
    """
    x = x.detach()
    if x.dtype in _LOW_PRECISION:
        x = x.float()
    n = x.numel()
    if n == 0:
        return torch.zeros(6, dtype=x.dtype, device=x.device)
    flat = x.reshape(-1)
    if sync_free is None:
        sync_free = flat.device.type != "cpu"
    if not sync_free:
        # The sum of squares is finite only when every value is finite: then no masking is needed.
        if totals is None:
            total, sum_sq = (flat.sum() if full else None), torch.dot(flat, flat)
        else:
            total, sum_sq = totals.unbind()
        if flat.device.type == "cpu":  # a read-back costs nothing here: one number at a time, masking only if needed
            sq = sum_sq.item()
            if not math.isfinite(sq):
                return _summarize_masked(flat, zero_tol, full)
            lo, hi = torch.aminmax(flat)
            abs_max = max(-lo.item(), hi.item())
            if not full:
                return [float(n), 0.0, sq, abs_max, 0.0, 0.0]
            assert total is not None
            return [float(n), total.item(), sq, abs_max, n - _count_above(flat, zero_tol, scratch).item(), 0.0]
        # elsewhere: four reductions read back together (one synchronization)
        lo, hi = torch.aminmax(flat)
        parts = [sum_sq, lo, hi]
        if total is not None:
            parts += [total, _count_above(flat, zero_tol, scratch)]
        values = torch.stack([p.double() for p in parts]).tolist() + ([] if total is not None else [0.0, n])
        square_sum, low, high, value_sum, above = values
        if math.isfinite(square_sum):  # no masking needed; Python floats keep counts above 2**24 exact
            return [float(n), value_sum, square_sum, max(-low, high), n - above, 0.0]
    return _summarize_masked(flat, zero_tol, full)


def _count_above(flat: Tensor, zero_tol: float, scratch: Tensor | None = None) -> Tensor:
    """Number of entries with ``|x| > zero_tol`` of a finite 1-d tensor, as a 0-d tensor of its dtype (float64 for
    a float32 tensor of 2**24 or more entries, whose count float32 cannot hold exactly)."""
    n = flat.numel()
    usable = (
        scratch is not None and scratch.numel() >= n and scratch.dtype == flat.dtype and scratch.device == flat.device
    )
    out = scratch[:n] if usable and scratch is not None else torch.empty_like(flat)
    # sign() is 0 exactly at 0 (|x| - tol is 0 exactly where |x| == tol: IEEE subtraction is exact there).
    if zero_tol == 0:
        marks = torch.sign(flat, out=out)
    else:
        marks = torch.abs(flat, out=out).sub_(zero_tol).sign_().clamp_min_(0.0)
    if marks.dtype == torch.float32 and flat.numel() >= _EXACT_FLOAT32_COUNT:
        return marks.abs_().sum(dtype=torch.float64)
    return torch.dot(marks, marks)  # marks are 0 or +-1: the dot is the count


def _summarize_masked(flat: Tensor, zero_tol: float, full: bool = True) -> Tensor:
    """The branch-free path: non-finite values counted and masked out with float kernels only."""
    n = flat.numel()
    finite_part = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    # x - x is 0 where x is finite and NaN where it is not: count those NaNs without a boolean reduction
    nonfinite_marks = torch.nan_to_num(flat - flat, nan=1.0)
    # counts of 2**24 or more float32 terms are summed, and the row kept, in float64 (float32 stops counting there)
    wide = nonfinite_marks.dtype == torch.float32 and n >= _EXACT_FLOAT32_COUNT
    dtype = torch.float64 if wide else flat.dtype
    nonfinite = nonfinite_marks.sum(dtype=dtype)
    lo, hi = torch.aminmax(finite_part)
    if full:
        total = finite_part.sum()
        # the masked-out entries are 0 in finite_part, so they count as zeros there: take them off again
        zeros = n - _count_above(finite_part, zero_tol).to(dtype) - nonfinite
    else:
        total = zeros = torch.zeros_like(nonfinite)
    parts = [n - nonfinite, total, torch.dot(finite_part, finite_part), torch.maximum(-lo, hi), zeros, nonfinite]
    return torch.stack([p.to(dtype) for p in parts])
