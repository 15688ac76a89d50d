"""Where the gateway's shared state lives: the store interface (base.py) and its two implementations.

SQLite (sqlite.py) is the default: one file beside the CA, no setup, every instance on one host. PostgreSQL
(postgres.py) is chosen by `[store] url = "postgresql://..."` so instances on several hosts share one
registry, one set of replay windows and one table of pending results. The registry and the result store
are written once against `Database`; only connection handling, transactions and locking differ.
"""
