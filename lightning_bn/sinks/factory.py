"""Pick the right sink for each attached Lightning logger."""

from __future__ import annotations

from collections.abc import Iterable

from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger

from lightning_bn.sinks.logger_sink import LoggerSink
from lightning_bn.sinks.sink import Sink
from lightning_bn.sinks.tensorboard_sink import TensorBoardSink
from lightning_bn.sinks.wandb_sink import WandbSink

__all__ = ["sinks_for_loggers", "sink_for_logger"]


def sink_for_logger(logger: Logger) -> Sink:
    """The sink for one logger: :class:`TensorBoardSink`, :class:`WandbSink`, or :class:`LoggerSink` for any other.

    Raises:
        TypeError: if ``logger`` is not a Lightning logger.
    """
    if isinstance(logger, TensorBoardLogger):
        return TensorBoardSink(logger)
    if isinstance(logger, WandbLogger):
        return WandbSink(logger)
    if isinstance(logger, Logger):
        return LoggerSink(logger)
    raise TypeError(f"`loggers` must hold Lightning loggers, got {type(logger).__name__}")


def sinks_for_loggers(loggers: Iterable[Logger] | None) -> list[Sink]:
    """One sink per logger, in order (``trainer.loggers``; ``None`` or an empty list gives no sinks).

    Building sinks does not create the loggers' experiments: that happens on the first write.

    Raises:
        TypeError: if an entry is not a Lightning logger.

    Example::

        sinks = sinks_for_loggers(trainer.loggers)
        for sink in sinks:
            sink.log_scalars({"act/std/fc": 1.1}, step=trainer.global_step)
    """
    if loggers is None:
        return []
    if isinstance(loggers, Logger):
        loggers = [loggers]
    return [sink_for_logger(logger) for logger in loggers]
