"""The store interface at the IO boundary (in the manner of httpcore's `_backends/base.py`).

`Database` is all the registry (gateway/registry/store.py) and the result store (gateway/server/store.py)
need from a database: statements with `?` placeholders, a write transaction, a read snapshot. The
implementations differ in how writers are kept apart, and that is the one thing callers must know:

- `row_locks` False (SQLite): `write()` takes the database-wide write lock up front (BEGIN IMMEDIATE), so a
  read-modify-write inside it can never interleave with another writer on any row.
- `row_locks` True (PostgreSQL): writers run concurrently (READ COMMITTED). A read-modify-write must lock
  the rows it reads (`SELECT ... FOR UPDATE`, in a consistent order) or a row standing for the whole
  table; callers do that where `row_locks` is set, and skip it where the database lock already holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from gateway.errors import LocalError, ProvisioningError

Params = Sequence[Any]
Row = tuple[Any, ...]

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


class StoreError(LocalError):
    """The store cannot be reached or used (connection refused, wrong schema, disk full)."""


class RetryableError(StoreError):
    """The database aborted the transaction to break a deadlock or a serialization conflict; nothing
    was written, and running the same transaction again may succeed."""


class ConflictError(ProvisioningError):
    """A write broke a uniqueness rule (a device id or a key that already exists)."""


class Database(ABC):
    kind: str
    where: str  # for messages: a file path, or a PostgreSQL address without its password
    row_locks: bool

    @abstractmethod
    def query(self, sql: str, params: Params = ()) -> list[Row]:
        """Run one statement and return every row (inside the open transaction, if there is one)."""

    def one(self, sql: str, params: Params = ()) -> Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @abstractmethod
    def run(self, sql: str, params: Params = ()) -> int:
        """Run one statement that returns no rows; returns how many rows it changed."""

    @abstractmethod
    def run_many(self, sql: str, rows: Iterable[Params]) -> None:
        """Run one statement once per parameter row."""

    @abstractmethod
    def write(self) -> AbstractContextManager[None]:
        """A write transaction: committed when the block ends, rolled back when it raises."""

    @abstractmethod
    def read(self) -> AbstractContextManager[None]:
        """A read-only transaction that sees one consistent snapshot for the whole block."""

    @property
    @abstractmethod
    def in_transaction(self) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...

    @property
    def for_update(self) -> str:
        """Suffix for a SELECT whose rows this transaction will write (empty where the lock is global)."""
        return " FOR UPDATE" if self.row_locks else ""


def chunks(items: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    """Slices small enough for one `IN (?, ...)` list (SQLite allows at most 32,766 parameters)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def marks(n: int) -> str:
    return ",".join("?" * n)


# Where a store is: a SQLite file's path, or a PostgreSQL URL (`[store] url`).
Location = Path | str

URL_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(where: object) -> bool:
    return isinstance(where, str) and where.startswith(URL_SCHEMES)
