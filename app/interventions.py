"""Interventions on a stored example: the live model re-run with heads zeroed, image patches removed,
or another example's hidden states patched in (the model side of the "Interventions" panel; no Dash).

Every run starts from what the example stores: its image (the one the model saw), its text and its
image tokens' patches in stored order, so a token position means the same token in the database and
in the re-run (the re-run's tokens are checked against the stored ones). The comparison is always
with an unchanged re-run, not with the stored prediction, so that both sides saw the same pixels.

Results are cached in memory per (example, settings): an :class:`Interventions` lives as long as the
app, and a repeated request answers without running the model.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from app.database.analysis import deletion_order
from app.figures import token_labels

FRACTIONS = tuple(round(0.1 * i, 1) for i in range(10))  # of the patches removed: 0 %, 10 %, ..., 90 %
METHODS = ("attention", "rollout", "relevancy")  # the attention panel's methods (app.panels.tokens.METHODS)
QUERY = 0  # the first text token, [CLS]: what ViLT's pooler (and so its answer) reads
CACHE_SIZE = 128  # results kept (each a few predictions)
MAX_NAMED_PATCHES = 24  # a note names at most this many removed patches, then counts the rest

log = logging.getLogger(__name__)


class InterventionError(ValueError):
    """An intervention that cannot run on this example; the message names the example and the field."""


@dataclass(frozen=True)
class DeletionCurve:
    """The score of the original answer as the most relevant patches go, ``fractions`` of them."""
    method: str
    fractions: tuple
    removed: tuple  # patches removed at each fraction
    scores: tuple  # the original answer's score after each removal
    answers: tuple  # the top answer after each removal
    original: dict  # the unchanged re-run's prediction


@dataclass(frozen=True)
class HeadSweep:
    """The head ablation sweep: ``scores[l, h]`` is the original answer's score with head ``h`` of layer
    ``l`` zeroed alone, ``answers[l][h]`` the top answer then."""
    scores: np.ndarray  # float32 (n_layers, n_heads)
    answers: tuple  # n_layers tuples of n_heads answers
    original: dict  # the unchanged re-run's prediction


@dataclass(frozen=True)
class Patching:
    """Activation patching of ``clean`` into ``corrupted``: ``difference[l, c]`` is the clean answer's
    logit when layer ``l``'s output at column ``c``'s positions (``per`` "position": the residual stream)
    or head ``c``'s output (``per`` "head") comes from the clean run, minus that logit in the corrupted
    run; ``recovered`` divides it by the clean run's margin (1: all recovered)."""
    clean: int
    corrupted: int
    per: str  # "position" or "head"
    columns: tuple  # column labels
    difference: np.ndarray  # float32 (n_layers, columns)
    recovered: Optional[np.ndarray]  # None when the clean and corrupted logits are equal
    clean_prediction: dict
    corrupted_prediction: dict


def stored_input(db, ex_id: int) -> tuple:
    """(image, text, patches) of a stored example, what the model is re-run on."""
    info = db.example(ex_id)
    if not info.text:
        raise InterventionError(f"example {ex_id}: no text stored (field text), so the model cannot be re-run on it")
    if not info.grid:
        raise InterventionError(f"example {ex_id}: no image patches (field img_coords), so the model cannot be "
                                "re-run on it")
    patches = [info.coords[i] for i in patch_positions(info)]
    return db.image(ex_id), info.text, patches


def patch_positions(info) -> list[int]:
    """Token positions of the image patches (image tokens with a coordinate)."""
    return [i for i in range(info.n_tokens) if info.coords[i] is not None]


def answer_query(info) -> int:
    """The query whose output is the prediction: a decoder's prompt's last token (it generates the answer's
    first token, what a decoder's re-run scores), else [CLS] (:data:`QUERY`)."""
    return info.n_tokens - info.generated - 1 if info.generated else QUERY


