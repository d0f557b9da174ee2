"""A database-wide token map: tokens of many examples in one 2-D map of a layer's hidden states.

    python -m app.database.token_map DB [--layers 0 4 12 | all] [--max-tokens 20000]

fits the maps ahead of time (the page fits a layer on first use otherwise, with its progress shown).

What is mapped: up to ``max_tokens`` tokens (default 20 000) drawn uniformly, without replacement and
with a fixed seed, from all the tokens of all the examples (every token of a small database), so
that an example's share of the map is its share of the tokens. Their hidden states after the layer
are reduced to 50 principal components (scikit-learn's PCA; t-SNE's usual first step, which keeps the
neighbourhoods and makes the nearest-neighbour search an order cheaper) and embedded with openTSNE
(its defaults: perplexity 30, PCA initialisation, 250 early-exaggeration and 500 optimisation
iterations, FFT-accelerated gradients).

openTSNE rather than UMAP, by measurement (20 000 points of 256 dimensions in 40 clusters, 2 cores):
openTSNE 77 s and 436 MB, UMAP 84 s and 556 MB (numba's compilation of UMAP in each new process
included), trustworthiness at 10 neighbours 0.992 and 0.991. It is also the method of the
per-example maps (app/database/tsne.py), so both maps read the same way: near means similar, while
distances between far clusters mean little. openTSNE reports its iterations, which the page shows.

Fitted maps are kept in ``DB/token_maps/layer-LLL.npz`` (plain arrays, read back without pickle),
tagged with a hash of the example ids and the sample size: a map is refitted once examples are added
or removed, or another size is asked for (a note added to an example changes neither). Where the
database folder is read-only they are kept in memory only, and said so.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from app.database import dataset as ds

DEFAULT_MAX_TOKENS = 20_000
PCA_DIMENSIONS = 50
SEED = 0
FOLDER = "token_maps"
MODALITIES = ("text", "image", "special")  # the ``modality`` codes 0, 1, 2
NEIGHBOURS_SHARE = 0.15  # of a fit's time, before openTSNE's first iteration (measured at 20 000 tokens)
CALLBACK_EVERY = 25  # openTSNE iterations between two progress reports


@dataclass(frozen=True)
class TokenMap:
    """One layer's map: point ``k`` is token ``tokens[k]`` of example ``ex_ids[k]``."""

    layer: int
    examples_key: str  # examples_key() of the database it was fitted on
    max_tokens: int
    points: np.ndarray  # (n, 2) float32
    ex_ids: np.ndarray  # (n,) int64
    tokens: np.ndarray  # (n,) int32
    words: np.ndarray  # (n,) str: the token as stored
    modality: np.ndarray  # (n,) int8: an index of MODALITIES
    cells: np.ndarray  # (n, 2) int16: an image token's patch (x, y), (-1, -1) for other tokens
    correct: np.ndarray  # (n,) int8: the example's correctness, 1, 0 or -1 (unknown)

    def __len__(self) -> int:
        return len(self.ex_ids)


def examples_key(ex_ids) -> str:
    """What a map depends on besides its layer and size: which examples there are (stored examples
    never change their hidden states)."""
    return hashlib.sha256(np.asarray(ex_ids, dtype="<i8").tobytes()).hexdigest()[:32]


