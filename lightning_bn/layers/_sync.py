"""Batch norm synchronized across processes on any backend (gloo on CPU, NCCL on GPU).

Two computations of the same thing, the statistics of the union of every process's batch:

* **Portable** (CPU, any dtype, any device under ``torch.compile``). Each process computes per-channel count, sum
  and sum of squares of its part of the batch, its values shifted by its own mean so that nothing cancels
  (:func:`lightning_bn.moments.shifted_channel_moments`, float64); one differentiable all-reduce per layer per
  forward (:func:`lightning_bn.moments.all_reduce_sum`) turns them into the moments of the union. Because the
  reduction is a sum and autograd runs through it, outputs, input gradients and parameter gradients are those of
  plain batch norm on the union batch. Traceable by dynamo without a graph break (also ``fullgraph=True``).
* **Fused** (CUDA, eager). The kernels ``torch.nn.SyncBatchNorm`` runs, in an autograd function of our own:
  ``torch.batch_norm_stats`` (Welford, per process), one all-gather of ``(mean, invstd, count)``,
  ``torch.batch_norm_gather_stats_with_counts`` (the pairwise merge), ``torch.batch_norm_elemt``; backward
  ``torch.batch_norm_backward_reduce``, one all-reduce of ``(sum_dy, sum_dy_xmu)``, ``torch.batch_norm_backward_elemt``.
  Unlike torch's, it takes channels-last input (as a ``(M, C)`` view), any backend, and an empty batch without a
  host synchronization (the gathered rows are sorted by count on the device instead of dropped by a boolean mask),
  and it updates the running statistics with the same rule as the portable path. Those kernels have no fake
  (meta) implementation, so dynamo cannot trace them: under ``torch.compile`` the portable path runs, and the
  compiler fuses its elementwise steps itself.

Either way the running statistics are identical on every process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_bn.layers._batch import (
    _LayoutBatchNorm,
    _masked_torch_batch_norm,
    _uses_batch_statistics,
    normalize_with,
    padding_of,
)
from lightning_bn.layers._layout import CHANNELS_FIRST, CHANNELS_LAST, channel_dim
from lightning_bn.moments import (
    COUNT,
    accumulation_dtype,
    all_reduce_sum,
    distributed_world_size,
    mean_var,
    shifted_channel_moments,
)

__all__ = ["SyncBatchNorm"]

# Where the fused kernels run, and the namespace they are called from (torch's ops). Tests on a machine without a
# GPU point both elsewhere (CPU, an emulation of the CUDA kernels) to run the fused path's own logic.
_FUSED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
_kernels: Any = torch
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _one_value_message(count: float | None, shape: tuple[int, ...]) -> str:
    got = "" if count is None else f", got {int(count)}"
    return (
        f"expected more than 1 value per channel in the batch of all processes together{got} "
        f"(this process's input: {shape})"
    )


def _uses_fused_kernels(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether the CUDA kernels take this input and these parameters (else the portable path runs)."""
    if torch.compiler.is_compiling() or input.device.type not in _FUSED_DEVICE_TYPES:
        return False
    if input.dtype not in _FUSED_DTYPES:
        return False
    if weight is None or bias is None:
        return weight is None and bias is None
    # The kernels read the parameters in the input's dtype, or in float32 for half and bfloat16 input ("mixed").
    allowed = {input.dtype, torch.float32} if input.dtype in (torch.float16, torch.bfloat16) else {input.dtype}
    return weight.dtype in allowed and bias.dtype == weight.dtype and weight.device == input.device


