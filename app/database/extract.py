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

Many GPUs and machines: the same module under ``torchrun``, one process per GPU::

    torchrun --nproc-per-node 8 [--nnodes 2 --node-rank R --master-addr HOST] \
        -m app.database.extract -m vilt CKPT --pairs pairs.jsonl --out OUT --device cuda

Launched by torchrun (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in the environment), rank ``r`` of
``w`` takes the lines ``k`` with ``(k - 1) % w == r`` into its own database ``OUT/shard-RRRRR-of-WWWWW``
(a normal VL-InterpreT database, with its own ``extract_runs.json``), under the ids a one-process run
would give them; ``python -m app.database.merge OUT/shard-* --into DB`` then makes one database.
Running the same command again (same number of processes) resumes every shard. ``first_id`` is
decided by rank 0 (``--first-id``, else the one ``OUT/extract_runs.json`` remembers for the pairs
file, else the id after every pairs file it remembers, 0 for a new ``OUT``) and sent to the others.
``--device cuda`` puts each rank on ``cuda:LOCAL_RANK``.

torchrun rather than accelerate: torchrun ships with torch (nothing to install or configure), and each
rank only needs its rank, its world size and two small exchanges, not accelerate's model wrapping,
mixed precision or data loaders. The exchanges go through torchrun's own key-value store (the
``env://`` rendezvous store), not a process group: (1) the ranks of several machines share no file
system, so rank 0 puts ``first_id`` there for the others, and (2) torchrun stops every rank as soon as
one exits non-zero, so every rank puts its counts there and waits for all of them (rank 0 prints the
totals) before exiting. A gloo process group would do the same with collectives, but its worker
threads sometimes abort the process at exit ("terminate called without an active exception") after
all the work is done, which torchrun reports as a failed run.

``--batch-size N`` (default 1: one pair at a time) hands the pairs to the model ``N`` at a time
(``VL_Model.data_setup_batch``: one record or one exception per pair, so a bad pair still fails alone);
skipped, failed and resumed lines, torchrun shards and the report are the same as with 1. Only a model
that batches on its own gains: ``-m hf`` generates a batch's answers together (left-padded) and takes
every record from one forward pass, each record being that of the pair run alone
(app/database/models/_hf_batch.py). Any other model, the ViLT adapter included, runs the pairs one by
one. The ViLT adapter keeps that loop: in a ViLT batch the images are padded to a common size and
``visual_embed`` draws padding patches (masked) into every shorter image's sequence, so each record would
have to drop them, its float sums would run over other lengths, and the gradient relevancy it stores
would need every pair's score backpropagated through the whole batch; one pair at a time, a ViLT record
is exactly what the app writes for that pair.

No ``--dtype``: half precision is the model's option (``-m hf CKPT dtype=bfloat16``), since bf16 or fp16
compute moves attention and hidden states by more than the float16 they are stored in, so such records
are not those of an fp32 run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from tqdm import tqdm

from app.database.models import ModelLoadError, load_model, run_data_setup
from app.database.models.vl_model import run_data_setup_batch

RUNS_FILE = "extract_runs.json"
SHARD_NAME = "shard-{rank:05d}-of-{world:05d}"
# The last exchange waits for the slowest rank: as long as an extraction may take.
EXCHANGE_TIMEOUT = datetime.timedelta(days=7)
REFUSED = -1  # the first_id rank 0 hands out when it refuses the run (its message says why)


class PairError(ValueError):
    """A line of the pairs file is not a usable pair."""


@dataclass
class ExtractReport:
    added: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # already in the database (resumed)
    failed: dict[int, str] = field(default_factory=dict)  # line number -> message

    def summary(self) -> str:
        return f"{len(self.added)} added, {len(self.skipped)} already in the database, {len(self.failed)} failed"


@dataclass(frozen=True)
class Launch:
    """Where torchrun put this process: global rank, number of processes, rank on this machine."""

    rank: int
    world: int
    local_rank: int

    def shard(self, out: str) -> str:
        return os.path.join(out, SHARD_NAME.format(rank=self.rank, world=self.world))


