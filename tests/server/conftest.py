"""Fixtures shared by the server's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_core.cli import main as fedsec


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A keygen development bundle of 3 clients on the random task; tests only read it."""
    root = tmp_path_factory.mktemp("random-bundle") / "d"
    assert fedsec(["keygen", "--out", str(root), "--clients", "3", "--task", "random"]) == 0
    return root
