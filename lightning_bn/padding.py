"""Padding-aware batch statistics: :func:`padding_mask` marks the real tokens of a padded batch.

While a mask is active, every batch statistic of a tensor whose non-channel dimensions match the mask counts real
tokens only: the batch-statistics layers (their normalization and their running-statistics update), synchronized
batch norm across processes, :func:`lightning_bn.recalibrate_bn` and :class:`lightning_bn.callbacks.LayerStatsMonitor`.
The layers are this package's: ``BatchNormChannelsLast``, ``BatchNormNd``, ``SyncBatchNorm``, ``GhostBatchNorm``,
``BatchRenorm`` and ``PowerNorm``; torch's own ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` ignore masks
(:func:`set_padding_mask_from` warns about them). See docs/padding.md.

The mask is ``(N, T)`` for tokens ``(N, T, C)`` (in general ``(N, *)``, the input's shape without its channel
dimension), boolean, True at a real token. Masks nest: the innermost one is active. The state is a plain module-level
list, which ``torch.compile`` guards on like any other global, so a compiled forward sees the mask as a graph input.

Example::

    with padding_mask(attention_mask.bool()):
        logits = model(tokens)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Hashable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PaddingMaskHooks",
    "active_padding_mask",
    "check_real_tokens",
    "mask_for",
    "padding_mask",
    "set_padding_mask_from",
]

# The innermost active mask is the last entry. Not thread-local: dynamo traces a plain global, not threading.local.
_ACTIVE: list[Tensor] = []
# One entry per active mask: for each key (this process's batch, or a process group's global batch) the largest
# minimum its count of real tokens was read to the host and found to meet. Every layer that fits a mask counts the
# same real tokens, so the first layer's host read serves the whole forward (eager only: a compiled graph asserts on
# the device instead).
_VERIFIED: list[dict[Hashable, int]] = []


def _check_mask(mask: Any) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"`mask` must be a boolean torch.Tensor of shape (N, *), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"`mask` must be a boolean tensor (True at a real token), got dtype {mask.dtype}; "
            "pass e.g. `attention_mask.bool()`"
        )
    if mask.dim() < 1:
        raise ValueError(f"`mask` must have shape (N, *) with at least one dimension, got shape {tuple(mask.shape)}")
    return mask


@contextlib.contextmanager
def padding_mask(mask: Tensor) -> Iterator[Tensor]:
    """Count only the real tokens (``mask`` True) in every batch statistic computed inside the block.

    Args:
        mask: boolean ``(N, *)``, the shape of the inputs without their channel dimension; True at a real token.

    Raises:
        TypeError: ``mask`` is not a boolean tensor.
        ValueError: ``mask`` has no dimension.

    Example::

        >>> bn = lightning_bn.layers.build_norm("batch", 4, layout="channels_last")
        >>> x, mask = torch.randn(2, 3, 4), torch.tensor([[True, True, False], [True, False, False]])
        >>> with padding_mask(mask):
        ...     y = bn(x)   # mean and variance of the 3 real tokens
    """
    _push(_check_mask(mask))
    try:
        yield mask
    finally:
        _pop()


def _push(mask: Tensor) -> None:
    _ACTIVE.append(mask)
    _VERIFIED.append({})


def _pop() -> None:
    _ACTIVE.pop()
    _VERIFIED.pop()


def active_padding_mask() -> Tensor | None:
    """The innermost active mask, or ``None`` outside :func:`padding_mask`."""
    return _ACTIVE[-1] if _ACTIVE else None


def mask_for(x: Tensor, channel_dim: int, *, strict: bool = False, name: str = "") -> Tensor | None:
    """The active mask if it fits ``x``'s dimensions other than ``channel_dim``, else ``None``.

    With ``strict`` a mask that does not fit raises a ``ValueError`` naming ``name`` (a layer), the input shape and
    the mask shape; a layer that computes batch statistics is strict, the monitor is not (it summarizes such a
    tensor whole).
    """
    mask = active_padding_mask()
    if mask is None:
        return None
    cdim = channel_dim % x.dim()
    rest = x.shape[:cdim] + x.shape[cdim + 1 :]
    if tuple(rest) == tuple(mask.shape):
        if mask.device != x.device:
            raise ValueError(
                f"padding_mask is on {mask.device} but the input of {name or 'a layer'} is on {x.device}: "
                "enter the mask on the model's device"
            )
        return mask
    if strict:
        raise ValueError(
            f"padding_mask of shape {tuple(mask.shape)} does not fit the input of {name or 'a layer'}: input shape "
            f"{tuple(x.shape)} with channels in dimension {cdim}, so the mask must have shape {tuple(rest)}"
        )
    return None


def check_real_tokens(
    count: Tensor,
    *,
    name: str,
    input_shape: tuple[int, ...],
    minimum: int = 2,
    key: Hashable = "local",
    scope: str = "batch",
) -> None:
    """Raise a ``ValueError`` unless ``count`` (real tokens per channel, a 0-d tensor) is at least ``minimum``.

    Called by the batch-statistics layers under a mask, with the count of the global batch for synchronized layers
    (so every process raises alike and none waits). Eagerly the count is read to the host once per mask, ``key``
    (``"local"`` for this process's batch, ``("global", group)`` for a process group's) and ``minimum``; under
    ``torch.compile`` it is a tensor-side assertion, raised when the graph runs.
    """
    mask = active_padding_mask()
    mask_shape = None if mask is None else tuple(mask.shape)

    def message(value: float | None) -> str:
        got = "" if value is None else f", got {int(value)}"
        what = "no real token" if value == 0 else f"fewer than {minimum} real tokens"
        return (
            f"{name} computes batch statistics over the real tokens (padding_mask True), but the {scope} has "
            f"{what}{got} (padding_mask shape {mask_shape}, input shape {tuple(input_shape)}); it needs at least "
            f"{minimum}: leave such batches out or run them in eval mode"
        )

    if torch.compiler.is_compiling():
        # No shapes in the text: under dynamic shapes they are symbols, which a traced message cannot hold.
        torch._assert_async(
            count >= minimum,
            f"{name} computes batch statistics over the real tokens (padding_mask True), but the {scope} has fewer "
            f"than {minimum} real tokens: leave such batches out or run them in eval mode",
        )
        return
    verified = _VERIFIED[-1] if _VERIFIED else {}
    if verified.get(key, -1) >= minimum:
        return
    value = float(count)
    if value < minimum:
        raise ValueError(message(value))
    verified[key] = max(minimum, verified.get(key, minimum))


def set_padding_mask_from(
    model: nn.Module, argument: str = "attention_mask", *, position: int | None = None
) -> PaddingMaskHooks:
    """Make every forward of ``model`` run under ``padding_mask(<argument> != 0)``, without editing the model.

    A forward pre-hook on ``model`` reads the keyword ``argument`` (or positional argument ``position``) and enters
    the mask; a forward hook, called even when the forward raises, leaves it. Forwards without the argument (or with
    ``None``) run without a mask. Returns a handle whose ``remove()`` takes both hooks off.

    Example (a Hugging Face model, whose ``attention_mask`` is 1 at a real token)::

        handle = set_padding_mask_from(bert)
        bert(input_ids, attention_mask=attention_mask)   # batch norms inside count real tokens only
        handle.remove()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(argument, str) or not argument:
        raise ValueError(f"`argument` must be the name of the forward's mask argument, got {argument!r}")
    _warn_mask_unaware(model)
    # Whether each forward in progress (nested calls included) entered a mask. Plain list operations rather than a
    # context manager, so that dynamo traces the hooks of a compiled model without a graph break.
    entered: list[bool] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        value = kwargs.get(argument)
        if value is None and position is not None and len(args) > position:
            value = args[position]
        if value is not None:
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"set_padding_mask_from: the forward's `{argument}` must be a tensor (nonzero at a real token) "
                    f"or None, got {type(value).__name__}"
                )
            _push(_check_mask(value if value.dtype == torch.bool else value != 0))
        entered.append(value is not None)

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if entered and entered.pop():
            _pop()

    pre = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    post = model.register_forward_hook(post_hook, with_kwargs=True, always_call=True)
    return PaddingMaskHooks(pre, post)


def _warn_mask_unaware(model: nn.Module) -> None:
    """Say loudly which batch norms of ``model`` would ignore the mask: torch's own classes compute their statistics
    in a kernel that takes no mask (this package's classes, e.g. after ``swap_norms``, do take it)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from lightning_bn.layers._batch import BatchNormChannelsLast, BatchNormNd, _LayoutBatchNorm

    aware = (BatchNormChannelsLast, BatchNormNd, _LayoutBatchNorm)
    unaware = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and not isinstance(m, aware)
    ]
    if unaware:
        warnings.warn(
            f"set_padding_mask_from: {len(unaware)} batch-norm layer(s) of {type(model).__name__} ignore padding "
            f"masks and will count padding in their batch statistics: {', '.join(unaware[:5])}"
            f"{', ...' if len(unaware) > 5 else ''}. Replace them with this package's layers (channels-last: "
            "build_norm('batch', C, layout='channels_last'); channels-first: BatchNormNd).",
            UserWarning,
            stacklevel=3,
        )


class PaddingMaskHooks:
    """The two hooks of :func:`set_padding_mask_from`, removed together (also as a context manager)."""

    def __init__(self, *handles: torch.utils.hooks.RemovableHandle) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> PaddingMaskHooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