def torchrun_launch(environ=os.environ) -> Optional[Launch]:
    """The Launch torchrun describes in the environment, None when not launched by torchrun."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(name in environ for name in names):
        return None
    try:
        rank, world, local_rank = (int(environ[name]) for name in names)
    except ValueError:
        raise ValueError(f"torchrun's RANK, WORLD_SIZE, LOCAL_RANK are not integers: "
                         f"{', '.join(repr(environ[n]) for n in names)}") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is not in 0..WORLD_SIZE-1 ({world})")
    return Launch(rank, world, local_rank)


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


def model_params(params, device: Optional[str], launch: Optional[Launch]) -> list[str]:
    """The model's parameters with ``--device`` appended: under torchrun ``cuda`` is this rank's GPU,
    ``cuda:LOCAL_RANK`` (one process per GPU); any other device string is passed as given."""
    if device is None:
        return list(params)
    return [*params, f"cuda:{launch.local_rank}" if launch is not None and device == "cuda" else device]


def sharded_first_id(pairs_path: str, out: str, requested: Optional[int], n_lines: int) -> int:
    """Rank 0's ``first_id`` for a sharded run into the folder ``out`` (see the module docstring),
    remembered with the number of lines in ``out/extract_runs.json``; ValueError when refused."""
    if os.path.isfile(os.path.join(out, "data.mdb")):
        raise ValueError(f"{out} is a database; a torchrun extraction writes shard databases into a folder "
                         f"(OUT/shard-*): give a new or shard folder as --out")
    os.makedirs(out, exist_ok=True)
    runs = _load_runs(out)
    key = _run_key(pairs_path, out)
    if key in runs:
        remembered = int(runs[key]["first_id"])
        if requested is not None and requested != remembered:
            raise ValueError(f"{pairs_path} was extracted into {out} from id {remembered}; --first-id "
                             f"{requested} disagrees (remove {_runs_path(out)} to start over)")
        first_id = remembered
    elif requested is not None:
        first_id = requested
    else:  # after the ids of every pairs file extracted into these shards before
        first_id = max((int(r["first_id"]) + int(r.get("lines", 0)) for r in runs.values()), default=0)
    entry = {"first_id": first_id, "lines": max(n_lines, int(runs.get(key, {}).get("lines", 0)))}
    if runs.get(key) != entry:  # new, or the pairs file grew
        runs[key] = entry
        _save_runs(out, runs)
    return first_id


def extract(model, pairs_path: str, db, out: str, first_id: int | None = None, progress: bool = True,
            log=None, rank: int = 0, world: int = 1, batch_size: int = 1) -> ExtractReport:
    """Run ``model`` on every line of ``pairs_path`` into ``db`` (see the module docstring); with
    ``world`` > 1, only the lines ``k`` with ``(k - 1) % world == rank`` (a torchrun shard); with
    ``batch_size`` > 1, the pairs to run go to ``model.data_setup_batch`` that many at a time."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size {batch_size!r}: expected a positive integer")
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
    mine = [(number, line) for number, line in enumerate(lines, start=1) if (number - 1) % world == rank]
    desc = "extracting" if world == 1 else f"extracting (rank {rank} of {world})"
    bar = tqdm(mine, desc=desc, unit="pair", disable=not progress)
    queued = []  # (line number, ex_id, pair) waiting for the model, at most batch_size

    def fail(number: int, e: Exception) -> None:
        message = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, (PairError, ValueError, OSError)):
            message = f"{type(e).__name__}: {message}"
        report.failed[number] = message
        log(f"{pairs_path}:{number}: {message}")

    def run_queued() -> None:
        for (number, ex_id, _pair), result in zip(queued, _run_model(model, queued, batch_size)):
            try:
                if isinstance(result, BaseException):
                    raise result
                stored = db.add_record(result)
                report.added.append(ex_id if stored is None else int(stored))
                existing.add(ex_id)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one bad line never loses the others
                fail(number, e)
        queued.clear()

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
            queued.append((number, ex_id, pair))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one bad line never loses the others
            fail(number, e)
        if len(queued) == batch_size:
            run_queued()
    if queued:
        run_queued()
    bar.close()
    return report


def _run_model(model, queued: list, batch_size: int) -> list:
    """The model's record (or exception) for each queued ``(line number, ex_id, pair)``: one pair through
    ``run_data_setup`` with ``--batch-size 1`` (as always), else ``model.data_setup_batch``."""
    if batch_size == 1:
        (_number, ex_id, pair), = queued
        try:
            return [run_data_setup(model, ex_id, pair["image"], pair["text"], label=pair["label"])]
        except Exception as e:  # noqa: BLE001 - reported for its line
            return [e]
    return run_data_setup_batch(model, [(ex_id, pair["image"], pair["text"], pair["label"])
                                        for _number, ex_id, pair in queued])


