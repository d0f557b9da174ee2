"""Batch extraction: run a live model over a file of (image, text) pairs into a database.

    python -m app.database.extract -m vilt shapes_vqa/vilt-shapes --pairs pairs.jsonl --out my_db

``pairs.jsonl`` holds one JSON object per line: ``{"image": "img/0.png", "text": "what color is the
circle?", "label": "red"}`` (``label`` optional; a relative ``image`` path is resolved against the
folder of the pairs file). Every record goes through ``VliLmdb.add_record`` (validated, then
committed on its own), with a tqdm bar.

Example ids: line ``k`` (1-based, blank lines count) becomes example ``first_id + k - 1``, where
``first_id`` is ``--first-id`` or, on the first run, ``db.reserve_example_id()`` (the next free id).
``first_id`` is remembered per pairs file (by its path relative to the database folder) in
``extract_runs.json`` next to the database, so running
the same command again after an interruption skips the lines whose example is already there (same
id and same text) and does the rest.

A bad line (invalid JSON, a missing field, an unreadable image, a model error, an invalid record)
is reported with its line number and skipped; the others still land. The exit status is 0 when
every line is in the database, 1 when some line failed (a summary lists them), 2 when the model or
the arguments are wrong, 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from app.database.models import ModelLoadError, load_model, run_data_setup

RUNS_FILE = "extract_runs.json"


class PairError(ValueError):
    """A line of the pairs file is not a usable pair."""


@dataclass
class ExtractReport:
    added: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # already in the database (resumed)
    failed: dict[int, str] = field(default_factory=dict)  # line number -> message

    def summary(self) -> str:
        return f"{len(self.added)} added, {len(self.skipped)} already in the database, {len(self.failed)} failed"


def parse_pair(line: str, base_dir: str) -> dict:
    """``{"image": absolute path, "text": str, "label": str or None}`` from one JSON line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise PairError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise PairError(f"expected a JSON object, got {type(obj).__name__}")
    for name in ("image", "text"):
        if not isinstance(obj.get(name), str) or not obj[name].strip():
            raise PairError(f"missing or empty field {name!r} (a string)")
    label = obj.get("label")
    if label is not None and not isinstance(label, (str, int, float, bool)):
        raise PairError("field 'label' must be a string")
    image = os.path.expanduser(obj["image"])
    if not os.path.isabs(image):
        image = os.path.join(base_dir, image)
    return {"image": os.path.normpath(image), "text": obj["text"], "label": None if label is None else str(label)}


def _runs_path(out: str) -> str:
    return os.path.join(out, RUNS_FILE) if os.path.isdir(out) else out + "." + RUNS_FILE


def _run_key(pairs_path: str, out: str) -> str:
    """The pairs file, as a path relative to the folder of the runs file: the key still matches
    after the project (database and pairs file together) moves to another folder or machine."""
    runs_dir = os.path.dirname(os.path.abspath(_runs_path(out)))
    return os.path.relpath(os.path.abspath(pairs_path), runs_dir).replace(os.sep, "/")


def _load_runs(out: str) -> dict:
    try:
        with open(_runs_path(out)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _save_runs(out: str, runs: dict) -> None:
    path = _runs_path(out)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(runs, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _existing_text(db, ex_id: int):
    try:
        return db.example(ex_id).text
    except KeyError:  # not stored yet
        return None


def _tsne_ready(log) -> None:
    """The t-SNE kernels compiled (or loaded) before the progress bar starts, with a line when that
    takes a while (the first run in a checkout), so that it is neither silent nor in the ETA."""
    from app.database.tsne import wait_until_compiled  # noqa: PLC0415
    wait_until_compiled(log)


def extract(model, pairs_path: str, db, out: str, first_id: int | None = None, progress: bool = True,
            log=None) -> ExtractReport:
    """Run ``model`` on every line of ``pairs_path`` into ``db`` (see the module docstring)."""
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    with open(pairs_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    base_dir = os.path.dirname(os.path.abspath(pairs_path))
    key = _run_key(pairs_path, out)
    runs = _load_runs(out)
    existing = set(int(i) for i in db.example_ids())
    pending = set(int(k) for k in db.pending_keys() if str(k).isdigit())
    if key in runs:
        if first_id is not None and first_id != runs[key]["first_id"]:
            raise ValueError(f"{pairs_path} was extracted into this database from id {runs[key]['first_id']}; "
                             f"--first-id {first_id} disagrees (remove {_runs_path(out)} to start over)")
        first_id = int(runs[key]["first_id"])
    else:
        if first_id is None:
            first_id = int(db.reserve_example_id())  # above every example, pending record and reservation
        runs[key] = {"first_id": int(first_id)}
        _save_runs(out, runs)

    report = ExtractReport()
    _tsne_ready(log)
    bar = tqdm(enumerate(lines, start=1), total=len(lines), desc="extracting", unit="pair", disable=not progress)
    for number, line in bar:
        if not line.strip():
            continue
        ex_id = first_id + number - 1
        try:
            pair = parse_pair(line, base_dir)
            if ex_id in existing:
                if _existing_text(db, ex_id) == pair["text"]:
                    report.skipped.append(ex_id)
                    continue
                raise PairError(f"example {ex_id} is already in the database with another text")
            if ex_id in pending:
                raise PairError(f"example {ex_id} is a pending record of this database (run preprocess())")
            record = run_data_setup(model, ex_id, pair["image"], pair["text"], label=pair["label"])
            stored = db.add_record(record)
            report.added.append(ex_id if stored is None else int(stored))
            existing.add(ex_id)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one bad line never loses the others
            message = " ".join(str(e).split()) or type(e).__name__
            if not isinstance(e, (PairError, ValueError, OSError)):
                message = f"{type(e).__name__}: {message}"
            report.failed[number] = message
            log(f"{pairs_path}:{number}: {message}")
    bar.close()
    return report


def main(argv=None, prog: str = "python -m app.database.extract") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a live model over a JSON-lines file of (image, text[, label]) pairs into a database.",
    )
    parser.add_argument("-m", "--model", required=True, help="model module in app/database/models/ (e.g. vilt)")
    parser.add_argument("params", nargs="*", help="the model's parameters (for vilt: CHECKPOINT [DEVICE])")
    parser.add_argument("--pairs", required=True, help='JSON lines: {"image": PATH, "text": STR, "label": STR}')
    parser.add_argument("--out", required=True, help="database directory (created when missing)")
    parser.add_argument("--first-id", type=int, default=None, help="example id of line 1 (default: next free)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)

    if not os.path.isfile(args.pairs):
        print(f"error: pairs file not found: {args.pairs}", file=sys.stderr)
        return 2
    from app.database.tsne import compile_in_background  # noqa: PLC0415 - keep `--help` fast
    compile_in_background()  # built while the model loads, so that the ETA never counts it
    try:
        model = load_model(args.model, args.params)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from app.database.database import VliLmdb  # noqa: PLC0415 - keep `--help` fast

    db = VliLmdb(args.out, read_only=False)
    try:
        report = extract(model, args.pairs, db, args.out, first_id=args.first_id, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("\ninterrupted: every finished line is stored; run the same command again to resume",
              file=sys.stderr)
        return 130
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        db.close()
    print(report.summary(), file=sys.stderr)
    if report.failed:
        print("failed lines:", file=sys.stderr)
        for number, message in sorted(report.failed.items()):
            print(f"  line {number}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
