"""The opened LMDB environment of a database: opening checks, transactions, settings, pending records.

One LMDB environment per file and process is shared (refcounted) by every :class:`Environment` on it
(py-lmdb refuses a second). Every read opens one short read transaction (``with env.begin(buffers=True)``),
copies what it needs out of the zero-copy views, and closes it; transactions are never shared across
threads. After a fork the environment is reopened (``os.getpid()`` is checked).

Raw records written with ``db[key] = pickle`` wait in a second LMDB environment, ``DB/pending/``,
until preprocessing converts them; it is removed once empty. So the main file never fills with the
free pages the raw pickles leave behind, and nothing ever rewrites, replaces or truncates a file that
another process may have mapped (an idle app holds no LMDB reader slot, so "nobody is reading" cannot
be known). Whoever has ``pending/`` open holds a shared ``flock`` on ``DB/pending.lock``; it is removed
only under an exclusive one.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import lmdb

from app.database import analyses
from app.database.checksum import CorruptValueError, open_value, seal_value
from app.database.keys import CORE_TABLES, PENDING_DIR, PENDING_LOCK, SCHEMA_VERSION, UPGRADE_HINT
from app.database.records import DEFAULT_SPECIAL_TOKENS

__all__ = ["Environment", "DatabaseError", "sub_dbs", "open_lmdb", "pending_environment"]

MAP_SIZES = (1 << 40, 1 << 36, 1 << 32)  # sparse on Linux; smaller fall-backs for tight ulimits


def sub_dbs() -> tuple[bytes, ...]:
    """Every table a database opens: the core ones (meta first), then the registered analyses'."""
    return CORE_TABLES + tuple(table.encode() for table in analyses.tables())


class _SharedEnv:
    """One LMDB environment per file and process (py-lmdb refuses a second), shared by VliLmdb
    instances and closed when the last of them closes."""

    def __init__(self, env: lmdb.Environment, dbs: dict, read_only: bool):
        self.env, self.dbs, self.read_only, self.users = env, dbs, read_only, 1


_SHARED: dict[tuple[int, str], _SharedEnv] = {}
_SHARED_LOCK = threading.Lock()


@dataclass
class _OpenPending:
    """The pending environment while some VliLmdb of this process uses it (refcounted), with the
    shared flock that keeps other processes from removing it meanwhile."""

    env: lmdb.Environment
    lock_fd: int
    users: int = 1


_PENDING: dict[tuple[int, str], _OpenPending] = {}


def _after_fork_in_child() -> None:
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()  # a parent thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class DatabaseError(RuntimeError):
    """The path is not a usable VL-InterpreT database; the message says what to do."""


def open_lmdb(path: str, quoted: str, readonly: bool, max_dbs: int) -> lmdb.Environment:
    """lmdb.open with the largest map this process may reserve, and a check that the file is whole:
    reading a page past the end of a truncated file kills the process with SIGBUS."""
    lock = not (readonly and _lock_file_unwritable(path))
    if not lock:
        print(f"note: {quoted} is on a read-only filesystem (its lock file cannot be written): opened "
              f"without LMDB's lock, for browsing; do not write to it from elsewhere meanwhile", file=sys.stderr)
    for map_size in MAP_SIZES:
        try:
            env = lmdb.open(path, map_size=map_size, max_dbs=max_dbs, subdir=True, readonly=readonly,
                            lock=lock, max_readers=512)
            break
        except lmdb.MemoryError:
            continue
        except lmdb.Error as error:
            raise DatabaseError(f"{quoted} could not be opened as an LMDB database: {error}") from None
    else:
        raise DatabaseError(f"{quoted}: not enough address space to map the database")
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    if size < needed:
        env.close()
        raise DatabaseError(f"{quoted}: data.mdb is truncated ({size:,} bytes, but its last page ends at "
                            f"{needed:,}): it was cut short (a full disk or an interrupted copy); restore it "
                            f"from a backup")
    return env


