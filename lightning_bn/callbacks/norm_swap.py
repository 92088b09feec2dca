"""NormSwap: put a normalization kind into any LightningModule at ``setup``, without rewriting the model."""

from __future__ import annotations

import importlib
import os
import pickle
import re
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_bn.layers import check_options, normalize_kind
from lightning_bn.swap import SwapReport, format_report, insert_norms, swap_norms

__all__ = ["NormSwap"]


# Beyond tensors and plain Python values, which `weights_only` loading accepts, a checkpoint that a Trainer writes
# with this package's callbacks holds at most Lightning's AttributeDict of hyper-parameters (our callbacks' states are
# plain values: classes in `include`/`exclude` are saved as "class:<import path>" strings). torch's weights-only
# unpickler fills no dict subclass, so an AttributeDict is read as a plain dict with the same items, under each import
# path it has had: lightning and the standalone lightning_fabric and pytorch_lightning packages.
_CHECKPOINT_GLOBALS: list[tuple[type, str]] = [
    (dict, f"{module}.AttributeDict")
    for module in (
        "lightning.fabric.utilities.data",
        "lightning.pytorch.utilities.parsing",
        "lightning_fabric.utilities.data",
        "pytorch_lightning.utilities.parsing",
    )
]


def _load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file on the CPU with ``torch.load(weights_only=True)``, allowing only ``_CHECKPOINT_GLOBALS``.

    Nothing in the file is run: a pickled object of any other class or a function is refused.

    Raises:
        pickle.UnpicklingError: the file holds such an object; the message names the file, the refused globals and
            how to load a file one trusts.
    """
    # Scoped, not `add_safe_globals`: other loads in the process are not affected. Globals already allowed are left
    # out, so that leaving the block (which removes what it added) does not take them back from the caller.
    allowed = set(torch.serialization.get_safe_globals())
    with torch.serialization.safe_globals([g for g in _CHECKPOINT_GLOBALS if g not in allowed]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            refused = _refused_globals(path, err)
            held = f"the global(s) {', '.join(refused)}" if refused else "an object"
            example = ", ".join(name.rpartition(".")[2] for name in refused) or "MyClass"
            raise pickle.UnpicklingError(
                f"NormSwap refuses to load {os.fspath(path)!r}: it holds {held}, which loading with "
                "`weights_only=True` does not unpickle (unpickling can run any code). A checkpoint written by a "
                "Trainer with lightning-bn's callbacks holds only tensors, plain values and Lightning's AttributeDict. "
                "If you trust the file, allow what it needs for this call: `with torch.serialization.safe_globals("
                f"[{example}]): NormSwap.load_model(...)`, or load the dict yourself (`torch.load` with `weights_only` "
                "set to False) and pass it as `checkpoint`."
            ) from err


def _refused_globals(path: str | Path, err: Exception) -> list[str]:
    """Every global in ``path`` that is not allowed (all of them, where torch can list them; else the one it named)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint: torch's message names the first one
        return re.findall(r"GLOBAL ([\w.]+)", str(err))[:1]


def _selected_norms(model: nn.Module, include: Any, exclude: Any, skip: set[int]) -> list[str]:
    """Names of the normalization layers of ``model`` that ``include``/``exclude`` select, other than the modules
    in ``skip`` (ids)."""
    from lightning_bn.swap import _all_names, _check_selector, _matches
    from lightning_bn.taxonomy import describe_norm

    include_l, exclude_l = _check_selector("include", include), _check_selector("exclude", exclude)
    names = _all_names(model)
    chosen: list[str] = []
    for module in model.modules():
        if id(module) in skip or describe_norm(module) is None:
            continue
        module_names = names[id(module)]
        wanted = not include_l or any(_matches(i, module_names, module) for i in include_l)
        if wanted and not any(_matches(i, module_names, module) for i in exclude_l):
            chosen.append(module_names[0] or "<root>")
    return chosen


