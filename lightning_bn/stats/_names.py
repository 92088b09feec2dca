"""Module and parameter names as the user's model has them, the same with and without ``torch.compile``.

``self.net = torch.compile(self.net)`` puts a ``torch._dynamo.OptimizedModule`` in the tree whose child
``_orig_mod`` is the original module, so ``named_modules`` says ``net._orig_mod.0`` where the user wrote
``net.0``. ``module.compile()`` (in place) and ``trainer.fit(torch.compile(model))`` (Lightning unwraps the
LightningModule) leave the names as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["compiled_wrappers", "uncompiled_modules", "uncompiled_name"]

_WRAPPED = "_orig_mod"  # the attribute torch.compile's OptimizedModule keeps the original module under


def uncompiled_name(name: str) -> str:
    """``net._orig_mod.0.weight`` -> ``net.0.weight``; ``_orig_mod.fc`` -> ``fc``; other names unchanged."""
    if _WRAPPED not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _WRAPPED)


def _is_wrapper(module: nn.Module) -> bool:
    return isinstance(getattr(module, _WRAPPED, None), nn.Module)


def uncompiled_modules(modules: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``modules`` under their uncompiled names; a ``torch.compile`` wrapper is left out where the module it wraps
    is listed too (both would have one name; the hooks on the inner module see the same outputs)."""
    listed = {id(m) for _, m in modules}
    out = []
    for name, module in modules:
        if _is_wrapper(module) and id(getattr(module, _WRAPPED)) in listed:
            continue
        out.append((uncompiled_name(name), module))
    return out


def compiled_wrappers(model: nn.Module) -> list[str]:
    """The uncompiled names of the ``torch.compile`` wrappers inside ``model`` (``""`` for the root)."""
    return [uncompiled_name(name) for name, m in model.named_modules() if _is_wrapper(m)]
