"""Guards pyproject.toml against dead weight: every runtime dependency is imported by `gateway/`, and every
package `gateway/` imports from outside the standard library is declared (trio's test_exports, in spirit).

The distribution -> module map comes from the installed metadata (`packages_distributions`), so a
dependency whose import name differs from its distribution name (protobuf -> google.protobuf,
ai-edge-litert -> ai_edge_litert) is matched without a hand-kept table.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "gateway"


# tensorflow-cpu installs the `tensorflow` module; the test venv has no TensorFlow, so map it by name
NOT_INSTALLED_DISTS = {"tensorflow": {"tensorflow-cpu", "tensorflow"}}


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _declared(spec: Iterable[str]) -> set[str]:
    """Distribution names of PEP 508 requirement strings, normalised."""
    return {_norm(re.split(r"[\s<>=!~;\[(]", s.strip(), maxsplit=1)[0]) for s in spec}


def _top_level_imports(paths: Iterable[Path], *, module_level_only: bool = False) -> set[str]:
    """Top-level package names imported anywhere in the files (or only by their module-level statements)."""
    names: set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in (tree.body if module_level_only else ast.walk(tree)):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def _imported_dists(modules: Iterable[str], dist_map: Mapping[str, list[str]]) -> set[str]:
    return {_norm(d) for m in modules for d in dist_map.get(m, ())}


def unused(declared: set[str], imported: set[str]) -> set[str]:
    return declared - imported


def undeclared(modules: Iterable[str], dist_map: Mapping[str, list[str]], declared: set[str]) -> set[str]:
    """Third-party top-level modules imported but provided by no declared distribution."""
    out = set()
    for m in modules:
        if m in sys.stdlib_module_names or m == "gateway":
            continue
        # a module that is not installed here (an optional extra's) is matched by its known distributions
        dists = {_norm(d) for d in dist_map.get(m, ())} or NOT_INSTALLED_DISTS.get(m, set())
        if not dists & declared:
            out.add(m)
    return out


def _project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def _runtime() -> set[str]:
    return _declared(_project()["dependencies"])  # type: ignore[arg-type]


def test_every_runtime_dependency_is_imported_by_gateway() -> None:
    imported = _imported_dists(_top_level_imports(PKG.rglob("*.py")), packages_distributions())
    dead = unused(_runtime(), imported)
    assert not dead, f"declared in pyproject.toml but imported by nothing in gateway/: {sorted(dead)}"


# Extras gateway/ may use, each only inside the function that needs it (an install without them runs).
OPTIONAL = ("plot", "train")


def _optional() -> set[str]:
    extras = _project()["optional-dependencies"]
    return set().union(*(_declared(extras[name]) for name in OPTIONAL))  # type: ignore[index]


def test_gateway_imports_only_declared_packages() -> None:
    missing = undeclared(_top_level_imports(PKG.rglob("*.py")), packages_distributions(),
                         _runtime() | _optional())
    assert not missing, f"gateway/ imports {sorted(missing)}, which no runtime or optional extra provides"


def test_gateway_imports_optional_extras_only_where_used() -> None:
    """A module-level import of an extra would break every install without it."""
    dist_map = packages_distributions()
    at_load = _top_level_imports(PKG.rglob("*.py"), module_level_only=True)
    missing = undeclared(at_load, dist_map, _runtime())
    assert not missing, f"gateway/ imports {sorted(missing)} at module level; only runtime dependencies can"


def test_the_guard_catches_a_planted_unused_dependency() -> None:
    """The check above can fail: a planted dependency nothing imports is reported, a used one is not."""
    dist_map = packages_distributions()
    imported = _imported_dists(_top_level_imports(PKG.rglob("*.py")), dist_map)
    planted = _runtime() | {"aiomqtt"}  # declared until nothing imported it
    assert unused(planted, imported) == {"aiomqtt"}
    assert undeclared({"numpy", "json", "not_a_declared_module"}, dist_map, _runtime()) == {
        "not_a_declared_module"}


def test_train_extra_is_imported_by_the_training_script() -> None:
    extra = _declared(_project()["optional-dependencies"]["train"])  # type: ignore[index]
    used = _top_level_imports((ROOT / "edge_models").rglob("*.py"))
    # tensorflow-cpu installs the `tensorflow` module; it is not installed in the test venv, so map by name.
    names = {"tensorflow-cpu": "tensorflow", "numpy": "numpy"}
    used |= _top_level_imports(PKG.rglob("*.py"))  # sgw model train (gateway/inference/keras_models.py)
    dead = {d for d in extra if names.get(d, d.replace("-", "_")) not in used}
    assert not dead, f"[train] extra declares {sorted(dead)} that edge_models/ and gateway/ never import"