def patch_relevance(db, ex_id: int, method: str) -> np.ndarray:
    """float32 (patches,): how much the answer uses each patch by ``method``, as the answer's query's
    row (:func:`answer_query`) read from the database: the last layer's attention (mean of heads), the
    rollout through every layer, or the gradient relevancy of the prediction."""
    info = db.example(ex_id)
    query = [answer_query(info)]
    if method == "attention":
        row = db.attention(ex_id, db.n_layers - 1, None, query)
    elif method == "rollout":
        row = db.rollout(ex_id, db.n_layers - 1, query)
    elif method == "relevancy":
        row = db.relevancy(ex_id, query)
        if row is None:
            raise InterventionError(f"example {ex_id}: no gradient relevancy stored (field relevancy); "
                                    "pick attention or rollout")
    else:
        raise InterventionError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    return np.asarray(row, dtype=np.float32)[patch_positions(info)]


def deletion_sets(relevance: np.ndarray, positions: list[int], fractions=FRACTIONS) -> list[list[int]]:
    """The token positions removed at each fraction: the most relevant ``round(f * patches)`` first."""
    order = deletion_order(relevance, positive=True)
    return [[positions[i] for i in order[: int(round(f * len(positions)))]] for f in fractions]


def patching_columns(info) -> tuple[list[str], list[list[int]]]:
    """What activation patching patches, column by column: each text token, each image-side special
    token, all the image patches together, and every position (which restores the clean run)."""
    labels = token_labels(info.tokens, info.coords)
    columns = [[i] for i in range(info.n_tokens) if info.coords[i] is None]
    names = [f"{i} {labels[i]}" for (i,) in columns]
    return names + ["all patches", "all positions"], columns + [patch_positions(info), list(range(info.n_tokens))]


