"""Editing sgw's TOML files in place (agent.toml, gateway.toml), through tomlkit, the one way sgw changes
TOML text: a change rewrites only its own value, so the operator's comments, order and other edits stay.
(Whole files are rendered from the templates in gateway/pki/templates.py; config is read with tomllib.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import Item, Table

Changes = Mapping[str, Mapping[str, Any]]


def _item(value: Any) -> Any:
    """Tables inside values stay inline (`faults = [{ at_s = 1.0, ... }]`), as the templates write them,
    rather than becoming `[[section.key]]` blocks."""
    if isinstance(value, Mapping):
        table = tomlkit.inline_table()
        table.update({k: _item(v) for k, v in value.items()})
        return table
    if isinstance(value, list | tuple):
        array = tomlkit.array()
        array.extend(_item(v) for v in value)
        return array
    return value


def _set(table: Table, key: str, value: Any) -> None:
    if key in table:
        table[key] = _item(value)  # keeps the line's indent and its trailing comment
        return
    # New keys go right after the table's last key, not after the blank lines and comments that end it
    # (those introduce the next section).
    body = table.value.body
    last = max((i for i, (k, _) in enumerate(body) if k is not None), default=-1)
    if last + 1 < len(body):
        table.value._insert_at(last + 1, key, _item(value))
    else:
        table.add(key, _item(value))


def set_keys(text: str, changes: Changes) -> str:
    """`text` with each `[section] key` set to its value: in place where it exists, else after the section's
    last key; a section the text lacks is added at the end. ValueError for text that is not TOML or a
    section that is not a table."""
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise ValueError(f"not TOML: {exc}") from None
    for section, values in changes.items():
        if section not in doc:
            if doc.body:
                doc.add(tomlkit.nl())
            doc.add(section, tomlkit.table())
        table = doc[section]
        if not isinstance(table, Table):
            raise ValueError(f"[{section}] is not a table")  # noqa: TRY004 - the file is wrong, not the call
        for key, v in values.items():
            _set(table, key, v)
    return tomlkit.dumps(doc)


def get(text: str, section: str, key: str) -> Any:
    """The value of `[section] key`, or None when the text is not TOML or has no such key."""
    try:
        table = tomlkit.parse(text).get(section)
    except TOMLKitError:
        return None
    found = table.get(key) if isinstance(table, Table) else None
    return found.unwrap() if isinstance(found, Item) else found


def edit_file(path: Path, changes: Changes) -> None:
    path.write_text(set_keys(path.read_text(), changes))


def dumps(doc: Changes) -> str:
    """A whole file from sections of values (inline tables inside values, as `set_keys` writes them)."""
    return set_keys("", doc)


def value(v: Any) -> str:
    """One value as TOML text (`[{ at_s = 1.0, fault = "bearing" }]`)."""
    return str(tomlkit.item(_item(v)).as_string())
