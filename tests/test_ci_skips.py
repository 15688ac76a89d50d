"""With CI set, a skip for a missing system tool is a failure (tests/conftest.py); other skips stand.

Runs a real pytest in a child on a scratch test file, with this suite's conftest loaded as a plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRATCH = """
import pytest

needs_mosquitto = pytest.mark.skipif(True, reason="mosquitto not installed")


@needs_mosquitto
def test_tool_marker():
    pass


def test_tool_skip_in_body():
    pytest.skip("systemd-analyze missing")


@pytest.mark.skipif(True, reason="this machine has an NPU device node")
def test_other_skip():
    pass


def test_passes():
    pass
"""


def _run(tmp_path: Path, ci: str | None) -> str:
    (tmp_path / "test_scratch.py").write_text(SCRATCH)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if ci is not None:
        env["CI"] = ci
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-rA", "-q",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_scratch.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    return res.stdout + res.stderr


@pytest.mark.parametrize("ci", [None, ""])
def test_without_ci_a_missing_tool_is_a_skip(tmp_path: Path, ci: str | None) -> None:
    out = _run(tmp_path, ci)
    assert "1 passed, 3 skipped" in out, out


def test_with_ci_a_missing_tool_fails(tmp_path: Path) -> None:
    out = _run(tmp_path, "true")
    # a skipif marker fails at setup (an error), a skip in the body fails the call
    assert "1 failed, 1 passed, 1 skipped, 1 error" in out, out
    assert "ERROR test_scratch.py::test_tool_marker" in out, out
    assert "FAILED test_scratch.py::test_tool_skip_in_body" in out, out
    assert "SKIPPED [1] test_scratch.py" in out and "NPU" in out, out
    assert "broken install" in out, out
