"""docs/configuration.md is the config loaders' own schema, regenerated and compared."""

from __future__ import annotations

from pathlib import Path

from server.config_reference import render, traced_keys, undocumented

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_reference_is_current_and_describes_every_key() -> None:
    keys = traced_keys()
    assert undocumented(keys) == [], "add these to server.config_reference.DESCRIPTIONS"
    assert render(keys) == DOC.read_text(), (
        "docs/configuration.md is stale: python -m server.config_reference > docs/configuration.md"
    )
    # Keys read only when present (probed first) are optional, not required.
    text = DOC.read_text()
    assert "| `max_epsilon` | number |  | > 0 |" in text
    assert "| `client_ca` | path, must exist |  |" in text