class Interventions:
    """The interventions of one app: its database and its live model, with a cache of the results.

    The sweeps (every head ablated, activation patching per position and per head) take one forward pass
    per layer or more: :meth:`request` runs them in a background thread and reports how far they are, so
    that the page polls a progress bar instead of waiting on one request. A request to a server process
    that has not got the run starts it there (the results are the same), so polls may reach any worker."""

    def __init__(self, db, model):
        self.db = db
        self.model = model
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._running: dict = {}  # background run -> the fraction done
        self._failed: dict = {}  # background run -> why it failed (said once)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vli-interventions")

    def request(self, kind: str, *args) -> dict:
        """Start the background run ``kind`` (a key of BACKGROUND: ``"sweep", ex_id`` or ``"patching", clean,
        corrupted``) unless it is done or running; its state: {"state": "done"}, {"state": "running",
        "fraction": 0..1} or {"state": "error", "message"} (said once: asking again runs it again)."""
        if kind not in BACKGROUND:
            raise InterventionError(f"no background run {kind!r} (expected one of {', '.join(BACKGROUND)})")
        job = (kind, *args)
        with self._lock:
            if job in self._failed:
                return {"state": "error", "message": self._failed.pop(job)}
            if job in self._running:
                return {"state": "running", "fraction": self._running[job]}
            if all(key in self._cache for key in BACKGROUND[kind].keys(*args)):
                return {"state": "done"}
            self._running[job] = 0.0
        self._worker.submit(self._run, job)
        return {"state": "running", "fraction": 0.0}

    def _run(self, job: tuple) -> None:
        kind, *args = job

        def progress(fraction: float) -> None:
            with self._lock:
                self._running[job] = float(fraction)
        try:
            BACKGROUND[kind].run(self, *args, progress=progress)
        except (InterventionError, ValueError) as error:  # the model's own checks say what is wrong
            failed = str(error)
        except Exception as error:  # noqa: BLE001 - said in the page; the server goes on
            log.exception("background run %s failed", job)
            failed = f"the run failed: {type(error).__name__}: {error}"
        else:
            failed = None
        with self._lock:
            del self._running[job]
            if failed is not None:
                self._failed[job] = failed

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _cached(self, key, compute):
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = compute()  # outside the lock: the model has its own, other requests read the cache
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return value

    def _checked(self, ex_id: int, prediction: dict) -> dict:
        stored = list(self.db.example(ex_id).tokens)
        if list(prediction["tokens"]) != stored:
            raise InterventionError(f"example {ex_id}: the model's tokens for the stored text and image differ "
                                    f"from the stored ones (field tokens): was it made by another model?")
        return prediction

    def original(self, ex_id: int) -> dict:
        """The prediction of the unchanged re-run."""
        return self._cached(("original", ex_id), lambda: self._checked(
            ex_id, self.model.predict(*stored_input(self.db, ex_id))))

    def ablation(self, ex_id: int, heads) -> dict:
        """The prediction with ``heads`` ([(layer, head)], 0-based) zeroed."""
        heads = tuple(sorted({(int(layer), int(head)) for layer, head in heads}))
        if not heads:
            raise InterventionError(f"example {ex_id}: no head to ablate (field heads)")
        image, text, patches = stored_input(self.db, ex_id)
        return self._cached(("ablate", ex_id, heads), lambda: self._checked(
            ex_id, self.model.ablate(image, text, list(heads), patches=patches)))

    def masked(self, ex_id: int, tokens) -> dict:
        """The prediction with the image patches at token positions ``tokens`` removed."""
        info = self.db.example(ex_id)
        removed = tuple(sorted(set(tokens) & set(patch_positions(info))))
        if not removed:
            raise InterventionError(f"example {ex_id}: no image patch selected to remove (field tokens)")
        image, text, patches = stored_input(self.db, ex_id)
        return self._cached(("mask", ex_id, removed), lambda: self._checked(
            ex_id, self.model.mask_patches(image, text, [list(removed)], patches=patches)[0]))

    def deletion_curve(self, ex_id: int, method: str) -> DeletionCurve:
        """The original answer's score as the most relevant patches by ``method`` are removed."""
        def compute():
            info = self.db.example(ex_id)
            sets = deletion_sets(patch_relevance(self.db, ex_id, method), patch_positions(info))
            image, text, patches = stored_input(self.db, ex_id)
            original = self.original(ex_id)
            runs = self.model.mask_patches(image, text, sets, patches=patches)
            return DeletionCurve(method, FRACTIONS, tuple(len(s) for s in sets),
                                 tuple(float(r["scores"][original["index"]]) for r in runs),
                                 tuple(r["answer"] for r in runs), original)
        return self._cached(("deletion", ex_id, method), compute)

    def head_sweep(self, ex_id: int, progress=None) -> HeadSweep:
        """Every head zeroed alone: the original answer's score and the top answer each time.
        ``progress(fraction)``, when given, follows the layers."""
        def compute():
            result = self.model.ablate_each_head(*stored_input(self.db, ex_id), progress=_fractions(progress))
            scores = np.asarray(result["scores"], dtype=np.float32)
            if scores.shape != (self.db.n_layers, self.db.n_heads):
                raise InterventionError(f"example {ex_id}: the model swept {scores.shape} heads, the database has "
                                        f"{self.db.n_layers} layers x {self.db.n_heads} heads (field attention)")
            return HeadSweep(scores, tuple(tuple(row) for row in result["answers"]),
                             self._checked(ex_id, result["original"]))
        return self._cached(("sweep", ex_id), compute)

    def patching(self, clean: int, corrupted: int, progress=None) -> Patching:
        """Activation patching from example ``clean`` into example ``corrupted`` (same token layout), per
        layer × position of the residual stream."""
        a = self._patchable(clean, corrupted)

        def compute():
            names, columns = patching_columns(a)
            return self._patching(clean, corrupted, "position", names, self.model.patch_activations(
                stored_input(self.db, clean), stored_input(self.db, corrupted), columns,
                progress=_fractions(progress)))
        return self._cached(("patching", clean, corrupted), compute)

    def head_patching(self, clean: int, corrupted: int, progress=None) -> Patching:
        """Activation patching from example ``clean`` into example ``corrupted`` per layer × head (each
        head's output, at every position)."""
        self._patchable(clean, corrupted)

        def compute():
            return self._patching(clean, corrupted, "head", [f"head {h + 1}" for h in range(self.db.n_heads)],
                                  self.model.patch_heads(stored_input(self.db, clean),
                                                         stored_input(self.db, corrupted),
                                                         progress=_fractions(progress)))
        return self._cached(("head patching", clean, corrupted), compute)

    def _patchable(self, clean: int, corrupted: int):
        """The clean example's info, once the two examples are known to have the same token layout."""
        a, b = self.db.example(clean), self.db.example(corrupted)
        if (a.txt_len, a.n_tokens) != (b.txt_len, b.n_tokens):
            raise InterventionError(
                f"example {corrupted} has {b.txt_len} text and {b.n_tokens - b.txt_len} image tokens, example "
                f"{clean} {a.txt_len} and {a.n_tokens - a.txt_len} (field tokens): activation patching needs "
                "the same tokens at the same positions; pick an example with as many of each")
        return a

    def _patching(self, clean: int, corrupted: int, per: str, names, result: dict) -> Patching:
        """The model's patched logits as differences from the corrupted run's (and shares of the margin)."""
        clean_prediction = self._checked(clean, result["clean"])
        corrupted_prediction = self._checked(corrupted, result["corrupted"])
        answer = clean_prediction["index"]
        base = float(corrupted_prediction["logits"][answer])
        margin = float(clean_prediction["logits"][answer]) - base
        difference = (np.asarray(result["patched"], dtype=np.float32) - base).astype(np.float32)
        if difference.shape != (self.db.n_layers, len(names)):
            raise InterventionError(f"example {clean}: the model patched {difference.shape} cells, expected "
                                    f"{self.db.n_layers} layers x {len(names)} (field attention)")
        recovered = (difference / margin).astype(np.float32) if margin != 0 else None
        return Patching(clean, corrupted, per, tuple(names), difference, recovered, clean_prediction,
                        corrupted_prediction)


