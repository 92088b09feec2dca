"""Per-layer statistics collected on demand (pure PyTorch, no Lightning).

* :func:`select_modules` -- which modules to watch (default: every normalization, conv and linear layer).
* :class:`LayerStatsCollector` -- hooks that exist only between ``attach`` and ``detach`` and add sufficient
  statistics to named fields of one on-device buffer; ``finalize`` reduces it across processes in one collective,
  transfers it once and computes the figures from the named fields.
* :class:`Layout` -- the named fields of such a buffer, each with its reduction (``"sum"``, ``"max"``, ``"local"``);
  :data:`TENSOR_FIELDS` and :data:`TENSOR_STATS` -- the per-tensor sufficient statistics and figures.
* :class:`LogBins`, :func:`bin_counts` -- histograms binned on the device with edges shared by construction.
* :func:`find_alerts` -- health alerts from a step's figures.
* :func:`uncompiled_name` -- a module's name without the ``_orig_mod`` of ``torch.compile`` wrappers.
"""

from lightning_bn.stats._alerts import ALERT_KINDS, AlertThresholds, find_alerts
from lightning_bn.stats._collector import (
    ACTIVATION_GRAD_STATS,
    ACTIVATION_STATS,
    LayerStats,
    LayerStatsCollector,
    in_backward_pass,
)
from lightning_bn.stats._fields import TENSOR_FIELDS, TENSOR_STATS, Layout, TensorField, TensorStat
from lightning_bn.stats._histogram import LogBins, bin_counts, histogram_edges, trim_histogram
from lightning_bn.stats._names import compiled_wrappers, uncompiled_name
from lightning_bn.stats._select import DEFAULT_WATCH_TYPES, NORM_TYPES, has_batch_stats, is_norm, select_modules
from lightning_bn.stats._summary import summarize

__all__ = [
    "ACTIVATION_GRAD_STATS",
    "ACTIVATION_STATS",
    "ALERT_KINDS",
    "AlertThresholds",
    "DEFAULT_WATCH_TYPES",
    "LayerStats",
    "LayerStatsCollector",
    "Layout",
    "LogBins",
    "NORM_TYPES",
    "TENSOR_FIELDS",
    "TENSOR_STATS",
    "TensorField",
    "TensorStat",
    "bin_counts",
    "compiled_wrappers",
    "find_alerts",
    "has_batch_stats",
    "histogram_edges",
    "in_backward_pass",
    "is_norm",
    "select_modules",
    "summarize",
    "trim_histogram",
    "uncompiled_name",
]
