"""Guards docs/ARCHITECTURE.md against dead or stale API (trio's test_exports, in spirit): every function,
method and class it documents exists in `gateway/` and is used by something outside tests.

What counts as documenting a name is how the file writes one:
- in a ```python block: `class Name` and `def name(` (indented under a class: that class's method);
- in the prose, in backticks: `Class.method` (with or without arguments), `function(...)` and
  `module.function(...)`. Bare lower-case words in backticks are config keys and metric labels, not
  functions, so they are not read as names.

"Used" is a reference by name (a call, an attribute read, a callback handed over) anywhere in
`gateway/`, `scripts/`, `benchmarks/` or `edge_models/`, other than the definition itself; a method
only as an attribute (`x.name`). A method is matched by name, not by type (another class's method of the
same name keeps it alive), so this can miss dead code but never flags live code.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
DEFINED_IN = (ROOT / "gateway",)
USED_IN = tuple(ROOT / d for d in ("gateway", "scripts", "benchmarks", "edge_models"))

_FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
_CLASS_LINE = re.compile(r"\bclass (\w+)")
_DEF_LINE = re.compile(r"^(\s*)def (\w+)\(")
_METHOD = re.compile(r"([A-Z]\w*)\.([A-Za-z_]\w*)(\(.*\))?")
_CALL = re.compile(r"(?:[a-z_]\w*\.)?([a-z_]\w*)\(.*\)")


@dataclass(frozen=True)
class Name:
    owner: str | None  # the class a method belongs to
    name: str

    def __str__(self) -> str:
        return f"{self.owner}.{self.name}" if self.owner else self.name


def documented(text: str) -> set[Name]:
    names: set[Name] = set()
    for lang, body in _FENCE.findall(text):
        if lang != "python":
            continue
        owner: str | None = None
        for line in body.splitlines():
            if (m := _CLASS_LINE.search(line)) and not line.startswith((" ", "\t")):
                owner = m.group(1)
                names.add(Name(None, owner))
            elif m := _DEF_LINE.match(line):
                indented = bool(m.group(1))
                if not indented:
                    owner = None
                names.add(Name(owner if indented else None, m.group(2)))
    prose = _FENCE.sub("", text)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if m := _METHOD.fullmatch(span):
            names.add(Name(m.group(1), m.group(2)))
        elif m := _CALL.fullmatch(span):
            names.add(Name(None, m.group(1)))
    return {n for n in names if not n.name.startswith("__")}


def _trees(roots: Iterable[Path]) -> Iterable[ast.AST]:
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            yield ast.parse(path.read_text(), filename=str(path))


def definitions(roots: Iterable[Path]) -> set[Name]:
    """Every class, function and method (as Name(class, method)); class-level assignments count as
    members too (enum values, dataclass fields)."""
    out: set[Name] = set()
    for tree in _trees(roots):
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                out.add(Name(None, node.name))
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                        out.add(Name(node.name, item.name))
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        out.add(Name(node.name, item.target.id))
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out.add(Name(None, node.name))
    return out


def references(roots: Iterable[Path]) -> tuple[set[str], set[str]]:
    """(bare names read, attribute names read): a method is only ever reached as an attribute."""
    bare: set[str] = set()
    attrs: set[str] = set()
    for tree in _trees(roots):
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                bare.add(node.id)
            elif isinstance(node, ast.Attribute):
                attrs.add(node.attr)
    return bare, attrs


def problems(doc: str, defined_in: Iterable[Path], used_in: Iterable[Path]) -> dict[str, str]:
    defined = definitions(defined_in)
    bare = {d.name for d in defined}
    used_bare, used_attrs = references(used_in)
    out: dict[str, str] = {}
    for name in sorted(documented(doc), key=str):
        exists = name in defined if name.owner else name.name in bare
        if not exists:
            out[str(name)] = "not defined in gateway/"
        elif name.name not in (used_attrs if name.owner else used_bare | used_attrs):
            out[str(name)] = "nothing outside tests uses it"
    return out


def test_every_documented_name_exists_and_is_used() -> None:
    found = problems(DOC.read_text(), DEFINED_IN, USED_IN)
    assert not found, f"docs/ARCHITECTURE.md documents dead or missing API: {found}"


def test_the_doc_is_read_as_it_names_things() -> None:
    """The parser sees the forms ARCHITECTURE.md uses, so the check above is not vacuous."""
    names = {str(n) for n in documented(DOC.read_text())}
    assert {"Opener.open", "Sealer.seal", "Registry.rotate_key", "Pipeline.feed", "Opener",
            "default_manifest_path", "Model.predict"} <= names


def test_the_guard_catches_a_planted_dead_documented_function(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "thing.py").write_text(
        "class Thing:\n"
        "    def used(self) -> None: ...\n"
        "    def dead(self) -> None: ...\n"
        "def helper() -> None: ...\n"
    )
    (pkg / "caller.py").write_text("from pkg.thing import Thing, helper\nThing().used()\nhelper()\n")
    doc = (
        "```python\nclass Thing:\n    def used(self) -> None\n    def dead(self) -> None\n```\n"
        "The helper `helper()` and `Thing.used`, the removed `gone(x)`; `queue_max` is a key.\n"
    )
    assert problems(doc, [pkg], [pkg]) == {"Thing.dead": "nothing outside tests uses it",
                                          "gone": "not defined in gateway/"}
    # a test calling it does not make it live: tests/ is not where callers are looked for
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_thing.py").write_text("from pkg.thing import Thing\nThing().dead()\n")
    assert "Thing.dead" in problems(doc, [pkg], [pkg])
    assert problems(doc, [pkg], [pkg, tmp_path / "tests"]).keys() == {"gone"}
