"""Batch extraction throughput, one process against torchrun with several (CPU here), and batch sizes.

    python bench/extract.py [--pairs 60] [--procs 1 2] [--batch-sizes 1 8] [--quick]

Runs the bundled model (shapes_vqa/vilt-shapes) over shapes_vqa/heldout/pairs.jsonl repeated to
``--pairs`` lines, once per process count: ``python -m app.database.extract`` for 1, ``torchrun
--nproc-per-node P --standalone -m app.database.extract`` for more (then the merge of the shards).
Prints examples per second over the whole command (start-up included), and without the start-up:
each command is run a second time, when every line is already stored, and that time is taken off.
torchrun gives each of its processes one thread (OMP_NUM_THREADS=1); the single process keeps
torch's default (one thread per core). Then the bundled generative model (shapes_vqa/llava-shapes,
``-m hf``) in one process, once per ``--batch-size``, timed the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ROOT, machine, scratch_dir  # noqa: E402

MODEL = os.path.join(ROOT, "shapes_vqa", "vilt-shapes")
GENERATIVE = os.path.join(ROOT, "shapes_vqa", "llava-shapes")
HELDOUT = os.path.join(ROOT, "shapes_vqa", "heldout", "pairs.jsonl")


def write_pairs(path: str, n: int) -> None:
    """The held-out pairs, image paths made absolute, repeated to ``n`` lines."""
    base = os.path.dirname(HELDOUT)
    with open(HELDOUT, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            pair = dict(pairs[i % len(pairs)])
            pair["image"] = os.path.join(base, pair["image"])
            f.write(json.dumps(pair) + "\n")


def command(procs: int, pairs: str, out: str, model: tuple = ("vilt", MODEL), batch_size: int = 1) -> list[str]:
    extract = ["-m", "app.database.extract", "-m", *model, "--pairs", pairs, "--out", out, "--no-progress",
               "--batch-size", str(batch_size)]
    if procs == 1:
        return [sys.executable, *extract]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--standalone", *extract]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=60, help="lines in the pairs file (default 60)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8],
                   help="batch sizes for the generative model (default 1 8)")
    p.add_argument("--quick", action="store_true", help="16 pairs")
    args = p.parse_args(argv)
    n = 16 if args.quick else args.pairs
    work = scratch_dir("vli-bench-extract-")
    pairs = os.path.join(work, "pairs.jsonl")
    write_pairs(pairs, n)
    print(machine())
    print(f"{n} pairs, model {os.path.relpath(MODEL, ROOT)}")
    print(f"{'processes':>9}  {'wall s':>7}  {'start-up s':>10}  {'ex/s':>6}  {'ex/s w/o start-up':>17}  {'merge s':>7}")
    for procs in args.procs:
        out = os.path.join(work, f"out-{procs}")
        cmd = command(procs, pairs, out)
        wall = timed(cmd)
        startup = timed(cmd)  # everything is stored: start-up, model load and the resume check only
        merge = ""
        if procs > 1:
            shards = sorted(os.path.join(out, name) for name in os.listdir(out) if name.startswith("shard-"))
            merge = f"{timed([sys.executable, '-m', 'app.database.merge', *shards, '--into', out + '-merged', '--no-progress']):7.1f}"
        print(f"{procs:>9}  {wall:7.1f}  {startup:10.1f}  {n / wall:6.2f}  {n / max(wall - startup, 1e-9):17.2f}  {merge:>7}")
    print(f"\n{n} pairs, model {os.path.relpath(GENERATIVE, ROOT)} (-m hf), one process")
    print(f"{'batch size':>10}  {'wall s':>7}  {'start-up s':>10}  {'ex/s':>6}  {'ex/s w/o start-up':>17}")
    for batch_size in args.batch_sizes:
        cmd = command(1, pairs, os.path.join(work, f"hf-batch-{batch_size}"), ("hf", GENERATIVE), batch_size)
        wall = timed(cmd)
        startup = timed(cmd)
        print(f"{batch_size:>10}  {wall:7.1f}  {startup:10.1f}  {n / wall:6.2f}  {n / max(wall - startup, 1e-9):17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
