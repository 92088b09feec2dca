"""Lightning plugins."""

from lightning_bn.plugins.sync_norm import SyncNormPlugin

__all__: list[str] = ["SyncNormPlugin"]
