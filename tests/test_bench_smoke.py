"""Smoke test of the benchmarks: make_db, interactions and the token map fit run end to end on tiny shapes (no timings
asserted; the benchmarks only print figures)."""
from __future__ import annotations

import os
import subprocess
import sys

from helpers import faithfulness_aucs

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
    aucs = faithfulness_aucs("--quick")
    for method in ("attention", "rollout", "relevancy"):
        assert aucs[("positive", method)] < aucs[("positive", "random")], aucs
        assert aucs[("negative", method)] > aucs[("negative", "random")], aucs


def test_dataset_views_are_timed_over_a_database_of_12_by_12_heads(tmp_path):
    sys.path.insert(0, ROOT)
    from bench.dataset import VIEWS, build_views_db, view_costs  # noqa: PLC0415

    costs = view_costs(build_views_db(str(tmp_path / "db"), 6), repeat=2)  # what bench/scale.py prints
    assert (costs["examples"], costs["layers"], costs["heads"]) == (6, 12, 12)
    assert list(costs["views"]) == list(VIEWS) and all(p95 >= p50 > 0 for p50, p95 in costs["views"].values())


def test_interventions_bench_times_every_run_on_both_bundled_models():
    out = subprocess.run([sys.executable, "bench/interventions.py", "--reps", "1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    sys.path.insert(0, ROOT)
    from bench.interventions import RUNS  # noqa: PLC0415

    for model in ("-m vilt (shapes_vqa/vilt-shapes): 4 layers x 4 heads", "-m hf (shapes_vqa/llava-shapes)"):
        section = out.stdout.split(model, 1)[1].split("\n-m ", 1)[0]
        timed = [line.split() for line in section.splitlines()[1:] if line.strip()]
        assert [" ".join(words[:-2]) for words in timed] == list(RUNS), section
        assert all(float(words[-1]) >= float(words[-2]) >= 0 for words in timed), section