def _all_gather_rows(row: Tensor, group: dist.ProcessGroup | None, world_size: int) -> Tensor:
    """``(world_size, len(row))``: every process's ``row``, in rank order."""
    if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor (torch's SyncBatchNorm says the same)
        rows = [torch.empty_like(row) for _ in range(world_size)]
        dist.all_gather(rows, row, group=group)
        return torch.stack(rows)
    out = row.new_empty(world_size, row.numel())
    dist.all_gather_into_tensor(out, row, group=group)
    return out


def _kernel_layout(t: Tensor) -> Tensor:
    """What the kernels read: contiguous, or channels-last contiguous as it is (they have kernels for it)."""
    if t.is_contiguous(memory_format=torch.channels_last) or t.is_contiguous(memory_format=torch.channels_last_3d):
        return t
    return t.contiguous()


class _FusedSyncBatchNorm(torch.autograd.Function):
    """Synchronized batch norm of a channels-first ``(N, C, *)`` tensor with torch's CUDA batch-norm kernels.

    Returns the output and, not differentiable, the union batch's mean and unbiased variance (for the running
    statistics, which the caller updates).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        group: dist.ProcessGroup | None,
        world_size: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        input = _kernel_layout(input)
        num_channels = input.shape[1]
        local_count = input.numel() // num_channels if num_channels else 0
        acc = accumulation_dtype(input.dtype)
        if input.numel() > 0:
            mean, invstd = _kernels.batch_norm_stats(input, eps)
        else:  # an empty batch takes part with count 0 and finite statistics, which the merge multiplies by 0
            mean = torch.zeros(num_channels, dtype=acc, device=input.device)
            invstd = torch.ones_like(mean)
        row = torch.cat([mean, invstd, mean.new_full((1,), float(local_count))])
        rows = _all_gather_rows(row, group, world_size)  # (world, 2C + 1)
        counts = rows[:, -1]
        # Only a process with at most one value per channel of its own can be part of a global batch that small:
        # the others skip the host read. Then every process of such a batch reads the count and raises; none waits.
        if local_count <= 1 and float(counts.sum()) <= 1.0:
            raise ValueError(_one_value_message(float(counts.sum()), tuple(input.shape)))
        # The merge divides by the count so far: a process with an empty batch must not come first (0/0). Sorting
        # by count on the device keeps the host out of it (torch's SyncBatchNorm drops such rows by a boolean mask,
        # a host synchronization).
        counts, order = torch.sort(counts, descending=True, stable=True)
        rows = rows[order]
        # Momentum 1 into zeroed buffers: the kernel writes the union's mean and unbiased variance there.
        batch_mean = torch.zeros(num_channels, dtype=acc, device=input.device)
        batch_var = torch.zeros_like(batch_mean)
        mean, invstd = _kernels.batch_norm_gather_stats_with_counts(
            input, rows[:, :num_channels], rows[:, num_channels : 2 * num_channels], batch_mean, batch_var,
            1.0, eps, counts,
        )
        ctx.save_for_backward(input, weight, mean, invstd, counts.to(torch.int32))
        ctx.group = group
        ctx.mark_non_differentiable(batch_mean, batch_var)
        if input.numel() > 0:
            out = _kernels.batch_norm_elemt(input, weight, bias, mean, invstd, eps)
        else:
            out = torch.empty_like(input)
        return out, batch_mean, batch_var

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_output: Tensor, _grad_mean: Any, _grad_var: Any
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        input, weight, mean, invstd, counts = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_output = _kernel_layout(grad_output)
        num_channels = input.shape[1]
        affine = weight is not None
        grad_input = grad_weight = grad_bias = None
        if input.numel() > 0:
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = _kernels.batch_norm_backward_reduce(
                grad_output, input, mean, invstd, weight, needs_input, needs_weight and affine, needs_bias and affine
            )
        else:
            sum_dy = sum_dy_xmu = torch.zeros(num_channels, dtype=mean.dtype, device=mean.device)
            # Zeros, not None: a parameter whose gradient never arrives would leave DDP's reducer waiting.
            if affine:
                grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(weight)
        if needs_input:
            # Every process's loss depends on every process's input through the statistics: sum the two sums.
            combined = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(combined, op=dist.ReduceOp.SUM, group=ctx.group)
            sum_dy, sum_dy_xmu = combined[:num_channels], combined[num_channels:]
            if input.numel() > 0:
                stat_weight = weight.to(mean.dtype) if affine and weight.dtype != mean.dtype else weight
                grad_input = _kernels.batch_norm_backward_elemt(
                    grad_output, input, mean, invstd, stat_weight, sum_dy, sum_dy_xmu, counts
                )
            else:
                grad_input = torch.zeros_like(input)
        return (
            grad_input,
            grad_weight if needs_weight else None,
            grad_bias if needs_bias else None,
            None,
            None,
            None,
        )


class SyncBatchNorm(_LayoutBatchNorm):
    """Batch norm whose training statistics are those of the union of every process's batch.

    Works on any backend torch.distributed supports (gloo on CPU included), with channels-first ``(N, C, *)`` or
    channels-last ``(N, *, C)`` input, uneven batch sizes across processes (the statistics are count-weighted) and
    processes whose batch is empty (they still take part in the reduction). On CUDA it runs torch's fused
    batch-norm kernels (those of ``torch.nn.SyncBatchNorm``); elsewhere, and under ``torch.compile``, a portable
    computation from shifted sums that keeps the variance of channels whose mean is far larger than their spread.
    Half and bfloat16 inputs accumulate their statistics in float32. Outside an initialized process group, with a
    group of one process, or in eval mode it is plain batch norm. Same parameters, buffers and ``state_dict`` keys
    as ``nn.BatchNorm2d``.

    Under :func:`lightning_bn.padding_mask` (a mask of the input's shape without its channel dimension, True at a
    real token) the statistics are those of the real tokens of every process together: each process sums its masked
    count, sum and sum of squares, and one differentiable all-reduce adds them, so padding that differs from process
    to process changes nothing. This is the portable computation on every device (the fused kernels take no mask);
    the running variance is unbiased with the real count. Padded positions go through the same scale and shift.

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
            most one value per channel (raised on every process alike, so none is left waiting). Under
            ``torch.compile`` the last check is a tensor-side assertion (``RuntimeError`` on CPU, a device-side
            assertion on CUDA), made only when this process's own input has at most one value per channel.
            Under a mask: a mask that does not fit the input (the message names the layer, the input shape and the
            mask shape), and a global batch with fewer than 2 real tokens, "no real token" included (read to the
            host once per mask and forward; a tensor-side assertion under ``torch.compile``).

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
        synchronized = self.training and distributed_world_size(self.process_group) > 1
        use_batch_stats = _uses_batch_statistics(self)
        mask = padding_of(self, input, cdim) if use_batch_stats else None
        if mask is not None:
            # Masked counts and sums, summed over the processes: exact however unevenly they are padded (the fused
            # kernels take no mask, so this is the portable computation on CUDA too).
            return _masked_torch_batch_norm(self, input, cdim, mask, synchronized, self.process_group)
        factor: float | Tensor = 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is not None:
                factor = float(self.momentum)
            elif synchronized and self.running_mean is not None:
                # A tensor: no host read of the counter (a CUDA synchronization, and a graph break when compiled).
                factor = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
            else:
                factor = 1.0 / float(self.num_batches_tracked)  # F.batch_norm takes a float, as torch's layer does
        if synchronized:
            if _uses_fused_kernels(input, self.weight, self.bias):
                return self._fused_forward(input, factor)
            return self._synchronized_forward(input, cdim, factor)
        # Plain batch norm: torch's kernel, with a (M, C) view for channels-last input.
        assert isinstance(factor, float)
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

    def _update_running_stats_from(self, mean: Tensor, var_unbiased: Tensor, factor: float | Tensor) -> None:
        """Torch's rule, ``running += factor * (batch - running)``, from the union batch's mean and variance."""
        if not (self.track_running_stats and self.running_mean is not None and self.running_var is not None):
            return
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
            self.running_var.lerp_(var_unbiased.detach().to(self.running_var.dtype), factor)

    def _fused_forward(self, input: Tensor, factor: float | Tensor) -> Tensor:
        flat = input.reshape(-1, input.shape[-1]) if self.layout == CHANNELS_LAST else input  # (N, C, *) or (M, C)
        world_size = distributed_world_size(self.process_group)
        out, mean, var_unbiased = _FusedSyncBatchNorm.apply(
            flat, self.weight, self.bias, self.eps, self.process_group, world_size
        )
        self._update_running_stats_from(mean, var_unbiased, factor)
        return out.reshape(input.shape)

    def _check_global_count(self, count: Tensor, input: Tensor) -> None:
        if torch.compiler.is_compiling():
            # A host read would break the graph: a tensor-side assertion (raised when the graph runs).
            torch._assert_async(count > 1.0, _one_value_message(None, tuple(input.shape)))
        elif float(count) <= 1.0:
            raise ValueError(_one_value_message(float(count), tuple(input.shape)))

    def _synchronized_forward(self, input: Tensor, cdim: int, factor: float | Tensor) -> Tensor:
        moments = all_reduce_sum(shifted_channel_moments(input, cdim), self.process_group)  # (3, C) float64, union
        count = moments[COUNT][0].detach()
        # Only a process with at most one value per channel of its own can be part of a global batch that small (a
        # static fact of the shapes, so a compiled graph carries no check on the common path). Then every process
        # of such a batch checks the count and raises; none waits.
        if input.numel() <= input.shape[cdim]:
            self._check_global_count(count, input)
        mean, var = mean_var(moments)
        self._update_running_stats_from(mean, var * (count / (count - 1.0)), factor)
        return normalize_with(input, cdim, mean, var, self.eps, self.weight, self.bias)
