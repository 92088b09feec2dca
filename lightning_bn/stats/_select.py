"""Which modules the monitor watches: by the taxonomy's answers (every normalization layer, every layer that owns a
weight matrix or kernel), or a selection by class or glob."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn
from torch.nn.modules.conv import _ConvNd

from lightning_bn import taxonomy
from lightning_bn.stats._names import uncompiled_name

__all__ = [
    "Selector",
    "NORM_TYPES",
    "DEFAULT_WATCH_TYPES",
    "is_norm",
    "has_batch_stats",
    "watched_by_default",
    "select_modules",
]

Selector = Sequence[type | str]

# Torch's and this package's normalization classes, as the taxonomy's table holds them. The rule is `is_norm`, which
# also recognizes third-party norms (timm, Hugging Face) and the ones its probe classifies.
NORM_TYPES: tuple[type[nn.Module], ...] = taxonomy.known_norm_classes()
# The classes watched by default among torch's; `watched_by_default` is the rule (linear-like leaves included).
DEFAULT_WATCH_TYPES: tuple[type[nn.Module], ...] = NORM_TYPES + (_ConvNd, nn.Linear, nn.Embedding, nn.EmbeddingBag)


def is_norm(module: nn.Module) -> bool:
    """True for a layer the taxonomy recognizes as a normalization layer: its inputs are watched too."""
    return taxonomy.is_norm(module)


def has_batch_stats(module: nn.Module) -> bool:
    """True for a batch-norm layer with running statistics to compare its batches with."""
    return taxonomy.tracks_running_stats(module)


def watched_by_default(module: nn.Module) -> bool:
    """The default selection: a recognized normalization layer, or a layer that owns a weight matrix or kernel."""
    return is_norm(module) or taxonomy.is_weight_layer(module)


def _check_selector(arg: str, selector: Selector | type | str | None) -> list[type | str] | None:
    if selector is None:
        return None
    items = [selector] if isinstance(selector, (str, type)) else list(selector)
    for item in items:
        if isinstance(item, str):
            continue
        if isinstance(item, type) and issubclass(item, nn.Module):
            continue
        raise TypeError(
            f"`{arg}` takes nn.Module classes and module-name globs (str), e.g. [nn.Conv2d, 'layer1.*'], "
            f"got {item!r} in {selector!r}"
        )
    return items


def _matches(items: list[type | str], name: str, module: nn.Module) -> bool:
    for item in items:
        if isinstance(item, type):
            if isinstance(module, item):
                return True
        elif fnmatch.fnmatchcase(name, item):
            return True
    return False


def select_modules(
    model: nn.Module, include: Selector | type | str | None = None, exclude: Selector | type | str | None = None
) -> list[tuple[str, nn.Module]]:
    """The watched modules of ``model`` as ``(name, module)`` in registration order.

    The rules, by default (``include=None``):

    - every normalization layer :func:`lightning_bn.describe_norm` recognizes: torch's and this package's,
      timm's, torchvision's and Hugging Face's known classes (``LlamaRMSNorm``, ``T5LayerNorm``, ``LayerNorm2d``,
      ``BatchNormAct2d`` ...), classes of registered kinds, and third-party norms the probe classifies; their
      inputs are watched too (``act_in/...``);
    - every layer that owns a weight matrix or kernel: conv and linear layers (also with a norm inserted after
      them), embeddings, and any leaf module with a parameter of two or more dimensions of its own, so linear-like
      layers such as Hugging Face's ``Conv1D`` (GPT-2's projections) and LSTMs are watched;
    - not: containers and blocks (a module with children that is none of the above), activations, dropout,
      pooling, parameter-free layers, and the root module (watched only when ``include`` names its class);
    - a module reachable under several names is watched once, under its first name.

    With ``include``, a module is watched when it matches any entry (a class, by ``isinstance``, or a glob on its
    name); ``exclude`` then removes the modules that match any of its entries. Globs match the names of the user's
    model without ``torch.compile``'s ``_orig_mod`` (``"net.0"`` selects ``net.0`` also after
    ``self.net = torch.compile(self.net)``), as the metric keys have them.

    Args:
        model: the model.
        include: classes and module-name globs (``fnmatch``, e.g. ``"layer1.*"``); a module is watched when it
            matches any. Default: the rules above.
        exclude: classes and globs of modules not to watch, applied after ``include``.

    Raises:
        TypeError: an entry of ``include`` or ``exclude`` is neither a module class nor a str.
    """
    inc = _check_selector("include", include)
    exc = _check_selector("exclude", exclude)
    chosen = []
    for name, module in model.named_modules():
        if not name:
            if inc is None or not any(isinstance(i, type) and isinstance(model, i) for i in inc):
                continue  # the root is watched only when the user names its class
        if inc is None:
            if not watched_by_default(module):
                continue
        elif not _matches(inc, uncompiled_name(name), module):
            continue
        if exc is not None and _matches(exc, uncompiled_name(name), module):
            continue
        chosen.append((name, module))
    return chosen
