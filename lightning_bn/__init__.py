"""lightning-bn: normalization for PyTorch Lightning.

Swap or insert normalization layers in any model, keep batch-norm statistics exact (recalibration, synchronized
batch norm on any backend), and watch per-layer statistics in TensorBoard and W&B.
"""

from lightning_bn.layers import available_norms, build_norm, register_norm
from lightning_bn.padding import padding_mask, set_padding_mask_from
from lightning_bn.recalibrate import recalibrate_bn
from lightning_bn.swap import insert_norms, swap_norms
from lightning_bn.taxonomy import NormInfo, declare_norm_layout, describe_norm

__version__ = "0.1.0"

__all__ = [
    "NormInfo",
    "__version__",
    "available_norms",
    "build_norm",
    "declare_norm_layout",
    "describe_norm",
    "insert_norms",
    "padding_mask",
    "recalibrate_bn",
    "register_norm",
    "set_padding_mask_from",
    "swap_norms",
]
