"""Guards the layering in docs/ARCHITECTURE.md: the pure core does no IO, and dependencies point inward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "gateway"

PURE = ["core", "sim"]
FORBIDDEN_IN_PURE = {
    "asyncio", "socket", "paho", "aiomqtt", "sqlite3", "subprocess", "threading",
    "selectors", "ssl", "http", "urllib", "os", "pathlib", "shutil", "tempfile", "time", "io",
}
INNER = ["core", "sim", "registry", "store", "pki", "inference", "common"]
OUTER = {"gateway.cli", "gateway.agent", "gateway.server", "gateway.demo"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


@pytest.mark.parametrize("sub", PURE)
def test_pure_core_does_no_io(sub: str) -> None:
    files = _modules(sub)
    assert files, f"gateway/{sub} has no modules"
    for path in files:
        bad = {name for name in _imports(path) if name.split(".")[0] in FORBIDDEN_IN_PURE}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; the pure core takes bytes and now"
        text = path.read_text()
        assert "open(" not in text.replace(".open(", "").replace("def open(", ""), (
            f"{path.relative_to(ROOT)} calls open(): files live at the edges"
        )


@pytest.mark.parametrize("sub", INNER)
def test_dependencies_point_inward(sub: str) -> None:
    for path in _modules(sub):
        bad = {n for n in _imports(path) if any(n == o or n.startswith(o + ".") for o in OUTER)}
        assert not bad, f"{path.relative_to(ROOT)} imports outer layer {sorted(bad)}"


def test_pure_core_imports_cleanly_without_io_modules() -> None:
    """Importing the core must not pull asyncio, paho or sockets into the process (checked in a child)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import gateway.core.session, gateway.core.replay, gateway.core.batcher, gateway.core.pipeline\n"
        "import gateway.core.downlink, gateway.core.ranges, gateway.core.topics\n"
        "import gateway.sim.generator\n"
        "bad = [m for m in ('asyncio', 'paho', 'aiomqtt', 'sqlite3') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"the pure core pulled in {out.stdout.strip()}"


# The batch path is type-checked whole (issue 20): no `type: ignore` in the core or the MQTT shell, so a
# change to an event's or an item's shape fails mypy where it is used, not in production.
CHECKED_WHOLE = [*sorted((PKG / "core").rglob("*.py")), PKG / "server" / "shell.py"]


@pytest.mark.parametrize("path", CHECKED_WHOLE, ids=lambda p: str(p.relative_to(PKG)))
def test_no_type_ignore_in_the_core_or_the_shell(path: Path) -> None:
    lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if "type: ignore" in line]
    assert not lines, f"{path.relative_to(ROOT)} lines {lines}: narrow the type instead of silencing mypy"


def test_sqlite_transactions_have_one_home() -> None:
    """BEGIN / COMMIT / ROLLBACK are written once, in gateway/store/sqlite.py's `transaction` (issue 20):
    the registry, the gateway's store and the agent's outbox all go through it."""
    home = PKG / "store" / "sqlite.py"
    spelled = [f"{p.relative_to(ROOT)}:{n}" for p in sorted(PKG.rglob("*.py")) if p != home
               for n, line in enumerate(p.read_text().splitlines(), 1)
               if any(f'"{w}' in line or f"'{w}" in line for w in ("BEGIN", "COMMIT", "ROLLBACK"))]
    assert not spelled, f"transactions written by hand: {spelled}"
