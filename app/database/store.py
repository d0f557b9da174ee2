"""The VL-InterpreT database: an LMDB environment with one named sub-database per kind of value.

Layout (schema version :data:`SCHEMA_VERSION`; ``E`` = ex_id as 10 digits, ``LLL`` = layer):

=========  =====================  ==============================================================
sub-db     key                    value
=========  =====================  ==============================================================
meta       ``schema_version``     JSON int; checked on open
meta       ``n_layers`` ...       JSON: n_layers, n_heads, hidden_size, special_tokens,
                                  custom_metrics (names), metric_descriptions, next_id, nn_dim,
                                  nn_tail, nn_shards
meta       ``nn_projection``      float32 (n_layers + 1, hidden_size, nn_dim) (see neighbors.py)
info       ``E``                  JSON: tokens, txt_len, special, coords, grid, image_size,
                                  modality ("t"/"i" per token; absent: text first), grids,
                                  patch_grid (with several grids), generated, accuracy, prediction, text, notes, logit_lens, custom_metrics (names),
                                  attention_exp, rollout_exp, source (xxh3 of the raw pickle)
ids        ``E``                  empty: the example ids alone, so that listing them reads a few
                                  pages (an ``info`` value is an overflow page)
image      ``E``                  PNG bytes
attention  ``E/LLL``              float16 little-endian (heads, n, n) holding attention *
                                  2**attention_exp (info), layer 0..n_layers-1
rollout    ``E/LLL``              float16 (n, n): the attention rollout through layers 1..LLL+1
                                  (analysis.attention_rollout) * 2**rollout_exp (info)
relevancy  ``E``                  float32 (n, n): gradient relevancy (Chefer et al. 2021) of the
                                  prediction, when the record has it (rows = queries)
hidden     ``E/LLL``              float16 little-endian (n, hidden), layer 0..n_layers (clipped
                                  to the float16 range, +-65 504)
           (an example whose info has ``compact``: attention and hidden in the reduced layouts of
           compact.py, no rollout, which is computed from the exact head means on read)
tsne       ``E``                  float32 (n_layers + 1, n, 2)
stats      ``E``                  float32 (n_statistics, n_layers, n_heads): the built-ins of
                                  stats.STATISTICS, then the example's custom metrics
nn         see neighbors.py       bound rows [a, r] per token: tail values and sealed shards
=========  =====================  ==============================================================

Every value carries a checksum (:mod:`app.database.checksum`), checked on every read: a damaged
value raises :class:`CorruptValueError` naming the example and what was damaged, and the rest of the
database stays readable.

Raw records written with ``db[key] = pickle`` wait in a second LMDB environment, ``DB/pending/``,
until :meth:`VliLmdb.preprocess` converts them; it is removed once empty.  So the main file never
fills with the free pages the raw pickles leave behind, and nothing ever rewrites, replaces or
truncates a file that another process may have mapped (an idle app holds no LMDB reader slot, so
"nobody is reading" cannot be known).  Whoever has ``pending/`` open holds a shared ``flock`` on
``DB/pending.lock``; it is removed only under an exclusive one.

Every read opens one short read transaction (``with env.begin(buffers=True)``), copies what it
needs out of the zero-copy views, and closes it; transactions are never shared across threads.
After a fork the environment is reopened (``os.getpid()`` is checked).  Every example is
written in its own write transaction.  Call :meth:`VliLmdb.close` explicitly (or use ``with``).
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import sys
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import lmdb
import numpy as np
import xxhash

from app.database import compact, neighbors, safe_pickle
from app.database.analysis import attention_rollout, rollout_mixing
from app.database.checksum import CHECKSUM_BYTES, CorruptValueError, open_value, seal_value
from app.database.neighbors import Neighbor, SearchCost
from app.database.records import DEFAULT_SPECIAL_TOKENS, Grid, Record, RecordError, validate_record
from app.database.stats import STATISTICS, head_statistics

__all__ = ["VliLmdb", "DatabaseError", "RecordError", "CorruptValueError", "ExampleInfo", "PreprocessReport",
           "Neighbor", "SearchCost", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2  # 2: checksummed values, pending records in their own environment
SUB_DBS = (b"meta", b"info", b"ids", b"image", b"attention", b"rollout", b"relevancy", b"hidden", b"tsne", b"stats",
           b"nn")
PENDING_DIR = "pending"
PENDING_LOCK = "pending.lock"
UPGRADE_HINT = "python -m app.database.upgrade"
MAP_SIZES = (1 << 40, 1 << 36, 1 << 32)  # sparse on Linux; smaller fall-backs for tight ulimits
FLOAT16_MAX = float(np.finfo(np.float16).max)
PIPELINE = True  # preprocess(): compute the next example in a worker thread (False: one by one, to measure)


class _SharedEnv:
    """One LMDB environment per file and process (py-lmdb refuses a second), shared by VliLmdb
    instances and closed when the last of them closes."""

    def __init__(self, env: lmdb.Environment, dbs: dict, read_only: bool):
        self.env, self.dbs, self.read_only, self.users = env, dbs, read_only, 1


_REGISTRY: dict[tuple[int, str], _SharedEnv] = {}
_REGISTRY_LOCK = threading.Lock()


@dataclass
class _OpenPending:
    """The pending environment while some VliLmdb of this process uses it (refcounted), with the
    shared flock that keeps other processes from removing it meanwhile."""

    env: lmdb.Environment
    lock_fd: int
    users: int = 1


_PENDING: dict[tuple[int, str], _OpenPending] = {}


def _after_fork_in_child() -> None:
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()  # a parent thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class DatabaseError(RuntimeError):
    """The path is not a usable VL-InterpreT database; the message says what to do."""


def _open_lmdb(path: str, quoted: str, readonly: bool, max_dbs: int) -> lmdb.Environment:
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


@dataclass(frozen=True, eq=False)  # eq=False: compared by identity (it holds an array)
class ExampleInfo:
    """The small, immutable description of one stored example (tokens in stored order)."""

    ex_id: int
    tokens: tuple[str, ...]
    txt_len: int
    special: np.ndarray                 # (n,) bool, read-only
    coords: tuple[Optional[tuple[int, int]], ...]  # (x, y) per image patch (on grid patch_grid[i]), None otherwise
    grid: Optional[tuple[int, int]]     # (rows, cols) of the first grid, None for a text-only example
    image_size: tuple[int, int]         # (H, W)
    accuracy: Optional[bool]
    prediction: Optional[dict]
    text: Optional[str]
    notes: tuple[str, ...] = ()         # shown with the example (e.g. "the text was cut to ...")
    logit_lens: Optional[list] = None   # per hidden-state layer: [[answer, probability], ...] (records.py)
    attention_exp: int = 0              # storage detail: attention is stored as float16(a * 2**exp)
    rollout_exp: int = 0                # the same for the rollout
    is_text: np.ndarray = None          # (n,) bool, read-only: each token's modality
    grids: tuple[Grid, ...] = ()        # every patch grid (one for most models)
    patch_grid: np.ndarray = None       # (n,) int16, read-only: the grid of each patch, -1 for other tokens
    generated: int = 0                  # the last `generated` tokens were generated by the model
    reduction: Optional[compact.Compact] = None  # how a large example was reduced (app.database.compact)
    source: Optional[str] = None        # xxh3 of the raw pickle it was preprocessed from (None: added live)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def on_grid(self, g: int) -> tuple[Optional[tuple[int, int]], ...]:
        """``coords`` with None for every token that is not a patch of grid ``g``."""
        return tuple(c if self.patch_grid[i] == g else None for i, c in enumerate(self.coords))

    def modality(self, token: int) -> str:
        return "text" if self.is_text[token] else "image"

    def patch_cell(self, token: int) -> Optional[tuple[float, float, float, float]]:
        """The pixel rectangle (x0, y0, x1, y1) of the stored image that patch ``token`` covers (None: no patch)."""
        coord = self.coords[token]
        return None if coord is None else self.grids[self.patch_grid[token]].cell(*coord)


@dataclass
class PreprocessReport:
    """What :meth:`VliLmdb.preprocess` did.

    stage_seconds sums each stage over examples; the compute stages of the next example run in
    a worker thread while the current one is written, so their sum can exceed total_seconds.
    """

    added: list[int] = field(default_factory=list)
    failed: dict[Union[int, str], str] = field(default_factory=dict)
    # pending records found already stored: an interrupted run had committed the example but not
    # yet cleared its raw record
    already: list[int] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0

    def __str__(self) -> str:
        text = f"preprocessed {len(self.added)} example(s) in {self.total_seconds:.1f} s"
        if self.failed:
            text += (f"; {len(self.failed)} record(s) failed and stay pending "
                     f"(fix them and run preprocess() again)")
        return text


@dataclass
class _Shape:
    """What committing an example needs to know of it besides its values."""

    ex_id: int
    n_layers: int
    n_heads: int
    hidden_size: int
    is_text: np.ndarray              # (n,) bool
    special: np.ndarray              # (n,) bool
    hidden16: np.ndarray             # (L + 1, n, d) float16 as stored: to index it under another projection
    custom_metrics: list[str]
    metric_descriptions: dict[str, str]


@dataclass
class _Prepared:
    """Everything one example writes, computed outside the write transaction."""

    example: _Shape
    key: Optional[bytes]               # pending key, None for add_record
    source: Optional[str]              # xxh3 of the pending raw pickle, None for add_record
    values: dict[bytes, dict[bytes, bytes]]  # sub-db -> key -> value
    projection: bytes
    seconds: dict[str, float]


def _ekey(ex_id: int) -> bytes:
    return b"%010d" % ex_id


def _lkey(ex_id: int, layer: int) -> bytes:
    return b"%010d/%03d" % (ex_id, layer)


def _key_name(key: bytes) -> Union[int, str]:
    text = key.decode("utf-8", "replace")
    return int(text) if text.isdigit() and len(text) <= 18 else text


def _source_hash(raw: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(raw)


def _tsne_maps(hidden: np.ndarray) -> np.ndarray:
    """(n_maps, n_points, dim) -> (n_maps, n_points, 2) float32 (app.database.tsne)."""
    from app.database.tsne import tsne_maps  # noqa: PLC0415 (heavy import, only when writing)
    return tsne_maps(hidden)


def _hidden_array(raw, info: ExampleInfo, hidden_size: int) -> np.ndarray:
    """One layer's stored hidden states: float16 ``(n, d)`` (a zero-copy view when stored whole)."""
    if info.reduction is None:
        return np.frombuffer(raw, dtype="<f2").reshape(info.n_tokens, hidden_size)
    return compact.decode_hidden(raw, info.n_tokens, hidden_size, info.reduction.components)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _is_text(info: dict) -> np.ndarray:
    """(n,) bool from a stored description: its ``modality`` ("t"/"i" per token), or, as written
    before any order was allowed, the first ``txt_len`` tokens."""
    if "modality" in info:
        return np.frombuffer(info["modality"].encode("ascii"), dtype=np.uint8) == ord("t")
    return np.arange(len(info["tokens"])) < info["txt_len"]


