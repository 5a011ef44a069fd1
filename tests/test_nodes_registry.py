"""nodes/__init__.py: the node registry, without ComfyUI."""

from __future__ import annotations

import re
from pathlib import Path

from nodes import NODE_MODULES

NODES_DIR = Path(__file__).resolve().parents[1] / "nodes"


def test_every_module_with_nodes_is_registered():
    """A nodes/*.py that defines NODES but is missing from NODE_MODULES would silently not appear in ComfyUI."""
    with_nodes = sorted(p.stem for p in NODES_DIR.glob("*.py") if re.search(r"^NODES = ", p.read_text(), re.MULTILINE))
    assert sorted(NODE_MODULES) == with_nodes
    assert len(with_nodes) >= 4
