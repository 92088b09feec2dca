"""Batch norm synchronized across processes on any backend (gloo on CPU, NCCL on GPU).

Each process computes per-channel count, sum and sum of squares of its part of the batch; one differentiable
all-reduce per layer per forward (:func:`lightning_bn.moments.all_reduce_sum`) turns them into the statistics of
the union of the batches. Because the reduction is a sum and autograd runs through it, outputs, input gradients
and parameter gradients are those of plain batch norm on the union batch, and the running statistics are
identical on every process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_bn.layers._batch import _LayoutBatchNorm
from lightning_bn.layers._layout import CHANNELS_FIRST, CHANNELS_LAST, channel_dim, per_channel
from lightning_bn.moments import COUNT, all_reduce_sum, channel_moments, distributed_world_size, mean_var

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_LayoutBatchNorm):
    """Batch norm whose training statistics are those of the union of every process's batch.

    Works on any backend torch.distributed supports (gloo on CPU included), with channels-first ``(N, C, *)`` or
    channels-last ``(N, *, C)`` input, uneven batch sizes across processes (the statistics are count-weighted) and
    processes whose batch is empty (they still take part in the reduction). Half and bfloat16 inputs accumulate
    their statistics in float32. Outside an initialized process group, with a group of one process, or in eval
    mode it is plain batch norm. Same parameters, buffers and ``state_dict`` keys as ``nn.BatchNorm2d``.

    Every process of the group must call ``forward`` in training mode the same number of times (a collective in
    the forward and one in the backward), as with ``torch.nn.SyncBatchNorm``.

    Args:
        num_features: channels ``C``.
        eps: added to the variance.
        momentum: factor of the exponential running average; ``None`` for a cumulative average.
        affine: learnable per-channel ``weight`` and ``bias``.
        track_running_stats: keep ``running_mean`` and ``running_var`` (used in eval mode).
        process_group: the processes to synchronize with (default: the whole world). Build it with
            ``torch.distributed.new_group`` to synchronize within groups of ranks.
        layout: ``"channels_first"`` or ``"channels_last"``.

    Raises:
        ValueError: a bad ``layout``; in training, an input of fewer than 2 dimensions, or a global batch with at
            most one value per channel (raised on every process alike, so none is left waiting).

    Example::

        >>> from lightning_bn.layers import build_norm
        >>> bn = build_norm("sync_batch", 8, layout="channels_last")
        >>> bn(torch.randn(4, 5, 8)).shape   # outside a process group: plain batch norm
        torch.Size([4, 5, 8])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        layout: str = CHANNELS_FIRST,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, layout, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            shape = "(N, C, *)" if self.layout == CHANNELS_FIRST else "(N, *, C)"
            raise ValueError(f"expected input of shape {shape} with at least 2 dimensions, got {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        cdim = channel_dim(self.layout, input.dim())
        if input.shape[cdim] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels in dimension {cdim} ({self.layout}), "
                f"got input of shape {tuple(input.shape)}"
            )
        factor = 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)
        if self.training and distributed_world_size(self.process_group) > 1:
            return self._synchronized_forward(input, cdim, factor)
        # Plain batch norm: torch's kernel, with a (M, C) view for channels-last input.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update = not self.training or self.track_running_stats
        flat = input.reshape(-1, input.shape[-1]) if self.layout == CHANNELS_LAST else input
        out = F.batch_norm(
            flat,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )
        return out.reshape(input.shape)

    def _synchronized_forward(self, input: Tensor, cdim: int, factor: float) -> Tensor:
        moments = all_reduce_sum(channel_moments(input, cdim), self.process_group)  # (3, C) over the union batch
        count = moments[COUNT][0].detach()
        # Only a process with at most one value per channel of its own can be part of a global batch that small:
        # the others skip the host read. Then every process of such a batch reads the count and raises; none waits.
        if input.numel() <= input.shape[cdim] and float(count) <= 1.0:
            raise ValueError(
                f"expected more than 1 value per channel in the batch of all processes together, got {int(count)} "
                f"(this process's input: {tuple(input.shape)})"
            )
        mean, var = mean_var(moments)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (count / (count - 1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(scale.dtype)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(shift.dtype)
        ndim = input.dim()
        out = input.to(scale.dtype) * per_channel(scale, ndim, cdim) + per_channel(shift, ndim, cdim)
        return out.to(input.dtype)