def _query_rows(queries, n_tokens: int, method: str) -> np.ndarray:
    """The query tokens of a read (stored positions) as int64, checked: at least one, all in range."""
    rows = np.atleast_1d(np.asarray(queries, dtype=np.int64))
    if rows.size == 0:
        raise ValueError(f"{method}(): at least one query token is needed")
    if rows.min() < 0 or rows.max() >= n_tokens:
        raise IndexError(f"query tokens {rows.tolist()} out of range 0..{n_tokens - 1}")
    return rows


def _scaled_float16(weights: np.ndarray) -> tuple[np.ndarray, int]:
    """``(float16(weights * 2**exp), exp)``. Attention weights are mostly tiny: scaled by 2**exp
    (exp = 14 when the largest is 1) they stay out of float16's subnormal range (12x faster to convert,
    and precise down to ~4e-9); the largest value still fits float16, and the rescale on read is exact."""
    peak = float(np.abs(weights).max()) or 1.0
    exp = int(np.clip(np.floor(np.log2(FLOAT16_MAX / peak)) - 1, -120, 120))
    return (weights * np.float32(2.0 ** exp)).astype("<f2"), exp


def _tsne_ready() -> None:
    """The t-SNE kernels compiled or loaded before a progress bar starts (a line says so when that is
    the first run's compile), so that the bar's ETA never counts it."""
    from app.database.tsne import wait_until_compiled  # noqa: PLC0415
    wait_until_compiled()


