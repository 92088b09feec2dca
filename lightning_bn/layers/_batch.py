"""Batch-norm kinds torch lacks: any-layout batch norm, batch renorm, ghost batch norm, frozen batch norm.

Every class keeps ``running_mean``, ``running_var`` and ``num_batches_tracked`` with torch's meaning
(momentum ``None`` is a cumulative average; the running variance is unbiased), so torch's tools and
:func:`lightning_bn.recalibrate_bn` treat them like ``nn.BatchNorm2d``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bn._checks import check_positive_int
from lightning_bn.layers._layout import CHANNELS_FIRST, CHANNELS_LAST, channel_dim, check_layout, per_channel
from lightning_bn.moments import (
    COUNT,
    accumulation_dtype,
    all_reduce_sum,
    channel_moments,
    distributed_world_size,
    masked_shifted_channel_moments,
    mean_var,
    reduce_across_processes,
)
from lightning_bn.padding import check_real_tokens, mask_for

__all__ = ["BatchNormNd", "BatchNormChannelsLast", "BatchRenorm", "GhostBatchNorm", "FrozenBatchNorm"]


def _as_channels_first(x: Tensor, layout: str) -> Tensor:
    """A ``(M, C)`` view for channels-last input (what ``F.batch_norm`` takes); channels-first unchanged."""
    return x.reshape(-1, x.shape[-1]) if layout == CHANNELS_LAST else x


def layer_name(module: nn.Module) -> str:
    """How error messages name a layer: its class and channels."""
    return f"{type(module).__name__}(num_features={getattr(module, 'num_features', '?')})"


def padding_of(module: nn.Module, x: Tensor, cdim: int) -> Tensor | None:
    """The active :func:`lightning_bn.padding_mask` for ``module``'s input ``x`` (None without one); a mask that
    does not fit ``x`` raises, naming the layer."""
    return mask_for(x, cdim, strict=True, name=layer_name(module))


def masked_moments(
    module: nn.Module, x: Tensor, cdim: int, mask: Tensor, synchronized: bool = False, group: Any = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean and biased variance (float64, differentiable) of the real tokens of ``x``, over every process
    of ``group`` when ``synchronized``; raises when the (global) batch has fewer than 2 real tokens."""
    moments = masked_shifted_channel_moments(x, mask, cdim)
    if synchronized:
        moments = all_reduce_sum(moments, group)
    count = moments[COUNT][0].detach()
    scope = "batch of all processes together" if synchronized else "batch"
    key = ("global", group) if synchronized else "local"
    check_real_tokens(count, name=layer_name(module), input_shape=tuple(x.shape), key=key, scope=scope)
    mean, var = mean_var(moments)
    return count, mean, var


