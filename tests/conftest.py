"""Project-wide pytest set-up: the ``cuda`` marker (tests that need a CUDA device, see tests/test_cuda.py)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (run with `-m cuda`; skipped without one)")
