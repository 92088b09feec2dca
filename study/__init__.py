"""The normalization study: published batch-norm findings, measured with the package's own callbacks.

    python -m study                 # the full study (the committed docs/study.md)
    python -m study --quick         # CI-sized: every part, one seed, small grids (about a minute)
    python -m study --out DIR       # where the report and its PNGs go (default: docs)

Run it from the repository root: it trains the examples in ``examples/``. Five parts, each a sweep over seeds with a
Markdown table and a matplotlib figure: learning rate and speed (Ioffe & Szegedy, 2015), batch size (Wu & He, 2018),
moving-average vs population statistics (Wu & Johnson, 2021), the loss landscape with
:class:`lightning_bn.callbacks.LossLandscapeProbe` (Santurkar et al., 2018), and transformers (Shen et al., 2020).
"""

from study._config import SIZES, StudyConfig
from study._report import main, run_study

__all__ = ["SIZES", "StudyConfig", "main", "run_study"]
