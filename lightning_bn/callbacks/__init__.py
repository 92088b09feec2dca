"""Lightning callbacks: thin layers over the package's pure-PyTorch logic."""

from lightning_bn.callbacks.bn_recalibration import BatchNormRecalibration
from lightning_bn.callbacks.layer_stats_monitor import LayerStatsMonitor
from lightning_bn.callbacks.loss_landscape import LossLandscapeProbe
from lightning_bn.callbacks.norm_swap import NormSwap

__all__: list[str] = ["BatchNormRecalibration", "LayerStatsMonitor", "LossLandscapeProbe", "NormSwap"]