def _png(image: np.ndarray) -> bytes:
    from PIL import Image  # noqa: PLC0415
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


@contextmanager
def pending_environment(db_dir: str, create: bool = False) -> Iterator[Optional[lmdb.Environment]]:
    """The pending environment ``db_dir/pending/`` for the duration of a ``with`` (None when there is
    none and ``create`` is false). It is open only while used, under a shared flock on
    ``db_dir/pending.lock``, so that another process can remove it once empty (module docstring)."""
    folder = os.path.join(db_dir, PENDING_DIR)
    key = (os.getpid(), os.path.realpath(folder))
    with _REGISTRY_LOCK:
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
        with _REGISTRY_LOCK:
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
        env = _open_lmdb(folder, repr(folder), readonly=not writable, max_dbs=0)
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


class VliLmdb:
    """A VL-InterpreT database (see the module docstring and docs/ARCHITECTURE.md).

    db_dir: the database folder (LMDB ``data.mdb`` + ``lock.mdb``).
    read_only: True (the app) opens an existing, preprocessed database and never creates files;
        False (scripts, live models) creates the folder if needed and allows writes.
    special_tokens: token strings excluded from statistics; stored with the first example
        (default ``[CLS]``, ``[SEP]``, ``[PAD]``).
    cache_size: how many ExampleInfo are kept in memory.
    """

    def __init__(self, db_dir: Union[str, os.PathLike], read_only: bool = True,
                 special_tokens: Optional[Sequence[str]] = None, cache_size: int = 256):
        self.path = os.fspath(db_dir)
        self.read_only = read_only
        self._requested_special = tuple(special_tokens) if special_tokens is not None else None
        self._cache: "OrderedDict[int, ExampleInfo]" = OrderedDict()
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
        with _REGISTRY_LOCK:
            shared = _REGISTRY.get(key)
            if shared is not None:  # LMDB allows one environment per file and process: share it
                if shared.read_only and not self.read_only:
                    raise DatabaseError(f"{quoted} is already open read-only in this process: close that "
                                        f"VliLmdb before opening it with read_only=False")
                shared.users += 1
                return shared
            shared = _SharedEnv(*self._open_env(path, quoted), read_only=self.read_only)
            _REGISTRY[key] = shared
            return shared

    def _open_env(self, path: str, quoted: str):
        env = _open_lmdb(path, quoted, self.read_only, max_dbs=len(SUB_DBS) + 4)
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
            for name in SUB_DBS[1:]:
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
            with _REGISTRY_LOCK:
                self._shared.users -= 1
                if self._shared.users == 0:
                    _REGISTRY.pop((self._pid, os.path.realpath(self.path)), None)
                    self._env.close()

    def compact_copy(self, dest: Union[str, os.PathLike]) -> None:
        """Write a compacted copy of the database to the new folder ``dest`` (LMDB files never shrink
        in place: the copy drops the free pages of deleted values). Pending records are not copied."""
        dest = os.fspath(dest)
        os.makedirs(dest, exist_ok=False)
        self._environment().copy(dest, compact=True)

    def __enter__(self) -> "VliLmdb":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VliLmdb({self.path!r}, read_only={self.read_only})"

    # ----------------------------------------------------------------------------- read side
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
        with _REGISTRY_LOCK:
            if (os.getpid(), os.path.realpath(folder)) in _PENDING or not os.path.isdir(folder):
                return
            fd = os.open(os.path.join(self.path, PENDING_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # another process is using it: it stays, harmlessly, until next time
                env = _open_lmdb(folder, repr(folder), readonly=False, max_dbs=0)
                try:
                    empty = env.stat()["entries"] == 0
                finally:
                    env.close()
                if empty:
                    shutil.rmtree(folder)
            finally:
                os.close(fd)

    def statistic_names(self) -> list[str]:
        """The built-in statistic keys (stats.STATISTICS), then the custom metric names."""
        return list(STATISTICS) + list(self._meta("custom_metrics") or [])

    def metric_description(self, name: str) -> Optional[str]:
        """The definition of a custom metric given with the records (``metric_descriptions``), if any."""
        return (self._meta("metric_descriptions") or {}).get(name)

    def example(self, ex_id: int) -> ExampleInfo:
        """The small description of example ``ex_id`` (cached; KeyError if absent)."""
        ex_id = int(ex_id)
        with self._lock:
            if ex_id in self._cache:
                self._cache.move_to_end(ex_id)
                return self._cache[ex_id]
        with self._read() as txn:
            data = json.loads(bytes(self._get(txn, "info", _ekey(ex_id), ex_id, "description")))
        special = _read_only(np.array(data["special"], dtype=bool))
        coords = tuple(None if c is None else tuple(c) for c in data["coords"])
        height, width = data["image_size"]
        if "grids" in data:
            grids = tuple(Grid.from_json(g) for g in data["grids"])
        else:  # written before several grids: one grid over the whole image
            grids = () if data["grid"] is None else (Grid("", *data["grid"], (0, 0, width, height)),)
        patch_grid = data.get("patch_grid") or [-1 if c is None else 0 for c in coords]
        info = ExampleInfo(
            ex_id=ex_id, tokens=tuple(data["tokens"]), txt_len=data["txt_len"], special=special,
            coords=coords, grid=None if data["grid"] is None else tuple(data["grid"]),
            image_size=(height, width), accuracy=data["accuracy"],
            prediction=data["prediction"], text=data["text"], notes=tuple(data["notes"]),
            logit_lens=data.get("logit_lens"),
            attention_exp=data["attention_exp"], rollout_exp=data["rollout_exp"],
            is_text=_read_only(_is_text(data)), grids=grids,
            patch_grid=_read_only(np.array(patch_grid, dtype=np.int16)), generated=data.get("generated", 0),
            reduction=compact.Compact(**data["compact"]) if data.get("compact") else None, source=data.get("source"))
        with self._lock:
            self._cache[ex_id] = info
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return info

    def _get(self, txn, name: str, key: bytes, ex_id: int, what: str) -> memoryview:
        """The checked payload of one value of example ``ex_id`` (KeyError when absent,
        CorruptValueError naming the example and ``what`` when damaged)."""
        raw = txn.get(key, db=self._dbs[name]) if self._dbs[name] is not None else None
        if raw is None:
            raise KeyError(f"example {ex_id} is not in the database {self.path!r}")
        return open_value(raw, f"example {ex_id}, {what}")

    def _check_layer(self, layer: int, hidden: bool) -> int:
        top = self.n_layers + (1 if hidden else 0)
        layer = int(layer)
        if not 0 <= layer < top:
            what = "hidden-state layer (0 = before layer 1)" if hidden else "attention layer"
            raise IndexError(f"{what} {layer} out of range 0..{top - 1}")
        return layer

    def _check_head(self, head: Optional[int]) -> Optional[int]:
        if head is None:
            return None
        head = int(head)
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range 0..{self.n_heads - 1}")
        return head

    def image_png(self, ex_id: int) -> bytes:
        """The example's image as PNG bytes."""
        with self._read() as txn:
            return bytes(self._get(txn, "image", _ekey(int(ex_id)), ex_id, "image"))

    def image(self, ex_id: int) -> np.ndarray:
        """The example's image, uint8 (H, W, 3)."""
        from PIL import Image  # noqa: PLC0415
        with Image.open(io.BytesIO(self.image_png(ex_id))) as image:
            return np.asarray(image.convert("RGB"))

    def attention(self, ex_id: int, layer: int, head: Optional[int],
                  queries: Union[int, Sequence[int], np.ndarray]) -> np.ndarray:
        """float32 (n,): the attention of ``queries`` (stored positions), averaged over them.

        layer: 0..n_layers-1; head: 0..n_heads-1, or None for the mean over heads.
        Only the needed rows are read.
        """
        info = self.example(ex_id)
        layer, head = self._check_layer(layer, hidden=False), self._check_head(head)
        rows = _query_rows(queries, info.n_tokens, "attention")
        return self._attention_rows(info, layer, head, rows).mean(axis=0)

    def _attention_rows(self, info: ExampleInfo, layer: int, head: Optional[int], rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), n) of one head, or of the mean over heads (head None), unscaled."""
        n, heads = info.n_tokens, self.n_heads
        with self._read() as txn:
            raw = self._get(txn, "attention", _lkey(info.ex_id, layer), info.ex_id, f"attention of layer {layer}")
            if info.reduction is not None:
                k = info.reduction.top_keys
                picked = compact.mean_rows(raw, heads, n, k, rows) if head is None \
                    else compact.head_rows(raw, heads, n, k, head, rows)
            else:
                view = np.frombuffer(raw, dtype="<f2").reshape(heads, n, n)
                picked = view[head, rows].astype(np.float32) if head is not None \
                    else view[:, rows].astype(np.float32).mean(axis=0)  # copies the rows
        return picked * np.float32(2.0 ** -info.attention_exp)

    def rollout(self, ex_id: int, layer: int, queries: Union[int, Sequence[int], np.ndarray]) -> np.ndarray:
        """float32 (n,): the attention rollout (Abnar & Zuidema 2020) through layers 1..layer+1 of
        ``queries``, averaged over them: what each query draws on from every input token, through the
        residual stream and every head (app.database.analysis.attention_rollout). layer: 0..n_layers-1."""
        info = self.example(ex_id)
        layer = self._check_layer(layer, hidden=False)
        rows, n = _query_rows(queries, info.n_tokens, "rollout"), info.n_tokens
        if info.reduction is not None:  # not stored: from the exact means, one row vector through the layers
            weights = np.zeros(n)
            np.add.at(weights, rows, 1.0 / len(rows))
            everyone = np.arange(n)
            for below in range(layer, -1, -1):
                weights = weights @ rollout_mixing(self._attention_rows(info, below, None, everyone))
            return weights.astype(np.float32)
        with self._read() as txn:
            view = np.frombuffer(self._get(txn, "rollout", _lkey(info.ex_id, layer), ex_id,
                                           f"rollout up to layer {layer}"), dtype="<f2").reshape(n, n)
            picked = view[rows]
        return picked.astype(np.float32).mean(axis=0) * np.float32(2.0 ** -info.rollout_exp)

    def relevancy(self, ex_id: int, queries: Union[int, Sequence[int], np.ndarray]) -> Optional[np.ndarray]:
        """float32 (n,): the gradient relevancy (Chefer et al. 2021) of every token for ``queries``
        (their rows averaged), for the model's prediction; None when the example has none (a record
        without ``relevancy``: models that compute it, such as the ViLT adapter, store it)."""
        info = self.example(ex_id)
        rows, n = _query_rows(queries, info.n_tokens, "relevancy"), info.n_tokens
        with self._read() as txn:
            try:
                raw = self._get(txn, "relevancy", _ekey(info.ex_id), ex_id, "relevancy")
            except KeyError:
                return None
            return np.frombuffer(raw, dtype="<f4").reshape(n, n)[rows].mean(axis=0)

    def attention_matrix(self, ex_id: int, layer: int, head: Optional[int]) -> np.ndarray:
        """float32 (n, n) attention of one head (or the mean over heads for head=None)."""
        info = self.example(ex_id)
        layer, head = self._check_layer(layer, hidden=False), self._check_head(head)
        return self._attention_rows(info, layer, head, np.arange(info.n_tokens))

    def hidden_states(self, ex_id: int, layer: int) -> np.ndarray:
        """float32 (n, hidden) at hidden-state layer 0 (before layer 1) .. n_layers."""
        info = self.example(ex_id)
        layer = self._check_layer(layer, hidden=True)
        with self._read() as txn:
            return _hidden_array(self._get(txn, "hidden", _lkey(info.ex_id, layer), ex_id,
                                           f"hidden states of layer {layer}"), info, self.hidden_size).astype(np.float32)

    def head_statistics(self, ex_id: int) -> dict[str, np.ndarray]:
        """{name: float32 (n_layers, n_heads)} for statistic_names(); NaN where undefined/absent."""
        ex_id = int(ex_id)
        with self._read() as txn:
            raw = self._get(txn, "stats", _ekey(ex_id), ex_id, "head statistics")
            values = np.frombuffer(raw, dtype="<f4").reshape(-1, self.n_layers, self.n_heads).copy()
            custom = json.loads(bytes(self._get(txn, "info", _ekey(ex_id), ex_id, "description")))["custom_metrics"]
        names = list(STATISTICS) + custom
        result = {name: values[i] for i, name in enumerate(names)}
        for name in self.statistic_names():
            if name not in result:
                result[name] = np.full((self.n_layers, self.n_heads), np.nan, np.float32)
        return {name: result[name] for name in self.statistic_names()}

    def tsne(self, ex_id: int, layer: int) -> np.ndarray:
        """float32 (n, 2): the t-SNE map of the hidden states at layer 0 .. n_layers."""
        info = self.example(ex_id)
        layer = self._check_layer(layer, hidden=True)
        with self._read() as txn:
            raw = self._get(txn, "tsne", _ekey(info.ex_id), ex_id, "t-SNE maps")
            return np.frombuffer(raw, dtype="<f4").reshape(-1, info.n_tokens, 2)[layer].copy()

    def nearest_other_modality(self, ex_id: int, layer: int, token: int) -> Optional[Neighbor]:
        """The closest token of the other modality in any example (cosine at hidden layer
        ``layer``), or None for a special token or when the other modality has no tokens."""
        return self.nearest_other_modality_cost(ex_id, layer, token)[0]

    def nearest_other_modality_cost(self, ex_id: int, layer: int,
                                    token: int) -> tuple[Optional[Neighbor], SearchCost]:
        """nearest_other_modality() and what the search cost (for benchmarks)."""
        info = self.example(ex_id)
        layer = self._check_layer(layer, hidden=True)
        token = int(token)
        if not 0 <= token < info.n_tokens:
            raise IndexError(f"token {token} out of range 0..{info.n_tokens - 1}")
        if info.special[token]:
            return None, SearchCost()
        with self._read() as txn:
            projection = self._projection(txn)
            meta = {k: self._meta(k, txn) for k in ("nn_shards", "nn_tail")}
            width = self.hidden_size

            def hidden_rows(other: int) -> np.ndarray:
                raw = self._get(txn, "hidden", _lkey(other, layer), other, f"hidden states of layer {layer}")
                return _hidden_array(raw, self.example(other), width)  # checksum checked

            query = hidden_rows(info.ex_id)[token].astype(np.float32)
            return neighbors.search(txn, self._dbs["nn"], query, bool(info.is_text[token]), layer,
                                    meta["nn_shards"] or 0, meta["nn_tail"] or [], projection, hidden_rows)

    def _projection(self, txn) -> np.ndarray:
        if "nn_projection" not in self._meta_cache:
            raw = open_value(txn.get(b"nn_projection", db=self._dbs["meta"]), "the nearest-token projection")
            dim = self._meta("nn_dim", txn)
            self._meta_cache["nn_projection"] = np.frombuffer(bytes(raw), dtype="<f4").reshape(
                self.n_layers + 1, self.hidden_size, dim)
        return self._meta_cache["nn_projection"]

    # ----------------------------------------------------------------------------- write side
    def __setitem__(self, key: Union[str, int], value: bytes) -> None:
        """Store a raw pickled record under ``str(ex_id)``, pending until preprocess()."""
        key = str(key)
        if not key:
            raise KeyError("the key must be a non-empty str (str(ex_id))")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"db[{key!r}] = ... expects pickle bytes "
                            f"(pickle.dumps(record)), got {type(value).__name__}")
        self._write().abort()  # fail early when read-only
        with self._pending(create=True) as env, env.begin(write=True) as txn:
            txn.put(key.encode(), seal_value(value))
        if key.isdigit() and len(key) <= 10:
            with self._write() as txn:
                self._bump_next_id(txn, int(key))

    def discard_pending(self, key: Union[str, int]) -> bool:
        """Delete a pending raw record; True if there was one."""
        self._write().abort()  # fail early when read-only
        with self._pending() as env:
            if env is None:
                return False
            with env.begin(write=True) as txn:
                found = txn.delete(str(key).encode())
        self._remove_pending_if_empty()
        return found

    def _bump_next_id(self, txn, ex_id: int) -> None:
        if (self._meta("next_id", txn) or 0) <= ex_id:
            self._put_meta(txn, "next_id", ex_id + 1)

    def reserve_example_id(self) -> int:
        """Atomically hand out an id no example or pending record uses (threads and processes)."""
        with self._write() as txn, self._pending() as pending:
            pending_txn = pending.begin() if pending is not None else None
            try:
                ex_id = self._meta("next_id", txn) or 0
                while (txn.get(_ekey(ex_id), db=self._dbs["info"]) is not None
                       or (pending_txn is not None and pending_txn.get(str(ex_id).encode()) is not None)):
                    ex_id += 1
            finally:
                if pending_txn is not None:
                    pending_txn.abort()
            self._put_meta(txn, "next_id", ex_id + 1)
            return ex_id

    def _expected_dims(self) -> Optional[tuple[int, int, int]]:
        dims = (self._meta("n_layers"), self._meta("n_heads"), self._meta("hidden_size"))
        return None if dims[0] is None else dims

    def add_record(self, record: dict) -> int:
        """Validate, preprocess and commit one record in one transaction; return its ex_id.

        Raises RecordError (nothing written) for an invalid record or an ex_id already in use;
        any other failure while preparing it is reported as a RecordError too.
        """
        start = time.perf_counter()
        ex_id = record.get("ex_id") if isinstance(record, dict) else None
        normal = _as_record_error(ex_id, "record", lambda: validate_record(
            record, special_tokens=self.special_tokens, expected=self._expected_dims()))
        seconds = {"validate": time.perf_counter() - start}
        prepared = self._prepare(normal, None, None, seconds)
        self._commit(prepared)
        return normal.ex_id

    def import_example(self, source: "VliLmdb", ex_id: int, new_id: Optional[int] = None) -> int:
        """Copy example ``ex_id`` of the database ``source`` into this one as ``new_id`` (default: the
        same id), every stored value as it is (each checked on the way), the nearest-token index entries
        computed for this database's projection; return the id. For merging databases (shards of one
        extraction): nothing is recomputed, so the copy equals the original. Raises RecordError when the id
        is taken or the model's shape differs; CorruptValueError when a value of the source is damaged."""
        ex_id = int(ex_id)
        new_id = ex_id if new_id is None else int(new_id)
        info = dict(json.loads(bytes(source._read_value("info", _ekey(ex_id), ex_id, "description"))))
        dims = (source.n_layers, source.n_heads, source.hidden_size)
        mine = self._expected_dims()
        if mine is not None and tuple(mine) != dims:
            raise RecordError(new_id, "attention", f"the source database's model has {dims[0]} layers, {dims[1]} "
                              f"heads, hidden size {dims[2]}; this one {mine[0]}, {mine[1]}, {mine[2]}")
        layers = range(dims[0])
        copied = {b"image": {_ekey(new_id): source._read_value("image", _ekey(ex_id), ex_id, "image")},
                  b"tsne": {_ekey(new_id): source._read_value("tsne", _ekey(ex_id), ex_id, "t-SNE maps")},
                  b"stats": {_ekey(new_id): source._read_value("stats", _ekey(ex_id), ex_id, "head statistics")},
                  b"attention": {_lkey(new_id, l): source._read_value("attention", _lkey(ex_id, l), ex_id,
                                                                    f"attention of layer {l}") for l in layers},
                  b"rollout": {} if info.get("compact") else {
                      _lkey(new_id, l): source._read_value("rollout", _lkey(ex_id, l), ex_id, f"rollout up to layer {l}")
                      for l in layers},
                  b"hidden": {_lkey(new_id, l): source._read_value("hidden", _lkey(ex_id, l), ex_id,
                                                                 f"hidden states of layer {l}")
                              for l in range(dims[0] + 1)},
                  b"relevancy": {}}
        try:
            copied[b"relevancy"][_ekey(new_id)] = source._read_value("relevancy", _ekey(ex_id), ex_id, "relevancy")
        except KeyError:  # the example has none
            pass
        stored = source.example(ex_id)
        hidden16 = np.stack([_hidden_array(copied[b"hidden"][_lkey(new_id, l)], stored, dims[2])
                             for l in range(dims[0] + 1)])
        special = np.array(info["special"], dtype=bool)
        is_text = _is_text(info)
        info["ex_id"] = new_id
        copied[b"info"] = {_ekey(new_id): json.dumps(info).encode()}
        copied[b"ids"] = {_ekey(new_id): b""}
        with self._read() as txn:
            raw = txn.get(b"nn_projection", db=self._dbs["meta"])
            projection_bytes = None if raw is None else bytes(open_value(raw, "the nearest-token projection"))
        if projection_bytes is None:
            projection = neighbors.make_projection(hidden16, special)
            projection_bytes = projection.astype("<f4").tobytes()
        else:
            projection = np.frombuffer(projection_bytes, dtype="<f4").reshape(dims[0] + 1, dims[2], -1)
        copied[b"nn"] = neighbors.example_entries(new_id, hidden16, is_text, special, projection)
        descriptions = {name: source.metric_description(name) for name in info["custom_metrics"]}
        shape = _Shape(ex_id=new_id, n_layers=dims[0], n_heads=dims[1], hidden_size=dims[2], is_text=is_text,
                       special=special, hidden16=hidden16, custom_metrics=list(info["custom_metrics"]),
                       metric_descriptions={k: v for k, v in descriptions.items() if v is not None})
        self._commit(_Prepared(example=shape, key=None, source=info.get("source"), values=copied,
                               projection=projection_bytes, seconds={}))
        return new_id

    def _read_value(self, name: str, key: bytes, ex_id: int, what: str) -> bytes:
        """A copy of one checked value of example ``ex_id`` (KeyError when absent)."""
        with self._read() as txn:
            return bytes(self._get(txn, name, key, ex_id, what))

    def preprocess(self, progress: bool = True) -> PreprocessReport:
        """Validate and convert every pending record (see PreprocessReport); bad ones stay pending.

        Any failure of one record (not only an invalid field: an unexpected error anywhere in its
        processing) refuses that record alone, reported with its example and field; the others land.
        The next example is computed in a worker thread while the current one is written.
        """
        self._write().abort()  # fail early when read-only
        report = PreprocessReport()
        start = time.perf_counter()
        keys = [k.encode() for k in self.pending_keys()]
        keys.sort(key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
        stages = {name: 0.0 for name in ("unpickle", "validate", "statistics", "tsne", "index",
                                         "encode", "write")}
        expected = [self._expected_dims()]

        def compute(key: bytes) -> Union[_Prepared, RecordError, int]:
            try:
                return self._compute_pending(key, expected)
            except RecordError as error:
                return error

        bar = None
        if keys:
            _tsne_ready()
        if progress and keys:
            from tqdm.auto import tqdm  # noqa: PLC0415
            bar = tqdm(total=len(keys), desc="preprocess", unit="example")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vli-preprocess")
        queue = deque()
        try:
            upcoming = iter(keys)

            def submit_next() -> None:
                for next_key in upcoming:
                    queue.append((next_key, executor.submit(compute, next_key)))
                    break

            submit_next()
            while queue:
                key, future = queue.popleft()
                result = future.result()
                if PIPELINE:  # compute the next example while this one is written
                    submit_next()
                if isinstance(result, _Prepared):
                    for stage, value in result.seconds.items():
                        stages[stage] = stages.get(stage, 0.0) + value
                    try:
                        t = time.perf_counter()
                        self._commit(result)
                        stages["write"] += time.perf_counter() - t
                        report.added.append(result.example.ex_id)
                    except RecordError as error:
                        result = error
                elif isinstance(result, int):
                    report.already.append(result)
                if isinstance(result, RecordError):
                    report.failed[_key_name(key)] = str(result)
                    message = f"✗ not added, kept pending: {result}"
                    if bar is not None:
                        bar.write(message, file=sys.stderr)
                    else:
                        print(message, file=sys.stderr)
                if bar is not None:
                    bar.update(1)
                if not PIPELINE:
                    submit_next()
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            if bar is not None:
                bar.close()
        self._remove_pending_if_empty()
        report.stage_seconds = stages
        report.total_seconds = time.perf_counter() - start
        if report.failed or progress:
            print(str(report), file=sys.stderr)
        return report

    def _compute_pending(self, key: bytes, expected: list) -> Union[_Prepared, int]:
        """The prepared example of one pending record, or its ex_id when it is already stored
        (its raw record is then cleared). Raises RecordError for any failure."""
        name = _key_name(key)
        t = time.perf_counter()
        with self._pending() as env:
            raw = None
            if env is not None:
                with env.begin() as txn:
                    sealed = txn.get(key)
                    raw = None if sealed is None else bytes(
                        _as_record_error(name, "record", lambda: open_value(sealed, "the pending raw record")))
        if raw is None:
            raise RecordError(name, "record", "disappeared from the pending records (preprocessed elsewhere?)")
        source = _source_hash(raw)
        if isinstance(name, int) and self.stored_source(name) == source:
            self._clear_pending(key, source)
            return name
        try:
            record = safe_pickle.loads(raw)
        except Exception as error:  # corrupt or unsafe pickle: kept pending, reported
            raise RecordError(name, "record", f"could not unpickle: {_one_line(error)}") from None
        del raw
        seconds = {"unpickle": time.perf_counter() - t}
        t = time.perf_counter()
        normal = _as_record_error(name, "record", lambda: validate_record(
            record, special_tokens=self.special_tokens, expected=expected[0], ex_id=name))
        if normal.ex_id != name:
            raise RecordError(name, "ex_id", f"the record's ex_id {normal.ex_id} differs from its key {name!r}; "
                              f"store it as db[str(ex_id)]")
        if expected[0] is None:
            expected[0] = (normal.n_layers, normal.n_heads, normal.hidden_size)
        seconds["validate"] = time.perf_counter() - t
        return self._prepare(normal, key, source, seconds)

    def stored_source(self, ex_id: int) -> Optional[str]:
        """The raw-record hash example ``ex_id`` was preprocessed from (None if absent, damaged or added live)."""
        try:
            return self.example(ex_id).source
        except (KeyError, CorruptValueError):
            return None

    def _clear_pending(self, key: bytes, source: str) -> None:
        """Delete a pending raw record once its example is stored, unless it was rewritten meanwhile."""
        with self._pending() as env:
            if env is None:
                return
            with env.begin(write=True) as txn:
                sealed = txn.get(key)
                if sealed is not None and _source_hash(bytes(sealed)[:-CHECKSUM_BYTES]) == source:
                    txn.delete(key)

    def _prepare(self, normal: Record, key: Optional[bytes], source: Optional[str],
                 seconds: dict[str, float]) -> _Prepared:
        ex_id, n = normal.ex_id, normal.n_tokens
        t = time.perf_counter()
        statistics = _as_record_error(ex_id, "attention", lambda: head_statistics(
            normal.attention, normal.is_text, normal.special, normal.coords, normal.image.shape[:2], normal.grids,
            normal.patch_grid))
        values = list(statistics.values()) + [normal.custom_metrics[m] for m in normal.custom_metrics]
        stats_blob = np.stack(values).astype("<f4").tobytes()
        seconds["statistics"] = time.perf_counter() - t

        # Everything derived from the hidden states uses what is stored (float16, clipped), so
        # that the nearest-token index and the maps agree with the values a reader gets back.
        hidden16 = np.clip(normal.hidden_states, -FLOAT16_MAX, FLOAT16_MAX).astype("<f2")
        stored_hidden = hidden16.astype(np.float32)
        t = time.perf_counter()
        maps = _as_record_error(ex_id, "hidden_states", lambda: np.asarray(_tsne_maps(stored_hidden), dtype="<f4"))
        reduced = compact.plan(normal.n_layers, normal.n_heads, n, normal.hidden_size)
        if reduced is not None:  # the index is built on what the search will read back: the reconstruction
            hidden_blobs, kept_variance = zip(*(compact.encode_hidden(layer, reduced[1]) for layer in stored_hidden))
            hidden16 = np.stack([compact.decode_hidden(blob, n, normal.hidden_size, reduced[1])
                                 for blob in hidden_blobs])
            stored_hidden = hidden16.astype(np.float32)
        else:
            hidden_blobs = [layer.tobytes() for layer in hidden16]
        if maps.shape != (normal.n_layers + 1, n, 2):
            raise RecordError(ex_id, "hidden_states", f"t-SNE returned shape {maps.shape}, expected "
                              f"{(normal.n_layers + 1, n, 2)}")
        seconds["tsne"] = time.perf_counter() - t

        t = time.perf_counter()
        with self._read() as txn:
            raw = txn.get(b"nn_projection", db=self._dbs["meta"])
            projection_bytes = None if raw is None else bytes(open_value(raw, "the nearest-token projection"))
        if projection_bytes is None:
            projection = neighbors.make_projection(hidden16, normal.special)
            projection_bytes = projection.astype("<f4").tobytes()
        else:
            projection = np.frombuffer(projection_bytes, dtype="<f4").reshape(
                normal.n_layers + 1, normal.hidden_size, -1)
        nn_values = _as_record_error(ex_id, "hidden_states", lambda: neighbors.example_entries(
            ex_id, stored_hidden, normal.is_text, normal.special, projection))
        seconds["index"] = time.perf_counter() - t

        t = time.perf_counter()
        info = {"ex_id": ex_id, "tokens": normal.tokens, "txt_len": normal.txt_len,
                "special": normal.special.tolist(), "coords": normal.coords, "grid": normal.grid,
                "modality": "".join("t" if t else "i" for t in normal.is_text),
                "grids": [g.as_json() for g in normal.grids], "generated": normal.generated,
                "image_size": list(normal.image.shape[:2]), "accuracy": normal.accuracy,
                "prediction": normal.prediction, "text": normal.text, "notes": normal.notes,
                "logit_lens": normal.logit_lens,
                "custom_metrics": list(normal.custom_metrics), "source": source}
        if len(normal.grids) > 1:
            info["patch_grid"] = normal.patch_grid.tolist()
        attention16, info["attention_exp"] = _scaled_float16(normal.attention)
        if reduced is None:
            attention_blobs = [layer.tobytes() for layer in attention16]
            rollout = _as_record_error(ex_id, "attention", lambda: attention_rollout(normal.attention))
            rollout16, info["rollout_exp"] = _scaled_float16(rollout)
            rollout_blobs = {_lkey(ex_id, layer): rollout16[layer].tobytes() for layer in range(normal.n_layers)}
        else:
            attention_blobs, kept_mass = zip(*(compact.encode_attention(layer, reduced[0]) for layer in attention16))
            info["rollout_exp"], rollout_blobs = 0, {}
            reduction = compact.Compact(top_keys=reduced[0], kept_mass=float(np.mean(kept_mass)),
                                        components=reduced[1], kept_variance=float(np.mean(kept_variance)))
            info["compact"] = reduction.as_json()
            info["notes"] = list(normal.notes) + [reduction.note()]
        ekey = _ekey(ex_id)
        image_png = _as_record_error(ex_id, "image", lambda: _png(normal.image))
        values = {
            b"info": {ekey: json.dumps(info).encode()},
            b"ids": {ekey: b""},
            b"image": {ekey: image_png},
            b"attention": {_lkey(ex_id, layer): blob for layer, blob in enumerate(attention_blobs)},
            b"rollout": rollout_blobs,
            b"relevancy": {} if normal.relevancy is None else {ekey: normal.relevancy.astype("<f4").tobytes()},
            b"hidden": {_lkey(ex_id, layer): blob for layer, blob in enumerate(hidden_blobs)},
            b"tsne": {ekey: maps.tobytes()},
            b"stats": {ekey: stats_blob},
            b"nn": nn_values,
        }
        seconds["encode"] = time.perf_counter() - t
        shape = _Shape(ex_id=ex_id, n_layers=normal.n_layers, n_heads=normal.n_heads, hidden_size=normal.hidden_size,
                       is_text=normal.is_text, special=normal.special, hidden16=hidden16,
                       custom_metrics=list(normal.custom_metrics), metric_descriptions=normal.metric_descriptions)
        return _Prepared(example=shape, key=key, source=source, values=values, projection=projection_bytes,
                         seconds=seconds)

    def _commit(self, prepared: _Prepared) -> None:
        """Write one prepared example in one transaction (all or nothing); then clear its pending
        raw record (a crash in between is noticed by the next preprocess() from info's source)."""
        normal, ex_id = prepared.example, prepared.example.ex_id
        with self._write() as txn:
            dims = (self._meta("n_layers", txn), self._meta("n_heads", txn), self._meta("hidden_size", txn))
            if dims[0] is not None:
                for name, got, want, field_name in (("layers", normal.n_layers, dims[0], "attention"),
                                                    ("heads", normal.n_heads, dims[1], "attention"),
                                                    ("hidden size", normal.hidden_size, dims[2], "hidden_states")):
                    if got != want:
                        raise RecordError(ex_id, field_name, f"{got} {name}, but the database has {want} {name}")
            else:
                self._put_meta(txn, "n_layers", normal.n_layers)
                self._put_meta(txn, "n_heads", normal.n_heads)
                self._put_meta(txn, "hidden_size", normal.hidden_size)
                self._put_meta(txn, "special_tokens", list(self.special_tokens))
                self._put_meta(txn, "nn_dim", len(prepared.projection) // 4 // normal.hidden_size
                               // (normal.n_layers + 1))
                self._put_meta(txn, "nn_tail", [])
                self._put_meta(txn, "nn_shards", 0)
                txn.put(b"nn_projection", seal_value(prepared.projection), db=self._dbs["meta"])
            stored_projection = bytes(open_value(txn.get(b"nn_projection", db=self._dbs["meta"]),
                                                 "the nearest-token projection"))
            if stored_projection != prepared.projection:  # another example set it meanwhile
                projection = np.frombuffer(stored_projection, dtype="<f4").reshape(
                    normal.n_layers + 1, normal.hidden_size, -1)
                prepared.values[b"nn"] = neighbors.example_entries(
                    ex_id, normal.hidden16, normal.is_text, normal.special, projection)
            if txn.get(_ekey(ex_id), db=self._dbs["info"]) is not None:
                raise RecordError(ex_id, "ex_id", f"example {ex_id} is already in the database "
                                  f"(use db.reserve_example_id() for a new id, or discard_pending({ex_id!r}))")
            for name, items in prepared.values.items():
                if name == b"nn":  # neighbors.py seals its own values
                    db = self._dbs["nn"]
                    for key, value in items.items():
                        txn.put(key, value, db=db)
                    continue
                db = self._dbs[name.decode()]
                for key, value in items.items():
                    txn.put(key, seal_value(value), db=db)
            custom = self._meta("custom_metrics", txn) or []
            new = [m for m in normal.custom_metrics if m not in custom]
            if new:
                self._put_meta(txn, "custom_metrics", custom + new)
            if normal.metric_descriptions:
                described = self._meta("metric_descriptions", txn) or {}
                if any(described.get(k) != v for k, v in normal.metric_descriptions.items()):
                    self._put_meta(txn, "metric_descriptions", {**described, **normal.metric_descriptions})
            tail = (self._meta("nn_tail", txn) or []) + [ex_id]
            if len(tail) >= neighbors.SHARD_EXAMPLES:
                shard = self._meta("nn_shards", txn) or 0
                neighbors.seal(txn, self._dbs["nn"], tail, shard, normal.n_layers + 1)
                self._put_meta(txn, "nn_shards", shard + 1)
                tail = []
            self._put_meta(txn, "nn_tail", tail)
            self._bump_next_id(txn, ex_id)
        if prepared.key is not None:
            self._clear_pending(prepared.key, prepared.source)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _as_record_error(ex_id, field_name: str, compute):
    """``compute()``, with any failure but a RecordError turned into one for ``field_name``: one bad
    record must never abort a whole preprocess() (or leave a traceback instead of a message)."""
    try:
        return compute()
    except RecordError:
        raise
    except Exception as error:  # noqa: BLE001 - reported with the example and the field
        raise RecordError(ex_id, field_name, f"could not be processed: {_one_line(error)}") from None
