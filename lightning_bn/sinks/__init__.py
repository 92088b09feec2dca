"""Writing the monitor's figures to TensorBoard, W&B and any Lightning logger.

``sinks_for_loggers(trainer.loggers)`` gives one :class:`Sink` per logger; each takes scalars, a chart layout,
histograms (bin edges and counts) and heatmaps (layers x steps, drawn with matplotlib), and ignores what its
destination cannot show.
"""

from lightning_bn.sinks.factory import sink_for_logger, sinks_for_loggers
from lightning_bn.sinks.heatmap import LOG_SCALE_STATS, render_heatmap, shorten_labels, uses_log_scale
from lightning_bn.sinks.histogram import HistogramSummary, histogram_summary, merge_bins
from lightning_bn.sinks.logger_sink import LoggerSink
from lightning_bn.sinks.sink import Sink
from lightning_bn.sinks.tensorboard_sink import TensorBoardSink
from lightning_bn.sinks.wandb_sink import WandbSink

__all__ = [
    "LOG_SCALE_STATS",
    "HistogramSummary",
    "LoggerSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "histogram_summary",
    "merge_bins",
    "render_heatmap",
    "sink_for_logger",
    "shorten_labels",
    "sinks_for_loggers",
    "uses_log_scale",
]
