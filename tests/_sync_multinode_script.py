"""One node of the two-node test in tests/test_sync_plugin.py (launched by torchrun, one process per node).

    torchrun --nnodes 2 --nproc-per-node 1 --node_rank 0 --master_addr 127.0.0.1 --master_port P \
        tests/_sync_multinode_script.py OUT_DIR

Trains the CNN example a few steps with ``Trainer(num_nodes=2, devices=1, strategy="ddp")`` and
:class:`SyncNormPlugin`, then writes ``OUT_DIR/node<node_rank>.pt``: the world as Lightning saw it, the classes of
the norm layers during training and after, and every layer's running statistics, and destroys the process group
before the interpreter exits, as every script that trains with Lightning over gloo should.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

from examples.cnn import CNN, DigitsDataModule
from lightning_bn.layers import is_batch_norm
from lightning_bn.plugins import SyncNormPlugin


class _ClassesDuringTraining(L.Callback):
    def __init__(self) -> None:
        self.classes: dict[str, str] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            self.classes = _norm_classes(pl_module)


def _norm_classes(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if is_batch_norm(m)}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, workers=True)
    model = CNN(norm="batch", width=8)
    watcher = _ClassesDuringTraining()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", plugins=[SyncNormPlugin()], max_steps=2,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[watcher],
    )
    trainer.fit(model, DigitsDataModule(batch_size=16))
    stats = {
        name: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
        for name, m in model.named_modules()
        if is_batch_norm(m)
    }
    torch.save(
        {
            "node_rank": trainer.node_rank,
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "classes_during": watcher.classes,
            "classes_after": _norm_classes(model),
            "stats": stats,
        },
        Path(out_dir) / f"node{trainer.node_rank}.pt",
    )
    # Lightning leaves a gloo default group alive (it destroys only NCCL groups, at exit). Left to interpreter
    # shutdown, a gloo worker thread that drops the last reference to a finished collective decrefs a Python object
    # after finalization has begun: Python ends that thread inside a C++ destructor, and the process aborts with
    # "terminate called without an active exception". Destroying the group here joins those threads first.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
