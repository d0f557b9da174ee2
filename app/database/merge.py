"""Merge databases into one, e.g. the shards of a torchrun extraction (see app/database/extract.py):

    python -m app.database.merge OUT/shard-* --into DB [--renumber]
    vl-interpret merge OUT/shard-* --into DB [--renumber]

Every example is copied verbatim with ``VliLmdb.import_example`` (each value checked, nothing
recomputed, the nearest-token index entries made for ``DB``), so the merge of a torchrun extraction
holds what one process would have written, under the same ids.

Examples are copied in id order (ties in the order the databases are given). Ids are kept by
default. With ``--renumber`` every example gets the next free id of ``DB`` (for
databases whose ids collide, e.g. extractions of different pairs files that all started at 0); which
id each one got is remembered in ``DB/merge_renumbered.jsonl`` (written before the copy), so that a
second merge finds them.

Skipped, not copied: an example whose id ``DB`` already holds with the same text (merged before, or
the same line in two shards of runs with different numbers of processes), or whose raw-record hash
(the ``source`` of a record preprocessed from ``db[key] = pickle``) an example of ``DB`` has. The same
id with another text is a conflict, reported (``--renumber`` merges both). So merging again, after an
interruption or after more shards finished, copies only what is missing.

Before anything is written the databases must agree on the model's shape (layers, heads, hidden
size) and special tokens, with each other and with an existing ``DB``; otherwise the merge is refused
with one line naming them. A shard without examples (more processes than pairs) is passed over.
Exit status: 0 when everything is in ``DB``, 1 when some example failed (listed), 2 when refused,
130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from tqdm import tqdm

from app.database.database import DatabaseError, VliLmdb

RENUMBERED_FILE = "merge_renumbered.jsonl"


class MergeRefused(ValueError):
    """The databases cannot be merged; nothing was written. The message is one line."""


@dataclass
class MergeReport:
    merged: list[int] = field(default_factory=list)  # ids in the merged database
    already: list[tuple[str, int]] = field(default_factory=list)  # (database, id) there or a duplicate
    failed: dict[tuple[str, int], str] = field(default_factory=dict)  # (database, id) -> message
    empty: list[str] = field(default_factory=list)  # databases without examples, passed over

    def summary(self) -> str:
        return (f"{len(self.merged)} merged, {len(self.already)} already in the database or duplicates, "
                f"{len(self.failed)} failed")


def _open_source(path: str) -> Optional[VliLmdb]:
    """``path`` opened read-only, or None for a database without examples or pending records (a shard
    that got no line); DatabaseError for anything that is not a database."""
    try:
        return VliLmdb(path)
    except DatabaseError:
        if os.path.isfile(os.path.join(path, "data.mdb")):
            with VliLmdb(path, read_only=False) as db:
                if len(db) == 0 and not db.pending_keys():
                    return None
        raise


def _shape(db: VliLmdb) -> tuple:
    return db.n_layers, db.n_heads, db.hidden_size, tuple(db.special_tokens)


def _describe(shape: tuple) -> str:
    layers, heads, hidden, special = shape
    return f"{layers} layers, {heads} heads, hidden size {hidden}, special tokens {' '.join(special)}"


def check_shapes(sources: dict[str, VliLmdb], target: Optional[VliLmdb], into: str) -> None:
    """MergeRefused naming every database (grouped by shape) unless they all have the same shape."""
    groups: dict[tuple, list[str]] = {}
    for path, db in sources.items():
        groups.setdefault(_shape(db), []).append(path)
    if target is not None and target.n_layers is not None:
        groups.setdefault(_shape(target), []).append(f"{into} (the target)")
    if len(groups) > 1:
        raise MergeRefused("the databases disagree on the model's shape: " + "; ".join(
            f"{', '.join(paths)}: {_describe(shape)}" for shape, paths in groups.items()))


def _relative_key(path: str, into: str) -> str:
    """A source database as a path relative to ``into`` (still matches after both move together)."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(into)).replace(os.sep, "/")


