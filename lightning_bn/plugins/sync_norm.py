"""``SyncNormPlugin``: synchronized batch norm on any backend as a Lightning ``LayerSync`` plugin."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.plugins import LayerSync
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from typing_extensions import override

from lightning_bn.layers import CHANNELS_FIRST, BatchRenorm, GhostBatchNorm, SyncBatchNorm
from lightning_bn.swap import _sharded_tensors, replace_modules
from lightning_bn.taxonomy import _HOOK_DICTS, NormInfo, describe_norm, unrecognized_reason

__all__ = ["SyncNormPlugin"]

# Kinds that keep their own class and forward; the plugin switches their ``sync_stats`` on for the fit.
_FLAGGED: tuple[type[nn.Module], ...] = (BatchRenorm, GhostBatchNorm)
# Attributes the plugin sets on a flagged layer, and the attributes of a plain batch norm that training may change
# (a callback that changes momentum, ``model.eval()``) and that go back to the original layer at revert.
_SYNC_ATTRS = ("sync_stats", "sync_group")
_CARRIED_ATTRS = ("eps", "momentum", "track_running_stats", "training")
_MISSING = object()


def _plain_batch_norm(module: nn.Module, info: NormInfo | None) -> bool:
    """True when the taxonomy says ``module`` computes batch norm of its own ``weight`` and ``bias`` (then maybe an
    activation) with torch's buffers, so a :class:`SyncBatchNorm` can share them."""
    return (
        info is not None
        and info.kind in ("batch", "sync_batch")
        and isinstance(module, _BatchNorm)
        and not isinstance(module, _FLAGGED)  # the caller has passed over our SyncBatchNorm already
        and info.scale is module.weight
        and info.shift is module.bias
    )


class _SyncBatchNormThen(SyncBatchNorm):
    """Synchronized batch norm followed by the original layer's own activation modules (timm's ``BatchNormAct2d``:
    drop, act), registered under the same names, so ``state_dict`` keys stay those of the original."""

    post: tuple[str, ...] = ()

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)
        for name in self.post:
            out = self.get_submodule(name)(out)
        return out


def to_sync_batch_norm(
    module: _BatchNorm, process_group: Any = None, *, layout: str | None = None, post: tuple[str, ...] = ()
) -> SyncBatchNorm:
    """A :class:`SyncBatchNorm` that shares ``module``'s parameters, buffers and forward hooks (the same objects).

    Layout: ``layout``, else the module's ``layout`` attribute, else channels-first. ``post`` names child modules
    of ``module`` applied after normalizing (what the taxonomy calls :attr:`NormInfo.post`); they are shared too.
    """
    layout = layout or str(getattr(module, "layout", CHANNELS_FIRST))
    cls = _SyncBatchNormThen if post else SyncBatchNorm
    sync = cls(
        module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
        process_group=process_group, layout=layout, device="meta",
    )
    # The same Parameter and buffer objects: the optimizer, the checkpoint keys and any user reference stay valid.
    sync._parameters = dict(module._parameters)  # type: ignore[assignment]
    sync._buffers = dict(module._buffers)  # type: ignore[assignment]
    sync._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    if post:
        sync.__dict__["post"] = post  # a plain attribute, not through nn.Module's __setattr__
        for name in post:
            sync.add_module(name, module.get_submodule(name))
    for hooks in _HOOK_DICTS:
        if hasattr(module, hooks):
            setattr(sync, hooks, getattr(module, hooks))
    sync.train(module.training)
    return sync


def restore_from_sync(original: _BatchNorm, sync: SyncBatchNorm) -> _BatchNorm:
    """Put what training changed on ``sync`` back on ``original`` (the module :func:`to_sync_batch_norm` got).

    Parameters and buffers are taken by reference (a move to another device or dtype during the fit replaced
    buffer tensors, so the sync layer's are the current ones); eps, momentum, ``track_running_stats`` and the
    train/eval mode are copied.
    """
    for name in original._parameters:
        original._parameters[name] = sync._parameters[name]
    for name in original._buffers:
        original._buffers[name] = sync._buffers[name]
    for attr in _CARRIED_ATTRS:
        if attr == "training":
            original.train(sync.training)
        else:
            setattr(original, attr, getattr(sync, attr))
    return original


