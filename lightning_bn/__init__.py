"""lightning-bn: normalization for PyTorch Lightning.

Swap or insert normalization layers in any model, keep batch-norm statistics exact (recalibration, synchronized
batch norm on any backend), and watch per-layer statistics in TensorBoard and W&B.
"""

from lightning_bn.layers import available_norms, build_norm, register_norm

__version__ = "0.1.0"

__all__ = ["__version__", "available_norms", "build_norm", "register_norm"]
