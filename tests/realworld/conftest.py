"""Real-world micropatches: the `realworld` marker, for `pytest -m realworld` (or `-m "not realworld"`)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "realworld: applies a real-world micropatch to a published package installed from PyPI "
        "into a temporary venv (skipped when the index is unreachable)",
    )
