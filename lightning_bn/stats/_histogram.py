"""Histograms binned on the device with edges every process shares by construction.

Bins are on the magnitude of a value, ``bins_per_decade`` to a decade between ``10**low`` and ``10**high``, mirrored
for negative values, with one bin ``(-10**low, 10**low)`` around zero (exact zeros land there) and one overflow bin at
each end. The edges depend on nothing but these three numbers, so every process bins with the same edges without
talking to the others and the counts of several processes (or micro-batches) simply add up. Non-finite values are
left out (the summaries count them). Only the counts, a few hundred numbers, ever leave the device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["LogBins", "bin_counts", "histogram_edges", "trim_histogram"]


class LogBins:
    """Signed log-magnitude bins.

    Args:
        bins_per_decade: bins per factor of ten.
        low: base-10 exponent of the smallest magnitude told apart from zero.
        high: base-10 exponent above which values share the overflow bin.

    Raises:
        ValueError: ``bins_per_decade`` < 1 or ``low`` >= ``high``.
    """

    def __init__(self, bins_per_decade: int = 4, low: int = -6, high: int = 6) -> None:
        if int(bins_per_decade) < 1:
            raise ValueError(f"`bins_per_decade` must be a positive integer, got {bins_per_decade!r}")
        if not int(low) < int(high):
            raise ValueError(f"`low` must be below `high` (base-10 exponents), got low={low!r}, high={high!r}")
        self.bins_per_decade, self.low, self.high = int(bins_per_decade), int(low), int(high)
        steps = (self.high - self.low) * self.bins_per_decade
        self.magnitudes = np.power(10.0, self.low + np.arange(steps + 1) / self.bins_per_decade)  # (M+1,)
        self._device_magnitudes: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    @property
    def num_magnitudes(self) -> int:
        return len(self.magnitudes)

    @property
    def num_bins(self) -> int:
        """``2 * (M + 1) + 1`` bins for ``M + 1`` magnitude edges."""
        return 2 * self.num_magnitudes + 1

    def device_magnitudes(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        if key not in self._device_magnitudes:
            self._device_magnitudes[key] = torch.tensor(self.magnitudes, dtype=dtype, device=device)
        return self._device_magnitudes[key]

    def __repr__(self) -> str:
        return f"LogBins(bins_per_decade={self.bins_per_decade}, low={self.low}, high={self.high})"


def bin_counts(x: Tensor, bins: LogBins, dtype: torch.dtype = torch.float32) -> Tensor:
    """Counts of the finite values of ``x`` in ``bins`` as a ``(bins.num_bins,)`` tensor on ``x``'s device.

    No host synchronization: ``bucketize`` and ``index_add_`` with a fixed output size.
    """
    x = x.detach().reshape(-1)
    counts = torch.zeros(bins.num_bins, dtype=dtype, device=x.device)
    if x.numel() == 0:
        return counts
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(work)
    magnitude = torch.bucketize(xf.abs(), bins.device_magnitudes(x.device, work), right=True)  # 0 .. M+1
    center = bins.num_magnitudes
    index = torch.where(xf < 0, center - magnitude, center + magnitude)
    counts.index_add_(0, index, torch.isfinite(xf).to(dtype))
    return counts


def histogram_edges(bins: LogBins, abs_max: float) -> np.ndarray:
    """The ``num_bins + 1`` edges of ``bins``; the outer edges of the overflow bins reach ``abs_max``."""
    mags = bins.magnitudes
    outer = max(float(abs_max), mags[-1]) * (1.0 + 1e-9) + 1e-300
    return np.concatenate([[-outer], -mags[::-1], mags, [outer]])


def trim_histogram(edges: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the empty bins at both ends: ``(edges, counts)`` from the first to the last non-empty bin.

    An all-empty histogram keeps its central bin, so a writer always gets at least one bin.
    """
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        mid = len(counts) // 2
        return edges[mid : mid + 2], counts[mid : mid + 1]
    first, last = int(nonzero[0]), int(nonzero[-1])
    return edges[first : last + 2], counts[first : last + 1]