def _selector_to_state(selector: Any) -> Any:
    """Classes become their import path so the settings can live in a checkpoint."""
    if selector is None or isinstance(selector, str):
        return selector
    if isinstance(selector, type):
        return f"class:{selector.__module__}.{selector.__qualname__}"
    return [_selector_to_state(s) for s in selector]


def _selector_from_state(state: Any) -> Any:
    if state is None:
        return None
    if isinstance(state, str):
        if state.startswith("class:"):
            module, _, name = state[len("class:"):].rpartition(".")
            return getattr(importlib.import_module(module), name)
        return state
    return [_selector_from_state(s) for s in state]


class NormSwap(Callback):
    """Swap (or insert) normalization layers of the LightningModule when the Trainer sets up.

    Runs at ``setup`` for every stage, before optimizers exist, before the strategy wraps the model (DDP, FSDP) and
    before a checkpoint is restored, so ``trainer.fit(ckpt_path=...)``, ``validate``, ``test`` and ``predict`` all
    see the swapped model and the optimizer holds the new parameters. A module is swapped once per callback, however
    many stages run. Rank zero prints a table of what changed (and of the layers left as they were). The settings
    are saved in the checkpoint; :meth:`load_model` and :meth:`apply_from_checkpoint` rebuild a swapped model
    outside the Trainer.

    Layers built in ``LightningModule.configure_model`` are swapped too. Lightning calls that hook after every
    callback's ``setup`` and documents it as idempotent (it runs once per stage), so ``NormSwap.setup`` calls it
    first, in the contexts Lightning calls it in (``trainer.strategy.tensor_init_context()``,
    ``model_sharded_context()`` and the precision's ``module_init_context()``), swaps, and calls it once more to
    check that it keeps what exists: a ``configure_model`` that rebuilds its layers on every call would undo the
    swap, so ``setup`` raises instead, saying to make it idempotent or to call :func:`lightning_bn.swap_norms` at
    its end. Layers already sharded by ``fully_shard`` in ``configure_model`` (DTensor parameters) are refused: swap
    before sharding.

    Under ``ModelParallelStrategy`` (FSDP2), whose ``configure_model`` calls ``fully_shard``, ``setup`` swaps the
    layers that exist first (those built in ``__init__``), then calls ``configure_model``, which shards the new
    layers; layers that ``configure_model`` builds itself are sharded by it before anything can swap them, so
    ``setup`` raises, naming them: build them in ``__init__``, or call :func:`lightning_bn.swap_norms` in
    ``configure_model`` before ``fully_shard``.

    Args:
        to: the target kind, one of :func:`lightning_bn.available_norms` (``"group"``, ``"layer"``, ``"none"`` ...).
        include: module-name globs (``"model.layer2.*"``) or classes; only these layers change (default: all).
        exclude: module-name globs or classes left alone.
        insert: instead of swapping existing norms, insert a norm of kind ``to`` after every conv and linear layer
            (for models with none; see :func:`lightning_bn.insert_norms`).
        options: options of the target kind, e.g. ``{"num_groups": 8}`` (also accepted as keyword arguments).
        verbose: print the table of changes on rank zero.

    Raises:
        ValueError: an unknown kind (the message lists the kinds) or options the kind does not take; at setup, a
            layer whose parameters are DTensors (sharded already: swap before ``fully_shard``), or under
            ``ModelParallelStrategy`` a selected norm that ``configure_model`` builds (and shards).
        MisconfigurationException: at setup, a ``configure_model`` that replaces the swapped layers when called
            again (not idempotent).
        pickle.UnpicklingError: from :meth:`load_model` and :meth:`apply_from_checkpoint`, a checkpoint file that
            holds a pickled object other than tensors, plain values and Lightning's ``AttributeDict`` (files are read
            with ``torch.load(weights_only=True)``, so nothing in them runs); the message names the file, what it
            holds and how to load a file one trusts.

    Example::

        import lightning as L
        from lightning_bn.callbacks import NormSwap
        from examples.cnn import CNN, DigitsDataModule

        trainer = L.Trainer(max_epochs=1, callbacks=[NormSwap(to="group", num_groups=8)])
        trainer.fit(CNN(norm="batch"), DigitsDataModule())
    """

    def __init__(
        self,
        to: str = "batch",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        insert: bool = False,
        options: dict[str, Any] | None = None,
        verbose: bool = True,
        **kwargs: Any,
    ) -> None:
        self.to = normalize_kind(to)
        self.options = {**(options or {}), **kwargs}
        check_options(self.to, self.options)
        for arg, sel in (("include", include), ("exclude", exclude)):
            items = [] if sel is None else [sel] if isinstance(sel, (str, type)) else list(sel)
            if not all(isinstance(i, (str, type)) for i in items):
                raise TypeError(f"`{arg}` takes module-name globs (str) or classes, got {sel!r}")
        if not isinstance(insert, bool):
            raise TypeError(f"`insert` must be a bool, got {insert!r}")
        self.include, self.exclude, self.insert, self.verbose = include, exclude, insert, verbose
        self.last_report: SwapReport | None = None
        self._done: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            to=self.to, include=_selector_to_state(self.include), exclude=_selector_to_state(self.exclude),
            insert=self.insert,
        )

    def apply(self, model: nn.Module) -> SwapReport:
        """Swap (or insert) in ``model`` now, outside a Trainer. Returns the report of what changed."""
        if self.insert:
            return insert_norms(model, self.to, include=self.include, exclude=self.exclude, **self.options)
        return swap_norms(model, self.to, include=self.include, exclude=self.exclude, **self.options)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        builds = is_overridden("configure_model", pl_module, parent=pl.LightningModule)
        from lightning.pytorch.strategies import ModelParallelStrategy

        if builds and isinstance(trainer.strategy, ModelParallelStrategy):
            self._setup_sharded(trainer, pl_module)
            return
        if builds:
            self._configure_model(trainer, pl_module)
        first = pl_module not in self._done
        if first:
            self._apply_once(pl_module)
        if builds and self.last_report:
            if first:
                self._configure_model(trainer, pl_module)  # as Lightning will next: it must keep what exists
            self._check_kept(pl_module, self.last_report)

    def _apply_once(self, pl_module: pl.LightningModule) -> None:
        """Swap (or insert) in ``pl_module``, remember it and its report, and print the report when verbose."""
        report = self.apply(pl_module)
        self._done.add(pl_module)
        self.last_report = report
        if self.verbose:
            action = "inserted" if self.insert else "swapped"
            rank_zero_info(f"NormSwap({self.to!r}) {action} {len(report)} layer(s)\n{format_report(report)}")

    def _setup_sharded(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under ``ModelParallelStrategy``, whose ``configure_model`` shards (``fully_shard``): swap the layers that
        exist first, so that sharding shards the new ones; then refuse layers that ``configure_model`` built and
        sharded itself (a sharded layer cannot be swapped)."""
        if pl_module in self._done:
            if self.last_report:
                self._check_kept(pl_module, self.last_report)
            return
        self._apply_once(pl_module)
        existing = {id(m) for m in pl_module.modules()}  # the swapped layers included
        self._configure_model(trainer, pl_module)  # as Lightning will next (it is idempotent)
        built = _selected_norms(pl_module, self.include, self.exclude, skip=existing)
        if built:
            raise ValueError(
                f"NormSwap({self.to!r}) cannot swap the normalization layer(s) {', '.join(built[:5])}"
                f"{', ...' if len(built) > 5 else ''} of {type(pl_module).__name__}: configure_model builds them, and "
                "under ModelParallelStrategy it also shards them (fully_shard), and a sharded layer (DTensor "
                "parameters) cannot be swapped. Build them in __init__ (NormSwap swaps before configure_model), or "
                f"call `lightning_bn.swap_norms(module, {self.to!r})` in configure_model before fully_shard."
            )
        if self.last_report:
            self._check_kept(pl_module, self.last_report)

    @staticmethod
    def _configure_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Call ``configure_model`` as Lightning does after the callbacks' setup (same contexts; it is idempotent)."""
        with (
            trainer.strategy.tensor_init_context(),
            trainer.strategy.model_sharded_context(),
            trainer.precision_plugin.module_init_context(),
        ):
            pl_module.configure_model()

    def _check_kept(self, pl_module: pl.LightningModule, report: SwapReport) -> None:
        present = {id(m) for m in pl_module.modules()}
        lost = [r.name for r in report if id(r.new) not in present]
        if lost:
            raise MisconfigurationException(
                f"NormSwap({self.to!r}) changed {len(report)} layer(s) of {type(pl_module).__name__}, but calling "
                f"its configure_model again replaced {len(lost)} of them ({', '.join(lost[:5])}"
                f"{', ...' if len(lost) > 5 else ''}): Lightning calls configure_model once per stage and documents "
                "it as idempotent. Make it return early when the layers exist (`if self.model is not None: "
                f"return`), or drop NormSwap and call `lightning_bn.swap_norms(self, {self.to!r})` at the end of "
                "configure_model."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "to": self.to,
            "include": _selector_to_state(self.include),
            "exclude": _selector_to_state(self.exclude),
            "insert": self.insert,
            "options": dict(self.options),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("to"), state_dict.get("options", {}), state_dict.get("insert", False))
        if saved != (self.to, self.options, self.insert):
            rank_zero_warn(
                f"NormSwap settings in the checkpoint {saved} differ from this callback's "
                f"{(self.to, self.options, self.insert)}; the model was built with this callback's settings."
            )

    @classmethod
    def from_state(cls, state: dict[str, Any], verbose: bool = False) -> NormSwap:
        """A callback with the settings saved by :meth:`state_dict`."""
        return cls(
            to=state["to"], include=_selector_from_state(state.get("include")),
            exclude=_selector_from_state(state.get("exclude")), insert=state.get("insert", False),
            options=state.get("options", {}), verbose=verbose,
        )

    @staticmethod
    def _read_checkpoint(checkpoint: str | Path | dict[str, Any]) -> dict[str, Any]:
        if isinstance(checkpoint, dict):
            return checkpoint
        return _load_checkpoint_file(checkpoint)

    @classmethod
    def apply_from_checkpoint(cls, model: nn.Module, checkpoint: str | Path | dict[str, Any]) -> list[SwapReport]:
        """Apply every NormSwap recorded in ``checkpoint`` to ``model`` (built as before the swap), in order.

        Then ``model.load_state_dict(checkpoint["state_dict"])`` loads the trained weights. A path is read with
        ``torch.load(weights_only=True)`` (see the class's Raises); a dict is used as it is.
        """
        ckpt = cls._read_checkpoint(checkpoint)
        states = [s for k, s in ckpt.get("callbacks", {}).items() if k.startswith(cls.__qualname__ + "{")]
        if not states:
            raise ValueError("`checkpoint` holds no NormSwap settings (was the model trained with NormSwap?)")
        return [cls.from_state(s).apply(model) for s in states]

    @classmethod
    def load_model(
        cls, module_cls: type[pl.LightningModule], checkpoint: str | Path | dict[str, Any], **kwargs: Any
    ) -> pl.LightningModule:
        """Rebuild a swapped LightningModule from a checkpoint outside the Trainer.

        Builds ``module_cls(**hyper_parameters, **kwargs)``, applies the recorded swaps and loads the weights. A path
        is read with ``torch.load(weights_only=True)`` (see the class's Raises); a dict is used as it is.
        """
        ckpt = cls._read_checkpoint(checkpoint)
        model = module_cls(**{**ckpt.get("hyper_parameters", {}), **kwargs})
        cls.apply_from_checkpoint(model, ckpt)
        model.load_state_dict(ckpt["state_dict"])
        return model
