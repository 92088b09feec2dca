"""Torch's layer, RMS, group and instance norm in the layout torch lacks.

Each subclasses the torch layer with the same parameters and ``state_dict`` keys and changes only which
dimension is the channel one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_bn.layers._layout import CHANNELS_FIRST, CHANNELS_LAST

__all__ = [
    "LayerNormChannelsFirst",
    "RMSNormChannelsFirst",
    "GroupNormChannelsLast",
    "InstanceNormNd",
    "InstanceNormChannelsLast",
]


class LayerNormChannelsFirst(nn.LayerNorm):
    """Layer norm over the channels of ``(N, C, *)`` at each position (as in ConvNeXt): ``LayerNorm2d`` in timm."""

    layout = CHANNELS_FIRST

    def forward(self, input: Tensor) -> Tensor:
        x = input.movedim(1, -1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)


class RMSNormChannelsFirst(nn.RMSNorm):
    """RMS norm over the channels of ``(N, C, *)`` at each position."""

    layout = CHANNELS_FIRST

    def forward(self, input: Tensor) -> Tensor:
        x = input.movedim(1, -1)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps).movedim(-1, 1)


class GroupNormChannelsLast(nn.GroupNorm):
    """Group norm over channels-last input ``(N, *, C)``: groups of channels, over all positions of a sample."""

    layout = CHANNELS_LAST

    def forward(self, input: Tensor) -> Tensor:
        x = input.movedim(-1, 1)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps).movedim(1, -1)


class InstanceNormNd(_InstanceNorm):
    """Instance norm over channels-first ``(N, C, *)`` with any number of spatial dimensions."""

    layout = CHANNELS_FIRST

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 3:
            raise ValueError(f"expected input of shape (N, C, L, *), got {tuple(input.shape)}")

    def _get_no_batch_dim(self) -> int:
        return -1  # no unbatched form: (N, C, *) always has a batch dimension

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return self._apply_instance_norm(input)


class InstanceNormChannelsLast(InstanceNormNd):
    """Instance norm over channels-last input ``(N, *, C)``: each channel of each sample over its positions."""

    layout = CHANNELS_LAST

    def forward(self, input: Tensor) -> Tensor:
        x = input.movedim(-1, 1)
        self._check_input_dim(x)
        return self._apply_instance_norm(x).movedim(1, -1)