def sample_tokens(n_tokens: Sequence[int], max_tokens: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(example positions, token indices) of ``max_tokens`` tokens drawn uniformly without replacement
    from all the tokens (example ``i`` has ``n_tokens[i]``), or of every token when there are fewer;
    sorted by example, then token."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    counts = np.asarray(n_tokens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    flat = np.arange(total) if total <= max_tokens else \
        np.sort(np.random.default_rng(seed).choice(total, size=max_tokens, replace=False))
    positions = np.searchsorted(starts, flat, side="right") - 1
    return positions, (flat - starts[positions]).astype(np.int32)


def _token_features(db, ex_ids: np.ndarray, tokens: np.ndarray, layer: int) -> tuple[np.ndarray, dict]:
    """The hidden states (n, hidden) float32 of the sampled tokens, and each example's info."""
    features = np.empty((len(ex_ids), db.hidden_size), dtype=np.float32)
    infos = {}
    bounds = np.flatnonzero(np.diff(ex_ids, prepend=-1, append=-1))  # where each example's run starts
    for start, stop in zip(bounds[:-1], bounds[1:]):
        ex_id = int(ex_ids[start])
        infos[ex_id] = db.example(ex_id)
        features[start:stop] = db.hidden_states(ex_id, layer)[tokens[start:stop]]
    return features, infos


def _labels(ex_ids: np.ndarray, tokens: np.ndarray, infos: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sampled token's text, modality code and patch (x, y) (-1, -1 for a token that is no patch)."""
    words, modality = [], np.empty(len(tokens), dtype=np.int8)
    cells = np.full((len(tokens), 2), -1, dtype=np.int16)
    for k, (ex_id, tok) in enumerate(zip(ex_ids.tolist(), tokens.tolist())):
        info = infos[ex_id]
        words.append(info.tokens[tok])
        modality[k] = 2 if info.special[tok] else 0 if info.is_text[tok] else 1
        if info.coords[tok] is not None:
            cells[k] = info.coords[tok][:2]
    return np.asarray(words, dtype=str), modality, cells


def fit_token_map(db, layer: int, max_tokens: int = DEFAULT_MAX_TOKENS,
                  progress: Optional[Callable[[str, float], None]] = None) -> TokenMap:
    """Fit one layer's map (see the module docstring); ``progress(phase, fraction done)`` is called as
    it goes. ValueError for a layer the database does not have or a database without examples."""
    import openTSNE  # noqa: PLC0415 - only when a map is fitted
    from sklearn.decomposition import PCA  # noqa: PLC0415

    if not isinstance(layer, int) or not 0 <= layer <= (db.n_layers or 0):
        raise ValueError(f"layer {layer!r}: the hidden states go from 0 (embeddings) to {db.n_layers}")
    report = progress or (lambda phase, fraction: None)
    index = ds.cache_for(db).get()
    if not len(index):
        raise ValueError("the database has no examples to map")
    report("reading the hidden states", 0.0)
    positions, tokens = sample_tokens(index.n_tokens, max_tokens)
    ex_ids = index.ex_ids[positions]
    features, infos = _token_features(db, ex_ids, tokens, layer)
    words, modality, cells = _labels(ex_ids, tokens, infos)
    n = len(features)
    if n < 4:  # openTSNE needs a few neighbours; a map of so few tokens is a line of dots
        points = np.zeros((n, 2), dtype=np.float32)
        points[:, 0] = np.arange(n)
    else:
        dims = min(PCA_DIMENSIONS, n, features.shape[1])
        reduced = PCA(dims, random_state=SEED).fit_transform(features.astype(np.float64))
        points = _embed(openTSNE, reduced, report).astype(np.float32)
    report("done", 1.0)
    return TokenMap(layer, examples_key(index.ex_ids), max_tokens, points, ex_ids.astype(np.int64), tokens, words, modality,
                    cells, index.correct[positions].astype(np.int8))


def _embed(openTSNE, x: np.ndarray, report: Callable[[str, float], None]) -> np.ndarray:
    """openTSNE's defaults on every core, its iterations reported (the nearest-neighbour search first
    takes about NEIGHBOURS_SHARE of the time, without reports)."""
    n_jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    tsne = openTSNE.TSNE(perplexity=min(30.0, (len(x) - 1) / 3.0),  # it needs 3 * perplexity neighbours
                         n_jobs=n_jobs, random_state=SEED, callbacks_every_iters=CALLBACK_EVERY)
    total = tsne.early_exaggeration_iter + tsne.n_iter
    reports = [0]

    def optimising(_iteration, _error, _embedding) -> bool:
        reports[0] += 1
        report("optimising", NEIGHBOURS_SHARE + (1 - NEIGHBOURS_SHARE) * min(1.0, reports[0] * CALLBACK_EVERY / total))
        return False  # go on

    tsne.callbacks = [optimising]
    report("finding nearest neighbours", 0.0)
    return np.asarray(tsne.fit(x))


# ----------------------------------------------------------------------------- kept maps

ARRAYS = ("points", "ex_ids", "tokens", "words", "modality", "cells", "correct")


def map_path(db_path: str, layer: int) -> str:
    return os.path.join(db_path, FOLDER, f"layer-{layer:03d}.npz")


def save_map(db_path: str, token_map: TokenMap) -> None:
    """Write the map atomically (a reader sees the old file or the new one); OSError where the folder
    cannot be written."""
    folder = os.path.join(db_path, FOLDER)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".layer-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, layer=token_map.layer, examples_key=token_map.examples_key, max_tokens=token_map.max_tokens,
                     **{name: getattr(token_map, name) for name in ARRAYS})
        os.replace(tmp, map_path(db_path, token_map.layer))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_map(db_path: str, layer: int, key: str, max_tokens: int) -> Optional[TokenMap]:
    """The kept map of ``layer`` if it was fitted on these examples with this size, else None (also for
    a file that is missing, damaged or not one of ours: it is fitted again)."""
    try:
        with np.load(map_path(db_path, layer), allow_pickle=False) as f:
            if str(f["examples_key"]) != key or int(f["max_tokens"]) != max_tokens or int(f["layer"]) != layer:
                return None
            arrays = {name: f[name] for name in ARRAYS}
    except (OSError, KeyError, ValueError, EOFError):
        return None
    n = len(arrays["ex_ids"])
    if arrays["points"].shape != (n, 2) or arrays["cells"].shape != (n, 2) or any(len(a) != n for a in arrays.values()):
        return None
    return TokenMap(layer, key, max_tokens, **arrays)


def _fit_marker(db_path: str, layer: int) -> str:
    return os.path.join(db_path, FOLDER, f"layer-{layer:03d}.fitting.json")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _marker_state(db_path: str, layer: int, key: str, max_tokens: int) -> Optional[dict]:
    """The fit another process of this machine is running for this map (its progress), or None."""
    try:
        with open(_fit_marker(db_path, layer), encoding="utf-8") as f:
            marker = json.load(f)
        alive = marker["host"] == socket.gethostname() and _pid_alive(int(marker["pid"]))
        if alive and marker["key"] == key and marker["max_tokens"] == max_tokens and marker["pid"] != os.getpid():
            return {"state": "fitting", "phase": str(marker["phase"]), "fraction": float(marker["fraction"]),
                    "message": ""}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_marker(db_path: str, layer: int, key: str, max_tokens: int, phase: str, fraction: float) -> None:
    """Say (atomically) that this process is fitting the map, so that the other server processes wait
    for it instead of fitting it too; OSError where the folder cannot be written."""
    path = _fit_marker(db_path, layer)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".marker-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "key": key, "max_tokens": max_tokens,
                   "phase": phase, "fraction": fraction}, f)
    os.replace(tmp, path)