def _load_renumbered(into: str) -> dict[tuple[str, int], int]:
    try:
        with open(os.path.join(into, RENUMBERED_FILE), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return {}
    return {(row["source"], int(row["id"])): int(row["new_id"]) for row in rows}


def _remember_renumbered(into: str, key: str, ex_id: int, new_id: int) -> None:
    with open(os.path.join(into, RENUMBERED_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps({"source": key, "id": ex_id, "new_id": new_id}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def merge(paths: list[str], into: str, renumber: bool = False, progress: bool = True, log=None) -> MergeReport:
    """Merge the databases ``paths`` into ``into`` (created when missing; see the module docstring)."""
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    if os.path.realpath(into) in {os.path.realpath(p) for p in paths}:
        raise MergeRefused(f"{into} is one of the databases to merge: give another --into")
    report = MergeReport()
    sources: dict[str, VliLmdb] = {}
    target = None
    try:
        for path in paths:
            db = _open_source(path)
            if db is None:
                report.empty.append(path)
            else:
                sources[path] = db
        if not sources:
            return report
        existing_target = os.path.isfile(os.path.join(into, "data.mdb"))
        if existing_target:
            target = VliLmdb(into, read_only=False)
        check_shapes(sources, target, into)
        if target is None:
            target = VliLmdb(into, read_only=False, special_tokens=next(iter(sources.values())).special_tokens)
        _copy_all(sources, target, into, renumber, progress, log, report)
    finally:
        for db in sources.values():
            db.close()
        if target is not None:
            target.close()
    return report


def _copy_all(sources: dict[str, VliLmdb], target: VliLmdb, into: str, renumber: bool, progress: bool, log,
              report: MergeReport) -> None:
    held = set(target.example_ids())
    hashes = {h: i for i in held if (h := target.stored_source(i)) is not None}
    renumbered = _load_renumbered(into) if renumber else {}
    # in id order (ties in the order given): the shards of one extraction interleave back into line order
    work = sorted(((ex_id, n, path) for n, (path, db) in enumerate(sources.items()) for ex_id in db.example_ids()))
    work = [(path, ex_id) for ex_id, _n, path in work]
    for path, ex_id in tqdm(work, desc="merging", unit="example", disable=not progress):
        source = sources[path]
        try:
            text = source.example(ex_id).text
            key = _relative_key(path, into)
            new_id = renumbered.get((key, ex_id)) if renumber else ex_id
            if new_id is not None and new_id in held:
                if target.example(new_id).text == text:
                    report.already.append((path, ex_id))
                    continue
                raise ValueError(f"example {new_id} is already in {into} with another text"
                                   + ("" if renumber else " (--renumber merges both)"))
            digest = source.stored_source(ex_id)
            if digest is not None and digest in hashes:
                report.already.append((path, ex_id))
                log(f"{path}: example {ex_id} is example {hashes[digest]} of {into} (same raw record): skipped")
                continue
            if new_id is None:
                new_id = target.reserve_example_id()
                _remember_renumbered(into, key, ex_id, new_id)
            target.import_example(source, ex_id, new_id)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one bad example never loses the others
            message = " ".join(str(e).split()) or type(e).__name__
            report.failed[(path, ex_id)] = message
            log(f"{path}: example {ex_id}: {message}")
            continue
        held.add(new_id)
        if digest is not None:
            hashes[digest] = new_id
        report.merged.append(new_id)


def main(argv=None, prog: str = "python -m app.database.merge") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Merge VL-InterpreT databases (e.g. the shards of a torchrun extraction) into one.")
    parser.add_argument("databases", nargs="+", help="the databases to merge (e.g. OUT/shard-*)")
    parser.add_argument("--into", required=True, help="the merged database (created when missing)")
    parser.add_argument("--renumber", action="store_true", help="give every example the next free id of --into "
                                                                 "(default: keep the ids)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)
    try:
        report = merge(args.databases, args.into, renumber=args.renumber, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("\ninterrupted: every example copied is stored; run the same command again to resume",
              file=sys.stderr)
        return 130
    except (MergeRefused, DatabaseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in report.empty:
        print(f"{path}: no examples, passed over", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    if report.failed:
        print("failed examples:", file=sys.stderr)
        for (path, ex_id), message in sorted(report.failed.items()):
            print(f"  {path} example {ex_id}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