@contextmanager
def pending_environment(db_dir: str, create: bool = False) -> Iterator[Optional[lmdb.Environment]]:
    """The pending environment ``db_dir/pending/`` for the duration of a ``with`` (None when there is
    none and ``create`` is false). It is open only while used, under a shared flock on
    ``db_dir/pending.lock``, so that another process can remove it once empty (module docstring)."""
    folder = os.path.join(db_dir, PENDING_DIR)
    key = (os.getpid(), os.path.realpath(folder))
    with _SHARED_LOCK:
        entry = _PENDING.get(key)
        if entry is not None:
            entry.users += 1
        elif create or os.path.isfile(os.path.join(folder, "data.mdb")):
            entry = _open_pending(db_dir, folder)
            _PENDING[key] = entry
    if entry is None:
        yield None
        return
    try:
        yield entry.env
    finally:
        with _SHARED_LOCK:
            entry.users -= 1
            if entry.users == 0:
                _PENDING.pop(key, None)
                entry.env.close()
                os.close(entry.lock_fd)  # releases the shared flock


def _open_pending(db_dir: str, folder: str) -> _OpenPending:
    writable = os.access(db_dir, os.W_OK)
    fd = os.open(os.path.join(db_dir, PENDING_LOCK), (os.O_RDWR | os.O_CREAT) if writable else os.O_RDONLY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while another process removes the folder
        if writable:
            os.makedirs(folder, exist_ok=True)
        env = open_lmdb(folder, repr(folder), readonly=not writable, max_dbs=0)
    except BaseException:
        os.close(fd)
        raise
    return _OpenPending(env=env, lock_fd=fd)


def _lock_file_unwritable(path: str) -> bool:
    """True when LMDB could not open (or create) the lock file for writing: a read-only filesystem or
    a folder the user may read but not write. LMDB's lock-free read-only mode is then the way in."""
    lock_path = os.path.join(path, "lock.mdb")
    try:
        fd = os.open(lock_path, os.O_RDWR | (0 if os.path.exists(lock_path) else os.O_CREAT), 0o644)
    except OSError:
        return True
    os.close(fd)
    return False


class Environment:
    """The database's environment and settings (the base of :class:`app.database.store.VliLmdb`, whose
    docstring gives the arguments)."""

    def __init__(self, db_dir: Union[str, os.PathLike], read_only: bool = True,
                 special_tokens: Optional[Sequence[str]] = None, cache_size: int = 256):
        self.path = os.fspath(db_dir)
        self.read_only = read_only
        self._requested_special = tuple(special_tokens) if special_tokens is not None else None
        self._cache: "OrderedDict[int, ExampleInfo]" = OrderedDict()  # reads.py: example()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._closed = False
        self._shared = self._open()
        self._env, self._dbs = self._shared.env, self._shared.dbs
        self._pid = os.getpid()
        self._meta_cache: dict[str, Any] = {}
        if read_only:
            self._check_preprocessed()
        self._check_special_tokens()


    # ----------------------------------------------------------------------------- opening
    def _open(self):
        path, quoted = self.path, repr(self.path)
        if self.read_only:
            if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "data.mdb")):
                raise DatabaseError(
                    f"{quoted} is not a VL-InterpreT database (no LMDB data.mdb): create one with "
                    f"`VliLmdb({quoted}, read_only=False)`, add records and run `.preprocess()` "
                    f"(see db_example.py)")
        elif os.path.exists(path) and not os.path.isdir(path):
            raise DatabaseError(f"{quoted} is a file, not a database folder: choose another path")
        elif (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "data.mdb"))
              and any(name != "lock.mdb" for name in os.listdir(path))):
            raise DatabaseError(f"{quoted} is a folder with other files and no database (no data.mdb): "
                                f"choose a new or empty folder for a new database")
        else:
            os.makedirs(path, exist_ok=True)
        key = (os.getpid(), os.path.realpath(path))
        with _SHARED_LOCK:
            shared = _SHARED.get(key)
            if shared is not None:  # LMDB allows one environment per file and process: share it
                if shared.read_only and not self.read_only:
                    raise DatabaseError(f"{quoted} is already open read-only in this process: close that "
                                        f"VliLmdb before opening it with read_only=False")
                shared.users += 1
                return shared
            shared = _SharedEnv(*self._open_env(path, quoted), read_only=self.read_only)
            _SHARED[key] = shared
            return shared

    def _open_env(self, path: str, quoted: str):
        tables = sub_dbs()
        env = open_lmdb(path, quoted, self.read_only, max_dbs=len(tables) + 4)
        try:
            try:
                meta = env.open_db(b"meta", create=False)
            except lmdb.NotFoundError:
                if self.read_only or env.stat()["entries"] > 0:
                    raise DatabaseError(
                        f"{quoted} is an LMDB database but not a VL-InterpreT one (it has no 'meta' "
                        f"table): choose an empty folder for a new database") from None
                meta = env.open_db(b"meta", create=True)
                with env.begin(write=True) as txn:
                    txn.put(b"schema_version", seal_value(json.dumps(SCHEMA_VERSION).encode()), db=meta)
                    txn.put(b"next_id", seal_value(b"0"), db=meta)
            with env.begin() as txn:
                version = self._stored_schema(txn.get(b"schema_version", db=meta), quoted)
            if version != SCHEMA_VERSION:
                raise self._schema_error(version, quoted)
            dbs = {b"meta": meta}
            for name in tables[1:]:
                try:
                    dbs[name] = env.open_db(name, create=not self.read_only)
                except lmdb.NotFoundError:
                    dbs[name] = None  # read-only and never written: treated as empty
        except BaseException:
            env.close()
            raise
        return env, {name.decode(): db for name, db in dbs.items()}

    @staticmethod
    def _stored_schema(raw, quoted: str):
        """The schema version in ``raw``: sealed (version 2 on), or plain JSON (version 1)."""
        if raw is None:
            raise DatabaseError(f"{quoted} has a 'meta' table without a schema version: it is not a "
                                f"VL-InterpreT database; choose an empty folder for a new database")
        damaged = DatabaseError(f"{quoted}: its schema version is damaged; restore the database from a backup")
        try:
            return json.loads(bytes(open_value(raw, "schema version")))
        except CorruptValueError:
            try:
                version = json.loads(bytes(raw))
            except ValueError:
                raise damaged from None
            if version == 1:  # written before values had checksums
                return 1
            raise damaged from None

    @staticmethod
    def _schema_error(version, quoted: str) -> DatabaseError:
        if version == 1:
            return DatabaseError(f"{quoted} was written by an older VL-InterpreT (schema version 1, values "
                                 f"without checksums): upgrade it in place with `{UPGRADE_HINT} {quoted}` "
                                 f"(nothing is lost)")
        return DatabaseError(f"{quoted} was written by a newer/unknown schema version {version}; this "
                             f"VL-InterpreT reads version {SCHEMA_VERSION}: upgrade VL-InterpreT or "
                             f"re-create the database")

    def _check_preprocessed(self) -> None:
        if self._count("info") > 0:
            return
        pending = len(self.pending_keys())
        quoted = repr(self.path)
        self.close()
        if pending:
            raise DatabaseError(f"{quoted} has {pending} pending record(s) but no preprocessed examples: "
                                f"run `VliLmdb({quoted}, read_only=False).preprocess()`")
        raise DatabaseError(f"{quoted} is an empty database: add records with `db[str(ex_id)] = "
                            f"pickle.dumps(record)` and run `VliLmdb({quoted}, read_only=False).preprocess()`")

    def _check_special_tokens(self) -> None:
        stored = self._meta("special_tokens")
        if stored is not None and self._requested_special is not None \
                and tuple(stored) != self._requested_special:
            self.close()
            raise DatabaseError(f"{self.path!r} already uses special tokens {stored}; "
                                f"open it without special_tokens= or re-create it")

    # ----------------------------------------------------------------------------- plumbing
    def _environment(self) -> lmdb.Environment:
        if self._closed:
            raise DatabaseError(f"the database {self.path!r} is closed")
        if os.getpid() != self._pid:  # forked: the parent's environment must not be used here
            # Closing the inherited handle in the child is safe: LMDB clears only the reader
            # slots of this pid, and fcntl locks are per process.  The child is single-threaded
            # here, so a fresh lock replaces one a parent thread may have held at the fork.
            self._lock = threading.Lock()
            self._env.close()
            self._shared = self._open()
            self._env, self._dbs = self._shared.env, self._shared.dbs
            self._pid = os.getpid()
        return self._env

    def _read(self):
        return self._environment().begin(buffers=True)

    def _write(self):
        if self.read_only:
            raise DatabaseError(f"{self.path!r} was opened read-only: use VliLmdb(..., read_only=False)")
        return self._environment().begin(write=True)

    def _count(self, name: str, txn=None) -> int:
        if txn is None:
            with self._read() as txn:  # opened first: after a fork it replaces the handles
                return self._count(name, txn)
        db = self._dbs[name]
        return 0 if db is None else txn.stat(db)["entries"]

    def _meta(self, key: str, txn=None) -> Any:
        if txn is None:
            with self._read() as txn:
                return self._meta(key, txn)
        raw = txn.get(key.encode(), db=self._dbs["meta"])
        if raw is None:
            return None
        try:
            return json.loads(bytes(open_value(raw, f"database setting {key!r}")))
        except CorruptValueError as error:
            raise DatabaseError(f"{self.path!r}: {error}; restore the database from a backup") from None

    def _put_meta(self, txn, key: str, value: Any) -> None:
        txn.put(key.encode(), seal_value(json.dumps(value).encode()), db=self._dbs["meta"])

    def _fixed_meta(self, key: str) -> Any:
        """A meta value that never changes once set (dimensions, special tokens)."""
        if key not in self._meta_cache:
            value = self._meta(key)
            if value is None:
                return None
            self._meta_cache[key] = value
        return self._meta_cache[key]

    def close(self) -> None:
        """Close the environment (idempotent). Nothing is written here."""
        if not self._closed:
            self._closed = True
            if os.getpid() != self._pid:
                return  # the parent's environment: not ours to close
            with _SHARED_LOCK:
                self._shared.users -= 1
                if self._shared.users == 0:
                    _SHARED.pop((self._pid, os.path.realpath(self.path)), None)
                    self._env.close()

    def compact_copy(self, dest: Union[str, os.PathLike]) -> None:
        """Write a compacted copy of the database to the new folder ``dest`` (LMDB files never shrink
        in place: the copy drops the free pages of deleted values). Pending records are not copied."""
        dest = os.fspath(dest)
        os.makedirs(dest, exist_ok=False)
        self._environment().copy(dest, compact=True)

    def __enter__(self) -> "Environment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VliLmdb({self.path!r}, read_only={self.read_only})"

    # ----------------------------------------------------------------------------- settings
    @property
    def n_layers(self) -> Optional[int]:
        return self._fixed_meta("n_layers")

    @property
    def n_heads(self) -> Optional[int]:
        return self._fixed_meta("n_heads")

    @property
    def hidden_size(self) -> Optional[int]:
        return self._fixed_meta("hidden_size")

    @property
    def special_tokens(self) -> tuple[str, ...]:
        stored = self._fixed_meta("special_tokens")
        if stored is not None:
            return tuple(stored)
        return self._requested_special or DEFAULT_SPECIAL_TOKENS

    def version(self) -> int:
        """A number that changes with every write to the database (LMDB's last transaction id), so
        that what is derived from its contents can be cached until it changes."""
        return self._environment().info()["last_txnid"]

    def example_ids(self) -> list[int]:
        """The ids of all preprocessed examples, sorted (keys of the small ``ids`` table)."""
        with self._read() as txn:
            if self._dbs["ids"] is None:
                return []
            return [int(bytes(k)) for k in txn.cursor(db=self._dbs["ids"]).iternext(values=False)]

    def __len__(self) -> int:
        return self._count("info")

    def pending_keys(self) -> list[str]:
        """Keys of the raw records waiting for preprocess()."""
        with self._pending() as env:
            if env is None:
                return []
            with env.begin() as txn:
                return [bytes(k).decode("utf-8", "replace") for k in txn.cursor().iternext(values=False)]

    # ----------------------------------------------------------------------------- pending records
    @contextmanager
    def _pending(self, create: bool = False) -> Iterator[Optional[lmdb.Environment]]:
        """The pending environment for the duration of a ``with`` (see :func:`pending_environment`)."""
        self._environment()  # closed / forked checks
        if create and self.read_only:
            raise DatabaseError(f"{self.path!r} was opened read-only: use VliLmdb(..., read_only=False)")
        with pending_environment(self.path, create) as env:
            yield env

    def _remove_pending_if_empty(self) -> None:
        """Remove ``pending/`` when it holds nothing and no process (this one included) has it open."""
        folder = os.path.join(self.path, PENDING_DIR)
        with _SHARED_LOCK:
            if (os.getpid(), os.path.realpath(folder)) in _PENDING or not os.path.isdir(folder):
                return
            fd = os.open(os.path.join(self.path, PENDING_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # another process is using it: it stays, harmlessly, until next time
                env = open_lmdb(folder, repr(folder), readonly=False, max_dbs=0)
                try:
                    empty = env.stat()["entries"] == 0
                finally:
                    env.close()
                if empty:
                    shutil.rmtree(folder)
            finally:
                os.close(fd)