def _fractions(progress):
    """A model's ``progress(done, total)`` for a ``progress(fraction)`` (None stays None)."""
    return None if progress is None else (lambda done, total: progress(done / max(total, 1)))


@dataclass(frozen=True)
class _Background:
    """A run :meth:`Interventions.request` starts in the background: ``run(interventions, *args, progress)``
    and ``keys(*args)``, the cache keys that hold its results once it is done."""
    run: Callable
    keys: Callable


def _both_patchings(runs: Interventions, clean: int, corrupted: int, progress) -> None:
    runs.patching(clean, corrupted, progress=lambda f: progress(0.5 * f))
    runs.head_patching(clean, corrupted, progress=lambda f: progress(0.5 + 0.5 * f))


BACKGROUND = {
    "sweep": _Background(run=lambda runs, ex_id, progress: runs.head_sweep(ex_id, progress),
                         keys=lambda ex_id: [("sweep", ex_id)]),
    "patching": _Background(run=_both_patchings,
                            keys=lambda clean, corrupted: [("patching", clean, corrupted),
                                                           ("head patching", clean, corrupted)]),
}


# ----------------------------------------------------------------------------- notes
# What "Save as note" stores with the example: one line per result, self-contained (the model's settings
# are in the line), the numbers as the panel shows them.

def _answer(prediction: dict) -> str:
    return f"'{prediction['answer']}' ({prediction['score']:.3f})"


