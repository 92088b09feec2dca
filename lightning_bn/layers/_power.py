"""Power normalization (Shen et al., ICML 2020), channels-first or channels-last, padding-aware."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_bn._checks import check_positive_int
from lightning_bn.layers._batch import layer_name, padding_of
from lightning_bn.layers._layout import CHANNELS_FIRST, channel_dim, check_layout, per_channel
from lightning_bn.moments import accumulation_dtype
from lightning_bn.padding import check_real_tokens

__all__ = ["PowerNorm", "group_scaling"]


def group_scaling(x: Tensor, cdim: int, num_groups: int, eps: float = 1e-5) -> Tensor:
    """Divide each position's channels, in ``num_groups`` groups of consecutive channels, by the root of the group's
    mean square: ``x / sqrt(mean_group(x**2) + eps)`` (``GroupScaling1D`` of the authors' code). Per position, so
    padding plays no part. Differentiable with autograd."""
    num_channels = x.shape[cdim]
    shape = list(x.shape)
    shape[cdim : cdim + 1] = [num_groups, num_channels // num_groups]
    grouped = x.reshape(shape)
    second_moment = grouped.pow(2).mean(dim=cdim + 1, keepdim=True)
    return (grouped / torch.sqrt(second_moment + eps)).reshape(x.shape)


class _PowerFunction(torch.autograd.Function):
    """``y = weight * x / sqrt(forward_sq + eps) + bias`` with the approximate backward of PowerNorm.

    Backward (Algorithm 1 of the paper, as ``PowerFunction.backward`` of the authors' code computes it), with
    ``g = weight * dL/dy`` and ``z = x / sqrt(forward_sq + eps)``:
    ``x_tilde = g - (1 - alpha_bkw) * ema_gz * z``, ``dL/dx = x_tilde / sqrt(backward_sq + eps)``, and
    ``ema_gz += mean(x_tilde * z)`` (in place). Under a padding mask the correction, and the mean, are those of the
    real tokens; a padded position gets ``g / sqrt(backward_sq + eps)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        forward_sq: Tensor,
        backward_sq: Tensor,
        ema_gz: Tensor,
        mask: Tensor | None,
        cdim: int,
        alpha_bkw: float,
        eps: float,
    ) -> Tensor:
        ndim = x.dim()
        z = x * per_channel(torch.rsqrt(forward_sq + eps).to(x.dtype), ndim, cdim)
        y = z
        if weight is not None:
            y = y * per_channel(weight.to(x.dtype), ndim, cdim)
        if bias is not None:
            y = y + per_channel(bias.to(x.dtype), ndim, cdim)
        ctx.save_for_backward(z, weight, backward_sq, ema_gz, mask)
        ctx.cdim, ctx.alpha_bkw, ctx.eps = cdim, alpha_bkw, eps
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z, weight, backward_sq, ema_gz, mask = ctx.saved_tensors
        cdim, ndim = ctx.cdim, z.dim()
        dims = [d for d in range(ndim) if d != cdim]
        g = grad_output if weight is None else grad_output * per_channel(weight.to(grad_output.dtype), ndim, cdim)
        correction = per_channel(((1.0 - ctx.alpha_bkw) * ema_gz).to(g.dtype), ndim, cdim) * z
        if mask is None:
            x_tilde = g - correction
            count = z.numel() // z.shape[cdim]
            gz = (x_tilde * z).sum(dims) / max(count, 1)
        else:
            real = mask.unsqueeze(cdim)
            x_tilde = torch.where(real, g - correction, g)
            zero = torch.zeros((), dtype=g.dtype, device=g.device)
            gz = torch.where(real, x_tilde * z, zero).sum(dims) / mask.sum().clamp_min(1).to(g.dtype)
        with torch.no_grad():
            ema_gz.add_(gz.to(ema_gz.dtype))
        grad_input = x_tilde * per_channel(torch.rsqrt(backward_sq + ctx.eps).to(g.dtype), ndim, cdim)
        grad_weight = (grad_output * z).sum(dims) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = grad_output.sum(dims) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class PowerNorm(nn.Module):
    """Power normalization (PN; Shen, Yao, Gholami, Mahoney, Keutzer, "PowerNorm: Rethinking Batch Normalization in
    Transformers", ICML 2020), as the authors' ``MaskPowerNorm`` computes it (github.com/sIncerass/powernorm,
    ``fairseq/modules/norms/mask_powernorm.py``), channels-first ``(N, C, *)`` or channels-last ``(N, *, C)``.

    Per training step ``t`` (``iters`` counts them, from 1), with ``x`` the input after group scaling:

    1. **Group scaling**: each position's channels, in ``num_groups`` groups, divided by the root of the group's
       mean square (``x / sqrt(mean_group(x**2) + 1e-5)``; the authors use the number of attention heads).
    2. **No mean subtraction**: the batch statistic is the quadratic mean ``psi_B**2 = mean(x**2)`` per channel,
       over the real tokens under :func:`lightning_bn.padding_mask`.
    3. **Running quadratic mean in the forward**: ``y = weight * x / sqrt(phi + eps) + bias`` with ``phi = psi_B**2``
       for ``t <= warmup_iters`` and ``phi = running_phi`` (``psi**2_{t-1}``) after the warm-up. Then
       ``running_phi`` is updated: for ``t < warmup_iters`` first to the cumulative average
       ``running_phi * (t - 1) / t + psi_B**2 / t``, then at every step
       ``running_phi = alpha_fwd * running_phi + (1 - alpha_fwd) * psi_B**2`` (both as in the authors' code).
    4. **Approximate backward** with a moving average of ``mean(g * z)`` (``g = weight * dL/dy``, ``z`` the
       normalized input): ``x_tilde = g - nu * z`` with ``nu = (1 - alpha_bkw) * ema_gz``,
       ``dL/dx = x_tilde / sqrt(psi_B**2 + eps)`` and ``ema_gz += mean(x_tilde * z)``. In terms of ``nu`` this is the
       paper's recursion ``nu_t = nu_{t-1} (1 - (1 - alpha) Gamma_t) + (1 - alpha) Lambda_t`` with
       ``Gamma_t = mean(z**2)`` and ``Lambda_t = mean(g * z)``. As in the authors' code the backward divides by
       the batch's ``psi_B`` also after the warm-up, and uses the correction during the warm-up too; the gradient
       of ``psi_B`` itself is not propagated (the correction stands in for it). ``weight`` and ``bias`` get their
       exact gradients.

    In eval mode ``y = weight * x / sqrt(running_phi + eps) + bias`` with exact (autograd) gradients.

    Under a padding mask the batch statistic, the cumulative and moving averages and the backward's ``mean(g*z)``
    and correction count the real tokens only (the authors' code masks the forward statistic, but averages the
    backward over padded positions too); padded positions go through the same scale and shift and get the
    uncorrected gradient ``g / sqrt(psi_B**2 + eps)``. A batch with no real token raises. The statistics are those
    of each process's own batch (not synchronized; DDP's buffer broadcast keeps ``running_phi`` equal).

    Recalibration: :func:`lightning_bn.recalibrate_bn` sets ``running_phi`` to the exact population quadratic mean
    of the group-scaled real inputs over the batches it is fed (``ema_gz`` and ``iters`` unchanged).

    Args:
        num_features: channels ``C``.
        eps: added to the quadratic mean.
        alpha_fwd: the running quadratic mean's decay ``alpha`` (paper and code: 0.9).
        alpha_bkw: the decay of the backward's moving average (paper and code: 0.9).
        affine: learnable per-channel ``weight`` and ``bias``.
        warmup_iters: training steps normalized with the batch statistic (the authors' class default: 10000;
            their transformer uses its learning-rate warm-up updates).
        num_groups: groups of the group-scaling step (1: all channels; must divide ``num_features``).
        layout: ``"channels_first"`` or ``"channels_last"``.

    Raises:
        ValueError: bad arguments (each message names the argument); an input whose channel dimension is not
            ``num_features``; a padding mask that does not fit the input, or one without a real token in training.

    Example::

        >>> from lightning_bn.layers import build_norm
        >>> pn = build_norm("power", 8, layout="channels_last", warmup_iters=100, num_groups=2)
        >>> pn(torch.randn(4, 5, 8)).shape
        torch.Size([4, 5, 8])
    """

    running_phi: Tensor
    ema_gz: Tensor
    iters: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        alpha_fwd: float = 0.9,
        alpha_bkw: float = 0.9,
        affine: bool = True,
        warmup_iters: int = 10000,
        num_groups: int = 1,
        layout: str = CHANNELS_FIRST,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_features", num_features)
        check_positive_int("num_groups", num_groups)
        if num_features % num_groups:
            raise ValueError(f"`num_groups`={num_groups} must divide `num_features`={num_features}")
        for name, value in (("alpha_fwd", alpha_fwd), ("alpha_bkw", alpha_bkw)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {value}")
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 0:
            raise ValueError(f"`warmup_iters` must be an int >= 0, got {warmup_iters!r}")
        if not eps > 0:
            raise ValueError(f"`eps` must be > 0, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine = num_features, float(eps), affine
        self.alpha_fwd, self.alpha_bkw = float(alpha_fwd), float(alpha_bkw)
        self.warmup_iters, self.num_groups = warmup_iters, num_groups
        self.layout = check_layout(layout)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_phi", torch.ones(num_features, **factory))
        self.register_buffer("ema_gz", torch.zeros(num_features, **factory))
        self.register_buffer("iters", torch.zeros((), dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        self.running_phi.fill_(1.0)
        self.ema_gz.zero_()
        self.iters.zero_()

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2 dimensions, got input of shape {tuple(input.shape)}")
        cdim = channel_dim(self.layout, input.dim())
        if input.shape[cdim] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels in dimension {cdim} ({self.layout}), "
                f"got input of shape {tuple(input.shape)}"
            )
        x = group_scaling(input, cdim, self.num_groups)
        ndim = input.dim()
        if not self.training:
            scale = torch.rsqrt(self.running_phi + self.eps).to(x.dtype)
            out = x * per_channel(scale, ndim, cdim)
            if self.weight is not None:
                out = out * per_channel(self.weight.to(x.dtype), ndim, cdim)
            if self.bias is not None:
                out = out + per_channel(self.bias.to(x.dtype), ndim, cdim)
            return out
        mask = padding_of(self, input, cdim)
        batch_sq = self._batch_quadratic_mean(x.detach(), cdim, mask)
        with torch.no_grad():
            self.iters.add_(1)
            # Tensors throughout: no host read of the step counter (a graph break when compiled).
            step = self.iters.to(batch_sq.dtype)
            in_warmup = self.iters <= self.warmup_iters
            forward_sq = torch.where(in_warmup, batch_sq, self.running_phi.to(batch_sq.dtype))
            cumulative = self.running_phi * (step - 1.0) / step + batch_sq.to(self.running_phi.dtype) / step
            self.running_phi.copy_(torch.where(self.iters < self.warmup_iters, cumulative, self.running_phi))
            self.running_phi.lerp_(batch_sq.to(self.running_phi.dtype), 1.0 - self.alpha_fwd)
        return _PowerFunction.apply(
            x, self.weight, self.bias, forward_sq, batch_sq, self.ema_gz, mask, cdim, self.alpha_bkw, self.eps
        )

    def _batch_quadratic_mean(self, x: Tensor, cdim: int, mask: Tensor | None) -> Tensor:
        """``psi_B**2``: the mean of ``x**2`` per channel over the (real) positions, in the accumulation dtype."""
        acc = accumulation_dtype(x.dtype)
        dims = [d for d in range(x.dim()) if d != cdim]
        values = x.to(acc)
        if mask is None:
            return values.pow(2).mean(dims)
        count = mask.sum()
        check_real_tokens(count, name=layer_name(self), input_shape=tuple(x.shape), minimum=1)
        zero = torch.zeros((), dtype=acc, device=x.device)
        return torch.where(mask.unsqueeze(cdim), values.pow(2), zero).sum(dims) / count.to(acc)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # The authors' checkpoints hold (1, C, 1, 1) statistics and a (1,) counter.
        for name in ("running_phi", "ema_gz"):
            if prefix + name in state_dict:
                state_dict[prefix + name] = state_dict[prefix + name].reshape(-1)
        if prefix + "iters" in state_dict:
            state_dict[prefix + "iters"] = state_dict[prefix + "iters"].reshape(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
            f"affine={self.affine}, warmup_iters={self.warmup_iters}, num_groups={self.num_groups}, "
            f"layout={self.layout}"
        )