@dataclass
class _Record:
    """What :meth:`SyncNormPlugin.apply` changed in one place, so that :meth:`SyncNormPlugin.revert` can undo it."""

    original: nn.Module
    replacement: nn.Module | None = None  # the SyncBatchNorm put in its place; None for a flagged layer
    saved: dict[str, Any] = field(default_factory=dict)  # instance attributes of a flagged layer before apply


class SyncNormPlugin(LayerSync):
    """Synchronized batch norm for every batch-norm kind, on any backend, reverted exactly after fitting.

    When fitting starts (``strategy="ddp"``, ``"ddp_spawn"``, FSDP: every strategy that calls a ``LayerSync``),
    each layer the taxonomy (:func:`lightning_bn.describe_norm`) describes as plain batch norm of its own weight
    and bias (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, Lightning's ``_BatchNormXd``,
    :class:`~lightning_bn.layers.BatchNormNd`, :class:`~lightning_bn.layers.BatchNormChannelsLast`, a batch-norm
    subclass whose own forward the probe finds to be batch norm, timm's ``BatchNormAct2d``, whose activation
    still follows) is replaced by a :class:`~lightning_bn.layers.SyncBatchNorm` that shares its parameters,
    buffers, activation modules and forward hooks, and
    :class:`~lightning_bn.layers.BatchRenorm` and :class:`~lightning_bn.layers.GhostBatchNorm` keep their class
    with ``sync_stats`` switched on (synchronized batch statistics for batch renorm; virtual batches per process
    and running statistics averaged over every process's virtual batches for ghost batch norm). Layers that
    already synchronize (:class:`~lightning_bn.layers.SyncBatchNorm`, e.g. from ``NormSwap(to="sync_batch")``)
    are left as they are. Subclasses of batch norm with a forward of their own that the taxonomy does not recognize
    are left alone with a warning: what their forward does is unknown.

    Each step then costs one all-reduce of a ``(3, C)`` tensor per layer in the forward and one in the backward;
    outputs, gradients and running statistics are those of batch norm on the union of all processes' batches,
    so the running statistics are identical on every process.

    At teardown, :meth:`revert` puts every original module object back in its place (so its class is the
    original one: ``BatchNorm2d`` stays ``BatchNorm2d``), holding the very Parameter objects that were trained
    and the current buffers; ``eps``, ``momentum`` and the train/eval mode carry over, and the attributes set on
    batch renorm and ghost batch norm are removed (or restored to the values they had).

    Sharded training (Lightning's ``ModelParallelStrategy``, FSDP2): that strategy never calls a ``LayerSync``
    plugin, and no public hook reaches a plugin object, so ``plugins=[SyncNormPlugin()]`` there would do nothing and
    cannot even tell. Call :meth:`apply` yourself in ``configure_model``, before ``fully_shard`` (``apply`` refuses
    layers whose parameters are DTensors already)::

        def configure_model(self):
            if isinstance(self.net, FSDPModule):
                return  # idempotent
            SyncNormPlugin().apply(self.net)
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    FSDP2 shards parameters, not buffers: each process keeps whole running statistics, and with the layers
    synchronized they are identical on every process (and equal to those of the same run under DDP with the
    plugin). The conversion stays for the life of the model: after ``fully_shard`` the sharded parameters belong to
    the synchronized layers, so nothing reverts it.

    Raises:
        MisconfigurationException: from the ``Trainer`` when ``sync_batchnorm=True`` is also given (Lightning's
            message names ``SyncNormPlugin``); drop ``sync_batchnorm=True``: this plugin already synchronizes.
        ValueError: from :meth:`apply`, a batch-norm layer whose parameters are DTensors (sharded by ``fully_shard``
            already): apply before sharding.

    Example::

        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[SyncNormPlugin()])
        trainer.fit(model, datamodule)   # batch norm synchronized over gloo; model's layers restored after
    """

    def __init__(self) -> None:
        self._records: list[_Record] = []

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        """Replace or switch on every batch-norm layer of ``model`` (see the class docstring); returns ``model``."""
        if self._records:  # applied twice without revert: undo first so the originals are never lost
            model = self.revert(model)
        replacements: dict[int, _Record] = {}
        skipped: list[str] = []
        try:
            for name, module in list(model.named_modules(remove_duplicate=True)):
                if isinstance(module, _BatchNorm) and isinstance(module, LazyModuleMixin):
                    if module.has_uninitialized_params():  # type: ignore[misc]
                        skipped.append(f"{name} ({type(module).__qualname__}, not initialized yet)")
                        continue
                info = describe_norm(module)
                if info is None or not info.batch_stats or isinstance(module, SyncBatchNorm):
                    if info is None and isinstance(module, _BatchNorm) and unrecognized_reason(module) is not None:
                        skipped.append(f"{name} ({type(module).__qualname__})")
                    continue  # not a batch norm, or ours that synchronizes already
                sharded = _sharded_tensors(module)
                if sharded:
                    raise ValueError(
                        f"SyncNormPlugin cannot synchronize layer {name or '<root>'!r} ({type(module).__name__}): "
                        f"its {', '.join(sharded)} {'is a DTensor' if len(sharded) == 1 else 'are DTensors'}, already "
                        "sharded by fully_shard. Under ModelParallelStrategy call SyncNormPlugin().apply(module) in "
                        "configure_model before fully_shard."
                    )
                if isinstance(module, _FLAGGED) and info.kind in ("batch_renorm", "ghost_batch"):
                    saved = {a: module.__dict__.get(a, _MISSING) for a in _SYNC_ATTRS}
                    self._records.append(_Record(module, None, saved))
                    setattr(module, "sync_stats", True)  # noqa: B010 - instance attributes that shadow the class's
                    setattr(module, "sync_group", None)  # noqa: B010
                elif _plain_batch_norm(module, info):
                    sync = to_sync_batch_norm(module, layout=info.layout, post=info.post)  # type: ignore[arg-type]
                    record = _Record(module, sync)
                    replacements[id(module)] = record
                    self._records.append(record)
                else:
                    skipped.append(f"{name} ({type(module).__qualname__})")
            if id(model) in replacements:
                raise ValueError(
                    f"`model` is itself a batch-norm layer ({type(model).__name__}); SyncNormPlugin converts the "
                    "layers inside a LightningModule"
                )
            replace_modules(model, {k: r.replacement for k, r in replacements.items() if r.replacement is not None})
        except BaseException:
            self.revert(model)
            raise
        if skipped:
            rank_zero_warn(
                "SyncNormPlugin left these batch-norm layers unsynchronized (a class with a forward of its own, or a "
                f"lazy layer not initialized yet): {', '.join(skipped)}. Convert them to a known kind "
                "(lightning_bn.swap.swap_norms) or run a forward first."
            )
        return model

    @override
    def revert(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`apply`: the original layer objects back in their places, flags restored; returns ``model``."""
        back: dict[int, nn.Module] = {}
        for record in self._records:
            if record.replacement is None:
                for attr, value in record.saved.items():
                    if value is _MISSING:
                        record.original.__dict__.pop(attr, None)
                    else:
                        setattr(record.original, attr, value)
            else:
                assert isinstance(record.replacement, SyncBatchNorm)
                restore_from_sync(record.original, record.replacement)  # type: ignore[arg-type]
                back[id(record.replacement)] = record.original
        self._records = []
        replace_modules(model, back)
        return model

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into spawned processes before `apply`; the records belong to the process that applied.
        return {"_records": []}

