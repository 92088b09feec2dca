"""Health alerts from a step's figures: non-finite values, dead units, collapsing or exploding activations and
vanishing or exploding gradients. Pure functions of :class:`~lightning_bn.stats.LayerStats`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_bn.stats._collector import LayerStats

__all__ = ["ALERT_KINDS", "AlertThresholds", "find_alerts"]

ALERT_KINDS = ("nonfinite", "dead", "std_collapse", "std_explode", "grad_vanishing", "grad_exploding")


@dataclass(frozen=True)
class AlertThresholds:
    """When a figure raises an alert.

    Args:
        dead_fraction: a layer is dead when more than this fraction of its output (or, for a norm, input) is zero.
        std_low: activation std below this (and the layer saw finite values) is a collapse.
        std_high: activation std above this is an explosion.
        grad_ratio: the activation-gradient RMS at the first watched layer (in forward order) and at the last
            differ by more than this factor: vanishing when the first is the smaller, exploding when it is the larger.

    Raises:
        ValueError: a threshold outside its range.
    """

    dead_fraction: float = 0.9
    std_low: float = 1e-4
    std_high: float = 1e4
    grad_ratio: float = 1e4

    def __post_init__(self) -> None:
        if not 0.0 <= self.dead_fraction <= 1.0:
            raise ValueError(f"`dead_fraction` must be in [0, 1], got {self.dead_fraction!r}")
        if not 0.0 <= self.std_low < self.std_high:
            raise ValueError(f"need 0 <= `std_low` < `std_high`, got std_low={self.std_low!r}, "
                             f"std_high={self.std_high!r}")
        if not self.grad_ratio > 1.0:
            raise ValueError(f"`grad_ratio` must be > 1, got {self.grad_ratio!r}")


def find_alerts(stats: LayerStats, thresholds: AlertThresholds | None = None, prefix: str = "") -> dict[str, list[str]]:
    """The layers behind each alert kind (every kind in ``ALERT_KINDS`` is a key; empty list: no alert).

    ``nonfinite`` lists the layers that produced NaN or Inf in forward order, the first one first.
    """
    th = thresholds or AlertThresholds()
    s = stats.scalars
    order = stats.order or sorted({k.rsplit("/", 1)[-1] for k in s if k.startswith(f"{prefix}act")})
    alerts: dict[str, list[str]] = {kind: [] for kind in ALERT_KINDS}

    def get(area: str, stat: str, name: str) -> float | None:
        return s.get(f"{prefix}{area}/{stat}/{name}")

    for name in order:
        if any((get(a, "frac_nonfinite", name) or 0.0) > 0 for a in ("act", "act_in")):
            alerts["nonfinite"].append(name)
        if any((get(a, "frac_zero", name) or 0.0) > th.dead_fraction for a in ("act", "act_in")):
            alerts["dead"].append(name)
        std = get("act", "std", name)
        if std is not None and math.isfinite(std):
            if std < th.std_low and (get("act", "frac_nonfinite", name) or 0.0) < 1.0:
                alerts["std_collapse"].append(name)
            elif std > th.std_high:
                alerts["std_explode"].append(name)
    grads: list[tuple[str, float]] = []
    for n in order:
        g = get("act_grad", "rms", n)
        if g is not None and math.isfinite(g):
            grads.append((n, g))
    if len(grads) >= 2:
        (first, g_first), (_, g_last) = grads[0], grads[-1]
        if g_first * th.grad_ratio < g_last:
            alerts["grad_vanishing"] = [first]
        elif g_last * th.grad_ratio < g_first:
            alerts["grad_exploding"] = [first]
    return alerts
