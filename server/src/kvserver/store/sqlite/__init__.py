"""The durable store: one SQLite file, opened through sqlitedict.

Layout of the file:
- `kv`: sqlitedict's table (key TEXT PRIMARY KEY, value BLOB), values stored as raw bytes (never
  pickle), with the metadata columns this store adds. `SqliteDict(path, tablename="kv",
  decode=bytes)` can still read it.
- `kv_events`: the history, one row per revision, written in the same transaction as the change
  it records. Each row also keeps the key's previous state, which is what lets a listing read an
  older revision while writes go on.
- `kv_state`: the revision counters.

Writes are group-committed: the operations that arrive while a commit is in flight are applied
together in the next transaction, with one fsync, and each is acknowledged only after that
transaction is durable. All writes run on the writer connection's sqlitedict worker thread;
reads use a second connection (WAL readers never wait for the writer and see only committed
transactions). Neither connection is ever used from the event loop's thread: statements are
queued to the worker and their rows come back through a future.
"""

from kvserver.store.sqlite.store import SqliteStore, SyncMode

__all__ = ["SqliteStore", "SyncMode"]