def normalize_with(
    x: Tensor, cdim: int, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` at every position (padding included: finite, unspecified),
    as one scale and shift per channel in the accumulation dtype."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    acc = accumulation_dtype(x.dtype)
    ndim = x.dim()
    out = x.to(acc) * per_channel(scale.to(acc), ndim, cdim) + per_channel(shift.to(acc), ndim, cdim)
    return out.to(x.dtype)


def update_running_stats(module: _BatchNorm, mean: Tensor, var_unbiased: Tensor) -> None:
    """Torch's update rule in training: ``num_batches_tracked += 1``, then an exponential average with
    ``momentum``, cumulative when it is None. The cumulative factor is a tensor: no host read of the counter (a
    device synchronization, and a graph break when compiled)."""
    if not (module.training and module.track_running_stats and module.num_batches_tracked is not None):
        return
    assert module.running_mean is not None and module.running_var is not None
    with torch.no_grad():
        module.num_batches_tracked.add_(1)
        factor: float | Tensor = (
            1.0 / module.num_batches_tracked.to(module.running_mean.dtype)
            if module.momentum is None
            else float(module.momentum)
        )
        module.running_mean.lerp_(mean.detach().to(module.running_mean.dtype), factor)
        module.running_var.lerp_(var_unbiased.detach().to(module.running_var.dtype), factor)


def _masked_torch_batch_norm(
    module: _BatchNorm, x: Tensor, cdim: int, mask: Tensor, synchronized: bool = False, group: Any = None
) -> Tensor:
    """What ``_BatchNorm.forward`` does with batch statistics, over the real tokens only (of every process of
    ``group`` when ``synchronized``): torch's update rule for the running statistics, unbiased variance with the
    real count. The moments are computed (and checked) before any buffer changes."""
    count, mean, var = masked_moments(module, x, cdim, mask, synchronized, group)
    update_running_stats(module, mean, var * (count / (count - 1.0)))
    return normalize_with(x, cdim, mean, var, module.eps, module.weight, module.bias)


def _uses_batch_statistics(module: _BatchNorm) -> bool:
    """Torch's rule: batch statistics in training, and in eval when there are no running buffers."""
    return module.training or (module.running_mean is None and module.running_var is None)


class BatchNormNd(_BatchNorm):
    """Batch norm over channels-first input ``(N, C, *)`` with any number of spatial dimensions.

    Under :func:`lightning_bn.padding_mask` (a mask of shape ``(N, *)``) its batch statistics and running-statistics
    update count the real positions only; without a mask it is torch's batch norm.
    """

    layout = CHANNELS_FIRST

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected input of shape (N, C, *), got {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        if _uses_batch_statistics(self):
            self._check_input_dim(input)
            mask = padding_of(self, input, 1)
            if mask is not None:
                return _masked_torch_batch_norm(self, input, 1, mask)
        return super().forward(input)


class BatchNormChannelsLast(_BatchNorm):
    """Batch norm over channels-last input ``(N, *, C)``, e.g. transformer tokens ``(B, T, C)``.

    Statistics per channel over every batch and position; the same kernel and buffers as torch's batch norm. Under
    :func:`lightning_bn.padding_mask` (a mask of shape ``(N, *)``, True at a real token) the batch statistics and
    the running-statistics update count the real tokens only, and every position, padding included, goes through
    the same normalization and affine transform.
    """

    layout = CHANNELS_LAST

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected input of shape (N, *, C), got {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if _uses_batch_statistics(self):
            mask = padding_of(self, input, input.dim() - 1)
            if mask is not None:
                return _masked_torch_batch_norm(self, input, input.dim() - 1, mask)
        return super().forward(input.reshape(-1, input.shape[-1])).reshape(input.shape)


class _LayoutBatchNorm(_BatchNorm):
    """Shared by our batch-norm kinds that take a ``layout`` argument.

    ``sync_stats`` and ``sync_group`` (class defaults: off, the world) switch on synchronization across processes:
    :class:`lightning_bn.plugins.SyncNormPlugin` sets them on the instance for the duration of a fit and removes
    them after. Each kind documents what it synchronizes (:class:`SyncBatchNorm` always does and ignores them).
    """

    sync_stats: bool = False
    sync_group: Any = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        layout: str = CHANNELS_FIRST,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.layout = check_layout(layout)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2 dimensions, got input of shape {tuple(input.shape)}")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout}"

    def _eval_forward(self, x: Tensor) -> Tensor:
        out = F.batch_norm(
            _as_channels_first(x, self.layout), self.running_mean, self.running_var, self.weight, self.bias,
            False, 0.0, self.eps,
        )
        return out.reshape(x.shape)

    def _synchronized(self) -> bool:
        """True in training when synchronization is on and the group has more than one process."""
        return self.training and self.sync_stats and distributed_world_size(self.sync_group) > 1


class BatchRenorm(_LayoutBatchNorm):
    """Batch renormalization (Ioffe, 2017), channels-first or channels-last.

    In training, ``x_hat = (x - mu_B) / sigma_B * r + d`` with ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and
    ``d = clip((mu_B - mu) / sigma, -dmax, dmax)`` held constant in the backward pass, where ``mu`` and
    ``sigma = sqrt(running_var + eps)`` are the running statistics. ``rmax`` rises linearly from 1 and ``dmax``
    from 0 to their final values over the first ``warmup_steps`` training batches (counted by
    ``num_batches_tracked``), so training starts as batch norm. In eval it is batch norm with running statistics.
    With ``sync_stats`` on (see :class:`lightning_bn.plugins.SyncNormPlugin`) ``mu_B`` and ``sigma_B`` are those of
    the union of every process's batch, reduced exactly and differentiably, as in ``SyncBatchNorm``. Under
    :func:`lightning_bn.padding_mask` ``mu_B``, ``sigma_B`` (so ``r`` and ``d``) and the running update are those of
    the real tokens (of every process, when synchronized); padded positions get the same transform.

    Args:
        num_features: channels ``C``.
        rmax: final bound on ``r`` (>= 1).
        dmax: final bound on ``d`` (>= 0).
        warmup_steps: batches over which the bounds open up; 0 uses the final bounds at once.
        layout: ``"channels_first"`` for ``(N, C, *)`` or ``"channels_last"`` for ``(N, *, C)``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 5000,
        layout: str = CHANNELS_FIRST,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if rmax < 1.0:
            raise ValueError(f"`rmax` must be >= 1, got {rmax}")
        if dmax < 0.0:
            raise ValueError(f"`dmax` must be >= 0, got {dmax}")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}")
        super().__init__(num_features, eps, momentum, affine, True, layout, device=device, dtype=dtype)
        self.rmax, self.dmax, self.warmup_steps = float(rmax), float(dmax), int(warmup_steps)

    def current_bounds(self) -> tuple[float, float]:
        """``(rmax, dmax)`` in force for the next training batch."""
        rmax, dmax = self._bounds(torch.float64)
        return float(rmax), float(dmax)

    def _bounds(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(rmax, dmax)`` as tensors on the buffers' device: no host read of the step counter per forward."""
        assert self.num_batches_tracked is not None
        steps = self.num_batches_tracked.to(torch.float64)
        done = torch.ones_like(steps) if self.warmup_steps == 0 else (steps / self.warmup_steps).clamp(max=1.0)
        return (1.0 + (self.rmax - 1.0) * done).to(dtype), (self.dmax * done).to(dtype)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return self._eval_forward(input)
        cdim = channel_dim(self.layout, input.dim())
        mask = padding_of(self, input, cdim)
        n: Any
        if mask is not None:
            n, mean, var = masked_moments(self, input, cdim, mask, self._synchronized(), self.sync_group)
            bessel = (n / (n - 1.0)).to(input.dtype)
            mean, var = mean.to(input.dtype), var.to(input.dtype)
        elif self._synchronized():
            moments = all_reduce_sum(channel_moments(input, cdim), self.sync_group)
            n = moments[COUNT][0]
            mean, var = (m.to(input.dtype) for m in mean_var(moments))
            bessel = (n / (n - 1.0).clamp_min(1.0)).to(input.dtype)
        else:
            dims = [d for d in range(input.dim()) if d != cdim]
            n = input.numel() // input.shape[cdim]
            mean = input.mean(dims)
            var = input.var(dims, unbiased=False)
            bessel = n / max(n - 1, 1)
        std = (var + self.eps).sqrt()
        assert self.running_mean is not None and self.running_var is not None
        running_std = (self.running_var + self.eps).sqrt()
        with torch.no_grad():
            rmax, dmax = self._bounds(std.dtype)
            r = (std / running_std).clamp(1.0 / rmax, rmax)
            d = ((mean - self.running_mean) / running_std).clamp(-dmax, dmax)
        ndim = input.dim()
        x_hat = (input - per_channel(mean, ndim, cdim)) * per_channel(r / std, ndim, cdim) + per_channel(d, ndim, cdim)
        if self.affine:
            x_hat = x_hat * per_channel(self.weight, ndim, cdim) + per_channel(self.bias, ndim, cdim)
        update_running_stats(self, mean.detach(), var.detach() * bessel)
        return x_hat.to(input.dtype)  # float32 r, d and running stats would otherwise promote half input

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}"


class GhostBatchNorm(_LayoutBatchNorm):
    """Ghost batch norm (Hoffer et al., 2017): batch statistics per virtual batch of ``virtual_batch_size`` samples.

    The batch (dimension 0) is cut into consecutive virtual batches (the last may be smaller), each normalized with
    its own statistics. The running statistics are updated once per forward with the average of the virtual
    batches' means and unbiased variances. Same ``state_dict`` keys as batch norm; in eval it is batch norm.
    With ``virtual_batch_size`` >= the batch size it equals batch norm.

    With ``sync_stats`` on (see :class:`lightning_bn.plugins.SyncNormPlugin`) the virtual batches stay within each
    process (each process's batch is cut as above) and the running statistics average the virtual batches of every
    process, so they are identical everywhere; when each process's batch is a multiple of ``virtual_batch_size``
    this is ghost batch norm on the union batch, exactly.

    Under :func:`lightning_bn.padding_mask` each virtual batch is normalized with the statistics of its real tokens;
    a virtual batch without one is only scaled and shifted (mean 0, variance 1) and left out of the running
    statistics, which average the virtual batches that have real tokens (of every process, when synchronized).
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        layout: str = CHANNELS_FIRST,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        virtual_batch_size = check_positive_int("virtual_batch_size", virtual_batch_size)
        super().__init__(num_features, eps, momentum, affine, True, layout, device=device, dtype=dtype)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return self._eval_forward(input)
        mask = padding_of(self, input, channel_dim(self.layout, input.dim()))
        if mask is not None:
            return self._masked_forward(input, mask)
        outs, means, vars_ = [], [], []
        for chunk in input.split(self.virtual_batch_size, dim=0):
            flat = _as_channels_first(chunk, self.layout)
            dims = [d for d in range(flat.dim()) if d != 1]
            n = flat.numel() // flat.shape[1]
            with torch.no_grad():
                means.append(flat.mean(dims))
                vars_.append(flat.var(dims, unbiased=False) * n / max(n - 1, 1))
            out = F.batch_norm(flat, None, None, self.weight, self.bias, True, 0.0, self.eps)
            outs.append(out.reshape(chunk.shape))
        if self._synchronized():
            # Sums over this process's virtual batches, then over every process's: one collective, on every process.
            acc = accumulation_dtype(input.dtype)
            local = torch.zeros(2 * self.num_features + 1, dtype=acc, device=input.device)
            if means:
                sums = [torch.stack(means).sum(0).to(acc), torch.stack(vars_).sum(0).to(acc)]
                local = torch.cat([*sums, local.new_tensor([len(means)])])
            total = reduce_across_processes(local, group=self.sync_group)
            count = total[-1].clamp_min(1.0)
            c = self.num_features
            update_running_stats(self, total[:c] / count, total[c : 2 * c] / count)
        else:
            update_running_stats(self, torch.stack(means).mean(0), torch.stack(vars_).mean(0))
        return torch.cat(outs, dim=0) if outs else input.clone()

    def _masked_forward(self, input: Tensor, mask: Tensor) -> Tensor:
        """Each virtual batch normalized with the statistics of its real tokens; a virtual batch without one is
        only scaled and shifted (mean 0, variance 1) and left out of the running statistics, which average the
        virtual batches that have real tokens."""
        cdim = channel_dim(self.layout, input.dim())
        name, shape = layer_name(self), tuple(input.shape)
        synchronized = self._synchronized()
        if not synchronized:
            check_real_tokens(mask.sum(), name=name, input_shape=shape)
        outs, mean_sum, var_sum, batches = [], None, None, None
        chunks = zip(input.split(self.virtual_batch_size, dim=0), mask.split(self.virtual_batch_size, dim=0))
        for chunk, chunk_mask in chunks:
            moments = masked_shifted_channel_moments(chunk, chunk_mask, cdim)
            n = moments[COUNT][0]
            mean, var = mean_var(moments)
            real = n > 0
            var_or_one = torch.where(real, var, torch.ones_like(var))
            outs.append(normalize_with(chunk, cdim, mean, var_or_one, self.eps, self.weight, self.bias))
            with torch.no_grad():
                unbiased = var * (n / (n - 1.0).clamp_min(1.0))
                mean_sum = mean if mean_sum is None else mean_sum + mean  # an empty virtual batch adds zeros
                var_sum = unbiased if var_sum is None else var_sum + unbiased
                batches = real.double() if batches is None else batches + real.double()
        if outs:
            assert mean_sum is not None and var_sum is not None and batches is not None
            local = torch.cat([mean_sum, var_sum, batches.reshape(1)])  # built under no_grad
        else:
            local = torch.zeros(2 * self.num_features + 1, dtype=torch.float64, device=input.device)
        total = reduce_across_processes(local, group=self.sync_group) if synchronized else local
        if synchronized:
            scope, key = "batch of all processes together", ("global", self.sync_group)
            check_real_tokens(total[-1], name=name, input_shape=shape, minimum=1, key=key, scope=scope)
        count = total[-1].clamp_min(1.0)
        c = self.num_features
        update_running_stats(self, total[:c] / count, total[c : 2 * c] / count)
        return torch.cat(outs, dim=0) if outs else input.clone()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics: ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    Any dimensionality, channels-first or channels-last. The statistics never change (not in train mode, not by
    recalibration). ``weight`` and ``bias`` are parameters, trainable only when ``trainable_affine=True``.
    Same ``state_dict`` keys as batch norm, so a batch-norm checkpoint loads into it.
    """

    layout: str

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        trainable_affine: bool = False,
        layout: str = CHANNELS_FIRST,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine = num_features, eps, affine
        self.layout = check_layout(layout)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory), requires_grad=trainable_affine)
            self.bias = nn.Parameter(torch.zeros(num_features, **factory), requires_grad=trainable_affine)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    running_mean: Tensor
    running_var: Tensor

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2 dimensions, got input of shape {tuple(input.shape)}")
        cdim = channel_dim(self.layout, input.dim())
        scale = (self.running_var + self.eps).rsqrt()
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        ndim = input.dim()
        return input * per_channel(scale.to(input.dtype), ndim, cdim) + per_channel(shift.to(input.dtype), ndim, cdim)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints of frozen batch norm from other libraries often lack the counter.
        state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        trainable = self.weight is not None and self.weight.requires_grad
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, trainable_affine={trainable}, " \
            f"layout={self.layout}"
