"""A W&B logger that runs offline unless an API key is set, so the same config works on a laptop and on a cluster.

    python -m examples.cnn fit --config examples/configs/cnn.yaml --config examples/configs/wandb.yaml
    wandb sync wandb/offline-run-*        # later, from a machine that is logged in

``examples/configs/wandb.yaml`` appends :class:`AutoWandbLogger` to the config's loggers (``logger+:``), so the
TensorBoard logs are still written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from lightning.pytorch.loggers import WandbLogger

__all__ = ["AutoWandbLogger", "wandb_offline_default"]

_OFFLINE_MODES = ("offline", "dryrun")
_OTHER_MODES = ("online", "disabled", "shared")


def wandb_offline_default(environ: Mapping[str, str] | None = None) -> bool:
    """Whether W&B should run offline, decided from the environment.

    ``WANDB_MODE`` decides when it is set (``offline``/``dryrun``: offline; ``online``, ``disabled``, ``shared``:
    not forced offline, W&B follows the variable). Otherwise: online when ``WANDB_API_KEY`` is set and non-empty,
    offline when it is not.

    Raises:
        ValueError: ``WANDB_MODE`` set to a value W&B does not know.
    """
    env = os.environ if environ is None else environ
    mode = env.get("WANDB_MODE", "").strip().lower()
    if mode in _OFFLINE_MODES:
        return True
    if mode in _OTHER_MODES:
        return False
    if mode:
        raise ValueError(
            f"environment variable `WANDB_MODE` must be one of {', '.join(_OFFLINE_MODES + _OTHER_MODES)} "
            f"or unset, got {env['WANDB_MODE']!r}"
        )
    return not env.get("WANDB_API_KEY", "").strip()


class AutoWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` with ``offline`` chosen from the environment when not given.

    Args:
        name: display name of the run.
        save_dir: where the ``wandb/`` directory goes (default: ``WANDB_DIR`` or the working directory).
        version: run id, to resume a run.
        offline: ``True``/``False`` to force; ``None`` (default) asks :func:`wandb_offline_default`: offline unless
            ``WANDB_API_KEY`` is set (``WANDB_MODE`` takes precedence).
        project: the W&B project.
        log_model: upload checkpoints as artifacts (online only; Lightning refuses it offline).
        prefix: prefix of every metric key.
        group: W&B run group (e.g. one per sweep).
        tags: W&B tags of the run.

    Raises:
        ValueError: a ``WANDB_MODE`` W&B does not know (when ``offline`` is None).
        MisconfigurationException: ``log_model`` with an offline run (from ``WandbLogger``).

    Example::

        import lightning as L
        from examples.loggers import AutoWandbLogger

        trainer = L.Trainer(logger=AutoWandbLogger(project="lightning-bn"))
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | None = None,
        version: str | None = None,
        offline: bool | None = None,
        project: str = "lightning-bn",
        log_model: Literal["all"] | bool = False,
        prefix: str = "",
        group: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        self.chose_offline = wandb_offline_default() if offline is None else bool(offline)
        super().__init__(
            name=name, save_dir=save_dir, version=version, offline=self.chose_offline, project=project,
            log_model=log_model, prefix=prefix, group=group, tags=tags,
        )