def _changed(before: dict, after: dict) -> str:
    """"changed the answer from 'red' (0.612) to 'blue' (0.455)", or "kept the answer 'red' (0.612 → 0.590)"."""
    if after["answer"] != before["answer"]:
        return f"changed the answer from {_answer(before)} to {_answer(after)}"
    return f"kept the answer '{before['answer']}' ({before['score']:.3f} → {after['score']:.3f})"


def ablation_note(zeroed: str, before: dict, after: dict) -> str:
    """The note of a head ablation; ``zeroed`` says which heads ("layer 2 (all heads), layer 3 head 1")."""
    return f"Head ablation: zeroing {zeroed} {_changed(before, after)}."


def masking_note(info, tokens, before: dict, after: dict) -> str:
    """The note of removing the image patches at token positions ``tokens`` (named by their (x, y))."""
    cells = [info.coords[t] for t in sorted(tokens)]
    named = ", ".join(f"({x}, {y})" for x, y in cells[:MAX_NAMED_PATCHES])
    more = f" and {len(cells) - MAX_NAMED_PATCHES} more" if len(cells) > MAX_NAMED_PATCHES else ""
    return (f"Patch removal: removing {len(cells)} patch{'es' if len(cells) > 1 else ''} (x, y: {named}{more}) "
            f"{_changed(before, after)}.")


def deletion_note(curve: DeletionCurve) -> str:
    """The note of a deletion curve: the original answer's score at each fraction removed."""
    points = ", ".join(f"{100 * f:.0f} % {s:.3f}" for f, s in zip(curve.fractions, curve.scores))
    return (f"Deletion curve ({curve.method}, most relevant patches first): the score of "
            f"'{curve.original['answer']}' with {points}; with {100 * curve.fractions[-1]:.0f} % removed the "
            f"answer is '{curve.answers[-1]}'.")


def patching_note(result: Patching, n_cells: int = 3) -> str:
    """The note of activation patching: the two answers, the clean margin and the ``n_cells`` layer ×
    position (or layer × head) cells that recover the most of the clean answer's logit."""
    clean, bad = result.clean_prediction, result.corrupted_prediction
    margin = float(clean["logits"][clean["index"]] - bad["logits"][clean["index"]])
    flat = np.argsort(-result.difference, axis=None, kind="stable")[:n_cells]
    cells = []
    for layer, column in zip(*np.unravel_index(flat, result.difference.shape)):
        share = "" if result.recovered is None else f", {100 * result.recovered[layer, column]:.0f} %"
        where = "at " if result.per == "position" else ""
        cells.append(f"layer {layer + 1} {where}{result.columns[column]} ({result.difference[layer, column]:+.3f}"
                     f"{share})")
    what = "Activation patching" if result.per == "position" else "Activation patching of each head's output"
    return (f"{what} from this example ('{clean['answer']}') into example {result.corrupted} "
            f"('{bad['answer']}'): the logit of '{clean['answer']}' is {margin:+.3f} higher in the clean run; "
            f"patched in, the most is recovered by {'; '.join(cells)}.")


def sweep_note(sweep: HeadSweep, n_heads: int = 3) -> str:
    """The note of a head ablation sweep: the ``n_heads`` heads whose ablation lowers the original
    answer's score the most, and how many heads change the answer."""
    original = sweep.original
    drop = sweep.scores - np.float32(original["score"])
    flat = np.argsort(drop, axis=None, kind="stable")[:n_heads]
    heads = [f"layer {l + 1} head {h + 1} ({original['score']:.3f} → {sweep.scores[l, h]:.3f}"
             + (f", answer '{sweep.answers[l][h]}'" if sweep.answers[l][h] != original["answer"] else "") + ")"
             for l, h in zip(*np.unravel_index(flat, drop.shape))]
    flipped = sum(answer != original["answer"] for row in sweep.answers for answer in row)
    return (f"Head ablation sweep (each of {drop.size} heads zeroed alone): the score of '{original['answer']}' "
            f"is lowest with {'; '.join(heads)}; {flipped} of {drop.size} heads change the answer alone.")