def main(argv=None, prog: str = "python -m app.database.extract") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a live model over a JSON-lines file of (image, text[, label]) pairs into a database "
                    "(under torchrun: one shard database per process in the --out folder).",
    )
    parser.add_argument("-m", "--model", required=True, help="model module in app/database/models/ (e.g. vilt)")
    parser.add_argument("params", nargs="*", help="the model's parameters (for vilt: CHECKPOINT [DEVICE])")
    parser.add_argument("--pairs", required=True, help='JSON lines: {"image": PATH, "text": STR, "label": STR}')
    parser.add_argument("--out", required=True, help="database directory (created when missing); under "
                                                     "torchrun the folder of the shard databases")
    parser.add_argument("--first-id", type=int, default=None, help="example id of line 1 (default: next free)")
    parser.add_argument("--device", default=None,
                        help="torch device, passed as the model's last parameter (vilt: its DEVICE); "
                             "under torchrun 'cuda' means cuda:LOCAL_RANK")
    parser.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                        help="pairs run by the model at once (default 1: one at a time); a model without "
                             "batching of its own (vilt) still runs them one by one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)

    if not os.path.isfile(args.pairs):
        print(f"error: pairs file not found: {args.pairs}", file=sys.stderr)
        return 2
    try:
        launch = torchrun_launch()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if launch is None:
        return _extract_into(args, args.out, args.first_id, None)[0]
    return _run_rank(args, launch, _rank_store())


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _rank_store():
    """torchrun's key-value store (the agent's, or rank 0's outside torchrun's agent), under a prefix of
    this attempt: keys from an attempt torchrun restarted are not this one's."""
    import torch.distributed as dist  # noqa: PLC0415 - only under torchrun

    store, _rank, _world = next(dist.rendezvous("env://", timeout=EXCHANGE_TIMEOUT))
    return dist.PrefixStore(f"vl-interpret-extract/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _run_rank(args, launch: Launch, store) -> int:
    """One torchrun rank: agree on first_id, extract this rank's lines into its shard, then wait for
    every rank's counts and (rank 0) print the totals (see the module docstring for why)."""
    if launch.rank == 0:
        first_id = REFUSED
        try:
            with open(args.pairs, encoding="utf-8") as f:
                n_lines = len(f.read().splitlines())
            first_id = sharded_first_id(args.pairs, args.out, args.first_id, n_lines)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
        store.set("first_id", str(first_id))
    first_id = int(store.get("first_id"))  # waits for rank 0
    if first_id == REFUSED:
        if launch.rank != 0:
            print(f"rank {launch.rank}: rank 0 refused the run (see its message)", file=sys.stderr)
        return 2
    rc, report = _extract_into(args, launch.shard(args.out), first_id, launch)
    if rc == 130:
        return rc  # Ctrl-C reaches every rank: none waits for the others
    counts = [0, 0, 0, 1] if report is None else [len(report.added), len(report.skipped), len(report.failed), 0]
    store.set(f"counts/{launch.rank}", json.dumps(counts))
    keys = [f"counts/{rank}" for rank in range(launch.world)]
    store.wait(keys)  # torchrun stops the others when one exits non-zero
    if launch.rank == 0:
        added, skipped, failed, not_run = (sum(c) for c in zip(*(json.loads(store.get(k)) for k in keys)))
        line = f"all {launch.world} ranks: {added} added, {skipped} already in the shards, {failed} failed"
        if not_run:
            line += f"; {not_run} rank(s) could not run (see their messages)"
        print(line + f"; merge with: python -m app.database.merge {os.path.join(args.out, 'shard-*')} --into DB",
              file=sys.stderr)
    return rc


def _extract_into(args, out: str, first_id: Optional[int], launch: Optional[Launch]):
    """Load the model and extract into the database ``out``: (exit status, ExtractReport or None
    when the run could not start)."""
    who = "" if launch is None else f"rank {launch.rank}: "
    params = model_params(args.params, args.device, launch)
    from app.database.tsne import compile_in_background  # noqa: PLC0415 - keep `--help` fast
    compile_in_background()  # built while the model loads, so that the ETA never counts it
    try:
        model = load_model(args.model, params)
    except ModelLoadError as e:
        print(f"{who}error: {e}", file=sys.stderr)
        return 2, None
    from app.database.database import VliLmdb  # noqa: PLC0415 - keep `--help` fast

    db = VliLmdb(out, read_only=False)
    try:
        report = extract(model, args.pairs, db, out, first_id=first_id,
                         progress=not args.no_progress and (launch is None or launch.local_rank == 0),
                         rank=0 if launch is None else launch.rank, world=1 if launch is None else launch.world,
                         batch_size=args.batch_size)
    except KeyboardInterrupt:
        print(f"\n{who}interrupted: every finished line is stored; run the same command again to resume",
              file=sys.stderr)
        return 130, None
    except ValueError as e:
        print(f"{who}error: {e}", file=sys.stderr)
        return 2, None
    finally:
        db.close()
    print(who + report.summary(), file=sys.stderr)
    if report.failed:
        print(f"{who}failed lines:", file=sys.stderr)
        for number, message in sorted(report.failed.items()):
            print(f"  line {number}: {message}", file=sys.stderr)
        return 1, report
    return 0, report


if __name__ == "__main__":
    sys.exit(main())
