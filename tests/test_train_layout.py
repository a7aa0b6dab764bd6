"""lrem.train's layout: one loop (`loop.py`), one home for pairs and batches (`pairs.py`), no
module leaning on another's private names, and modules small enough to read."""
from __future__ import annotations

import ast
import doctest
from pathlib import Path

import lrem.train

TRAIN = Path(lrem.train.__file__).parent


def test_pairs_doctests():
    import lrem.train.pairs

    result = doctest.testmod(lrem.train.pairs)
    assert result.attempted > 0 and result.failed == 0


def test_no_module_imports_private_names_of_another():
    # `from .sft import _pad` made sft.py a utilities module; shared code gets a public name in its home
    found = [f"{path.name}: from {node.module} import {alias.name}"
             for path in sorted(TRAIN.glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.ImportFrom) and node.module and node.level
             for alias in node.names if alias.name.startswith("_")]
    assert not found, found


def test_modules_stay_under_450_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in TRAIN.glob("*.py")}
    assert max(sizes.values()) <= 450, sizes