class TokenMaps:
    """The maps of one open database: kept ones read from disk, missing ones fitted on request in one
    background thread (one fit at a time: each uses every core), so that the page stays responsive and
    polls :meth:`status`. Thread-safe. With several server processes, a fit in one is seen by the
    others (a marker file in ``DB/token_maps/``), which wait for its map instead of fitting it again."""

    def __init__(self, db, max_tokens: int = DEFAULT_MAX_TOKENS):
        self.db, self.max_tokens = db, max_tokens
        self._maps: dict[tuple[str, int], TokenMap] = {}
        self._states: dict[tuple[str, int], dict] = {}
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vli-token-map")
        self.not_kept: Optional[str] = None  # why fitted maps are not written to disk, once that failed

    def _key(self, layer: int) -> tuple[str, int]:
        return examples_key(ds.cache_for(self.db).get().ex_ids), layer

    def get(self, layer: int) -> Optional[TokenMap]:
        """The layer's map for the database as it is now, if fitted (in memory or on disk)."""
        key = self._key(layer)
        with self._lock:
            if key in self._maps:
                return self._maps[key]
        kept = load_map(self.db.path, layer, key[0], self.max_tokens)
        if kept is not None:
            with self._lock:
                self._maps[key] = kept
        return kept

    def status(self, layer: int) -> dict:
        """{"state": "ready" | "fitting" | "missing" | "error", "phase", "fraction", "message"}."""
        key = self._key(layer)
        with self._lock:
            state = self._states.get(key)
        if state is not None:
            return dict(state)
        if self.get(layer) is not None:
            return {"state": "ready", "phase": "", "fraction": 1.0, "message": ""}
        return _marker_state(self.db.path, layer, key[0], self.max_tokens) or \
            {"state": "missing", "phase": "", "fraction": 0.0, "message": ""}

    def request(self, layer: int) -> dict:
        """Start fitting the layer's map in the background unless it is fitted or being fitted; its status."""
        status = self.status(layer)
        if status["state"] in ("ready", "fitting"):
            return status  # an error is asked again: the page offers that
        key = self._key(layer)
        with self._lock:
            self._states[key] = {"state": "fitting", "phase": "queued", "fraction": 0.0, "message": ""}
        self._worker.submit(self._fit, key)
        return self.status(layer)

    def fit(self, layer: int, progress: Optional[Callable[[str, float], None]] = None) -> TokenMap:
        """Fit the layer's map now (in this thread), keep it and write it to disk where possible."""
        token_map = fit_token_map(self.db, layer, self.max_tokens, progress)
        with self._lock:
            self._maps[(token_map.examples_key, layer)] = token_map
        try:
            save_map(self.db.path, token_map)
        except OSError as error:
            self.not_kept = f"the maps are not kept on disk ({os.path.join(self.db.path, FOLDER)}: " \
                            f"{error.strerror or error}): they are fitted again when the app restarts"
        return token_map

    def _fit(self, key: tuple[str, int]) -> None:
        marked = [True]

        def progress(phase: str, fraction: float) -> None:
            with self._lock:
                self._states[key] = {"state": "fitting", "phase": phase, "fraction": fraction, "message": ""}
            if marked[0]:
                try:
                    _write_marker(self.db.path, key[1], key[0], self.max_tokens, phase, fraction)
                except OSError:
                    marked[0] = False  # a read-only folder: the other processes cannot know
        try:
            self.fit(key[1], progress)
            with self._lock:
                self._states.pop(key, None)
        except Exception as error:  # noqa: BLE001 - shown in the page, which can ask again
            with self._lock:
                self._states[key] = {"state": "error", "phase": "", "fraction": 0.0,
                                     "message": " ".join(str(error).split()) or type(error).__name__}
        finally:
            if marked[0]:
                try:
                    os.unlink(_fit_marker(self.db.path, key[1]))
                except OSError:
                    pass

    def shutdown(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


_MAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MAPS_LOCK = threading.Lock()


def maps_for(db, max_tokens: int = DEFAULT_MAX_TOKENS) -> TokenMaps:
    """The one TokenMaps of an open database (the first call's ``max_tokens`` holds)."""
    with _MAPS_LOCK:
        if db not in _MAPS:
            _MAPS[db] = TokenMaps(db, max_tokens)
        return _MAPS[db]


# ----------------------------------------------------------------------------- command line

def main(argv=None, prog: str = "python -m app.database.token_map") -> int:
    from tqdm import tqdm  # noqa: PLC0415

    from app.database.database import DatabaseError, VliLmdb  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog=prog,
                                     description="Fit the database-wide token maps ahead of time (the page "
                                                 "fits a layer on first use otherwise).")
    parser.add_argument("database", help="a preprocessed database directory")
    parser.add_argument("--layers", nargs="+", default=["all"],
                        help="hidden-state layers, 0 (embeddings) to the last, or 'all' (default)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"tokens sampled per map (default {DEFAULT_MAX_TOKENS}; the page's --map-tokens "
                             f"must match to use them)")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    try:
        db = VliLmdb(args.database)
    except DatabaseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with db:
        n_layers = db.n_layers or 0
        try:
            layers = list(range(n_layers + 1)) if args.layers == ["all"] else [int(v) for v in args.layers]
        except ValueError:
            parser.error(f"--layers: numbers from 0 to {n_layers}, or 'all'")
        if any(not 0 <= layer <= n_layers for layer in layers):
            parser.error(f"--layers: numbers from 0 to {n_layers}, or 'all'")
        maps = TokenMaps(db, args.max_tokens)
        for layer in layers:
            if maps.get(layer) is not None:
                print(f"layer {layer}: already fitted", file=sys.stderr)
                continue
            with tqdm(total=100, desc=f"layer {layer}", unit="%", bar_format="{l_bar}{bar}| {postfix}") as bar:
                def progress(phase: str, fraction: float) -> None:
                    bar.n = round(100 * fraction)
                    bar.set_postfix_str(phase)
                try:
                    token_map = maps.fit(layer, progress)
                except ValueError as error:
                    print(f"error: {error}", file=sys.stderr)
                    return 2
            print(f"layer {layer}: {len(token_map)} tokens mapped", file=sys.stderr)
        if maps.not_kept:
            print(f"warning: {maps.not_kept}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
