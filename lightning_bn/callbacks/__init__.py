"""Lightning callbacks: thin layers over the package's pure-PyTorch logic."""

from lightning_bn.callbacks.norm_swap import NormSwap

__all__: list[str] = ["NormSwap"]
