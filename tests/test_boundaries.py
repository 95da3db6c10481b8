"""The pure core stays free of I/O frameworks (STYLE.md: a pure core, a thin shell)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"faust", "aiokafka", "kafka", "aiohttp", "prometheus_client", "mode", "streams", "httpx", "requests"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    "path", sorted(p for pkg in ("models", "detectors") for p in (ROOT / pkg).rglob("*.py")), ids=str
)
def test_core_imports_no_io_framework(path: Path) -> None:
    assert not (_imports(path) & FORBIDDEN), f"{path} imports {_imports(path) & FORBIDDEN}"


def test_detectors_do_not_touch_hnswlib_outside_index() -> None:
    users = [p.name for p in (ROOT / "detectors").rglob("*.py") if "hnswlib" in _imports(p)]
    assert users == ["index.py"]


def test_sentence_transformers_only_in_text_module() -> None:
    users = [
        p.name
        for pkg in ("models", "detectors", "streams")
        for p in (ROOT / pkg).rglob("*.py")
        if "sentence_transformers" in _imports(p)
    ]
    assert users == ["text.py"]
