"""Normalization layers and the registry of kinds (pure PyTorch, no Lightning).

Kinds: ``batch``, ``sync_batch``, ``group``, ``layer``, ``instance``, ``rms``, ``batch_renorm``, ``ghost_batch``,
``frozen_batch``, ``power``, ``none``, and whatever :func:`register_norm` adds. Torch's own layers are used wherever
they fit; the classes here cover what torch lacks.
"""

from __future__ import annotations

from torch import nn

from lightning_bn.layers._batch import BatchNormChannelsLast, BatchNormNd, BatchRenorm, FrozenBatchNorm, GhostBatchNorm
from lightning_bn.layers._channel import (
    GroupNormChannelsLast,
    InstanceNormChannelsLast,
    InstanceNormNd,
    LayerNormChannelsFirst,
    RMSNormChannelsFirst,
)
from lightning_bn.layers._layout import CHANNELS_FIRST, CHANNELS_LAST, LAYOUTS, channel_dim
from lightning_bn.layers._power import PowerNorm
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
    "PowerNorm",
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
    """True for a layer that normalizes with batch statistics in training, as :mod:`lightning_bn.taxonomy` says
    (torch's, ours, third-party ones; not frozen batch norm)."""
    from lightning_bn import taxonomy  # the taxonomy is built on this package's classes: imported when asked

    return taxonomy.is_batch_norm(module)


def tracks_running_stats(module: nn.Module) -> bool:
    """True for a batch-norm layer with running statistics that recalibration may recompute (see the taxonomy)."""
    from lightning_bn import taxonomy

    return taxonomy.tracks_running_stats(module)
