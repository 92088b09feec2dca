"""Normalization layers and the registry of kinds (pure PyTorch, no Lightning).

Kinds: ``batch``, ``sync_batch``, ``group``, ``layer``, ``instance``, ``rms``, ``batch_renorm``, ``ghost_batch``,
``frozen_batch``, ``none``, and whatever :func:`register_norm` adds. Torch's own layers are used wherever they fit;
the classes here cover what torch lacks.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bn.layers._batch import BatchNormChannelsLast, BatchNormNd, BatchRenorm, FrozenBatchNorm, GhostBatchNorm
from lightning_bn.layers._channel import (
    GroupNormChannelsLast,
    InstanceNormChannelsLast,
    InstanceNormNd,
    LayerNormChannelsFirst,
    RMSNormChannelsFirst,
)
from lightning_bn.layers._layout import CHANNELS_FIRST, CHANNELS_LAST, LAYOUTS, channel_dim
from lightning_bn.layers._registry import (
    available_norms,
    build_norm,
    check_options,
    default_num_groups,
    kind_options,
    normalize_kind,
    register_norm,
    unregister_norm,
)
from lightning_bn.layers._sync import SyncBatchNorm

__all__ = [
    "CHANNELS_FIRST",
    "CHANNELS_LAST",
    "LAYOUTS",
    "BatchNormChannelsLast",
    "BatchNormNd",
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "GroupNormChannelsLast",
    "InstanceNormChannelsLast",
    "InstanceNormNd",
    "LayerNormChannelsFirst",
    "RMSNormChannelsFirst",
    "SyncBatchNorm",
    "available_norms",
    "build_norm",
    "channel_dim",
    "check_options",
    "default_num_groups",
    "is_batch_norm",
    "kind_options",
    "normalize_kind",
    "register_norm",
    "tracks_running_stats",
    "unregister_norm",
]


def is_batch_norm(module: nn.Module) -> bool:
    """True for every batch-norm kind whose statistics come from batches (torch's and ours; not frozen)."""
    return isinstance(module, _BatchNorm)


def tracks_running_stats(module: nn.Module) -> bool:
    """True for a batch-norm layer with running statistics that recalibration may recompute."""
    return is_batch_norm(module) and bool(module.track_running_stats) and module.running_mean is not None
