"""Smoke test of the benchmarks: make_db, interactions and the token map fit run end to end on tiny shapes (no timings
asserted; the benchmarks only print figures)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_db_and_interactions_quick(tmp_path):
    db = str(tmp_path / "db")
    shape = ["--layers", "2", "--heads", "2", "--hidden", "16"]
    out = subprocess.run([sys.executable, "bench/make_db.py", db, "-n", "3", "--text", "6", "--grid", "3", "4",
                          "--image", "48", "--fast-tsne", "--quick", *shape],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "examples/s" in out.stdout and "MB/example" in out.stdout

    out = subprocess.run([sys.executable, "bench/interactions.py", "--db", db, "--quick", "--reps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("page load (replay)", "select another example", "click a text token", "click a head",
                 "hover a t-SNE point", "open the attention matrix"):
        assert name in out.stdout, out.stdout
    assert "ERRORS" not in out.stdout, out.stdout

    sys.path.insert(0, ROOT)
    from bench.scale import token_map_cost  # noqa: PLC0415

    cost = token_map_cost(db, max_tokens=20)  # the figures bench/scale.py prints for the token map
    assert cost["tokens"] == 20 and cost["fit_s"] > 0 and cost["peak_mb"] > 0


def test_faithfulness_quick_ranks_every_map_above_a_random_order():
    """On the bundled trained model, removing the patches a map calls relevant first hurts more than a
    random order (positive test), and removing the irrelevant ones first hurts less (negative)."""
    out = subprocess.run([sys.executable, "bench/faithfulness.py", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    aucs, direction = {}, None
    for line in out.stdout.splitlines():
        if line.startswith(("positive", "negative")):
            direction = line.split()[0]
        elif "AUC" in line:
            method, _, value = line.split()[:3]
            aucs[(direction, method)] = float(value)
    for method in ("attention", "rollout", "relevancy"):
        assert aucs[("positive", method)] < aucs[("positive", "random")], out.stdout
        assert aucs[("negative", method)] > aucs[("negative", "random")], out.stdout
